"""Nearest-centroid assignment for k-means, batched over codebook scopes.

For every scope s (a row, a group of rows or a whole layer, each with its own codebook) and every
d-dimensional block n of that scope:

    idx[s, n]  = argmin_k  sum_j imp[s, n, j] * (blocks[s, n, j] - centroids[s, k, j])**2
    dist[s, n] = the minimum itself

Ties go to the lowest centroid index (all implementations agree on exact ties).

Implementations, one contract:
- `kmeans_assign_triton`: one Triton launch for all scopes. Each program holds a tile of
  BLOCK_N blocks of one scope and loops over the scope's centroids in tiles of BLOCK_K, keeping a
  running (min, argmin). The distance is a direct difference summed over the block dimension
  (no ||w||^2 - 2 w.c + ||c||^2 cancellation), exact up to fp32 rounding; tile sizes shrink
  with d so the [BLOCK_N, BLOCK_K, d] difference tile fits in registers.
- `kmeans_assign_reference`: the same direct-difference formula in torch, chunked over centroids
  so K = 65536 does not materialise [scopes, blocks, K, d].
- `kmeans_assign_cpu`: the fast CPU path. CPU tensors run the fused C++ op
  `physkern::kmeans_assign_cpu` (csrc/kmeans_assign.cpp, in physkern._C: blocks vectorised over
  SIMD lanes, centroids swept with a running per-lane (min, argmin), threads over tiles); other
  devices, a build without physkern._C, or (on a CPU without AVX-512) any problem above
  NATIVE_MAX_WORK_WITHOUT_AVX512 run `kmeans_assign_torch` (`prefer_native_kmeans` picks).
  Both rank centroids with the expanded form -2 (s w).c + s.c^2 (the per-block constant s.w^2
  does not change the argmin) and then recompute the exact distance of the chosen centroid (the
  C++ op in the reference's order and rounding). Near-ties that differ by fp32 rounding of the
  expanded form may pick a different (equally near) centroid.
- `kmeans_assign_torch`: the pure-torch fallback of the CPU path: one batched matmul per chunk.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

SUPPORTED_BLOCK_DIMS = (1, 2, 4, 8, 16)

# Production launch configurations per block dim d (compiled for sm_80/sm_90 by
# tests/test_kernel_compile.py). The [BLOCK_N, BLOCK_K, d] difference tile lives in registers:
# at most 8192 fp32 over 128 threads; for d <= 2 the reduction needs more registers per element,
# so the tile is smaller (ptxas then stays well under 255 registers, see bench/results).
KMEANS_CONFIGS = {
    1: {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4},
    2: {"BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4},
    4: {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4},
    8: {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4},
    16: {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4},
}


@triton.jit
def _kmeans_assign_kernel(
    blocks_ptr, centroids_ptr, importance_ptr, idx_ptr, dist_ptr,
    n_blocks, n_centroids,
    stride_bs, stride_bn, stride_bd,
    stride_cs, stride_ck, stride_cd,
    stride_is, stride_in, stride_id,
    D: tl.constexpr, HAS_IMPORTANCE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    scope = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < n_blocks
    offs_n64 = offs_n.to(tl.int64)
    # The block tile [BLOCK_N, D] (and its importance) stays in registers for the whole loop.
    w = tl.load(blocks_ptr + scope * stride_bs + offs_n64[:, None] * stride_bn
                + offs_d[None, :] * stride_bd, mask=mask_n[:, None], other=0.0).to(tl.float32)
    if HAS_IMPORTANCE:
        s = tl.load(importance_ptr + scope * stride_is + offs_n64[:, None] * stride_in
                    + offs_d[None, :] * stride_id, mask=mask_n[:, None], other=0.0).to(tl.float32)
    cent_base = centroids_ptr + scope * stride_cs

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, n_centroids, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_centroids
        c = tl.load(cent_base + offs_k[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                    mask=mask_k[:, None], other=0.0).to(tl.float32)
        diff = w[:, None, :] - c[None, :, :]                      # [BLOCK_N, BLOCK_K, D]
        sq = diff * diff
        if HAS_IMPORTANCE:
            sq = sq * s[:, None, :]
        dist = tl.sum(sq, axis=2)                                 # [BLOCK_N, BLOCK_K]
        dist = tl.where(mask_k[None, :], dist, float("inf"))
        tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True,
                                    return_indices_tie_break_left=True)
        # Strictly smaller: on a tie an earlier tile (lower index) keeps the block.
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg + k0, best_idx)

    out_off = scope * n_blocks + offs_n64
    tl.store(idx_ptr + out_off, best_idx.to(tl.int64), mask=mask_n)
    tl.store(dist_ptr + out_off, best, mask=mask_n)


def check_assign_inputs(blocks: torch.Tensor, centroids: torch.Tensor,
                        importance: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Validate shapes/dtypes; return importance expanded to blocks' shape (a stride-0 view) or None."""
    if blocks.dim() != 3:
        raise ValueError(f"blocks must be [n_scopes, n_blocks, d], got shape {tuple(blocks.shape)}")
    if centroids.dim() != 3:
        raise ValueError(f"centroids must be [n_scopes, K, d], got shape {tuple(centroids.shape)}")
    s, n, d = blocks.shape
    if centroids.shape[0] != s or centroids.shape[2] != d:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match blocks {tuple(blocks.shape)}: "
                         "need the same n_scopes and d")
    if centroids.shape[1] < 1:
        raise ValueError("centroids must hold at least one centroid per scope (K >= 1)")
    if not (blocks.is_floating_point() and centroids.is_floating_point()):
        raise ValueError(f"blocks and centroids must be floating point, got {blocks.dtype}, "
                         f"{centroids.dtype}")
    if blocks.device != centroids.device:
        raise ValueError(f"blocks ({blocks.device}) and centroids ({centroids.device}) must share a device")
    if importance is None:
        return None
    if not importance.is_floating_point():
        raise ValueError(f"importance must be floating point, got {importance.dtype}")
    try:
        return importance.to(blocks.device).expand(s, n, d)
    except RuntimeError as e:
        raise ValueError(f"importance {tuple(importance.shape)} is not broadcastable to blocks "
                         f"{tuple(blocks.shape)}") from e


