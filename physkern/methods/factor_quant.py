"""Codebook / scalar quantization OF the factors of a factorized layer (MPO cores, low-rank
factors): a recipe's `"factorize": {..., "quantize": {<a quantizer config>}}` (issue 21.2).

The storage (QuantizedFactor, QuantizedMPOLinear, QuantizedLowRankLinear, the 2-D view a factor
is quantized as) lives in physkern.research.quantized_factors; this file is the config side:
which quantizer configs a factor takes, how a bits target converts with them, and the function
that quantizes a float MPOLinear / LowRankLinear's factors through the method registry.

Quantizers that need calibration (codebook calibrate / error_feedback, GPTQ) are refused: a
factor has no input activations of its own. Rotations are refused too (not stored there).
"""
from __future__ import annotations

from torch import nn

from ..research.mpo import MPOLinear
from ..research.prune import LowRankLinear
from ..research.quantized_factors import (QuantizedFactor, QuantizedLowRankLinear,
                                          QuantizedMPOLinear, matrix_shape)


def quantize_tensor(t, cfg) -> QuantizedFactor:
    """Factor `t` (its 2-D view, float32) quantized with quantizer config `cfg` (no
    calibration: check_factor_config first)."""
    from .registry import quantizer_for
    w = t.detach().float().reshape(matrix_shape(t.shape)).contiguous()
    return QuantizedFactor(quantizer_for(cfg)(w, cfg, None, None), t.shape)


def check_factor_config(cfg, where: str = "factorize.quantize"):
    """A quantizer config usable on factors (an object or its recipe dict {"method": ...}):
    no calibration (a factor has no input activations), no rotation, no layer selection.
    Returns the config object; ValueError naming `where` and the key otherwise."""
    from dataclasses import fields
    from .registry import CONFIG_CLASSES, config_class
    if isinstance(cfg, dict):  # physkern.config.config_from_dict's rules (it imports methods/)
        d = dict(cfg)
        try:
            cls = config_class(d.pop("method", None))
            unknown = set(d) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown {cls.method} config keys {sorted(unknown)}; valid: "
                                 f"{sorted(f.name for f in fields(cls))}")
            if d.get("overrides"):
                raise ValueError("overrides: not supported")
            cfg = cls(**d)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if type(cfg) not in CONFIG_CLASSES.values():
        raise ValueError(f"{where}: must be a quantizer config (an object with 'method' one of "
                         f"{sorted(CONFIG_CLASSES)}), got {type(cfg).__name__}")
    if getattr(cfg, "needs_calibration", False) or getattr(cfg, "needs_hessian", False):
        raise ValueError(f"{where}: {cfg.method} with calibration (calibrate / error_feedback / "
                         "a Hessian) is not supported: a factor has no input activations; set "
                         "calibrate=false, error_feedback=false or use codebook / rtn")
    if getattr(cfg, "rotation", "none") != "none":
        raise ValueError(f"{where}.rotation: must be 'none' for factors, got {cfg.rotation!r}")
    if cfg.layers is not None or cfg.overrides:
        raise ValueError(f"{where}.layers / overrides: not supported (the factorize config "
                         "selects the layers)")
    return cfg


def with_quantize(d: dict, cfg) -> dict:
    """A factorization config's to_dict with its `quantize` as a recipe dict; the key is left
    out when there is none (recipes and saved files without it stay as they were)."""
    d = dict(d)
    d.pop("quantize", None)
    if cfg is not None:
        d["quantize"] = cfg.to_dict()
    return d


def nominal_value_bits(cfg) -> float:
    """Index bits per stored value of a quantizer config: stages * ceil(log2 K) / d for
    codebooks, `bits` for scalar grids. Codebooks and scales come on top (the accounting
    counts them): this is what a factorize bits target converts with."""
    from ..quant.packing import index_bits
    if hasattr(cfg, "k") and hasattr(cfg, "block_dim"):
        return getattr(cfg, "stages", 1) * index_bits(cfg.k) / cfg.block_dim
    return float(cfg.bits)


def quantize_factors(mod: nn.Module, cfg, where: str = "factorize.quantize") -> nn.Module:
    """The quantized counterpart of an MPOLinear / LowRankLinear (its factors quantized with
    `cfg`, bias and MPO mode kept). ValueError naming `where` when the quantizer refuses a
    factor's shape (e.g. block_dim not dividing its column count)."""
    def q(name, t):
        try:
            return quantize_tensor(t, cfg)
        except ValueError as exc:
            raise ValueError(f"{where}: factor {name} (2-D view {list(matrix_shape(t.shape))}): "
                             f"{exc}") from None
    bias = None if mod.bias is None else mod.bias.detach()
    if isinstance(mod, MPOLinear) and not isinstance(mod, QuantizedMPOLinear):
        out = QuantizedMPOLinear([q(f"cores.{k}", g) for k, g in enumerate(mod.cores)], bias)
        out.mode = mod.mode
    elif isinstance(mod, LowRankLinear) and not isinstance(mod, QuantizedLowRankLinear):
        out = QuantizedLowRankLinear(q("up", mod.up), q("down", mod.down), bias)
    else:
        raise ValueError(f"{where}: expected a float MPOLinear or LowRankLinear, got "
                         f"{type(mod).__name__}")
    if hasattr(mod, "factorization_info"):
        out.factorization_info = dict(mod.factorization_info)
    return out
