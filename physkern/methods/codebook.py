"""Codebook (k-means vector) quantization: CodebookConfig and its registered quantizer.

The algorithms live in physkern.quant.codebook (k-means, error feedback over d-dim vectors,
codebook refinement); this file is the config and the glue the registry calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from ..quant.format import SCOPES
from ..rotation import check_config_rotation
from ._base import (MAX_SEED, VALID_BLOCK_DIMS, _check_bool, _check_float, _check_int,
                    _check_selection, _Selectable)
from .registry import register_method


@dataclass
class CodebookConfig(_Selectable):
    """k-means vector (codebook) quantization.

    k:          centroids per codebook (>= 1; larger than the blocks in a scope is an error)
    block_dim:  d, weights per vector (1, 2, 4, 8, 16); must divide in_features
    scope:      "row" (one codebook per output row, the seeds), "group" (group_size consecutive
                rows share one), "layer" (one codebook for the layer), "shared" (one codebook
                for every layer of a share group, stored once: physkern.shared_codebook)
    share:      scope="shared" only: "type" (the layers with the same name after the block
                index, e.g. every "mlp.gate_proj", share one) or "model" (every layer quantized
                with this config shares one); per-row scales stay per layer
    group_size: rows per codebook for scope="group"
    stages:     residual stages (each quantizes the previous stages' residual)
    scales:     "auto" (per-row scales for group/layer scope, none for row scope), "none", "row",
                or "columns" (one scale per row per `scale_group` input columns)
    calibrate:  weight k-means by E[x_j^2] of each input dimension (from calibration text)
    error_feedback: GPTQ-style error feedback over d-dim vectors (GPTVQ); needs calibration
    iters, tol: Lloyd iterations and relative tolerance on the objective
    max_fit_blocks: fit centroids on a seeded sample of at most this many blocks per scope
                (then assign all); None = all blocks. scope="shared": about this many blocks
                pooled over the group's layers (physkern.shared_codebook); must be >= k
    refine_steps: Adam steps re-fitting codebooks and scales on the layer's output loss after
                error feedback (indices fixed; kept only if the loss falls); 0 = off
    init:       "kmeans++" (seeded D^2 sampling) or "random" (seeded sample of distinct blocks);
                "auto" uses k-means++ up to k=1024 and random beyond (k-means++ is O(k) passes)
    rotation:   "none" or "hadamard": quantize W R under the rotated statistics R^T G R, with R
                the seeded (seed = `seed`) permutation + signs + 64-block Hadamard of
                physkern.rotation, stored as that seed (no bits); the layer computes (x R) Q^T.
                With calibrate it needs X^T X (needs_hessian is then True)
    outliers:   fraction in [0, 1) of each row's weights kept as sparse corrections after
                quantization (physkern.quant.outliers: round(fraction x in_features) per row,
                chosen by |error| x sqrt(diag X^T X), values the least-squares correction under
                X^T X; an int16/int32 column + an fp16 value each, counted in bits); 0 = off
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
    rotation: str = "none"
    share: Optional[str] = None
    outliers: float = 0.0
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "codebook"

    def __post_init__(self):
        _check_selection(self)
        _check_int("k", self.k, 1, 65536)
        if self.block_dim not in VALID_BLOCK_DIMS:
            raise ValueError(f"block_dim must be one of {VALID_BLOCK_DIMS}, got {self.block_dim!r}")
        if self.scope not in CONFIG_SCOPES:
            raise ValueError(f"scope must be one of {CONFIG_SCOPES}, got {self.scope!r}")
        _check_share(self)
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
        _check_float("outliers", self.outliers, 0, 1, lo_open=False)
        _check_float("tol", self.tol, 0)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_bool("calibrate", self.calibrate)
        _check_bool("error_feedback", self.error_feedback)
        _check_int("refine_steps", self.refine_steps, 0)
        check_config_rotation(self)
        if self.refine_steps and not self.error_feedback:
            raise ValueError("refine_steps needs error_feedback=True (it uses X^T X)")
        if self.refine_steps and self.scope == "shared":
            raise ValueError("refine_steps must be 0 with scope='shared' (refining the codebook "
                             "on one layer's loss would change it for every layer of its group)")

    @property
    def needs_calibration(self) -> bool:
        return self.calibrate

    @property
    def needs_hessian(self) -> bool:
        # a rotation's calibrated importance is the diagonal of R^T G R: it needs all of G
        return self.error_feedback or (self.calibrate and self.rotation != "none")

    def storage_probe(self) -> "CodebookConfig":
        """Same storage format, no calibration, no Lloyd iterations (physkern.research.alloc's bit count)."""
        return replace(self, calibrate=False, error_feedback=False, iters=0, init="random",
                       refine_steps=0, layers=None, overrides={})

    def to_dict(self) -> dict:
        """_Selectable.to_dict without `rotation` when it is "none": the dicts (layer recipes in
        saved models, sweep point keys) of every unrotated config stay as they were before the
        field existed, so existing results still resume."""
        from ..rotation import config_dict_without_default_rotation
        d = config_dict_without_default_rotation(super().to_dict())
        if d.get("share") is None:   # likewise: dicts of configs without sharing unchanged
            d.pop("share", None)
        if d.get("outliers") == 0:   # likewise without outliers
            d.pop("outliers", None)
        return d

    def effective_scales(self) -> str:
        if self.scales == "auto":
            return "none" if self.scope == "row" else "row"
        return self.scales

    def storage_scope(self) -> str:
        """The scope each layer's QuantizedWeight has: a shared codebook is stored per layer as
        a layer-scope codebook [S, 1, K, d] (the same tensor in every layer of the group)."""
        return "layer" if self.scope == "shared" else self.scope


SHARES = ("type", "model")
CONFIG_SCOPES = SCOPES + ("shared",)


def _check_share(cfg: CodebookConfig) -> None:
    """`share` is set exactly when scope is "shared", to one of SHARES."""
    if cfg.scope == "shared":
        if cfg.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES} with scope='shared', got "
                             f"{cfg.share!r}")
    elif cfg.share is not None:
        raise ValueError(f"share is only used with scope='shared' (scope={cfg.scope!r}); "
                         f"allowed: null, or one of {SHARES} with scope='shared'")