class AssignInputs(NamedTuple):
    """Validated float32 operands: w [S, N, d], c [S, K, d], imp [S, N, d] (a view) or None."""
    w: torch.Tensor
    c: torch.Tensor
    imp: Optional[torch.Tensor]
    s: int
    n: int
    d: int
    k: int


def prepare_assign_inputs(blocks: torch.Tensor, centroids: torch.Tensor,
                          importance: Optional[torch.Tensor]) -> AssignInputs:
    """check_assign_inputs, then everything as float32 (no copy when already float32)."""
    imp = check_assign_inputs(blocks, centroids, importance)
    s, n, d = blocks.shape
    return AssignInputs(blocks.float(), centroids.float(),
                        imp.float() if imp is not None else None, s, n, d, centroids.shape[1])


def kmeans_assign_triton(blocks: torch.Tensor, centroids: torch.Tensor,
                         importance: Optional[torch.Tensor] = None,
                         block_n: Optional[int] = None, block_k: Optional[int] = None,
                         num_warps: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton assignment (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).

    blocks [S, N, d], centroids [S, K, d], importance broadcastable to [S, N, d] (any strides;
    broadcast dims get stride 0) -> (indices int64 [S, N], distances float32 [S, N]).
    block_n / block_k / num_warps override KMEANS_CONFIGS[d] (tests use small tiles).
    """
    imp = check_assign_inputs(blocks, centroids, importance)
    s, n, d = blocks.shape
    k = centroids.shape[1]
    if d not in SUPPORTED_BLOCK_DIMS:
        raise ValueError(f"block dim d must be one of {SUPPORTED_BLOCK_DIMS}, got {d}")
    idx = torch.empty(s, n, dtype=torch.int64, device=blocks.device)
    dist = torch.empty(s, n, dtype=torch.float32, device=blocks.device)
    if s == 0 or n == 0:
        return idx, dist
    cfg = KMEANS_CONFIGS[d]
    bn = block_n or cfg["BLOCK_N"]
    bk = block_k or cfg["BLOCK_K"]
    nw = num_warps or cfg["num_warps"]
    imp_arg = imp if imp is not None else blocks  # never read when HAS_IMPORTANCE is False
    imp_strides = imp.stride() if imp is not None else (0, 0, 0)
    grid = (triton.cdiv(n, bn), s)
    _kmeans_assign_kernel[grid](
        blocks, centroids, imp_arg, idx, dist, n, k,
        *blocks.stride(), *centroids.stride(), *imp_strides,
        D=d, HAS_IMPORTANCE=imp is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    return idx, dist


def _chunk(total: int, per_item: int, budget: int) -> int:
    return max(1, min(total, budget // max(1, per_item)))


def kmeans_assign_reference(blocks: torch.Tensor, centroids: torch.Tensor,
                            importance: Optional[torch.Tensor] = None,
                            chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: direct differences summed over j in order, chunked over scopes and centroids.

    Same contract as kmeans_assign_triton. Memory stays near chunk_elements floats whatever K is.
    """
    w, c, imp, s, n, d, k = prepare_assign_inputs(blocks, centroids, importance)
    idx = torch.zeros(s, n, dtype=torch.int64, device=blocks.device)
    dist = torch.full((s, n), float("inf"), dtype=torch.float32, device=blocks.device)
    kc = _chunk(k, max(1, n), chunk_elements)
    sc = _chunk(s, max(1, n) * kc, chunk_elements)
    for s0 in range(0, s, sc):
        ws = w[s0:s0 + sc, :, None, :]                               # [sc, n, 1, d]
        ims = imp[s0:s0 + sc, :, None, :] if imp is not None else None
        for k0 in range(0, k, kc):
            cs = c[s0:s0 + sc, None, k0:k0 + kc, :]                   # [sc, 1, kc, d]
            acc = torch.zeros(ws.shape[0], n, cs.shape[2], device=blocks.device)
            for j in range(d):  # block dimension (<= 16), in the kernel's order
                diff = ws[..., j] - cs[..., j]
                acc += ims[..., j] * (diff * diff) if ims is not None else diff * diff
            cmin, carg = acc.min(dim=-1)  # first minimum on ties
            better = cmin < dist[s0:s0 + sc]
            dist[s0:s0 + sc] = torch.where(better, cmin, dist[s0:s0 + sc])
            idx[s0:s0 + sc] = torch.where(better, carg + k0, idx[s0:s0 + sc])
    return idx, dist


def kmeans_assign_torch(blocks: torch.Tensor, centroids: torch.Tensor,
                        importance: Optional[torch.Tensor] = None,
                        chunk_elements: int = 1 << 19) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch CPU path (valid on any device): batched matmul ranking + exact distance.

    Same contract as kmeans_assign_triton. Scores -2 (s w).c + s.c^2 are computed chunk by chunk
    (chunk_elements floats of [scopes, blocks, centroids] at a time, sized to stay in cache);
    the returned distances are recomputed exactly for the chosen centroids.
    """
    w, c, imp, s, n, d, k = prepare_assign_inputs(blocks, centroids, importance)
    idx = torch.empty(s, n, dtype=torch.int64, device=blocks.device)
    if s == 0 or n == 0:
        return idx, torch.empty(s, n, device=blocks.device)

    # Importance that does not vary over blocks folds into the centroids: one matmul of width d.
    per_scope_imp = imp is not None and imp.stride(1) == 0
    if imp is None:
        lhs = w                                                       # [S, N, d]
        rhs = c                                                       # [S, K, d]
        const = (c * c).sum(-1)                                       # [S, K]
    elif per_scope_imp:
        s_dim = imp[:, 0, :]                                          # [S, d]
        lhs = w
        rhs = c * s_dim[:, None, :]
        const = (rhs * c).sum(-1)
    else:  # importance per block: [s*w, s] . [-2c, c^2]
        lhs = torch.cat([imp * w, imp], dim=-1)                       # [S, N, 2d]
        rhs = torch.cat([-2.0 * c, c * c], dim=-1)                    # [S, K, 2d]
        const = None

    kc = _chunk(k, min(n, 256), chunk_elements)
    nc = _chunk(n, kc, chunk_elements)
    sc = _chunk(s, nc * kc, chunk_elements)
    rhs_t = rhs.transpose(1, 2)                                       # [S, d', K]
    for s0 in range(0, s, sc):
        for n0 in range(0, n, nc):
            lhs_c = lhs[s0:s0 + sc, n0:n0 + nc]
            best = None
            for k0 in range(0, k, kc):
                r = rhs_t[s0:s0 + sc, :, k0:k0 + kc]
                if const is None:
                    score = torch.bmm(lhs_c, r)
                else:
                    score = torch.baddbmm(const[s0:s0 + sc, None, k0:k0 + kc], lhs_c, r, alpha=-2.0)
                cmin, carg = score.min(dim=-1)
                if best is None:
                    best, arg = cmin, carg
                else:
                    better = cmin < best
                    best = torch.where(better, cmin, best)
                    arg = torch.where(better, carg + k0, arg)
            idx[s0:s0 + sc, n0:n0 + nc] = arg
    # Exact distance of the chosen centroid (index_select of rows is far cheaper than gather).
    flat = (idx + torch.arange(s, device=idx.device)[:, None] * k).reshape(-1)
    chosen = c.reshape(s * k, d).index_select(0, flat).reshape(s, n, d)
    diff = w - chosen
    sq = diff * diff
    dist = (sq * imp).sum(-1) if imp is not None else sq.sum(-1)
    return idx, dist


_NATIVE_OP = "physkern::kmeans_assign_cpu"
_native: Optional[bool] = None


def native_kmeans_available() -> bool:
    """Whether physkern._C is importable and registers a CPU kernel for physkern::kmeans_assign_cpu
    (False for a build without the extension, or a stale one from before the op existed)."""
    global _native
    if _native is None:
        from ._native import native_op_available
        _native = native_op_available(_NATIVE_OP)
    return _native


# Work (scopes x blocks x centroids x d multiply-adds) up to which the C++ op runs on a CPU
# without AVX-512: below it both paths take well under a millisecond and the op skips torch's
# per-call overhead; above it the op's register tiles (sized for 32 AVX-512 registers) spill on
# 16 AVX2 registers and the batched-matmul path is faster, median 3x
# (bench/bench_kmeans_paths.py, bench/results/kmeans_paths_cpu.json: K=65536 d=8, 1536 blocks with per-block importance,
# 1.56 s against 0.17 s on a 2-core AVX2 EPYC, which made a shared-codebook layer take 2 minutes).
NATIVE_MAX_WORK_WITHOUT_AVX512 = 1 << 20


def prefer_native_kmeans(s: int, n: int, k: int, d: int,
                         capability: Optional[str] = None) -> bool:
    """Whether the C++ op (rather than kmeans_assign_torch) should assign a [s, n, d] problem
    against k centroids per scope on this CPU. capability: torch's CPU capability string
    ("AVX512", "AVX2", "DEFAULT", ...; None = this machine's). The one place that picks."""
    cap = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    return cap.startswith("AVX512") or s * n * k * d <= NATIVE_MAX_WORK_WITHOUT_AVX512


def kmeans_assign_cpu(blocks: torch.Tensor, centroids: torch.Tensor,
                      importance: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast CPU path: the fused C++ op for CPU tensors where it is the faster one
    (prefer_native_kmeans), else kmeans_assign_torch (any device).

    Same contract as kmeans_assign_triton: blocks [S, N, d], centroids [S, K, d], importance
    broadcastable to [S, N, d] or None -> (indices int64 [S, N], distances float32 [S, N]).
    """
    imp = check_assign_inputs(blocks, centroids, importance)
    if blocks.device.type == "cpu" and native_kmeans_available() and prefer_native_kmeans(
            blocks.shape[0], blocks.shape[1], centroids.shape[1], blocks.shape[2]):
        return torch.ops.physkern.kmeans_assign_cpu(blocks, centroids, imp)
    return kmeans_assign_torch(blocks, centroids, importance)
