"""The registry of quantization methods (the torchao pattern): a config class -> its quantizer.

Each method lives in one file of physkern/methods/ with its config dataclass and a function
decorated with `@register_method(ThatConfig)`:

    @register_method(CodebookConfig)
    def quantize_codebook_weight(weight, cfg, m2, gram) -> QuantizedWeight: ...

weight is the float32 [out, in] weight; m2 the [in] E[x_j^2] of the layer's input and gram the
[in, in] X^T X (each None unless the config's `needs_calibration` / `needs_hessian` asks for it:
physkern.api's calibration hooks read those two declarations and nothing else).
"""
from __future__ import annotations

from typing import Callable

QUANTIZERS: dict[type, Callable] = {}      # config class -> quantizer
CONFIG_CLASSES: dict[str, type] = {}       # config.method ("codebook", "rtn", ...) -> class


def register_method(config_cls: type) -> Callable:
    """Decorator: register `fn(weight, cfg, m2, gram) -> QuantizedWeight` as the quantizer of
    `config_cls` (which must have a unique string attribute `method`)."""
    method = getattr(config_cls, "method", None)
    if not isinstance(method, str) or not method:
        raise TypeError(f"{config_cls.__name__} needs a class attribute `method` (a string)")
    if CONFIG_CLASSES.get(method, config_cls) is not config_cls:
        raise ValueError(f"method {method!r} is already registered by "
                         f"{CONFIG_CLASSES[method].__name__}")

    def decorator(fn: Callable) -> Callable:
        QUANTIZERS[config_cls] = fn
        CONFIG_CLASSES[method] = config_cls
        return fn
    return decorator


def quantizer_for(cfg) -> Callable:
    """The registered quantizer of `cfg`'s class (or of its nearest registered base class)."""
    for cls in type(cfg).__mro__:
        if cls in QUANTIZERS:
            return QUANTIZERS[cls]
    raise ValueError(f"no quantization method registered for {type(cfg).__name__} (registered: "
                     f"{', '.join(sorted(CONFIG_CLASSES))})")


def config_class(method: str) -> type:
    """The config class registered under `method`; ValueError listing the valid ones."""
    if method not in CONFIG_CLASSES:
        raise ValueError(f"method must be one of {sorted(CONFIG_CLASSES)}, got {method!r}")
    return CONFIG_CLASSES[method]
