"""Scalar round-to-nearest (RTN) quantization, stored as a QuantizedWeight.

A scalar grid is the special case of the codebook format with block_dim d = 1, K = 2**bits,
layer scope (codebook_rows = out_features, one shared codebook [1, 1, K, 1]) and an affine map
per group of `scale_group` consecutive input columns of each row (q in 0..K-1 is the index):

    asymmetric: codebook [0, 1, ..., K-1],          W[r, j] = scale * q + offset
    symmetric:  codebook [-K/2, ..., K/2 - 1],      W[r, j] = scale * (q - K/2)   (no offsets)

with scale, offset = scales/offsets[r, j // scale_group]. The codebook entries are integers
|c| <= 255, exact in float16.

Grids (per row and group of columns, `scalar_grid_params`):
- asymmetric (min/max affine): offset = min(w), scale = (max(w) - min(w)) / (K - 1). The offset
  is a float, not an integer zero point, so the grid spans exactly [min, max] (zero need not be
  on the grid; published GPTQ instead forces min <= 0 <= max and rounds the zero point).
- symmetric (fixed mid-point zero, as published GPTQ): scale = 2 max|w| / (K - 1), zero point
  K/2 = 2**(bits-1), i.e. the affine offset is -scale * 2**(bits-1). It is stored as a signed
  codebook and no offsets (the offset is implied), so symmetric grids do not pay for offsets
  in the accounting. q = K/2 is exactly zero; the grid spans [-K/2 scale, (K/2 - 1) scale]
  (the largest positive value may be clipped by less than one step).

Scales and offsets are stored float16. They are computed in float32, rounded to float16 FIRST,
and q is computed with the rounded values, so `QuantizedWeight.dequantize()` reproduces exactly
what the quantizer intended (codebook[q] * scale16 (+ offset16) in float32).

Granularity: per-group (group_size = G, scale_group = G), per-channel (group_size None,
scale_group = in_features), per-tensor (one scale and offset for the whole tensor). Per-tensor is
stored as scale_group = in_features with every row holding the same scale/offset: the format has
no per-tensor field, so the accounting counts out_features fp16 scales (and offsets) where one
would do. That overhead is at most 32 / in_features bits per weight.
"""
from __future__ import annotations

from typing import Optional

import torch

from .format import QuantizedWeight
from .packing import pack_indices

MIN_BITS, MAX_BITS = 2, 8
# Smallest positive float16 (subnormal): a scale that rounds below this would be 0 in storage.
_FP16_TINY = 2.0 ** -24