@register_method(CodebookConfig)
def quantize_codebook_weight(weight, cfg: CodebookConfig, m2=None, gram=None, shared=None):
    """k-means codebooks (weighted by m2 when calibrated); with error_feedback the GPTQ-style
    loop over d-dim vectors on gram, then optional codebook refinement.

    shared: for scope="shared", the group's fitted physkern.shared_codebook.SharedCodebook
    (physkern.quantize fits it over every layer of the group first); the layer then only
    assigns against it (with error feedback when configured) and holds that very tensor."""
    from ..quant.codebook import (quantize_codebook, quantize_codebook_error_feedback,
                                  refine_codebooks)
    from ..rotation import config_rotation, rotate_problem
    original = (weight, m2, gram)   # the outliers correct the effective (unrotated) weight
    rotation = config_rotation(cfg, weight.shape[1])
    if rotation is not None:
        weight, m2, gram = rotate_problem(weight, m2 if cfg.calibrate else None, gram, rotation)
    if (cfg.scope == "shared") != (shared is not None):
        raise ValueError(
            "scope='shared' needs its group's codebook, fitted over all of the group's layers "
            "before any is quantized: physkern.quantize does that in memory (`physkern "
            "quantize --in-memory`); streaming or one-layer quantization cannot"
            if shared is None else f"shared: a shared codebook was given for scope={cfg.scope!r}")
    fixed = None if shared is None else shared.codebooks
    common = dict(k=cfg.k, block_dim=cfg.block_dim, scope=cfg.storage_scope(),
                  group_size=cfg.group_size, stages=cfg.stages,
                  scales=cfg.effective_scales(), scale_group=cfg.scale_group,
                  iters=cfg.iters, tol=cfg.tol, seed=cfg.seed, init=cfg.init,
                  codebook_dtype=cfg.codebook_dtype, max_fit_blocks=cfg.max_fit_blocks)
    if cfg.error_feedback:
        qw = quantize_codebook_error_feedback(weight, gram, percdamp=cfg.percdamp,
                                              codebooks=fixed, **common)
        qw = refine_codebooks(qw, weight, gram, cfg.refine_steps)
    else:
        qw = quantize_codebook(weight, input_importance=m2 if cfg.calibrate else None,
                               codebooks=fixed, **common)
    if shared is not None:   # the group's one tensor (not a copy), and its name
        qw = replace(qw, codebooks=shared.codebooks, shared=shared.name)
    # the rotated basis' Q, then R attached: qw.dequantize() is the effective Q R^T
    qw = qw if rotation is None else replace(qw, rotation=rotation)
    if cfg.outliers:
        from ..quant.outliers import fit_outliers, per_row_count
        w0, m2_0, gram0 = original
        n = per_row_count(cfg.outliers, w0.shape[1])
        qw = replace(qw, outliers=fit_outliers(
            w0, qw.dequantize(), n, gram=gram0, m2=m2_0 if cfg.calibrate else None,
            percdamp=cfg.percdamp))
    return qw
