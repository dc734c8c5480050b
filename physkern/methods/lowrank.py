"""Truncated-SVD factorization of chosen layers: SVDConfig and its registered factorizer.

The layer becomes a physkern.research.prune.LowRankLinear (up [out, r] @ down [r, in], stored
at `dtype`, counted by the accounting), the baseline MPO is compared with at equal stored bits.
With weighted=true the rank-r factors minimise the activation-weighted error
tr((W - W') H (W - W')^T), H = X^T X of the layer's input from calibration text (SVD-LLM's
whitening: SVD of W L with H + damping = L L^T, then down = V_r^T L^{-1}); else the plain
Frobenius-optimal truncated SVD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ._base import _check_bool, _check_float, _check_int, _check_selection, _Selectable
from .factor_quant import check_factor_config, nominal_value_bits, with_quantize
from .factorized import DTYPES, register_factorization


@dataclass
class SVDConfig(_Selectable):
    """Truncated SVD of each selected layer at a rank or a bits target.

    rank:     rank r (give rank or bits, not both)
    bits:     stored bits per weight of the two factors: the largest r with
              r * (out + in) * width <= bits * out * in (width = dtype's bits)
    weighted: activation-weighted (whitened) SVD from calibration X^T X
    percdamp: damping of H for the Cholesky factor (fraction of its mean diagonal)
    dtype:    storage dtype of the factors: float16, bfloat16 or float32
    quantize: None, or a quantizer config (object or recipe dict) the factors up / down are then
              quantized with (physkern.methods.factor_quant; no calibration); a bits target
              then counts its index bits per value (factor_quant.nominal_value_bits)
    layers:   glob patterns of the decoder linear layers to factorize (None = all)
    """
    rank: Optional[int] = None
    bits: Optional[float] = None
    weighted: bool = False
    percdamp: float = 0.01
    dtype: str = "float16"
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)
    quantize: Optional[object] = None

    method = "svd"

    def __post_init__(self):
        _check_selection(self)
        if self.overrides:
            raise ValueError("svd: overrides are not supported")
        if (self.rank is None) == (self.bits is None):
            raise ValueError(f"svd: give exactly one of rank or bits (stored bits per weight), "
                             f"got rank={self.rank!r}, bits={self.bits!r}")
        if self.rank is not None:
            _check_int("rank", self.rank, 1)
        if self.bits is not None:
            _check_float("bits", self.bits, 0)
        _check_bool("weighted", self.weighted)
        _check_float("percdamp", self.percdamp, 0, 1, lo_open=False)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize is not None:
            self.quantize = check_factor_config(self.quantize)

    @property
    def needs_calibration(self) -> bool:
        return self.weighted

    def to_dict(self) -> dict:
        return with_quantize(super().to_dict(), self.quantize)

    def rank_for(self, out_features: int, in_features: int) -> int:
        full = min(out_features, in_features)
        if self.rank is not None:
            return min(self.rank, full)
        width = DTYPES[self.dtype].itemsize * 8 if self.quantize is None else \
            nominal_value_bits(self.quantize)
        r = int(self.bits * out_features * in_features // (width * (out_features + in_features)))
        if r < 1:
            raise ValueError(f"svd: bits={self.bits} is below rank 1 for a [{out_features}, "
                             f"{in_features}] weight ({width * (out_features + in_features) / (out_features * in_features):.4g} bits/weight)")
        return min(r, full)


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int,
                     percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) minimising tr((W - up down) H (W - up down)^T) over rank r,
    H = gram + percdamp * mean(diag) * I (float64 inside, float32 out)."""
    W = weight.detach().double()
    H = gram.detach().double()
    H = 0.5 * (H + H.t())
    n = H.shape[0]
    H = H + (percdamp * float(torch.diagonal(H).mean()) + 1e-12) * torch.eye(n, dtype=H.dtype)
    L = torch.linalg.cholesky(H)                                   # H = L L^T
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    root = S[:rank].sqrt()
    up = U[:, :rank] * root
    # down = sqrt(S) V^T L^{-1}: solve L^T X^T = (sqrt(S) V^T)^T
    down = torch.linalg.solve_triangular(L.t(), (root[:, None] * Vh[:rank]).t(), upper=True).t()
    return up.float().contiguous(), down.float().contiguous()


@register_factorization(SVDConfig)
def factorize_svd(weight, bias, cfg: SVDConfig, gram=None):
    """Rank from the config; plain or whitened truncated SVD; a LowRankLinear at cfg.dtype."""
    from ..research.prune import LowRankLinear, truncated_svd_factors
    r = cfg.rank_for(*weight.shape)
    if cfg.weighted:
        if gram is None:
            raise ValueError("svd weighted: needs the layer input's X^T X (calibration)")
        up, down = whitened_factors(weight, gram, r, cfg.percdamp)
    else:
        up, down = truncated_svd_factors(weight.float(), r)
    dt = DTYPES[cfg.dtype]
    mod = LowRankLinear(up.to(dt), down.to(dt), bias)
    mod.factorization_info = {"rank": r}
    return mod
