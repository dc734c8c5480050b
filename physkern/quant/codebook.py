"""k-means codebook (vector) quantization of one weight matrix.

W [out, in] is cut into blocks of d consecutive input columns. Rows are grouped into codebook
scopes (row / group of rows / layer); each scope gets its own K-entry codebook fitted by
weighted k-means:

    minimise  sum_blocks sum_j s_j (w_j - c_{idx}_j)^2

where s_j is the importance of input dimension j (E[x_j^2] from calibration, times the row's
scale squared when rows are normalised). The weighted centroid update is the weighted mean
per dimension. This fixes the seeds' defect (NOTES.md item 3): a per-block scalar weight does
not change which centroid is nearest; a per-dimension weight does.

Init (seeded, deterministic): k-means++ D^2 sampling under the weighted distance (Arthur &
Vassilvitskii 2007), or a seeded sample of distinct blocks for large K. Empty clusters are
reseeded with the blocks farthest from their centroid in the same scope.

Codebooks shared across layers (physkern.shared_codebook): fit_pooled_codebooks fits them on
the pooled blocks of a group of layers; quantize_codebook and quantize_codebook_error_feedback
then take them as fixed `codebooks` and only choose indices (and scales). Every assignment goes
through physkern.ops.kmeans_assign, chunked over centroids, so K = 65536 never materialises a
[blocks, K] matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import ops


def kmeans_assign(blocks, centroids, importance=None):
    """Nearest-centroid assignment (physkern.ops); CPU tensors call the fast CPU path directly
    (the fused C++ op physkern::kmeans_assign_cpu, or its pure-torch fallback without
    physkern._C), skipping the custom-op dispatch, which costs more than the work for the small
    per-step assignments of error feedback."""
    backend = "cpu" if blocks.device.type == "cpu" else "auto"
    return ops.kmeans_assign(blocks, centroids, importance, backend=backend)
from .format import QuantizedWeight
from .packing import index_bits, pack_indices
from .reconstruct import reconstruct

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class KMeansResult:
    centroids: torch.Tensor      # [n_scopes, K, d] float32
    indices: torch.Tensor        # [n_scopes, n] int64
    objective: list = field(default_factory=list)  # weighted SSE after each assignment


def _weighted_sse(dist: torch.Tensor) -> float:
    return float(dist.double().sum())


def kmeans_init(blocks: torch.Tensor, k: int, importance: Optional[torch.Tensor],
                generator: torch.Generator, method: str = "kmeans++") -> torch.Tensor:
    """Seeded initial centroids [n_scopes, k, d] for blocks [n_scopes, n, d]."""
    s, n, d = blocks.shape
    if method == "random":
        # k distinct blocks per scope, chosen by a seeded random permutation.
        keys = torch.rand(s, n, generator=generator)
        pick = keys.argsort(dim=1)[:, :k]
        return blocks.gather(1, pick[..., None].expand(s, k, d)).clone()
    cent = torch.empty(s, k, d, dtype=blocks.dtype)
    first = torch.randint(0, n, (s,), generator=generator)
    cent[:, 0] = blocks[torch.arange(s), first]
    w = importance.expand_as(blocks) if importance is not None else None
    best = _dist_to(blocks, cent[:, 0], w)                     # [s, n]
    for c in range(1, k):
        total = best.sum(1, keepdim=True)
        # D^2 sampling; scopes whose points all coincide with a centroid sample uniformly.
        probs = torch.where(total > 0, best / total.clamp_min(1e-300), torch.full_like(best, 1.0 / n))
        pick = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        cent[:, c] = blocks[torch.arange(s), pick]
        best = torch.minimum(best, _dist_to(blocks, cent[:, c], w))
    return cent


def _dist_to(blocks: torch.Tensor, c: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
    diff2 = (blocks - c[:, None, :]).pow(2)
    return (diff2 * w).sum(-1) if w is not None else diff2.sum(-1)


def weighted_centroids(blocks: torch.Tensor, indices: torch.Tensor, k: int,
                       importance: Optional[torch.Tensor], previous: torch.Tensor):
    """Weighted mean of each cluster per dimension; returns (centroids, counts [s, k])."""
    s, n, d = blocks.shape
    flat = (indices + torch.arange(s)[:, None] * k).reshape(-1)          # [s*n]
    w = importance.expand_as(blocks).reshape(-1, d) if importance is not None \
        else torch.ones(s * n, d, dtype=blocks.dtype)
    num = torch.zeros(s * k, d, dtype=torch.float64).index_add_(0, flat, (w * blocks.reshape(-1, d)).double())
    den = torch.zeros(s * k, d, dtype=torch.float64).index_add_(0, flat, w.double())
    counts = torch.bincount(flat, minlength=s * k).reshape(s, k)
    cent = torch.where(den > 0, num / den.clamp_min(1e-300), previous.reshape(-1, d).double())
    return cent.reshape(s, k, d).to(blocks.dtype), counts


def _reseed_empty(cent: torch.Tensor, counts: torch.Tensor, blocks: torch.Tensor,
                  dist: torch.Tensor) -> torch.Tensor:
    """Move each empty centroid onto one of the blocks farthest from its centroid (vectorised)."""
    empty = counts == 0                                             # [s, k]
    n_empty = int(empty.sum(1).max())
    if n_empty == 0:
        return cent
    far = dist.topk(min(n_empty, dist.shape[1]), dim=1).indices     # [s, e]
    rank = (empty.cumsum(1) - 1).clamp(min=0, max=far.shape[1] - 1)  # which far block each empty takes
    scope_idx, k_idx = empty.nonzero(as_tuple=True)
    src = far[scope_idx, rank[scope_idx, k_idx]]
    cent = cent.clone()
    cent[scope_idx, k_idx] = blocks[scope_idx, src]
    return cent


def fit_subset(blocks: torch.Tensor, importance: Optional[torch.Tensor], m: int,
               generator: torch.Generator) -> torch.Tensor:
    """Sorted positions [min(m, n)] of the blocks [n_scopes, n, d] k-means fits on (the same
    positions in every scope): a quarter of them the blocks of largest weighted energy summed
    over the scopes, so rare outlier blocks (which dominate a layer's output error) always shape
    the codebook; the rest a seeded uniform sample of the others."""
    n = blocks.shape[1]
    if m >= n:
        return torch.arange(n)
    energy = blocks.pow(2)
    energy = (energy * importance.expand_as(blocks)).sum(-1) if importance is not None \
        else energy.sum(-1)
    top = energy.sum(0).topk(m // 4).indices
    rest = torch.ones(n, dtype=torch.bool)
    rest[top] = False
    others = rest.nonzero().squeeze(1)
    others = others[torch.randperm(others.numel(), generator=generator)[:m - top.numel()]]
    return torch.cat([top, others]).sort().values


def kmeans(blocks: torch.Tensor, k: int, importance: Optional[torch.Tensor] = None,
           iters: int = 25, tol: float = 1e-4, seed: int = 0, init: str = "auto",
           max_fit_blocks: Optional[int] = None) -> KMeansResult:
    """Batched weighted k-means: one codebook per scope.

    blocks:     [n_scopes, n, d] float32
    importance: None or broadcastable to blocks (per-dimension weights s >= 0)
    max_fit_blocks: fit the centroids on a subset of this many blocks per scope (as faiss
                does; None = all blocks): the quarter with the largest weighted energy plus a
                seeded random sample of the rest; every block is assigned once at the end.
    Returns centroids [n_scopes, k, d], indices [n_scopes, n] and the objective after each
    assignment on the fitted blocks (non-increasing).
    """
    if blocks.dim() != 3:
        raise ValueError(f"blocks must be [n_scopes, n, d], got {tuple(blocks.shape)}")
    s, n, d = blocks.shape
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} blocks in each codebook scope: every block "
                         f"would need its own centroid and some would be duplicates (no cap is "
                         f"applied; choose k <= {n} or a wider scope)")
    if not torch.isfinite(blocks).all():
        raise ValueError("weight has NaN or Inf values; cannot quantize")
    if importance is not None:
        importance = importance.to(blocks.dtype)
        if (importance < 0).any() or not torch.isfinite(importance).all():
            raise ValueError("importance must be finite and >= 0")
    gen = torch.Generator().manual_seed(seed)
    all_blocks, all_importance = blocks, importance
    if max_fit_blocks is not None and n > max(max_fit_blocks, k):
        pick = fit_subset(blocks, importance, max(max_fit_blocks, k), gen)
        blocks = blocks[:, pick]
        if importance is not None:
            importance = importance.expand_as(all_blocks)[:, pick]
    method = ("kmeans++" if k <= 1024 else "random") if init == "auto" else init
    cent = kmeans_init(blocks, k, importance, gen, method)
    idx, dist = kmeans_assign(blocks, cent, importance)
    history = [_weighted_sse(dist)]
    for _ in range(iters):
        new, counts = weighted_centroids(blocks, idx, k, importance, cent)
        new = _reseed_empty(new, counts, blocks, dist)
        new_idx, new_dist = kmeans_assign(blocks, new, importance)
        obj = _weighted_sse(new_dist)
        if obj > history[-1]:  # numerical noise only; keep the better solution
            break
        cent, idx, dist = new, new_idx, new_dist
        history.append(obj)
        if history[-2] - obj <= tol * max(history[-2], 1e-30):
            break
    if blocks is not all_blocks:
        idx, _ = kmeans_assign(all_blocks, cent, all_importance)
    return KMeansResult(cent, idx, history)


# ----------------------------------------------------------------------------------------------
# one matrix -> QuantizedWeight


def codebook_rows_for(scope: str, out_features: int, group_size: Optional[int]) -> int:
    """Rows that share one codebook."""
    if scope == "row":
        return 1
    if scope == "layer":
        return out_features
    if group_size is None or group_size < 1 or out_features % group_size:
        raise ValueError(f"group_size ({group_size}) must divide out_features ({out_features}) "
                         "for scope='group'")
    return group_size


def compute_scales(weight: torch.Tensor, mode: str, scale_group: Optional[int],
                   dtype: torch.dtype = torch.float16):
    """Per-row or per-(row, column group) RMS scales, rounded to the storage dtype.

    Returns (scales [out, in / group] or None, group).
    """
    out, inf = weight.shape
    if mode == "none":
        return None, inf
    group = inf if mode == "row" else scale_group
    if group is None or inf % group:
        raise ValueError(f"scale_group ({group}) must divide in_features ({inf})")
    rms = weight.reshape(out, inf // group, group).pow(2).mean(-1).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))  # all-zero rows: scale 1
    return rms.to(dtype), group


def to_blocks(weight: torch.Tensor, d: int, codebook_rows: int) -> torch.Tensor:
    """[out, in] -> [n_codebooks, codebook_rows * n_blocks, d] (rows of a scope are contiguous)."""
    out, inf = weight.shape
    if inf % d:
        raise ValueError(f"in_features ({inf}) is not divisible by block_dim ({d})")
    return weight.reshape(out // codebook_rows, codebook_rows * (inf // d), d)


def quantize_codebook(weight: torch.Tensor, k: int, block_dim: int, scope: str = "row",
                      group_size: Optional[int] = None, stages: int = 1, scales: str = "none",
                      scale_group: Optional[int] = None,
                      input_importance: Optional[torch.Tensor] = None, iters: int = 25,
                      tol: float = 1e-4, seed: int = 0, init: str = "auto",
                      codebook_dtype: str = "float16",
                      max_fit_blocks: Optional[int] = 65536,
                      codebooks: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Fit codebooks to `weight` [out, in] and return its QuantizedWeight.

    input_importance: [in] E[x_j^2] (or None for plain k-means).
    codebooks: None (fit them here), or fixed codebooks [stages, out / codebook_rows, k,
    block_dim] (a shared codebook: physkern.shared_codebook), which are only assigned against.
    Centroids and scales are rounded to their storage dtypes before the final assignment, so
    the stored indices are the nearest entries of the codebook actually stored.
    """
    w = weight.detach().float().cpu()
    out, inf = w.shape
    if inf % block_dim:
        raise ValueError(f"in_features ({inf}) is not divisible by block_dim ({block_dim}); "
                         f"choose a block_dim that divides it")
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or Inf values; cannot quantize")
    cb_dtype = DTYPES[codebook_dtype]
    rows = codebook_rows_for(scope, out, group_size)
    _check_fixed(codebooks, stages, out // rows, k, block_dim)
    sc, sgroup = compute_scales(w, scales, scale_group)
    sc_full = sc.float().repeat_interleave(sgroup, 1) if sc is not None else None
    normed = w / sc_full if sc_full is not None else w
    # Per-element importance: s_j for the input dimension, times scale^2 (error is measured in
    # the original, unnormalised units).
    imp = None
    if input_importance is not None or sc_full is not None:
        imp = torch.ones(out, inf)
        if input_importance is not None:
            imp = imp * input_importance.float().cpu()[None, :]
        if sc_full is not None:
            imp = imp * sc_full.pow(2)
        imp = to_blocks(imp, block_dim, rows)
    residual = to_blocks(normed, block_dim, rows)
    codebooks_out, all_idx = [], []
    for stage in range(stages):
        if codebooks is None:
            res = kmeans(residual, k, imp, iters=iters, tol=tol, seed=seed + stage, init=init,
                         max_fit_blocks=max_fit_blocks)
            cent = res.centroids.to(cb_dtype).float()
        else:
            cent = codebooks[stage].detach().float().cpu()
        idx, _ = kmeans_assign(residual, cent, imp)   # nearest entry of the stored codebook
        recon = cent.gather(1, idx[..., None].expand(-1, -1, block_dim))
        residual = residual - recon
        codebooks_out.append(cent.to(cb_dtype))
        all_idx.append(idx.reshape(out, inf // block_dim))
    idx = torch.stack(all_idx)
    qw = QuantizedWeight(
        packed=pack_indices(idx, index_bits(k)), codebooks=torch.stack(codebooks_out),
        scales=sc, offsets=None, in_features=inf, out_features=out, codebook_rows=rows,
        scale_group=sgroup)
    return qw.validate()


def quantize_codebook_error_feedback(weight: torch.Tensor, gram: torch.Tensor, k: int,
                                     block_dim: int, scope: str = "row",
                                     group_size: Optional[int] = None, stages: int = 1,
                                     scales: str = "none", scale_group: Optional[int] = None,
                                     percdamp: float = 0.01, iters: int = 25, tol: float = 1e-4,
                                     seed: int = 0, init: str = "auto",
                                     codebook_dtype: str = "float16",
                                     max_fit_blocks: Optional[int] = 65536,
                                     codebooks: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Codebooks with GPTQ error feedback over d-dim vectors (in the manner of GPTVQ).

    1. Codebooks are fitted by weighted k-means with importance diag(X^T X) (as
       `quantize_codebook` with calibration), unless fixed `codebooks` [stages, out /
       codebook_rows, k, block_dim] are given (a shared codebook, fitted over its group by
       physkern.shared_codebook with this same importance): then only the scales are computed.
    2. Columns are then visited in blocks of d: each row's d-vector (already corrected by the
       error feedback of earlier columns) is assigned to its nearest codebook entry under the
       weight 1 / U_jj^2 (U = upper Cholesky factor of H^-1), and the rounding error is pushed
       onto the columns not yet quantized (physkern.quant.gptq.gptq_error_feedback).
    gram: [in, in] X^T X of the layer's calibration inputs.
    """
    from .gptq import gptq_error_feedback
    w = weight.detach().float().cpu()
    out, inf = w.shape
    if gram is None or tuple(gram.shape) != (inf, inf):
        raise ValueError(f"gram must be [{inf}, {inf}] (X^T X of the layer input), got "
                         f"{None if gram is None else tuple(gram.shape)}")
    if codebooks is None:
        init_qw = quantize_codebook(w, k, block_dim, scope, group_size, stages, scales,
                                    scale_group, input_importance=gram_importance(gram),
                                    iters=iters, tol=tol, seed=seed, init=init,
                                    codebook_dtype=codebook_dtype, max_fit_blocks=max_fit_blocks)
        cb_stored, sc_stored, sgroup = init_qw.codebooks, init_qw.scales, init_qw.scale_group
        rows = init_qw.codebook_rows
    else:
        rows = codebook_rows_for(scope, out, group_size)
        _check_fixed(codebooks, stages, out // rows, k, block_dim)
        cb_stored = codebooks.detach().cpu()
        sc_stored, sgroup = compute_scales(w, scales, scale_group)
    d = block_dim
    n_cb = out // rows
    cbs = cb_stored.float()                                          # [S, C, K, d]
    sc_full = (sc_stored.float().repeat_interleave(sgroup, 1)
               if sc_stored is not None else torch.ones(out, inf))
    idx = torch.zeros(stages, out, inf // d, dtype=torch.long)

    def quantize_step(col: int, w_cols: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
        sc = sc_full[:, col:col + d]                                 # [out, d]
        resid = (w_cols / sc).reshape(n_cb, rows, d)
        imp = (sc.pow(2) / u_diag.pow(2)[None, :]).reshape(n_cb, rows, d)
        recon = torch.zeros_like(resid)
        for s in range(stages):
            i_s, _ = kmeans_assign(resid - recon, cbs[s], imp)       # [C, rows]
            recon = recon + cbs[s].gather(1, i_s[..., None].expand(-1, -1, d))
            idx[s, :, col // d] = i_s.reshape(out)
        return recon.reshape(out, d) * sc

    q = gptq_error_feedback(w, gram.float().cpu(), quantize_step, step=d,
                            blocksize=max(d, (128 // d) * d), percdamp=percdamp)
    qw = QuantizedWeight(pack_indices(idx, index_bits(k)), cb_stored, sc_stored,
                         None, inf, out, rows, sgroup).validate()
    # The packed result must reproduce what the error-feedback loop decided.
    if not torch.allclose(qw.dequantize(), q, atol=1e-4 * float(w.abs().max()) + 1e-6):
        raise RuntimeError("internal error: packed codebook result differs from the "
                           "error-feedback loop's values")
    return qw


def gram_importance(gram: torch.Tensor) -> torch.Tensor:
    """[in] importance of each input dimension from X^T X [in, in]: diag(G) / mean diag(G), the
    weighting error feedback's codebook fit uses (the mean divided out, so layers with larger
    activations do not outweigh the others when their blocks are pooled)."""
    diag = torch.diagonal(gram).float().clamp_min(0)
    return diag / diag.mean().clamp_min(1e-30)


def _check_fixed(codebooks: Optional[torch.Tensor], stages: int, n_codebooks: int, k: int,
                 d: int) -> None:
    """Fixed codebooks must be [stages, n_codebooks, k, d] (ValueError naming `codebooks`)."""
    if codebooks is not None and tuple(codebooks.shape) != (stages, n_codebooks, k, d):
        raise ValueError(f"codebooks must be [stages, n_codebooks, k, block_dim] = "
                         f"{[stages, n_codebooks, k, d]}, got {list(codebooks.shape)}")


def fit_pooled_codebooks(blocks: torch.Tensor, importance: Optional[torch.Tensor], k: int,
                         stages: int = 1, iters: int = 25, tol: float = 1e-4, seed: int = 0,
                         init: str = "auto", codebook_dtype: str = "float16"):
    """One codebook per stage fitted by weighted k-means on pooled blocks (a shared codebook).

    blocks:     [n, d] float32 (row-scaled, rotated blocks of several layers)
    importance: None or [n, d] per-element weights (input importance x scale^2)
    Stage s is fitted on the residual the stored (rounded) stages < s leave.
    Returns (codebooks [stages, 1, k, d] in codebook_dtype, [objective history per stage]).
    """
    cb_dtype = DTYPES[codebook_dtype]
    residual = blocks.float()[None]
    imp = None if importance is None else importance.float()[None]
    cbs, histories = [], []
    for stage in range(stages):
        res = kmeans(residual, k, imp, iters=iters, tol=tol, seed=seed + stage, init=init,
                     max_fit_blocks=None)
        cent = res.centroids.to(cb_dtype).float()
        idx, _ = kmeans_assign(residual, cent, imp)     # against the stored entries
        residual = residual - cent.gather(1, idx[..., None].expand(-1, -1, blocks.shape[1]))
        cbs.append(cent.to(cb_dtype))
        histories.append(res.objective)
    return torch.stack(cbs), histories


def refine_codebooks(qw: QuantizedWeight, weight: torch.Tensor, gram: torch.Tensor,
                     steps: int = 100, lr: float = 1e-3) -> QuantizedWeight:
    """Re-fit codebook entries and scales with the indices fixed, on the layer's output loss.

    Minimises tr((W - Q) H (W - Q)^T) with H = X^T X (GPTVQ's codebook update, done here with
    Adam in float32). The result is stored in the codebook's dtype; it is kept only if the loss
    after rounding is lower than before, so refining never makes a layer worse on H.
    weight: [out, in]; gram: [in, in], both in the layer's input basis. A weight with an input
    rotation R (physkern.rotation) is refined in its stored basis: the same loss written as
    tr((W R - Q) R^T H R (W R - Q)^T); the result keeps R.
    """
    if steps <= 0:
        return qw
    w = weight.detach().float().cpu()
    h = gram.detach().float().cpu()
    rot = qw.rotation
    if rot is not None:
        w = rot.apply(w.double()).float()
        h = rot.rotate_gram(h.double()).float()
    h = h / torch.diagonal(h).mean().clamp_min(1e-30)
    idx = qw.indices()                                               # [S, out, nb]
    loss_of = lambda q: float((((w - q) @ h) * (w - q)).sum())
    rebuild = lambda cbs, scales: reconstruct(idx, cbs, scales, qw.offsets,
                                              codebook_rows=qw.codebook_rows, dtype=torch.float32)

    cbs = qw.codebooks.float().clone().requires_grad_(True)
    scales = qw.scales.float().clone().requires_grad_(True) if qw.scales is not None else None
    params = [cbs] + ([scales] if scales is not None else [])
    opt = torch.optim.Adam(params, lr=lr * float(qw.codebooks.float().abs().mean().clamp_min(1e-8)))
    before = loss_of(rebuild(qw.codebooks, qw.scales))
    # quantize() runs layers under torch.no_grad(); the refit needs autograd locally.
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            e = w - rebuild(cbs, scales)
            ((e @ h) * e).sum().backward()
            opt.step()
    new = QuantizedWeight(qw.packed, cbs.detach().to(qw.codebooks.dtype),
                          None if scales is None else scales.detach().to(qw.scales.dtype),
                          qw.offsets, qw.in_features, qw.out_features, qw.codebook_rows,
                          qw.scale_group, rot)
    return new if loss_of(rebuild(new.codebooks, new.scales)) < before else qw
