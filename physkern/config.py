"""Quantization configs: small dataclasses in the manner of torchao's `quantize_(model, Config)`.

Every config has `layers` (glob patterns over layer names; None = every decoder linear layer,
i.e. all linear layers inside the transformer blocks) and `overrides` (pattern -> config for
the layers it matches; the first matching pattern wins). Configs validate themselves on
construction, so bad values fail before any work starts.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence, Union

from .quant.format import SCOPES

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
        if not isinstance(sub, (CodebookConfig, ScalarConfig, GPTQConfig)):
            raise ValueError(f"overrides[{pattern!r}] must be a CodebookConfig, ScalarConfig or "
                             f"GPTQConfig (in a recipe JSON: an object with a 'method'), got "
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

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "overrides":
                v = {k: c.to_dict() for k, c in (v or {}).items()}
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


@dataclass
class CodebookConfig(_Selectable):
    """k-means vector (codebook) quantization.

    k:          centroids per codebook (>= 1; larger than the blocks in a scope is an error)
    block_dim:  d, weights per vector (1, 2, 4, 8, 16); must divide in_features
    scope:      "row" (one codebook per output row, the seeds), "group" (group_size consecutive
                rows share one), "layer" (one codebook for the layer)
    group_size: rows per codebook for scope="group"
    stages:     residual stages (each quantizes the previous stages' residual)
    scales:     "auto" (per-row scales for group/layer scope, none for row scope), "none", "row",
                or "columns" (one scale per row per `scale_group` input columns)
    calibrate:  weight k-means by E[x_j^2] of each input dimension (from calibration text)
    error_feedback: GPTQ-style error feedback over d-dim vectors (GPTVQ); needs calibration
    iters, tol: Lloyd iterations and relative tolerance on the objective
    max_fit_blocks: fit centroids on a seeded sample of at most this many blocks per scope
                (then assign all); None = all blocks
    refine_steps: Adam steps re-fitting codebooks and scales on the layer's output loss after
                error feedback (indices fixed; kept only if the loss falls); 0 = off
    init:       "kmeans++" (seeded D^2 sampling) or "random" (seeded sample of distinct blocks);
                "auto" uses k-means++ up to k=1024 and random beyond (k-means++ is O(k) passes)
    """
    k: int = 256
    block_dim: int = 4
    scope: str = "row"
    group_size: Optional[int] = None
    stages: int = 1
    scales: str = "auto"
    scale_group: Optional[int] = None
    calibrate: bool = True
    error_feedback: bool = False
    iters: int = 25
    tol: float = 1e-4
    init: str = "auto"
    max_fit_blocks: Optional[int] = 65536
    seed: int = 0
    codebook_dtype: str = "float16"
    percdamp: float = 0.01
    refine_steps: int = 0
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "codebook"

    def __post_init__(self):
        _check_selection(self)
        _check_int("k", self.k, 1, 65536)
        if self.block_dim not in VALID_BLOCK_DIMS:
            raise ValueError(f"block_dim must be one of {VALID_BLOCK_DIMS}, got {self.block_dim!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "group":
            if self.group_size is None:
                raise ValueError("scope='group' needs group_size (rows per codebook)")
            _check_int("group_size", self.group_size, 1)
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with scope='group' (scope={self.scope!r})")
        _check_int("stages", self.stages, 1, 8)
        if self.scales not in ("auto", "none", "row", "columns"):
            raise ValueError(f"scales must be 'auto', 'none', 'row' or 'columns', got {self.scales!r}")
        if self.scales == "columns":
            if self.scale_group is None:
                raise ValueError("scales='columns' needs scale_group (input columns per scale)")
            _check_int("scale_group", self.scale_group, 1)
        _check_int("iters", self.iters, 0)
        if self.max_fit_blocks is not None:
            _check_int("max_fit_blocks", self.max_fit_blocks, 1)
        if self.init not in ("auto", "kmeans++", "random"):
            raise ValueError(f"init must be 'auto', 'kmeans++' or 'random', got {self.init!r}")
        if self.codebook_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"codebook_dtype must be float16, bfloat16 or float32, got "
                             f"{self.codebook_dtype!r}")
        if self.error_feedback and not self.calibrate:
            raise ValueError("error_feedback=True needs calibrate=True (it uses the Hessian X^T X)")
        _check_float("percdamp", self.percdamp, 0, 1)
        _check_float("tol", self.tol, 0)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_bool("calibrate", self.calibrate)
        _check_bool("error_feedback", self.error_feedback)
        _check_int("refine_steps", self.refine_steps, 0)
        if self.refine_steps and not self.error_feedback:
            raise ValueError("refine_steps needs error_feedback=True (it uses X^T X)")

    @property
    def needs_calibration(self) -> bool:
        return self.calibrate

    @property
    def needs_hessian(self) -> bool:
        return self.error_feedback

    def effective_scales(self) -> str:
        if self.scales == "auto":
            return "none" if self.scope == "row" else "row"
        return self.scales


@dataclass
class ScalarConfig(_Selectable):
    """Round-to-nearest on a uniform grid (2-8 bits).

    group_size: input columns per scale (None = one scale per output channel)
    symmetric:  zero at the grid's mid-point (no offsets stored) instead of min/max affine
    per_tensor: one scale for the whole tensor (the seeds' "uniform 4-bit" strawman)
    """
    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    per_tensor: bool = False
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "rtn"
    needs_calibration = False
    needs_hessian = False

    def __post_init__(self):
        _check_selection(self)
        _check_int("bits", self.bits, 2, 8)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1)
        _check_bool("symmetric", self.symmetric)
        _check_bool("per_tensor", self.per_tensor)
        if self.per_tensor and self.group_size is not None:
            raise ValueError("per_tensor=True and group_size are exclusive")


@dataclass
class GPTQConfig(_Selectable):
    """GPTQ on a scalar grid (Frantar et al. 2022): Hessian error feedback, lazy batches.

    act_order: quantize columns in order of decreasing Hessian diagonal (groups stay static)
    """
    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "gptq"
    needs_calibration = True
    needs_hessian = True

    def __post_init__(self):
        _check_selection(self)
        _check_int("bits", self.bits, 2, 8)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1)
        _check_bool("symmetric", self.symmetric)
        _check_bool("act_order", self.act_order)
        _check_float("percdamp", self.percdamp, 0, 1)
        _check_int("blocksize", self.blocksize, 1)


AnyConfig = Union[CodebookConfig, ScalarConfig, GPTQConfig]
CONFIG_CLASSES = {c.method: c for c in (CodebookConfig, ScalarConfig, GPTQConfig)}


def config_from_dict(d: dict) -> AnyConfig:
    """Inverse of `to_dict` (used by recipe files and saved models)."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be an object with a 'method' key, got {d!r}")
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ValueError(f"method must be one of {sorted(CONFIG_CLASSES)}, got {method!r}")
    if d.get("overrides"):
        if not isinstance(d["overrides"], dict):
            raise ValueError(f"overrides must be an object of glob pattern -> config, got "
                             f"{d['overrides']!r}")
        d["overrides"] = {k: config_from_dict(v) for k, v in d["overrides"].items()}
    cls = CONFIG_CLASSES[method]
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {method} config keys {sorted(unknown)}; valid: {sorted(known)}")
    return cls(**d)
