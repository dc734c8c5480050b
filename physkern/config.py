"""Quantization configs: small dataclasses in the manner of torchao's `quantize_(model, Config)`.

Each method's config lives with its quantizer in physkern/methods/ (codebook.py, scalar.py,
gptq.py; registered in physkern.methods.registry); this module re-exports them, so
`from physkern.config import CodebookConfig` keeps working, and reads configs from dicts.

Every config has `layers` (glob patterns over layer names; None = every decoder linear layer,
i.e. all linear layers inside the transformer blocks) and `overrides` (pattern -> config for
the layers it matches; the first matching pattern wins). Configs validate themselves on
construction, so bad values fail before any work starts.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Union

from .methods import CONFIG_CLASSES, CodebookConfig, GPTQConfig, ScalarConfig, config_class
from .methods._base import (MAX_SEED, VALID_BLOCK_DIMS, _check_bool, _check_float,  # noqa: F401
                            _check_int, _check_selection, _Selectable)

__all__ = ["CodebookConfig", "ScalarConfig", "GPTQConfig", "AnyConfig", "CONFIG_CLASSES",
           "config_from_dict", "MAX_SEED", "VALID_BLOCK_DIMS"]

AnyConfig = Union[CodebookConfig, ScalarConfig, GPTQConfig]


def config_from_dict(d: dict) -> AnyConfig:
    """Inverse of `to_dict` (used by recipe files and saved models)."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be an object with a 'method' key, got {d!r}")
    d = dict(d)
    method = d.pop("method", None)
    cls = config_class(method)
    if d.get("overrides"):
        if not isinstance(d["overrides"], dict):
            raise ValueError(f"overrides must be an object of glob pattern -> config, got "
                             f"{d['overrides']!r}")
        d["overrides"] = {k: config_from_dict(v) for k, v in d["overrides"].items()}
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {method} config keys {sorted(unknown)}; valid: {sorted(known)}")
    return cls(**d)
