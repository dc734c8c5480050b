"""Discrete code updates with the codebooks fixed (the "P step" of PV-tuning, layer-wise).

A quantized layer (physkern.quant.format) rebuilds

    Q[r, j] = scale[r, j // g] * sum_s C[s, c(r), idx[s, r, j // d], j % d] + offset[r, j // g]

Fine-tuning (physkern.finetune) trains C, scales and offsets with idx fixed. This module moves
idx instead: with everything continuous fixed, it lowers the layer's output error on the
calibration inputs X,

    f(Q) = tr((W - Q) H (W - Q)^T),   H = X^T X [in, in],  W the full-precision weight [out, in],

by blockwise coordinate descent (in the spirit of PV-tuning's discrete step, Malinovskii et al.
2024, written here from the objective, not from their code). Rows are independent terms of f
(f = sum_r e_r H e_r^T, e_r = w_r - q_r), so one visit of block b updates every row at once:
for stage s, replacing row r's code i by c changes q_r on the block's columns J by
delta(c) = a_r * (C[s, c(r), c] - C[s, c(r), i]) (a_r = the row's scales on J) and f by

    Df(c) = delta^T H_JJ delta - 2 delta^T (H e_r)_J

which is exact (f is quadratic). The code with the smallest Df is taken only when Df < 0, then
e_r is updated before the next stage / block. A seeded random `fraction` of the block columns is
visited per call (the rest keep their codes), in ascending order.

Guarantee: the pass runs in float64 and ends with a check per row (f_r recomputed from scratch
through physkern.quant.reconstruct before and after): any row whose objective went up by
rounding keeps its old codes, so the returned objective never exceeds the one given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .format import QuantizedWeight
from .packing import index_bits, pack_indices
from .reconstruct import reconstruct

# rows x K candidate scores (float64) scored at once: bounds the memory of a block visit for
# large K or many rows (8 MB a score tensor)
_CHUNK_ELEMENTS = 1 << 20


@dataclass
class CodeUpdate:
    """What `update_codes` did to one layer.

    indices:   [S, out, n_blocks] int64, the new codes
    objective_before / objective_after: f before and after (float64 sums over rows)
    blocks:    the block columns visited, ascending
    changed:   codes that differ from the input ones (after the per-row check)
    visited:   codes visited (S * out * len(blocks))
    rows_kept: rows whose new codes were dropped because rounding made their f go up
    """
    indices: torch.Tensor
    objective_before: float
    objective_after: float
    blocks: list = field(default_factory=list)
    changed: int = 0
    visited: int = 0
    rows_kept: int = 0

    def summary(self) -> dict:
        """The JSON-friendly record (no tensors)."""
        return {"objective_before": self.objective_before,
                "objective_after": self.objective_after, "blocks_visited": len(self.blocks),
                "codes_visited": self.visited, "codes_changed": self.changed,
                "rows_kept": self.rows_kept}


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1] (the share of block columns "
                         f"visited), got {fraction!r}")
    return float(fraction)


def choose_blocks(n_blocks: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """ceil(fraction * n_blocks) (>= 1) distinct block columns, drawn from `generator`,
    ascending: int64 [m]."""
    m = max(1, math.ceil(_check_fraction(fraction) * n_blocks))
    return torch.randperm(n_blocks, generator=generator)[:m].sort().values


def row_objectives(weight: torch.Tensor, gram: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """f_r = (w_r - q_r) H (w_r - q_r)^T per row, float64 [out]; weight, q [out, in],
    gram [in, in]."""
    e = weight.double() - q.double()
    return ((e @ gram.double()) * e).sum(1)


def layer_objective(indices: torch.Tensor, codebooks: torch.Tensor,
                    scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor], *,
                    codebook_rows: int, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """f = tr((W - Q) H (W - Q)^T) in float64, Q rebuilt by physkern.quant.reconstruct from
    indices [S, out, nb], codebooks [S, n_cb, K, d], scales / offsets [out, G] or None;
    weight [out, in] and gram [in, in] in the same (stored) basis as Q."""
    q = reconstruct(indices, codebooks, scales, offsets, codebook_rows=codebook_rows,
                    dtype=torch.float64)
    return float(row_objectives(weight, gram, q).sum())


def _check_problem(indices, codebooks, scales, weight, gram) -> None:
    """Shapes of an update problem: ValueError naming the argument."""
    if indices.dim() != 3 or codebooks.dim() != 4 or indices.shape[0] != codebooks.shape[0]:
        raise ValueError(f"indices must be [S, out, n_blocks] and codebooks [S, n_codebooks, K, "
                         f"d] with the same S, got {tuple(indices.shape)} and "
                         f"{tuple(codebooks.shape)}")
    if indices.dtype.is_floating_point:
        raise ValueError(f"indices must be integer, got {indices.dtype}")
    _, out, nb = indices.shape
    inf = nb * codebooks.shape[3]
    if weight.dim() != 2 or tuple(weight.shape) != (out, inf):
        raise ValueError(f"weight must be [{out}, {inf}] (the layer's [out, in]), got "
                         f"{tuple(weight.shape)}")
    if gram.dim() != 2 or tuple(gram.shape) != (inf, inf):
        raise ValueError(f"gram must be [{inf}, {inf}] (X^T X of the layer input), got "
                         f"{tuple(gram.shape)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(gram).all()):
        raise ValueError("weight and gram must be finite")
    if scales is not None and (scales.dim() != 2 or scales.shape[0] != out or
                               inf % scales.shape[1]):
        raise ValueError(f"scales must be [{out}, G] with G dividing {inf}, got "
                         f"{tuple(scales.shape)}")


def _pieces(n_cb: int, rows: int, k: int):
    """(c0, c1, r0, r1): codebooks [c0, c1) x their local rows [r0, r1) per piece, so that
    pieces x K stays under _CHUNK_ELEMENTS: whole codebooks together when they are small, else
    slices of one codebook's rows."""
    if rows * k <= _CHUNK_ELEMENTS:
        m = max(1, _CHUNK_ELEMENTS // (rows * k))
        for c0 in range(0, n_cb, m):
            yield c0, min(n_cb, c0 + m), 0, rows
    else:
        step = max(1, _CHUNK_ELEMENTS // k)
        for c in range(n_cb):
            for r0 in range(0, rows, step):
                yield c, c + 1, r0, min(rows, r0 + step)


def _best_codes(cb: torch.Tensor, cur: torch.Tensor, a: torch.Tensor, h_jj: torch.Tensor,
                g_j: torch.Tensor) -> torch.Tensor:
    """For every row, the code of its stage codebook minimising Df (module docstring), or its
    current code when no candidate scores strictly lower.

    cb [n_cb, K, d] the stage's codebooks; cur [n_cb, R] the current codes, a [n_cb, R, d]
    the rows' scales on the block, g_j [n_cb, R, d] = (E H)[:, J], all with rows grouped by
    codebook (R = codebook_rows); h_jj = H[J, J] [d, d]. With p = a * u (u a candidate entry,
    p0 the current one), Df = p^T H_JJ p - 2 p . (H_JJ p0 + g) + (terms without u), so two
    batched GEMMs over the d^2 and d coordinates score every candidate of every row.
    """
    n_cb, k, d = cb.shape
    new = cur.clone()
    u2 = (cb[..., :, None] * cb[..., None, :]).reshape(n_cb, k, d * d)       # u u^T
    for c0, c1, r0, r1 in _pieces(n_cb, cur.shape[1], k):
        c, r = slice(c0, c1), slice(r0, r1)
        ai, gi, ci = a[c, r], g_j[c, r], cur[c, r]                           # [m, r, ...]
        p0 = ai * cb[c].gather(1, ci[..., None].expand(-1, -1, d))
        v = ai * (p0 @ h_jj + gi)                                            # H symmetric
        m2 = (ai[..., :, None] * ai[..., None, :] * h_jj).reshape(*ai.shape[:2], d * d)
        score = m2 @ u2[c].mT - 2 * (v @ cb[c].mT)                           # [m, r, K]
        best_score, best = score.min(-1)
        # strictly below the current code's own score (computed the same way): ties and
        # duplicate entries never churn codes
        keep = best_score < score.gather(-1, ci[..., None]).squeeze(-1)
        new[c, r] = torch.where(keep, best, ci)
    return new


def _descent_pass(idx: torch.Tensor, cbs: torch.Tensor, a_full: torch.Tensor,
                  cb_ids: torch.Tensor, e: torch.Tensor, h: torch.Tensor,
                  blocks: torch.Tensor) -> None:
    """One coordinate-descent visit of `blocks`, every stage, all rows at once; updates idx
    [S, out, nb] and the error e = W - Q [out, in] in place (float64)."""
    n_stages, n_cb, _, d = cbs.shape
    grouped = lambda t: t.reshape(n_cb, -1, *t.shape[1:])     # rows grouped by codebook
    for b in blocks.tolist():
        j = slice(b * d, (b + 1) * d)
        a = a_full[:, j]
        for s in range(n_stages):
            cur = idx[s, :, b]
            g_j = e @ h[:, j]                       # (E H)[:, J] with the current error
            new = _best_codes(cbs[s], grouped(cur), grouped(a), h[j, j],
                              grouped(g_j)).reshape(-1)
            if not bool((new != cur).any()):
                continue
            delta = a * (cbs[s][cb_ids, new] - cbs[s][cb_ids, cur])       # [out, d]
            e[:, j] -= delta
            idx[s, :, b] = new


def update_codes(indices: torch.Tensor, codebooks: torch.Tensor,
                 scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor], *,
                 codebook_rows: int, weight: torch.Tensor, gram: torch.Tensor,
                 fraction: float, generator: torch.Generator) -> CodeUpdate:
    """Re-assign the codes of a seeded `fraction` of the block columns to lower
    f = tr((W - Q) H (W - Q)^T) with codebooks, scales and offsets fixed (module docstring).

    indices:   [S, out, n_blocks] integer (not modified)
    codebooks: [S, n_codebooks, K, d]; scales / offsets [out, G] or None (any float dtype;
               the pass runs in float64 on the values as given)
    weight:    [out, in] the full-precision target; gram [in, in] = X^T X (positive
               semi-definite), both in the basis Q is stored in
    fraction:  in (0, 1], the share of block columns visited (choose_blocks)
    generator: draws the columns (the only randomness: same generator state, same result)
    Returns a CodeUpdate with objective_after <= objective_before.
    """
    _check_problem(indices, codebooks, scales, weight, gram)
    _check_fraction(fraction)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dev = indices.device
    old = indices.to(torch.int64)
    rebuild = lambda i: reconstruct(i, codebooks, scales, offsets, codebook_rows=codebook_rows,
                                    dtype=torch.float64)
    w, h = weight.to(dev, torch.float64), gram.to(dev, torch.float64)
    q_old = rebuild(old)
    f_old = row_objectives(w, h, q_old)
    s, out, nb = old.shape
    blocks = choose_blocks(nb, fraction, generator)
    new = old.clone()
    inf = w.shape[1]
    a_full = (torch.ones(out, inf, dtype=torch.float64, device=dev) if scales is None else
              scales.double().repeat_interleave(inf // scales.shape[1], 1))
    cb_ids = torch.arange(out, device=dev) // codebook_rows
    _descent_pass(new, codebooks.double(), a_full, cb_ids, w - q_old, h, blocks)
    # per-row guarantee, measured from scratch: rounding never buys a worse row
    f_new = row_objectives(w, h, rebuild(new))
    worse = f_new > f_old
    new[:, worse] = old[:, worse]
    f_new = torch.where(worse, f_old, f_new)
    return CodeUpdate(new, float(f_old.sum()), float(f_new.sum()), blocks.tolist(),
                      int((new != old).sum()), s * out * len(blocks), int(worse.sum()))


def linearized_target(q: torch.Tensor, grad: torch.Tensor, relative_step: float,
                      gram: Optional[torch.Tensor] = None,
                      percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The P step of PV-tuning with the END-TO-END loss linearised at the current Q (written from
    the objective): over new codes Q' (codebooks, scales fixed) minimise

        L(Q') = <G, Q' - Q> + 1/(2 eta) tr((Q' - Q) M (Q' - Q)^T)

    G = dLoss/dQ [out, in] (the fine-tuning loss's gradient at Q), M = I (gram None) or the
    layer's input Gram H + lambda I (lambda = percdamp * mean diag H: a Gauss-Newton metric, so
    a move costs what it changes in the layer's output). Completing the square,
    L = 1/(2 eta) tr((Q' - T) M (Q' - T)^T) + const with T = Q - eta G M^-1: update_codes with
    weight = T and gram = M minimises L on the visited blocks and never raises it.

    q, grad: [out, in] in the basis Q is stored in (a rotated layer's gradient is G_eff R);
    relative_step: eta chosen so that |eta G M^-1|_F = relative_step * |Q|_F (a trust region
    relative to the weights: the layers' gradients differ by orders of magnitude).
    Returns (T [out, in] float64, M [in, in] float64, eta).
    """
    if q.shape != grad.shape or q.dim() != 2:
        raise ValueError(f"q and grad must be the same [out, in] shape, got {tuple(q.shape)} "
                         f"and {tuple(grad.shape)}")
    if not (isinstance(relative_step, (int, float)) and math.isfinite(relative_step)
            and relative_step > 0):
        raise ValueError(f"relative_step must be a finite number > 0, got {relative_step!r}")
    inf = q.shape[1]
    g, q = grad.double(), q.double()
    if gram is None:
        m = torch.eye(inf, dtype=torch.float64, device=q.device)
        direction = g
    else:
        if tuple(gram.shape) != (inf, inf):
            raise ValueError(f"gram must be [{inf}, {inf}], got {tuple(gram.shape)}")
        m = gram.double().to(q.device)
        m = m + percdamp * float(m.diagonal().mean().clamp_min(1e-12)) * \
            torch.eye(inf, dtype=torch.float64, device=q.device)
        direction = torch.linalg.solve(m, g.T).T           # G M^-1 (M symmetric)
    norm = float(direction.norm())
    eta = 0.0 if norm == 0 else relative_step * float(q.norm()) / norm
    return q - eta * direction, m, eta


def update_quantized_weight(qw: QuantizedWeight, weight: torch.Tensor, gram: torch.Tensor,
                            fraction: float, seed: int) -> tuple[QuantizedWeight, CodeUpdate]:
    """`update_codes` on a QuantizedWeight: (the weight with the new packed codes, same
    codebooks / scales / offsets / rotation; the CodeUpdate).

    weight [out, in] and gram [in, in] are in the layer's input basis; a weight with an input
    rotation R is updated in its stored basis (target W R, Gram R^T H R), as
    physkern.quant.codebook.refine_codebooks does. seed seeds the columns' generator.
    """
    w, h = weight.detach().double().cpu(), gram.detach().double().cpu()
    if qw.rotation is not None:
        if tuple(w.shape) != (qw.out_features, qw.in_features) or \
                tuple(h.shape) != (qw.in_features, qw.in_features):
            _check_problem(qw.indices(), qw.codebooks, qw.scales, w, h)  # names the argument
        w, h = qw.rotation.apply(w), qw.rotation.rotate_gram(h)
    res = update_codes(qw.indices(), qw.codebooks, qw.scales, qw.offsets,
                       codebook_rows=qw.codebook_rows, weight=w, gram=h, fraction=fraction,
                       generator=torch.Generator().manual_seed(seed))
    new = QuantizedWeight(pack_indices(res.indices, index_bits(qw.k)), qw.codebooks, qw.scales,
                          qw.offsets, qw.in_features, qw.out_features, qw.codebook_rows,
                          qw.scale_group, qw.rotation).validate()
    return new, res
