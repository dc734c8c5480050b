"""y = x @ W^T + bias with W rebuilt from packed codebook indices inside the GEMM loop.

W follows physkern.quant.format.QuantizedWeight:

    W[r, j] = scale[r, j // g] * sum_s C[s, r // codebook_rows, idx[s, r, j // d], j % d]
              + offset[r, j // g]

Implementations, one contract (`x [..., in] -> y [..., out]`, y in x's dtype):
- `codebook_matmul_triton`: one Triton kernel. Each program owns a BLOCK_M x BLOCK_N tile of y and
  walks the input dimension in BLOCK_K steps; for every step it unpacks the indices of its
  BLOCK_N rows straight from the int32 bit stream (an index may straddle two words), gathers the
  codebook entries (summing residual stages), applies scales/offsets in fp32, casts the tile to
  x's dtype and feeds tl.dot with fp32 accumulation. The dequantized W never exists in global
  memory. Three kernels share that dequantization (`_dequant_tile`): a tensor-core-free GEMV
  for M <= 4 rows of x (broadcast multiply reduced in fp32: no padding of M to an MMA tile and
  no shared-memory round trip of W), a split-K tl.dot GEMV for M <= 16, and a tiled tl.dot path
  for prefill. Split-K writes fp32 partial sums that one reduction kernel adds (with the bias)
  and casts. For at most PSUM_MAX_M rows and one shared codebook it hands over to the
  partial-sum GEMV (kernels/codebook_gemv_psum.py: table lookups, no dequantization) only when
  that is switched on (codebook_gemv_psum.set_cuda_gemv("psum") / PHYSKERN_CUDA_GEMV=psum).
- `codebook_matmul_reference`: dequantize (fp32) + matmul. The independent reference for tests.
- The CPU path: physkern::codebook_matmul's C++ CPU kernel (csrc/codebook_matmul.cpp; the op's
  schema is defined there): for x with at most NATIVE_MAX_M rows (decode) the fused kernel, where
  the packed indices are decoded row by row and the centroids FMA'd straight into the output (the
  dense W never exists); above, W dequantized once and one GEMM. `codebook_matmul_small_m` is the
  decode selector: for up to GEMV_LUT_MAX_M rows and formats where it pays, a lookup-table GEMV
  (kernels/codebook_gemv_lut.py: per row of x a table of x-slice . centroid products, then one
  register-permute lookup per d weights from a cached byte layout of the indices; int16 tables
  by default, fp32 on request), else the op's CPU kernel.
  `codebook_matmul_cpu` is the CPU path as a function (and, without physkern._C, the op's CPU
  kernel): the C++ above, or vectorised torch (no physkern._C, other devices): a LUT GEMV for
  shared codebooks and small M, else one gather + one matmul, with the unpacked indices cached
  per packed tensor (see `IndexCache`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


from . import _device
from . import codebook_gemv_lut as lut
from .index_cache import IndexCache
from .packing import index_bits, unpack_indices, words_per_row

# Production configurations, compiled for sm_80/sm_90 by tests/test_kernel_compile.py and chosen
# from bench/results/matmul_variants_gpu.json (H200; every candidate timed through this wrapper):
# - one row of x (decode): the tensor-core-free GEMV (`gemv_vec`);
# - 2..GEMV_MAX_M rows: the split-K tl.dot GEMV (`gemv`);
# - more rows: tiled tl.dot (`tiled`, `tiled_large`).
# Configs marked "wordwise_only" are used (and compiled) only for formats whose indices fill whole
# words per step (wordwise_decode), "min_block_dim"/"max_stages" only for such d and stages
# (their large tiles spill on sm_80 for the d = 1 scalar grid with offsets, or for two stages
# with offsets); the others serve every format. BLOCK_K is a multiple of every
# block dim d in {1, 2, 4, 8, 16}.
GEMV_MAX_M = 16
GEMV_VEC_MAX_M = 1
# Rows of x up to which codebook_matmul_triton hands eligible formats to the psum GEMV
# (kernels/codebook_gemv_psum.py) when that is switched on (off by default). It runs a program
# set per row of x, so its cost grows with M: the static SASS model (bench/gpu_static_report.py,
# 4096x4096 K=256 d=4) puts it at m x 0.09 warp instructions and m x 0.81 requested global
# bytes per weight against 0.35 and 2.9 for the split-K tl.dot GEMV at M <= 16: break-even near
# M = 4. Not yet timed on a GPU.
PSUM_MAX_M = 4
MATMUL_CONFIGS = {
    "gemv": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "tiled": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    "tiled_large": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
    "tiled_large_wordwise": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8,
                             "num_stages": 3, "wordwise_only": True, "min_block_dim": 2},
}
# Split-K programs aim at about this many waves of SMs (more programs in flight hide the
# dependent index-load -> codebook-gather latency of each step).
GEMV_WAVES = 2
GEMV_VEC_CONFIGS = {
    "m1": {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3,
           "waves": 8},
    "m1_wordwise": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3,
                    "waves": 4, "wordwise_only": True, "min_block_dim": 2, "max_stages": 1},
}
REDUCE_BLOCK = 1024


@triton.jit
def _dequant_tile(packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, cb_regs,
                  offs_n64, mask_n, cb_base, p_base, k0, k_stop, n_words, scale_group,
                  stride_ps, stride_pw, stride_cs, stride_ck, stride_cd,
                  stride_sn, stride_sg, stride_on, stride_og,
                  BITS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
                  HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                  SCALE_PER_BLOCK: tl.constexpr, ROW_SCALE: tl.constexpr, WORDWISE: tl.constexpr,
                  CB_ALIGN: tl.constexpr, CB_GATHER: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rows, k0:k0+BLOCK_K] as an fp32 [BLOCK_N, BLOCK_K] tile, rebuilt from the bit stream.

    One index per (row, block): decode [BLOCK_N, NBK] indices from the bit stream, gather d
    contiguous codebook values per index ([BLOCK_N, NBK, D]), sum residual stages, apply
    scales/offsets. Columns at or past k_stop are zero. Codebooks must be contiguous (the
    wrapper makes them so): an entry starts at a multiple of D, so the D values of one index
    are one vector load (8 bytes for d=4 fp16) instead of D scalar loads. On the GPU this
    function is bound by L1 traffic (Nsight Compute, H200: 89% L1/TEX throughput at 1.7% of
    DRAM bandwidth for M=1), so every load it saves counts:
    - WORDWISE (32 % BITS == 0 and a step covers whole words): each int32 word is loaded once
      and split into its 32/BITS indices in registers; otherwise each index loads its word (and
      the next, where it straddles).
    - ROW_SCALE (one scale per row): one scale load per row instead of one per index."""
    NBK: tl.constexpr = BLOCK_K // D                                   # index blocks per step
    idx_mask: tl.constexpr = (1 << BITS) - 1
    offs_d = tl.arange(0, D)
    blk = k0 // D + tl.arange(0, NBK)
    bmask = mask_n[:, None] & (blk < k_stop // D)[None, :]
    w3 = tl.zeros([BLOCK_N, NBK, D], dtype=tl.float32)
    # constexprs cannot be re-assigned: define them once, outside the (unrolled) stage loop
    PER: tl.constexpr = 32 // BITS                                         # indices per word
    NW: tl.constexpr = NBK // PER if WORDWISE else 1                       # words per step
    for s in tl.static_range(STAGES):
        if WORDWISE:
            wrd = (k0 // D) // PER + tl.arange(0, NW)
            words = tl.load(p_base[:, None] + s * stride_ps + wrd[None, :] * stride_pw,
                            mask=mask_n[:, None] & (wrd < n_words)[None, :], other=0).to(tl.uint32)
            shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
            idx3 = (words[:, :, None] >> shifts[None, None, :]) & idx_mask  # [BLOCK_N, NW, PER]
            idx = tl.reshape(idx3, [BLOCK_N, NBK]).to(tl.int32)
        else:
            bitpos = blk * BITS
            word = bitpos // 32
            shift = (bitpos % 32).to(tl.uint32)
            pptr = p_base[:, None] + s * stride_ps + word[None, :] * stride_pw
            w0 = tl.load(pptr, mask=bmask, other=0).to(tl.uint32)
            idx = w0 >> shift[None, :]
            if 32 % BITS != 0:  # an index may straddle into the next word
                w1 = tl.load(pptr + stride_pw, mask=bmask & ((word + 1) < n_words)[None, :],
                             other=0).to(tl.uint32)
                hi = w1 << ((32 - shift) & 31)[None, :]
                idx = idx | tl.where(((shift + BITS) > 32)[None, :], hi, 0)
            idx = (idx & idx_mask).to(tl.int32)
        # int32 offsets from one base pointer (the wrapper bounds the codebook size): half the
        # registers of per-element 64-bit pointers. Every term is a multiple of D.
        if CB_GATHER:
            # One small codebook, held by the program (cb_regs [KP, D]): gathered on chip
            # (tl.gather) instead of one L1 request per index.
            gidx = tl.broadcast_to(tl.reshape(idx, [BLOCK_N * NBK])[:, None], [BLOCK_N * NBK, D])
            c = tl.reshape(tl.gather(cb_regs, gidx, 0), [BLOCK_N, NBK, D])
            w3 += tl.where(bmask[:, :, None], c.to(tl.float32), 0.0)
        else:
            coff = cb_base[:, None] + s * stride_cs + idx * D
            cptr = codebooks_ptr + (coff[:, :, None] + offs_d[None, None, :])
            # An entry is D contiguous values starting at a multiple of D (16-byte aligned
            # base): told so, the compiler loads it as one vector (ld.global.v2.b32, d=4 fp16).
            cptr = tl.max_contiguous(tl.multiple_of(cptr, [1, 1, CB_ALIGN]), [1, 1, D])
            c = tl.load(cptr, mask=bmask[:, :, None], other=0.0)
            w3 += c.to(tl.float32)
    if HAS_SCALES and ROW_SCALE:  # one scale (and offset) per row
        sc = tl.load(scales_ptr + offs_n64 * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        w3 = w3 * sc[:, None, None]
        if HAS_OFFSETS:
            of = tl.load(offsets_ptr + offs_n64 * stride_on, mask=mask_n, other=0.0)
            w3 = w3 + of.to(tl.float32)[:, None, None]
    if HAS_SCALES and not ROW_SCALE:
        if SCALE_PER_BLOCK:  # scale_group % D == 0: one scale per (row, block)
            grp = (blk * D) // scale_group
            sc = tl.load(scales_ptr + offs_n64[:, None] * stride_sn + grp[None, :] * stride_sg,
                         mask=bmask, other=0.0).to(tl.float32)
            w3 = w3 * sc[:, :, None]
            if HAS_OFFSETS:
                of = tl.load(offsets_ptr + offs_n64[:, None] * stride_on
                             + grp[None, :] * stride_og, mask=bmask, other=0.0)
                w3 = w3 + of.to(tl.float32)[:, :, None]
        else:  # groups smaller than a block: one scale per element
            grp3 = ((blk[:, None] * D + offs_d[None, :]) // scale_group)[None, :, :]
            sc = tl.load(scales_ptr + offs_n64[:, None, None] * stride_sn + grp3 * stride_sg,
                         mask=bmask[:, :, None], other=0.0).to(tl.float32)
            w3 = w3 * sc
            if HAS_OFFSETS:
                of = tl.load(offsets_ptr + offs_n64[:, None, None] * stride_on
                             + grp3 * stride_og, mask=bmask[:, :, None], other=0.0)
                w3 = w3 + of.to(tl.float32)
    return tl.reshape(w3, [BLOCK_N, BLOCK_K])                              # rows x cols


@triton.jit
def _program_codebook(codebooks_ptr, n_entries, D: tl.constexpr, KP: tl.constexpr,
                      CB_GATHER: tl.constexpr):
    """The one codebook [KP, D] a program holds for the on-chip gather (layer scope, one stage,
    K <= KP), loaded once; without CB_GATHER a placeholder that is never read."""
    if CB_GATHER:
        offs_c = tl.arange(0, KP)
        return tl.load(codebooks_ptr + offs_c[:, None] * D + tl.arange(0, D)[None, :],
                       mask=(offs_c < n_entries)[:, None], other=0.0)
    else:
        return codebooks_ptr


@triton.jit
def _store_tile(acc, y_ptr, bias_ptr, offs_m64, offs_n, offs_n64, mask_m, mask_n, pid_k,
                stride_ysplit, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, SPLIT_OUTPUT: tl.constexpr):
    """Write a [BLOCK_M, BLOCK_N] fp32 tile: + bias and cast to y's dtype, or (split-K) the raw
    partial sum into slice pid_k of the fp32 partials."""
    y_mask = mask_m[:, None] & mask_n[None, :]
    y_off = offs_m64[:, None] * stride_ym + offs_n64[None, :] * stride_yn
    if not SPLIT_OUTPUT:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptr + pid_k * stride_ysplit + y_off, acc, mask=y_mask)


@triton.jit
def _step_operands(x_ptr, packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, cb_regs,
                   offs_m64, mask_m, offs_n64, mask_n, cb_base, p_base, k0, k_stop,
                   n_words, scale_group, stride_xm, stride_xk,
                   stride_ps, stride_pw, stride_cs, stride_ck, stride_cd,
                   stride_sn, stride_sg, stride_on, stride_og,
                   BITS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
                   HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                   SCALE_PER_BLOCK: tl.constexpr, ROW_SCALE: tl.constexpr,
                   WORDWISE: tl.constexpr, CB_ALIGN: tl.constexpr, CB_GATHER: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One k step's operands: the x tile [BLOCK_M, BLOCK_K] (x's dtype) and the fp32 W tile
    [BLOCK_N, BLOCK_K]; both kernels contract them their own way."""
    # k0 is a multiple of BLOCK_K and k_stop of D: said so, the x loads become vectors.
    k0 = tl.multiple_of(k0, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = (offs_k // D) < (k_stop // D)
    x = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    w = _dequant_tile(packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, cb_regs,
                      offs_n64, mask_n, cb_base, p_base, k0, k_stop, n_words, scale_group,
                      stride_ps, stride_pw, stride_cs, stride_ck, stride_cd,
                      stride_sn, stride_sg, stride_on, stride_og,
                      BITS, D, STAGES, HAS_SCALES, HAS_OFFSETS, SCALE_PER_BLOCK,
                      ROW_SCALE, WORDWISE, CB_ALIGN, CB_GATHER, BLOCK_N, BLOCK_K)
    return x, w


@triton.jit
def _codebook_matmul_kernel(
    x_ptr, packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, K_IN, n_words, codebook_rows, scale_group, k_per_split, n_entries,
    stride_xm, stride_xk,
    stride_ps, stride_pn, stride_pw,
    stride_cs, stride_cc, stride_ck, stride_cd,
    stride_sn, stride_sg,
    stride_on, stride_og,
    stride_ysplit, stride_ym, stride_yn,
    BITS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr, ROW_SCALE: tl.constexpr, WORDWISE: tl.constexpr,
    CB_ALIGN: tl.constexpr, CB_GATHER: tl.constexpr, KP: tl.constexpr, SPLIT_OUTPUT: tl.constexpr, FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    cb_base = (offs_n // codebook_rows) * stride_cc                    # [BLOCK_N] int32 offsets
    p_base = packed_ptr + offs_n64 * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    cb_regs = _program_codebook(codebooks_ptr, n_entries, D, KP, CB_GATHER)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K_IN)                  # a multiple of D
    for k0 in range(k_start, k_stop, BLOCK_K):
        x, w = _step_operands(x_ptr, packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, cb_regs,
                              offs_m64, mask_m, offs_n64, mask_n, cb_base, p_base, k0, k_stop,
                              n_words, scale_group, stride_xm, stride_xk,
                              stride_ps, stride_pw, stride_cs, stride_ck, stride_cd,
                              stride_sn, stride_sg, stride_on, stride_og,
                              BITS, D, STAGES, HAS_SCALES, HAS_OFFSETS, SCALE_PER_BLOCK,
                              ROW_SCALE, WORDWISE, CB_ALIGN, CB_GATHER, BLOCK_N, BLOCK_K)
        if FP32_IEEE:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)

    _store_tile(acc, y_ptr, bias_ptr, offs_m64, offs_n, offs_n64, mask_m, mask_n, pid_k,
                stride_ysplit, stride_ym, stride_yn, HAS_BIAS, SPLIT_OUTPUT)


@triton.jit
def _codebook_gemv_kernel(
    x_ptr, packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, K_IN, n_words, codebook_rows, scale_group, k_per_split, n_entries,
    stride_xm, stride_xk,
    stride_ps, stride_pn, stride_pw,
    stride_cs, stride_cc, stride_ck, stride_cd,
    stride_sn, stride_sg,
    stride_on, stride_og,
    stride_ysplit, stride_ym, stride_yn,
    BITS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr, ROW_SCALE: tl.constexpr, WORDWISE: tl.constexpr,
    CB_ALIGN: tl.constexpr, CB_GATHER: tl.constexpr, KP: tl.constexpr, SPLIT_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode GEMV for a few rows of x (M <= BLOCK_M <= 4): no tensor-core tile to pad to 16
    rows and no shared-memory round trip for the MMA operand layout; the product is a
    broadcast multiply [BLOCK_M, BLOCK_N, BLOCK_K] reduced over the input dimension in fp32.
    Grid (N tiles, K splits); each program owns BLOCK_N output columns of all M rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    cb_base = (offs_n // codebook_rows) * stride_cc
    p_base = packed_ptr + offs_n64 * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    cb_regs = _program_codebook(codebooks_ptr, n_entries, D, KP, CB_GATHER)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K_IN)
    for k0 in range(k_start, k_stop, BLOCK_K):
        x, w = _step_operands(x_ptr, packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, cb_regs,
                              offs_m64, mask_m, offs_n64, mask_n, cb_base, p_base, k0, k_stop,
                              n_words, scale_group, stride_xm, stride_xk,
                              stride_ps, stride_pw, stride_cs, stride_ck, stride_cd,
                              stride_sn, stride_sg, stride_on, stride_og,
                              BITS, D, STAGES, HAS_SCALES, HAS_OFFSETS, SCALE_PER_BLOCK,
                              ROW_SCALE, WORDWISE, CB_ALIGN, CB_GATHER, BLOCK_N, BLOCK_K)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)

    _store_tile(acc, y_ptr, bias_ptr, offs_m64, offs_n, offs_n64, mask_m, mask_n, pid_k,
                stride_ysplit, stride_ym, stride_yn, HAS_BIAS, SPLIT_OUTPUT)


@triton.jit
def _split_reduce_kernel(part_ptr, bias_ptr, y_ptr, total, N, n_split,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum over splits of the fp32 partial sums (+ bias), cast to y's dtype: one launch in
    place of torch's sum + add + cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_split):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


from ._checks import check_matmul_inputs  # noqa: E402  (re-exported: callers import it from here)

def wordwise_decode(bits: int, blocks_per_step: int) -> bool:
    """Whether a step's indices fill whole int32 words (then each word is loaded once)."""
    return 32 % bits == 0 and blocks_per_step % (32 // bits) == 0


def codebook_alignment(d: int, element_size: int) -> int:
    """Bytes every codebook entry's address is a multiple of (contiguous, 16-byte aligned base)."""
    size = d * element_size
    return min(16, size & -size)


CB_GATHER_MAX = 2048  # codebook values a program holds for the on-chip gather (fp16: 16 B/thread)


def gather_eligible(stages: int, n_codebooks: int, kp: int, d: int, device: torch.device) -> bool:
    """Whether the kernels gather from a program-held codebook (tl.gather) rather than issue one
    L1 request per index: one codebook (layer scope), one stage, at most CB_GATHER_MAX values."""
    return stages == 1 and n_codebooks == 1 and kp * d <= CB_GATHER_MAX


def pick_config(m: int, bits: int = 8, d: int = 4, stages: int = 1) -> dict:
    """Production configuration for an x with m rows and a format of `bits`-bit indices over
    d-dim blocks with `stages` residual stages (gemv_vec configs carry "kernel")."""
    def fits(cfg):
        return d >= cfg.get("min_block_dim", 1) and stages <= cfg.get("max_stages", 8) and (
            not cfg.get("wordwise_only") or wordwise_decode(bits, cfg["BLOCK_K"] // d))
    if m <= GEMV_VEC_MAX_M:
        cfg = GEMV_VEC_CONFIGS["m1_wordwise"]
        return {"kernel": "gemv_vec", **(cfg if fits(cfg) else GEMV_VEC_CONFIGS["m1"])}
    if m <= GEMV_MAX_M:
        return MATMUL_CONFIGS["gemv"]
    if m < 256:
        return MATMUL_CONFIGS["tiled"]
    cfg = MATMUL_CONFIGS["tiled_large_wordwise"]
    return cfg if fits(cfg) else MATMUL_CONFIGS["tiled_large"]


def _split_k_for(n_tiles: int, k_steps: int, device: torch.device, waves: int = GEMV_WAVES) -> int:
    """Enough programs along the input dimension to occupy about `waves` waves of SMs."""
    sms = _device.sm_count(device)
    return max(1, min(k_steps, (waves * sms + n_tiles - 1) // n_tiles, 64))


def codebook_matmul_triton(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                           scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                           scale_group: int, config: Optional[dict] = None,
                           split_k: Optional[int] = None) -> torch.Tensor:
    """Triton codebook matmul (CUDA, or CPU under TRITON_INTERPRET=1).

    x [..., in] (fp16/bf16/fp32), packed int32 [S, out, words], codebooks [S, n_cb, K, d],
    scales/offsets [out, in/scale_group] or None, bias [out] or None -> y [..., out] in x.dtype.
    config overrides the production config (BLOCK_M/N/K, num_warps, num_stages; "kernel":
    "gemv_vec" picks the tensor-core-free decode kernel, which needs BLOCK_M >= m, and "waves"
    its split-K target); split_k overrides the number of input-dimension splits.
    """
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    if codebooks.numel() >= 2 ** 31:
        raise ValueError(f"codebooks {tuple(codebooks.shape)} are too large for the Triton "
                         "kernel's int32 offsets (at most 2**31 - 1 elements)")
    # The kernel indexes entries as idx * d from a 16-byte aligned base (vector loads).
    codebooks = codebooks.contiguous()
    if codebooks.data_ptr() % 16:
        codebooks = codebooks.clone()
    stages, out = packed.shape[0], packed.shape[1]
    d, k = codebooks.shape[3], codebooks.shape[2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if config is None and split_k is None and 0 < m <= PSUM_MAX_M and out > 0:
        # The psum GEMV, only where switched on (set_cuda_gemv("psum") /
        # PHYSKERN_CUDA_GEMV=psum; default "dequant": it has not been timed on a GPU yet) and
        # only for the formats it takes. Imported here: it imports this module.
        from . import codebook_gemv_psum as psum
        if psum.cuda_gemv() == "psum" and psum.psum_supported(
                stages, codebooks.shape[1], k, d, scale_group, scales is not None):
            return psum.codebook_matmul_psum(x, packed, codebooks, scales, offsets, bias,
                                             in_features, codebook_rows, scale_group)
    y = torch.empty(m, out, dtype=x.dtype, device=x.device)
    if m == 0 or out == 0:
        return y.reshape(*lead, out)
    cfg = dict(config or pick_config(m, index_bits(k), d, stages))
    vec = cfg.get("kernel") == "gemv_vec"
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk % d:
        raise ValueError(f"BLOCK_K ({bk}) must be a multiple of block_dim ({d})")
    if vec and bm < m:
        raise ValueError(f"the gemv_vec kernel needs BLOCK_M ({bm}) >= rows of x ({m})")
    k_steps = triton.cdiv(in_features, bk)
    n_tiles = triton.cdiv(m, bm) * triton.cdiv(out, bn)
    if split_k is None:
        split_k = (_split_k_for(n_tiles, k_steps, x.device, cfg.get("waves", GEMV_WAVES))
                   if m <= GEMV_MAX_M else 1)
    split_k = max(1, min(split_k, k_steps))
    k_per_split = triton.cdiv(k_steps, split_k) * bk
    split_k = triton.cdiv(in_features, k_per_split)
    target = y if split_k == 1 else torch.empty(split_k, m, out, dtype=torch.float32, device=x.device)
    ys = (0, *y.stride()) if split_k == 1 else target.stride()
    dummy = codebooks
    sc = scales if scales is not None else dummy
    of = offsets if offsets is not None else dummy
    sc_strides = scales.stride() if scales is not None else (0, 0)
    of_strides = offsets.stride() if offsets is not None else (0, 0)
    kp = 1 << max(0, (k - 1).bit_length())
    cb_gather = bool(cfg.get("cb_gather", False)) and gather_eligible(
        stages, codebooks.shape[1], kp, d, x.device)
    args = (x2, packed, codebooks, sc, of, bias if bias is not None else dummy, target,
            m, out, in_features, packed.shape[2], codebook_rows, scale_group, k_per_split, k,
            *x2.stride(), *packed.stride(), *codebooks.stride(), *sc_strides, *of_strides, *ys)
    meta = dict(BITS=index_bits(k), D=d, STAGES=stages,
                HAS_SCALES=scales is not None, HAS_OFFSETS=offsets is not None,
                HAS_BIAS=bias is not None, SCALE_PER_BLOCK=scale_group % d == 0,
                ROW_SCALE=scale_group == in_features,
                WORDWISE=wordwise_decode(index_bits(k), bk // d),
                CB_ALIGN=codebook_alignment(d, codebooks.element_size()),
                CB_GATHER=cb_gather, KP=kp,
                SPLIT_OUTPUT=split_k > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    if vec:
        _codebook_gemv_kernel[(triton.cdiv(out, bn), split_k)](*args, **meta)
    else:
        grid = (triton.cdiv(m, bm), triton.cdiv(out, bn), split_k)
        _codebook_matmul_kernel[grid](*args, FP32_IEEE=x.dtype == torch.float32, **meta)
    if split_k > 1:
        total = m * out
        _split_reduce_kernel[(triton.cdiv(total, REDUCE_BLOCK),)](
            target, bias if bias is not None else dummy, y, total, out, split_k,
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4)
    return y.reshape(*lead, out)


def dequantize_reference(packed: torch.Tensor, codebooks: torch.Tensor,
                         scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                         in_features: int, codebook_rows: int, scale_group: int) -> torch.Tensor:
    """W [out, in] in float32 straight from the format's formula, in plain torch: unpack every
    index, gather its centroid per stage, sum the stages, scale, offset. The slow, obvious
    reading of the format the kernels are checked against (kernels import nothing of
    physkern.quant; tests check it equals QuantizedWeight.dequantize)."""
    stages, out = packed.shape[0], packed.shape[1]
    _, n_cb, k, d = codebooks.shape
    nb = in_features // d
    idx = unpack_indices(packed, index_bits(k), nb)                       # [S, out, nb]
    cb_of_row = torch.arange(out, device=packed.device) // codebook_rows  # [out]
    w = torch.zeros(out, nb, d, dtype=torch.float32, device=packed.device)
    for s in range(stages):
        w += codebooks[s].float()[cb_of_row[:, None], idx[s]]             # [out, nb, d]
    w = w.reshape(out, in_features)
    if scales is not None:
        group = torch.arange(in_features, device=packed.device) // scale_group
        w = w * scales.float()[:, group]
        if offsets is not None:
            w = w + offsets.float()[:, group]
    return w


def codebook_matmul_reference(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                              scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                              scale_group: int) -> torch.Tensor:
    """Reference: W from dequantize_reference (fp32), then x @ W^T + bias in fp32, cast to
    x.dtype. x [..., in] -> y [..., out]."""
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    w = dequantize_reference(packed, codebooks, scales, offsets, in_features, codebook_rows,
                             scale_group)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# CPU path
# ---------------------------------------------------------------------------------------------

INDEX_CACHE = IndexCache()

# LUT GEMV is used for x with at most this many rows (see codebook_matmul_cpu).
LUT_MAX_M = 4

# physkern::codebook_matmul's C++ CPU kernel runs its fused decode-and-dot kernel for x with at
# most this many rows, and dequantize + one GEMM above (kFusedMaxM in csrc/codebook_matmul.cpp,
# where the measurements are; tests/test_codebook_matmul_native.py checks that the two agree).
# The decode selector (codebook_matmul_small_m) serves the same rows.
NATIVE_MAX_M = 32

OP_NAME = "physkern::codebook_matmul"
# Internal to physkern._C: the fused kernel at any M with its method forced. Only
# codebook_matmul_native (tests, benchmarks) calls it; no path of the package does.
_FUSED_OP = "physkern::_codebook_matmul_fused"
_native: Optional[bool] = None
# The op (OpOverload) and its CPU kernel called below autograd: redispatch(keyset, *args) (see
# _op_cpu_kernel); set once the C++ op is known to exist.
_cpu_kernel = None
_cpu_redispatch = None
_CPU_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def native_matmul_available() -> bool:
    """Whether physkern._C defines physkern::codebook_matmul with its C++ CPU kernel (False
    without the extension, or with a stale build from before the op moved to C++: physkern.ops
    then defines the op itself, with the pure-torch CPU path). Checked through the internal op,
    which only the extension defines, so the answer does not depend on whether physkern.ops has
    registered its fallback yet."""
    global _native, _cpu_kernel, _cpu_redispatch
    if _native is None:
        from ._native import native_op_available
        _native = native_op_available(_FUSED_OP) and native_op_available(OP_NAME)
        if _native:
            _cpu_kernel = torch.ops.physkern.codebook_matmul.default
            # The handle's bound method is what OpOverload.redispatch calls; binding it once
            # saves a Python frame per decode call (~0.3 us).
            handle = getattr(_cpu_kernel, "_handle", None)
            _cpu_redispatch = (handle.redispatch_boxed if handle is not None
                               else _cpu_kernel.redispatch)
    return _native


def native_isa() -> Optional[str]:
    """Instruction set the C++ kernels run with ("avx512", "avx2", "baseline"), or None."""
    return torch.ops.physkern.codebook_matmul_cpu_isa() if native_matmul_available() else None


def codebook_matmul_native(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                           scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                           scale_group: int, method: str = "direct") -> torch.Tensor:
    """The C++ fused kernel (csrc/codebook_matmul.cpp) at any M, its method forced: for tests and
    benchmarks (the op itself runs "direct" for at most NATIVE_MAX_M rows). CPU tensors; needs
    physkern._C.

    Same contract as codebook_matmul_triton: x [..., in] -> y [..., out] in x.dtype, fp32
    accumulation. method: "direct" (decode-and-dot, any scope; "auto" is the same) or "lut"
    (per-row lookup tables of x-block . centroid products; shared codebooks,
    scale_group % d == 0). Bad arguments raise ValueError from the kernel itself.
    """
    if method not in ("auto", "direct", "lut"):
        raise ValueError(f"method must be 'auto', 'direct' or 'lut', got {method!r}")
    if not native_matmul_available():
        raise RuntimeError("physkern._C with physkern::codebook_matmul is not available "
                           "(run `make install`)")
    return torch.ops.physkern._codebook_matmul_fused(x, packed, codebooks, scales, offsets, bias,
                                                     in_features, codebook_rows, scale_group,
                                                     method)


def codebook_matmul_small_m(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                            scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                            bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                            scale_group: int) -> torch.Tensor:
    """The C++ path for x [..., in] with at most NATIVE_MAX_M rows (CPU tensors, physkern._C
    present) -> y [..., out] in x.dtype: the LUT GEMV codebook_gemv_lut.gemv_plan names for this
    weight (int16 or fp32 tables, where it is supported and pays; at most GEMV_LUT_MAX_M rows),
    else physkern::codebook_matmul's CPU kernel (its fused decode-and-dot kernel at these M).
    The one place that chooses between them; the decision per weight is cached with its index
    layout.

    The op's CPU kernel is called below autograd (redispatch to the CPU key): that skips the
    Python autograd kernel physkern.ops registers (~5 us a call, a tenth of a small layer's
    GEMV), so callers must have nothing to differentiate or trace (physkern.ops.codebook_linear
    checks). Layouts are the caller's to have validated."""
    if x.numel() <= lut.GEMV_LUT_MAX_M * in_features:
        plan = lut.gemv_plan(packed, codebooks, scales, in_features, codebook_rows, scale_group)
        if plan is not None:
            op, lay, gs = plan
            return op(x, lay, codebooks, scales, offsets, bias, in_features, codebook_rows, gs)
    return _op_cpu_kernel(x, packed, codebooks, scales, offsets, bias, in_features,
                          codebook_rows, scale_group)


def _op_cpu_kernel(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                   scale_group):
    """physkern::codebook_matmul's C++ CPU kernel on plain CPU tensors: redispatched to the CPU
    key, below the op's (Python) autograd kernel. FakeTensors and other tensor subclasses, or an
    active Python dispatch mode (FakeTensorMode, FlopCounterMode, ...), take the full dispatch
    instead, so that they see the op (and its fake) rather than a kernel reading data they may
    not have."""
    if _cpu_kernel is None and not native_matmul_available():
        raise RuntimeError("physkern._C with physkern::codebook_matmul is not available "
                           "(run `make install`)")
    if type(x) is torch.Tensor and not torch._C._len_torch_dispatch_stack():
        return _cpu_redispatch(_CPU_KEYSET, x, packed, codebooks, scales, offsets, bias,
                               in_features, codebook_rows, scale_group)
    return _cpu_kernel(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                       scale_group)


def unpack_fast(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """unpack_indices, with a shift-and-mask fast path when bits divides 32 (no straddling)."""
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
        w = packed.to(torch.int64) & 0xFFFFFFFF
        idx = (w[..., None] >> shifts) & ((1 << bits) - 1)
        return idx.reshape(*packed.shape[:-1], -1)[..., :n]
    return unpack_indices(packed, bits, n)


def _row_codebook_index(packed: torch.Tensor, k: int, n_blocks: int, codebook_rows: int,
                        n_codebooks: int) -> torch.Tensor:
    """[out * n_blocks, S] rows of codebooks.reshape(S * n_cb * K, d) that rebuild each block."""
    stages, out = packed.shape[0], packed.shape[1]
    idx = unpack_fast(packed, index_bits(k), n_blocks)                   # [S, out, nb]
    cb = torch.arange(out, device=packed.device) // codebook_rows
    stage = torch.arange(stages, device=packed.device)
    flat = (stage[:, None, None] * n_codebooks + cb[None, :, None]) * k + idx
    return flat.permute(1, 2, 0).reshape(out * n_blocks, stages).contiguous()


def _lut_index(packed: torch.Tensor, k: int, n_blocks: int, codebook_rows: int,
               n_codebooks: int) -> torch.Tensor:
    """[S * n_blocks, out] column of the LUT [M, S * n_blocks, n_cb * K] each (block, row) reads:
    c(row) * K + idx[s, row, block]. Laid out block-major so one torch.gather along the last dim
    reads, for every block, the table entry of every row."""
    stages, out = packed.shape[0], packed.shape[1]
    idx = unpack_fast(packed, index_bits(k), n_blocks)                   # [S, out, nb]
    cb = torch.arange(out, device=packed.device) // codebook_rows
    col = cb[None, :, None] * k + idx
    return col.permute(0, 2, 1).reshape(stages * n_blocks, out).contiguous()


def lut_eligible(m: int, stages: int, n_codebooks: int, k: int, d: int, out: int,
                 scale_group: int, has_scales: bool) -> bool:
    """LUT GEMV pays when x has few rows and the codebooks are shared by many rows.

    Building the LUT costs M * in * S * n_cb * K multiply-adds (dense: M * in * out), the gather
    M * out * S * in / d lookups; scales must be constant over a block (scale_group % d == 0).
    The dequant path instead pays out * in gathered values once plus a dense matmul, so the LUT
    wins only for small M (LUT_MAX_M, measured on 2 cores: bench/bench_kernels.py).
    """
    max_m = LUT_MAX_M if d > 1 else LUT_MAX_M // 2  # d = 1: one lookup per weight
    return (m <= max_m and 2 * stages * n_codebooks * k <= out
            and (not has_scales or scale_group % d == 0))


def codebook_matmul_cpu(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                        scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                        scale_group: int, method: str = "auto") -> torch.Tensor:
    """The CPU path: C++ from physkern._C where present, else vectorised torch; fp32 arithmetic.

    Same contract as codebook_matmul_triton: x [..., in] -> y [..., out] in x.dtype. method:
    "auto" (on CPU tensors with physkern._C: codebook_matmul_small_m for at most NATIVE_MAX_M
    rows, which picks the LUT GEMV or the op's fused kernel, and above it the op's C++
    dequantize + GEMM; otherwise "lut" or "dequant" as below: this is also the CPU kernel of
    physkern::codebook_matmul when physkern.ops defines the op without the extension),
    "native" (the C++ fused kernel's direct method, any M), "native_lut" (its lookup-table
    method), "gemv_lut" (the C++ LUT GEMV, codebook_matmul_gemv_lut, any M),
    "lut" (torch: gather-sum over a table of x-block . centroid products, AQLM-style; shared
    codebooks, small M) or "dequant" (torch: one gather rebuilds W, one matmul).
    """
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    if method in ("native", "native_lut"):
        return codebook_matmul_native(x, packed, codebooks, scales, offsets, bias, in_features,
                                      codebook_rows, scale_group,
                                      "lut" if method == "native_lut" else "direct")
    if method == "gemv_lut":
        return lut.codebook_matmul_gemv_lut(x, packed, codebooks, scales, offsets, bias, in_features,
                                        codebook_rows, scale_group)
    if method == "auto" and x.device.type == "cpu" and native_matmul_available():
        if x.numel() <= NATIVE_MAX_M * in_features:
            return codebook_matmul_small_m(x, packed, codebooks, scales, offsets, bias,
                                           in_features, codebook_rows, scale_group)
        # The op's C++ CPU kernel (dequantize + GEMM at this M), below autograd: this function
        # computes values only (physkern.ops.codebook_matmul is the differentiable entry).
        return _op_cpu_kernel(x, packed, codebooks, scales, offsets, bias, in_features,
                              codebook_rows, scale_group)
    stages, out = packed.shape[0], packed.shape[1]
    _, n_cb, k, d = codebooks.shape
    nb = in_features // d
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).float()
    m = x2.shape[0]
    if method == "auto":
        method = "lut" if lut_eligible(m, stages, n_cb, k, d, out, scale_group,
                                       scales is not None) else "dequant"
    if method not in ("lut", "dequant"):
        raise ValueError(f"method must be 'auto', 'native', 'native_lut', 'gemv_lut', 'lut' or "
                         f"'dequant', got {method!r}")
    if method == "lut" and scales is not None and scale_group % d:
        raise ValueError(f"method='lut' needs scale_group ({scale_group}) to be a multiple of "
                         f"block_dim ({d})")
    cbf = codebooks.reshape(stages * n_cb * k, d).float()
    if m == 0:
        y = x2.new_zeros(0, out)
    elif method == "lut":
        lut_col = INDEX_CACHE.get(packed, ("lut", k, nb, codebook_rows),
                                  lambda: _lut_index(packed, k, nb, codebook_rows, n_cb))
        # lut[m, (s, b), (c, kk)] = x[m, block b] . C[s, c, kk]: M * in * S * n_cb * K MACs.
        lut = (x2.reshape(m * nb, d) @ cbf.T).reshape(m, nb, stages, n_cb * k)
        if stages > 1:
            lut = lut.transpose(1, 2)
        lut = lut.reshape(m, stages * nb, n_cb * k)
        # One gather: every (block, row) picks its entry; [m, S * nb, out].
        picked = torch.gather(lut, 2, lut_col.expand(m, -1, -1))
        if scales is not None:
            # Sum the blocks of each scale group, then weight the group sums by their scales.
            per_group = scale_group // d
            n_groups = in_features // scale_group
            picked = picked.reshape(m, stages * n_groups, per_group, out).sum(2)
            sc_t = scales.float().T                                       # [n_groups, out]
            if stages > 1:
                sc_t = sc_t.repeat(stages, 1)
            y = (picked * sc_t).sum(1)                                    # [m, out]
        else:
            y = picked.sum(1)
        if offsets is not None:
            xg = x2.reshape(m, in_features // scale_group, scale_group).sum(-1)
            y = torch.addmm(y, xg, offsets.float().T)
        if bias is not None:
            y = y + bias.float()
    else:
        flat = INDEX_CACHE.get(packed, ("rows", k, nb, codebook_rows),
                               lambda: _row_codebook_index(packed, k, nb, codebook_rows, n_cb))
        # Fastest gather per case on CPU (measured): take for scalar grids (d = 1), embedding_bag
        # with per-sample weights (scale folded into the gather) from d = 8, else embedding.
        per_block_scales = scales is not None and scale_group % d == 0 and d >= 8
        if per_block_scales:
            col = (torch.arange(nb, device=x.device) * d) // scale_group
            psw = scales.float().index_select(1, col).reshape(out * nb, 1).expand(-1, stages)
            w = F.embedding_bag(flat, cbf, mode="sum", per_sample_weights=psw.contiguous())
        elif stages == 1 and d == 1:
            w = torch.take(cbf.reshape(-1), flat.reshape(-1))
        elif stages == 1:
            w = F.embedding(flat[:, 0], cbf)                             # [out * nb, d]
        else:
            w = F.embedding_bag(flat, cbf, mode="sum")
        if scales is not None:
            g = in_features // scale_group
            w = w.reshape(out, g, scale_group)
            if not per_block_scales:
                w = w.mul_(scales.float()[..., None])
            if offsets is not None:
                w = w.add_(offsets.float()[..., None])
        w = w.reshape(out, in_features)
        if bias is not None:
            y = torch.addmm(bias.float(), x2, w.T)
        else:
            y = x2 @ w.T
    return y.to(x.dtype).reshape(*lead, out)