def check_bits(bits: int) -> int:
    """Validate bits (an int in 2..8); return it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def check_group_size(group_size: Optional[int], in_features: int) -> int:
    """Validate group_size against in_features; return the scale_group (in_features if None)."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer dividing in_features "
                         f"({in_features}) or None (per-channel), got {group_size!r}")
    if in_features % group_size:
        divisors = [g for g in range(1, in_features + 1) if in_features % g == 0]
        raise ValueError(f"group_size ({group_size}) must divide in_features ({in_features}); "
                         f"valid group sizes: {divisors} (or None for per-channel)")
    return group_size


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float16 value, returned as float32."""
    return x.to(torch.float16).to(torch.float32)


def scalar_grid_params(w_group: torch.Tensor, bits: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of a 2**bits-level grid for each row of `w_group`.

    w_group: [rows, cols] weights sharing one grid per row (any float dtype).
    Returns (scale [rows], offset [rows]) float32 tensors holding float16-representable values
    (already rounded to float16), with scale > 0. Degenerate rows: an all-zero row (symmetric)
    gets scale 1; a constant row (asymmetric) gets offset = its value and scale 2|value| / (K-1)
    (or 1 when the value is 0), so q = 0 reproduces it up to the float16 rounding of the offset.
    """
    check_bits(bits)
    if w_group.dim() != 2:
        raise ValueError(f"w_group must be [rows, cols], got shape {tuple(w_group.shape)}")
    w = w_group.float()
    if not torch.isfinite(w).all():
        raise ValueError(f"weight has {int(w.isnan().sum())} NaN and {int(w.isinf().sum())} Inf "
                         "values; cannot quantize")
    maxq = (1 << bits) - 1
    if symmetric:
        absmax = w.abs().amax(dim=1)
        scale = 2.0 * absmax / maxq
        # All-zero row: any positive scale reproduces it (q = mid point is exactly 0).
        scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
        scale = round_fp16(scale).clamp_min(_FP16_TINY)
        offset = round_fp16(-scale * float(1 << (bits - 1)))
    else:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale = (hi - lo) / maxq
        # Constant row: q = 0 reproduces min exactly; keep a scale of the row's magnitude so a
        # caller that later rounds updated values (GPTQ) still has a sensible step.
        flat = (hi - lo) <= 0
        scale = torch.where(flat, torch.where(lo.abs() > 0, 2.0 * lo.abs() / maxq,
                                              torch.ones_like(lo)), scale)
        scale = round_fp16(scale).clamp_min(_FP16_TINY)
        offset = round_fp16(lo)
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise ValueError("weights too large for float16 scales/offsets (|w| > 65504 * levels)")
    return scale, offset


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                     bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Round w onto the grid scale * q + offset, q in 0..2**bits - 1 (broadcasting).

    scale, offset: from scalar_grid_params (for symmetric, offset = -scale * 2**(bits-1)).
    Returns (q int64, values float32), values computed exactly as `QuantizedWeight.dequantize`
    computes them from the stored format: q * scale + offset (asymmetric) or
    (q - 2**(bits-1)) * scale (symmetric).
    """
    maxq = (1 << bits) - 1
    qf = torch.clamp(torch.round((w.float() - offset) / scale), 0, maxq)
    if symmetric:
        return qf.to(torch.int64), (qf - float(1 << (bits - 1))) * scale
    return qf.to(torch.int64), qf * scale + offset


def scalar_quantized_weight(q: torch.Tensor, scales: torch.Tensor,
                            offsets: Optional[torch.Tensor], bits: int, scale_group: int,
                            symmetric: bool = False) -> QuantizedWeight:
    """Assemble a scalar-grid QuantizedWeight.

    q: [out, in] integer levels in 0..2**bits - 1; scales, offsets: [out, in / scale_group]
    (float16-representable values; offsets ignored for symmetric). Returns the validated
    QuantizedWeight (d = 1, K = 2**bits, layer scope, float16 codebook [0..K-1], or
    [-K/2..K/2-1] with offsets None for symmetric).
    """
    out, inf = q.shape
    k = 1 << bits
    first = -(k // 2) if symmetric else 0
    codebooks = torch.arange(first, first + k, dtype=torch.float16,
                             device=q.device).reshape(1, 1, k, 1)
    packed = pack_indices(q.reshape(1, out, inf), bits)
    return QuantizedWeight(packed=packed, codebooks=codebooks,
                           scales=scales.to(torch.float16).contiguous(),
                           offsets=None if symmetric else offsets.to(torch.float16).contiguous(),
                           in_features=inf, out_features=out, codebook_rows=out,
                           scale_group=scale_group).validate()


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: Optional[int] = None,
                 symmetric: bool = False, per_tensor: bool = False) -> QuantizedWeight:
    """Round-to-nearest scalar quantization of weight [out, in] to a QuantizedWeight.

    bits: 2..8 (K = 2**bits levels). group_size: columns per scale group (must divide in);
    None = per-channel (one grid per row). per_tensor: one grid for the whole tensor (stored as
    per-channel with equal rows; cannot be combined with group_size). symmetric: fixed mid-point
    zero (see module docstring); else min/max affine.
    Returns a QuantizedWeight whose dequantize() is [out, in].
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    out, inf = weight.shape
    if per_tensor and group_size is not None:
        raise ValueError(f"per_tensor=True takes one grid for the whole tensor; group_size must "
                         f"be None, got {group_size!r}")
    scale_group = check_group_size(group_size, inf)
    w = weight.detach().float()
    n_groups = inf // scale_group
    if per_tensor:
        s, o = scalar_grid_params(w.reshape(1, -1), bits, symmetric)
        scales, offsets = s.expand(out, 1).clone(), o.expand(out, 1).clone()
    else:
        s, o = scalar_grid_params(w.reshape(out * n_groups, scale_group), bits, symmetric)
        scales, offsets = s.reshape(out, n_groups), o.reshape(out, n_groups)
    q, _ = quantize_to_grid(w, scales.repeat_interleave(scale_group, dim=1),
                            offsets.repeat_interleave(scale_group, dim=1), bits, symmetric)
    return scalar_quantized_weight(q, scales, offsets, bits, scale_group, symmetric)
