"""Partial-sum ("psumbook") Triton GEMV for shared (layer-scope) codebooks: decode without
dequantization.

For one codebook shared by every row, W[n, s*d:(s+1)*d] = scale[n, g] * sum_st C_st[idx_st[n, s]]
(+ offset[n, g]), so

    y[m, n] = sum_g scale[n, g] * sum_{s in g} sum_st P_st[m, s, idx_st[n, s]]
              + offset[n, g] * sum_{j in g} x[m, j],      P_st[m, s, k] = C_st[k] . x[m, s]

Each program owns one chunk of SL consecutive slices (d inputs each) of one row of x and a range
of output rows. It builds its tables P (SL * KP fp32, SL * K * d FMAs: K / BLOCK_N of an FMA
per weight) once, then walks its rows BLOCK_N at a time: per row and slice one table lookup and
one add (no codebook read, no multiply by x), and one fp32 atomic add into y per row and chunk
(split-K over chunks; a per-row scale is applied once by the finishing kernel). Threads sit on
different rows at the same slices. The lookups are one tl.gather over the flat table, which
Triton lowers through shared memory: one LDS per lookup (a 2-D gather would get a warp-local
layout and cost KP / 32 shuffles per lookup instead; tests/test_kernel_compile.py checks the
SASS has no shuffles).

The indices are read from a re-laid-out copy of the packed bit stream (`psum_layout`, built once
per packed tensor and cached while it lives unmodified): per stage and chunk, words [SL * w / 32,
out] of power-of-two bit fields w (never straddling a word), rows contiguous, so a warp reading
one word of consecutive rows reads whole 128-byte lines (and 16-byte vectors where the row count
is a multiple of 16). Indices of 9-16 bits are split into an 8-bit plane and a high plane of the
remaining bits rounded up to a power of two (9 bits: 8 + 1); 3 bits take 4-bit fields, 5-7
bits 8-bit fields.

Limits (psum_supported): one codebook for all rows, 1 or 2 stages, K <= PSUM_MAX_K,
scale_group a multiple of d. Other formats take codebook_matmul_triton. The layout is a second
copy of the indices on the device (the packed original stays for the other paths).

The reference is kernels/codebook_matmul.codebook_matmul_reference (tests compare the two).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _device
from ._checks import check_matmul_inputs
from .index_cache import PlanCache
from .packing import index_bits, unpack_indices

PSUM_MAX_K = 1024          # 10-bit indices: the tables of one chunk stay small (below)
PSUM_MAX_STAGES = 2        # each stage keeps its own table in the program
PSUM_TABLE_ENTRIES = 4096  # SL * KP per stage: 16 KB of fp32 table per program and stage
PSUM_MAX_SL = 64           # slices per chunk
# Production config: up to 1024 rows per program (8 per thread at 4 warps), fewer when that
# leaves SMs idle (pick_block_n); compiled for sm_80/sm_90 by tests/test_kernel_compile.py.
PSUM_CONFIG = {"BLOCK_N": 1024, "num_warps": 4, "waves": 2}
PSUM_LOOKUPS_PER_BLOCK = 16384  # BLOCK_N * SL * stages: K=256 d=4 gets 1024 rows x 16 slices
REDUCE_BLOCK = 1024

# The CUDA decode GEMV: "dequant" (codebook_matmul_triton's kernels, the default) or "psum"
# (this kernel for eligible formats and at most codebook_matmul.PSUM_MAX_M = 4 rows of x: each
# row of x runs its own programs and re-reads the indices, so wider x stays on the dequantizing
# kernels). Off by default until it has been timed on a GPU: set_cuda_gemv("psum") or
# PHYSKERN_CUDA_GEMV=psum.
CUDA_GEMVS = ("dequant", "psum")
_cuda_gemv = os.environ.get("PHYSKERN_CUDA_GEMV", "dequant")


def set_cuda_gemv(mode: str) -> None:
    """Choose the CUDA small-M path of codebook_matmul_triton: "dequant" or "psum"."""
    global _cuda_gemv
    if mode not in CUDA_GEMVS:
        raise ValueError(f"cuda gemv must be one of {CUDA_GEMVS}, got {mode!r}")
    _cuda_gemv = mode


def cuda_gemv() -> str:
    """The current set_cuda_gemv / PHYSKERN_CUDA_GEMV setting."""
    if _cuda_gemv not in CUDA_GEMVS:
        raise ValueError(f"PHYSKERN_CUDA_GEMV must be one of {CUDA_GEMVS}, got {_cuda_gemv!r}")
    return _cuda_gemv


# ---------------------------------------------------------------------------------------------
# Geometry and index layout
# ---------------------------------------------------------------------------------------------

def _pow2_ceil(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def plane_bits(bits: int) -> tuple[int, int]:
    """(low plane field width, high plane field width or 0): power-of-two fields that never
    straddle a word. Up to 8 bits one plane (3 -> 4, 5..7 -> 8); above, 8 + the rest rounded up
    (9 -> 8 + 1, 10 -> 8 + 2)."""
    if bits <= 8:
        return _pow2_ceil(bits), 0
    return 8, _pow2_ceil(bits - 8)


def chunk_slices(k: int, n_slices: int, group_slices: int) -> int:
    """SL, slices per chunk: a power of two with SL * KP <= PSUM_TABLE_ENTRIES, at most
    PSUM_MAX_SL and the slice count rounded up to a power of two, dividing the scale group's
    slice count (so one chunk lies in one scale group and a row needs one scale per chunk;
    groups of an odd number of slices get SL = 1: correct, slow)."""
    sl = max(1, min(PSUM_MAX_SL, PSUM_TABLE_ENTRIES // _pow2_ceil(k), _pow2_ceil(n_slices)))
    if group_slices < n_slices:
        sl = min(sl, group_slices & -group_slices)  # largest power of two dividing it
    return sl


def plane_words(sl: int, width: int) -> int:
    """int32 words one row's chunk of `sl` fields of `width` bits takes."""
    return max(1, sl * width // 32)


def _pack_plane(idx: torch.Tensor, sl: int, width: int) -> torch.Tensor:
    """idx [S, out, n_chunks * sl] (values < 2**width) -> int32 [S, n_chunks, words, out]: field
    i of a row's chunk at bits (i % per) * width of word i // per; rows contiguous, so a warp
    reading one word of 32 consecutive rows reads 128 contiguous bytes."""
    stages, out, ns = idx.shape
    per = min(32 // width, sl)
    words = plane_words(sl, width)
    v = idx.reshape(stages, out, ns // sl, words, per).to(torch.int64)
    shifts = torch.arange(per, device=idx.device, dtype=torch.int64) * width
    w = (v << shifts).sum(-1)                                   # fields are disjoint: sum = or
    w = torch.where(w >= (1 << 31), w - (1 << 32), w).to(torch.int32)
    return w.permute(0, 2, 3, 1).contiguous()


def build_layout(packed: torch.Tensor, k: int, n_slices: int, sl: int):
    """(low plane, high plane or None) int32 [S, n_chunks, words, out] from the packed stream;
    the slice count is padded to whole chunks with index 0 (their table entries are zero)."""
    bits = index_bits(k)
    lo_w, hi_w = plane_bits(bits)
    idx = unpack_indices(packed, bits, n_slices)                # [S, out, n_slices]
    pad = (-n_slices) % sl
    if pad:
        idx = torch.nn.functional.pad(idx, (0, pad))
    lo = _pack_plane(idx & ((1 << lo_w) - 1) if hi_w else idx, sl, lo_w)
    hi = _pack_plane(idx >> 8, sl, hi_w) if hi_w else None
    return lo, hi


LAYOUT_CACHE = PlanCache()


def psum_layout(packed: torch.Tensor, k: int, n_slices: int, sl: int):
    """build_layout for `packed`, cached while that tensor lives unmodified (one re-layout per
    weight, like the CPU LUT GEMVs' layouts)."""
    return LAYOUT_CACHE.get(packed, ("psum", k, n_slices, sl),
                            lambda: build_layout(packed, k, n_slices, sl))


def psum_supported(stages: int, n_codebooks: int, k: int, d: int, scale_group: int,
                   has_scales: bool) -> bool:
    """Whether the format fits the psum GEMV: one shared codebook, at most PSUM_MAX_STAGES
    stages, K <= PSUM_MAX_K, scale groups made of whole slices."""
    return (n_codebooks == 1 and 1 <= stages <= PSUM_MAX_STAGES and k <= PSUM_MAX_K
            and (not has_scales or scale_group % d == 0))


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

@triton.jit
def _stage_table(x_ptr, cb_ptr, offs_s, mask_s, n_entries,
                 D: tl.constexpr, KP: tl.constexpr, SL: tl.constexpr):
    """The table flat [SL * KP] fp32, slice-major: P[s * KP + k] = C[k] . x[slice s] for this
    stage's codebook C [K, D] (zero for k >= K and slices past the end). Flat because Triton
    lowers a 1-D tl.gather through shared memory (one load per lookup), while for 2-D tensors
    it forces a warp-local layout and emits KP / 32 shuffles and selects per lookup."""
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < n_entries
    p = tl.zeros([SL, KP], dtype=tl.float32)
    for j in tl.static_range(D):
        c = tl.load(cb_ptr + offs_k * D + j, mask=mask_k, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + offs_s * D + j, mask=mask_s, other=0.0).to(tl.float32)
        p += xv[:, None] * c[None, :]
    return tl.reshape(p, [SL * KP])


@triton.jit
def _plane_fields(ptr, offs_n, mask_n, n_rows, W: tl.constexpr, SL: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """[SL, BLOCK_N] fields of width W of rows offs_n in one chunk of one plane (words
    [words, out]: a warp loads consecutive rows of one word, coalesced)."""
    PER: tl.constexpr = SL if SL < 32 // W else 32 // W
    NW: tl.constexpr = SL // PER
    wrd = tl.load(ptr + tl.arange(0, NW)[:, None] * n_rows + offs_n[None, :],
                  mask=mask_n[None, :], other=0).to(tl.uint32)
    sh = (tl.arange(0, PER) * W).to(tl.uint32)
    return tl.reshape((wrd[:, None, :] >> sh[None, :, None]) & ((1 << W) - 1), [SL, BLOCK_N])


@triton.jit
def _chunk_indices(lo_ptr, hi_ptr, offs_n, mask_n, n_rows,
                   LO_W: tl.constexpr, HI_W: tl.constexpr, SL: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """[SL, BLOCK_N] int32 indices of rows offs_n in one chunk (low plane | high plane << 8)."""
    idx = _plane_fields(lo_ptr, offs_n, mask_n, n_rows, LO_W, SL, BLOCK_N)
    if HI_W > 0:
        idx = idx | (_plane_fields(hi_ptr, offs_n, mask_n, n_rows, HI_W, SL, BLOCK_N) << 8)
    return idx.to(tl.int32)


@triton.jit
def _lookup_sum(p, idx, KP: tl.constexpr, SL: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_s P[s * KP + idx[s, n]] -> [BLOCK_N] fp32 (p flat [SL * KP], idx [SL, BLOCK_N])."""
    flat = tl.reshape(tl.arange(0, SL)[:, None] * KP + idx, [SL * BLOCK_N])
    return tl.sum(tl.reshape(tl.gather(p, flat, 0), [SL, BLOCK_N]), axis=0)


@triton.jit
def _psum_gemv_kernel(
    x_ptr, lo_ptr, hi_ptr, cb_ptr, scales_ptr, offsets_ptr, y_ptr,
    N, n_slices, n_entries, rows_per_prog, group_slices,
    stride_xm, stride_ls, stride_lc, stride_hs, stride_hc, stride_cs,
    stride_sn, stride_sg, stride_on, stride_og, stride_ym,
    D: tl.constexpr, KP: tl.constexpr, SL: tl.constexpr, STAGES: tl.constexpr,
    LO_W: tl.constexpr, HI_W: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (row blocks, chunks, rows of x). y (fp32, zeroed) += this chunk's partial sums of
    rows [pid_r * rows_per_prog, +rows_per_prog) for row pid_m of x, scaled (HAS_SCALES: one
    scale per row and chunk; per-row scales are left to the finishing kernel)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_s = pid_c * SL + tl.arange(0, SL)
    mask_s = offs_s < n_slices
    xrow = x_ptr + pid_m.to(tl.int64) * stride_xm
    # The tables, built once and reused for every row of the program.
    p0 = _stage_table(xrow, cb_ptr, offs_s, mask_s, n_entries, D, KP, SL)
    if STAGES == 2:
        p1 = _stage_table(xrow, cb_ptr + stride_cs, offs_s, mask_s, n_entries, D, KP, SL)
    if HAS_OFFSETS:  # offset[n, g] * sum of x over the chunk (the chunk lies in one group)
        offs_j = pid_c * SL * D + tl.arange(0, SL * D)
        xsum = tl.sum(tl.load(xrow + offs_j, mask=offs_j < n_slices * D, other=0.0)
                      .to(tl.float32), axis=0)
    grp = (pid_c * SL) // group_slices
    lo_base = lo_ptr + pid_c.to(tl.int64) * stride_lc
    hi_base = hi_ptr + pid_c.to(tl.int64) * stride_hc
    r_start = pid_r * rows_per_prog
    r_stop = tl.minimum(r_start + rows_per_prog, N)
    for n0 in range(r_start, r_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # against N, not r_stop: rows_per_prog is a multiple of BLOCK_N, and a mask constant
        # over aligned runs of rows keeps the index loads coalesced
        mask_n = offs_n < N
        idx = _chunk_indices(lo_base, hi_base, offs_n, mask_n, N, LO_W, HI_W, SL, BLOCK_N)
        # one table read per (row, slice): P[s * KP + idx[s, n]]
        acc = _lookup_sum(p0, idx, KP, SL, BLOCK_N)
        if STAGES == 2:
            idx1 = _chunk_indices(lo_base + stride_ls, hi_base + stride_hs, offs_n, mask_n, N,
                                  LO_W, HI_W, SL, BLOCK_N)
            acc += _lookup_sum(p1, idx1, KP, SL, BLOCK_N)
        if HAS_SCALES:
            sc = tl.load(scales_ptr + offs_n * stride_sn + grp * stride_sg, mask=mask_n,
                         other=0.0).to(tl.float32)
            acc = acc * sc
            if HAS_OFFSETS:
                of = tl.load(offsets_ptr + offs_n * stride_on + grp * stride_og, mask=mask_n,
                             other=0.0).to(tl.float32)
                acc += of * xsum
        tl.atomic_add(y_ptr + pid_m * stride_ym + offs_n, acc, mask=mask_n, sem="relaxed")


@triton.jit
def _finish_kernel(acc_ptr, scales_ptr, bias_ptr, y_ptr, total, N, stride_sn,
                   ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = fp32 sums (x the row's scale when ROW_SCALE, + bias) cast to y's dtype. A per-row
    scale applied here is read once per row instead of once per row and chunk."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if ROW_SCALE:
        acc *= tl.load(scales_ptr + (offs % N) * stride_sn, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def max_block_n(sl: int, stages: int, cfg: dict = PSUM_CONFIG) -> int:
    """Largest rows per program for chunks of `sl` slices: cfg's BLOCK_N, capped so that a
    program's lookups per row block (BLOCK_N * SL * stages) stay at PSUM_LOOKUPS_PER_BLOCK,
    whose index tile fits the registers without spilling (sm_80/sm_90, checked by
    tests/test_kernel_compile.py), and at least one row per thread."""
    floor = 32 * cfg["num_warps"]
    return max(floor, min(cfg["BLOCK_N"], PSUM_LOOKUPS_PER_BLOCK // (sl * stages)))


def pick_block_n(n_rows: int, n_chunks: int, m: int, sl: int, stages: int,
                 device: torch.device, cfg: dict = PSUM_CONFIG) -> int:
    """Rows per program: max_block_n, halved (down to one row per thread) while row blocks x
    chunks x rows of x fill fewer than cfg["waves"] waves of SMs, and never far past n_rows."""
    sms = _device.sm_count(device)
    floor = 32 * cfg["num_warps"]
    bn = max(floor, min(max_block_n(sl, stages, cfg), _pow2_ceil(n_rows)))
    while bn > floor and triton.cdiv(n_rows, bn) * n_chunks * m < cfg["waves"] * sms:
        bn //= 2
    return bn


def codebook_matmul_psum(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                         scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                         scale_group: int, config: Optional[dict] = None,
                         rows_per_prog: Optional[int] = None) -> torch.Tensor:
    """The psum GEMV (CUDA, or CPU under TRITON_INTERPRET=1). Same contract as
    codebook_matmul_triton: x [..., in] -> y [..., out] in x.dtype, fp32 arithmetic. Needs
    psum_supported; any number of rows of x (each runs its own programs: meant for few).
    config overrides PSUM_CONFIG (BLOCK_N, a power of two; num_warps; waves); rows_per_prog
    (a multiple of BLOCK_N) makes each program loop over that many rows."""
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    stages, out = packed.shape[0], packed.shape[1]
    _, n_cb, k, d = codebooks.shape
    if n_cb != 1:
        raise ValueError(f"codebooks: the psum GEMV needs one codebook shared by all rows "
                         f"(layer scope), got {n_cb}")
    if not 1 <= stages <= PSUM_MAX_STAGES:
        raise ValueError(f"codebooks: the psum GEMV takes 1..{PSUM_MAX_STAGES} stages, "
                         f"got {stages}")
    if k > PSUM_MAX_K:
        raise ValueError(f"codebooks: the psum GEMV takes K <= {PSUM_MAX_K}, got K={k}")
    if scales is not None and scale_group % d:
        raise ValueError(f"scale_group ({scale_group}) must be a multiple of block_dim ({d}) "
                         "for the psum GEMV")
    cfg = {**PSUM_CONFIG, **(config or {})}
    n_slices = in_features // d
    gs = scale_group // d if scales is not None else n_slices
    sl = chunk_slices(k, n_slices, gs)
    lo, hi = psum_layout(packed, k, n_slices, sl)
    lo_w, hi_w = plane_bits(index_bits(k))
    n_chunks = lo.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, out)
    block_n = cfg["BLOCK_N"] if config and "BLOCK_N" in config else pick_block_n(
        out, n_chunks, m, sl, stages, x.device, cfg)
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"config BLOCK_N must be a power of two, got {block_n}")
    rows_per_prog = rows_per_prog or block_n
    if rows_per_prog < 1 or rows_per_prog % block_n:
        raise ValueError(f"rows_per_prog ({rows_per_prog}) must be a positive multiple of "
                         f"BLOCK_N ({block_n})")
    cb = codebooks.reshape(stages, k * d).contiguous()
    acc = torch.zeros(m, out, dtype=torch.float32, device=x.device)
    # One scale per row (the common layer-codebook format) is applied by the finishing kernel.
    row_scale = scales is not None and offsets is None and scale_group == in_features
    dummy = cb
    sc = scales if scales is not None else dummy
    of = offsets if offsets is not None else dummy
    sc_st = scales.stride() if scales is not None else (0, 0)
    of_st = offsets.stride() if offsets is not None else (0, 0)
    hi_t = hi if hi is not None else lo
    _psum_gemv_kernel[(triton.cdiv(out, rows_per_prog), n_chunks, m)](
        x2, lo, hi_t, cb, sc, of, acc,
        out, n_slices, k, rows_per_prog, gs,
        x2.stride(0), lo.stride(0), lo.stride(1), hi_t.stride(0), hi_t.stride(1), cb.stride(0),
        *sc_st, *of_st, acc.stride(0),
        D=d, KP=_pow2_ceil(k), SL=sl, STAGES=stages, LO_W=lo_w, HI_W=hi_w,
        HAS_SCALES=scales is not None and not row_scale, HAS_OFFSETS=offsets is not None,
        BLOCK_N=block_n, num_warps=cfg["num_warps"])
    total = m * out
    _finish_kernel[(triton.cdiv(total, REDUCE_BLOCK),)](
        acc, sc, bias if bias is not None else dummy, y, total, out, sc_st[0],
        ROW_SCALE=row_scale, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4)
    return y.reshape(*lead, out)
