"""GPTQ (Frantar et al. 2022) as published, plus the generic error-feedback loop it rests on.

Given a layer's weight W [out, in] and the Hessian of the layer-wise proxy loss
H = X^T X (in x in, X = calibration inputs [tokens, in]; any positive factor is irrelevant),
GPTQ quantizes W column by column and, after fixing column j, updates the not-yet-quantized
columns to compensate the error through the inverse Hessian. The published algorithm:

1. dead columns (H_jj == 0, the input is always zero) get H_jj = 1 and W[:, j] = 0;
2. damping: H += percdamp * mean(diag H) * I;
3. U = upper Cholesky factor of H^-1 (H^-1 = U^T U), i.e. cholesky_inverse then
   cholesky(upper=True): row j of U holds the OBS update of column j onto columns > j in the
   order the columns are processed;
4. for each column j in order: q_j = quant(w_j); err_j = (w_j - q_j) / U_jj;
   W[:, j+1:] -= err_j U[j, j+1:]. The update is applied lazily: inside a batch of `blocksize`
   columns immediately, to the later columns once per batch (W[:, i2:] -= Err U[i1:i2, i2:]).

(The seeds' GPTQ skipped step 3's upper factor, so its compensation was wrong; NOTES.md item 6.)

`gptq_error_feedback` is that loop with the quantizer left open: every `step` columns it calls
quantize_step(col_start, w_cols, u_diag) -> q_cols, so the same loop serves scalar grids
(step = 1) and d-dimensional codebook vectors (GPTVQ style, step = d).
`gptq_quantize_scalar` is published GPTQ with the scalar grids of physkern.quant.scalar and
returns a QuantizedWeight.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .format import QuantizedWeight
from .scalar import (check_bits, check_group_size, quantize_to_grid, scalar_grid_params,
                     scalar_quantized_weight)

QuantizeStep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_perm(perm: torch.Tensor, n: int) -> torch.Tensor:
    perm = torch.as_tensor(perm).to(torch.int64).flatten()
    if perm.numel() != n or not torch.equal(torch.sort(perm.cpu()).values, torch.arange(n)):
        raise ValueError(f"perm must be a permutation of 0..{n - 1} (length {n}), got "
                         f"{perm.numel()} entries")
    return perm


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """U [in, in] float32: upper Cholesky factor of (H + percdamp * mean(diag H) * I)^-1.

    hessian: [in, in] symmetric positive semi-definite with no zero diagonal entries (dead
    columns must be handled before). Computed in float64.
    """
    h = hessian.to(torch.float64).clone()
    n = h.shape[0]
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(f"hessian + damping is not positive definite (Cholesky failed at column "
                         f"{int(info) - 1} of {n}); increase percdamp (got {percdamp})")
    hinv = torch.cholesky_inverse(lower)
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise ValueError(f"inverse hessian is not positive definite numerically; increase "
                         f"percdamp (got {percdamp})")
    return u.to(torch.float32)


def _prepare(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 W and float64 H with dead columns handled (H_jj = 1, W[:, j] = 0)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"hessian must be [in, in] = [{n}, {n}], got {tuple(hessian.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight has {int(weight.isnan().sum())} NaN and "
                         f"{int(weight.isinf().sum())} Inf values; cannot quantize")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian (X^T X of the calibration inputs) has NaN or Inf values: the "
                         "layer's calibration activations are not finite")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diag(h) == 0
    if dead.any():
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    return w, h


def _error_feedback(w: torch.Tensor, u: torch.Tensor, quantize_step, step: int,
                    blocksize: int, pass_block: bool = False) -> torch.Tensor:
    """The lazy-batch loop on prepared (permuted) w [out, n] float32 and U [n, n] float32.

    With pass_block, quantize_step also gets the current values of the rest of the lazy batch
    (w1[:, s:], [out, b - s]); used for dynamic group grids.
    """
    out, n = w.shape
    q = torch.zeros_like(w)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        b = i2 - i1
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for s in range(0, b, step):
            w_cols = w1[:, s:s + step].clone()
            u_diag = torch.diagonal(u1)[s:s + step].clone()
            if pass_block:
                q_cols = quantize_step(i1 + s, w_cols, u_diag, w1[:, s:])
            else:
                q_cols = quantize_step(i1 + s, w_cols, u_diag)
            q_cols = torch.as_tensor(q_cols)
            if tuple(q_cols.shape) != (out, step):
                raise ValueError(f"quantize_step must return [out, step] = [{out}, {step}], got "
                                 f"{tuple(q_cols.shape)}")
            q_cols = q_cols.to(device=w.device, dtype=torch.float32)
            for t in range(step):
                j = s + t
                e = (w1[:, j] - q_cols[:, t]) / u1[j, j]
                w1[:, j + 1:] -= e[:, None] * u1[j, j + 1:][None, :]
                err1[:, j] = e
            q[:, i1 + s:i1 + s + step] = q_cols
        if i2 < n:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q


def gptq_error_feedback(weight: torch.Tensor, hessian: torch.Tensor,
                        quantize_step: QuantizeStep, step: int = 1, blocksize: int = 128,
                        percdamp: float = 0.01, perm: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
    """GPTQ's error-feedback loop with a pluggable quantizer; returns quantized W [out, in].

    weight: [out, in]; hessian: [in, in] (X^T X of the layer's calibration inputs).
    quantize_step(col_start, w_cols, u_diag) -> q_cols is called once per `step` consecutive
      columns (in processing order), with
        col_start: int, the position of the step's first column in processing order: with
          perm None this is the original column index; with perm it is the position in the
          permuted order (the original column is perm[col_start + t]; the caller maps it);
        w_cols: [out, step] float32, the current (error-updated) values of those columns
          (a copy: changing it has no effect);
        u_diag: [step] float32, the U_jj of those columns (U = upper Cholesky factor of the
          damped H^-1 in processing order), e.g. to weight a vector quantizer's distance;
      and must return q_cols [out, step], the quantized values.
    After each step the error is propagated column by column: err_j = (w_j - q_j) / U_jj,
    W[:, j+1:] -= err_j U[j, j+1:] (inside the lazy batch, including the step's own later
    columns), then once per batch of `blocksize` columns to all later columns.
    step: columns quantized jointly (1 for scalar grids, d for d-dim codebooks); must divide
      in_features. blocksize: lazy batch width, a multiple of step.
    percdamp: damping as a fraction of mean(diag H). perm: optional [in] column permutation
      (act-order): W's columns and H's rows/columns are permuted before and the result is
      returned in the original column order.
    Dead columns (H_jj == 0) are zeroed in W before quantization (as published).
    Returns float32 [out, in], the quantized values in the original column order.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1 \
            or blocksize % step:
        raise ValueError(f"blocksize must be a positive multiple of step ({step}), got "
                         f"{blocksize!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    w, h = _prepare(weight, hessian)
    n = w.shape[1]
    if n % step:
        raise ValueError(f"step ({step}) must divide in_features ({n})")
    if perm is not None:
        perm = _check_perm(perm, n).to(w.device)
        w = w[:, perm]
        h = h[perm][:, perm]
    u = inverse_hessian_cholesky(h, percdamp)
    q = _error_feedback(w, u, quantize_step, step, blocksize)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q


def act_order_perm(hessian: torch.Tensor) -> torch.Tensor:
    """Act-order permutation [in]: columns by decreasing H_jj (dead columns count as 1)."""
    d = torch.diag(hessian).to(torch.float64).clone()
    d[d == 0] = 1.0
    return torch.argsort(d, descending=True, stable=True)


def gptq_quantize_scalar(weight: torch.Tensor, hessian: torch.Tensor, bits: int,
                         group_size: Optional[int] = None, symmetric: bool = False,
                         act_order: bool = False, static_groups: bool = True,
                         percdamp: float = 0.01, blocksize: int = 128) -> QuantizedWeight:
    """Published GPTQ with scalar grids (physkern.quant.scalar) -> QuantizedWeight.

    weight: [out, in]; hessian: [in, in] = X^T X of the calibration inputs.
    bits: 2..8. group_size: columns per scale group (divides in), None = per-channel.
    symmetric: grid kind (see physkern.quant.scalar). act_order: process columns by
      decreasing H_jj. static_groups: each group's scale/offset is computed from the (dead-column
      zeroed) original weights before the loop, so groups are contiguous column ranges in the
      original order whatever the processing order; required with act_order and group_size
      (the storage format has no g_idx). static_groups=False (without act_order): a group's grid
      is computed when its first column is reached, from the group's current error-updated
      values, as published GPTQ does (the lazy batch is widened to a multiple of group_size so
      those values are exact; batching does not change the result). Per-channel grids are
      always computed from the original weights (as published).
    percdamp, blocksize: as in gptq_error_feedback.
    Returns a QuantizedWeight whose dequantize() equals the values the loop chose.
    """
    qw, _ = _gptq_scalar(weight, hessian, bits, group_size, symmetric, act_order, static_groups,
                         percdamp, blocksize)
    return qw


def _gptq_scalar(weight, hessian, bits, group_size, symmetric, act_order, static_groups,
                 percdamp, blocksize) -> tuple[QuantizedWeight, torch.Tensor]:
    """gptq_quantize_scalar, also returning the loop's quantized values [out, in] float32."""
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    out, n = weight.shape
    scale_group = check_group_size(group_size, n)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    dynamic = (not static_groups) and group_size is not None
    if dynamic and act_order:
        raise ValueError("act_order=True with group_size needs static_groups=True: dynamic groups "
                         "in act order are not contiguous column ranges, which the storage "
                         "format (no g_idx) cannot hold")
    w, h = _prepare(weight, hessian)
    n_groups = n // scale_group
    scales = torch.zeros(out, n_groups, dtype=torch.float32, device=w.device)
    offsets = torch.zeros_like(scales)
    if not dynamic:
        s, o = scalar_grid_params(w.reshape(out * n_groups, scale_group), bits, symmetric)
        scales.copy_(s.reshape(out, n_groups))
        offsets.copy_(o.reshape(out, n_groups))
    perm = act_order_perm(h).to(w.device) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    col_of = perm.tolist() if perm is not None else list(range(n))
    idx = torch.zeros(out, n, dtype=torch.int64, device=w.device)

    def quantize_step(pos: int, w_cols: torch.Tensor, _u_diag: torch.Tensor,
                      rest: Optional[torch.Tensor] = None) -> torch.Tensor:
        col = col_of[pos]
        g = col // scale_group
        if dynamic and col % scale_group == 0:
            # rest starts at this column; the group's columns are the next scale_group ones.
            s_, o_ = scalar_grid_params(rest[:, :scale_group], bits, symmetric)
            scales[:, g], offsets[:, g] = s_, o_
        qi, qv = quantize_to_grid(w_cols[:, 0], scales[:, g], offsets[:, g], bits, symmetric)
        idx[:, col] = qi
        return qv[:, None]

    if dynamic:
        blocksize = max(blocksize // scale_group, 1) * scale_group
    u = inverse_hessian_cholesky(h, percdamp)
    q = _error_feedback(w, u, quantize_step, 1, blocksize, pass_block=dynamic)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return scalar_quantized_weight(idx, scales, offsets, bits, scale_group, symmetric), q
