"""What every method's config shares: `layers` glob patterns, `overrides`, value checks.

Every config has `layers` (glob patterns over layer names; None = every decoder linear layer,
i.e. all linear layers inside the transformer blocks) and `overrides` (pattern -> config for
the layers it matches; the first matching pattern wins). Configs validate themselves on
construction, so bad values fail before any work starts.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, fields
from typing import Optional

VALID_BLOCK_DIMS = (1, 2, 4, 8, 16)


def _check_int(name: str, value, lo: int, hi: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or \
            (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer in {rng}, got {value!r}")


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


def _check_float(name: str, value, lo: float, hi: Optional[float] = None,
                 lo_open: bool = True, hi_open: bool = True) -> None:
    """A finite real number in the interval; bools and NaN/Inf are rejected."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > lo if lo_open else value >= lo) and \
        (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}" \
              f"{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false (a bool), got {value!r}")


def _check_selection(cfg) -> None:
    """Normalise and validate `layers` (one glob string or a list of them) and `overrides`
    (dict of glob pattern -> config object). A single string is ONE pattern, never iterated
    per character."""
    layers = cfg.layers
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers or \
                not all(isinstance(p, str) and p for p in layers):
            raise ValueError(f"layers must be None (every decoder linear layer), a glob pattern "
                             f"string or a non-empty list of non-empty pattern strings, got "
                             f"{cfg.layers!r}")
        layers = list(layers)
    cfg.layers = layers
    overrides = cfg.overrides
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of glob pattern -> config, got "
                         f"{type(overrides).__name__} {overrides!r}")
    for pattern, sub in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"overrides: keys must be non-empty glob pattern strings, got "
                             f"{pattern!r}")
        if not isinstance(sub, _Selectable):
            from .registry import CONFIG_CLASSES
            names = [c.__name__ for c in CONFIG_CLASSES.values()]
            raise ValueError(f"overrides[{pattern!r}] must be a {', '.join(names[:-1])} or "
                             f"{names[-1]} (in a recipe JSON: an object with a 'method'), got "
                             f"{type(sub).__name__}")
    cfg.overrides = overrides


@dataclass
class _Selectable:
    def applies_to(self, name: str) -> bool:
        pats = getattr(self, "layers", None)
        return pats is None or any(fnmatch.fnmatchcase(name, p) for p in pats)

    def for_layer(self, name: str):
        """The config that governs layer `name` (an override, or self)."""
        for pattern, cfg in (getattr(self, "overrides", None) or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                return cfg
        return self

    def storage_probe(self):
        """A config with the same storage format (hence the same stored bits for a shape) that
        needs no calibration and runs fast: physkern.research.alloc counts an option's bits with it."""
        from dataclasses import replace
        return replace(self, layers=None, overrides={})

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "overrides":
                v = {k: c.to_dict() for k, c in (v or {}).items()}
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def _check_scalar_grid(cfg) -> None:
    """The fields RTN and GPTQ share: selection, bits in [2, 8], group_size, symmetric."""
    _check_selection(cfg)
    _check_int("bits", cfg.bits, 2, 8)
    if cfg.group_size is not None:
        _check_int("group_size", cfg.group_size, 1)
    _check_bool("symmetric", cfg.symmetric)
