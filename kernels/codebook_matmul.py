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
  memory. Two configurations: a split-K GEMV path for decode (M <= 16: many programs along the
  input dimension write fp32 partial sums that are added afterwards) and a tiled path for
  prefill.
- `codebook_matmul_reference`: dequantize (fp32) + matmul. The independent reference for tests.
- The CPU path lives in `codebook_matmul_cpu`. For x with at most NATIVE_MAX_M rows (decode)
  it runs the fused C++ op `physkern::codebook_matmul_cpu` (csrc/codebook_matmul.cpp, in
  physkern._C): the packed indices are decoded row by row and the centroids FMA'd straight into
  the output, the dense W never exists. Otherwise (more rows, no physkern._C, other devices)
  vectorised torch: a LUT GEMV for shared codebooks and small M, else one gather + one matmul,
  with the unpacked indices cached per packed tensor (see `IndexCache`).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from physkern.quant.packing import index_bits, unpack_indices, words_per_row

# Production configurations, compiled for sm_80/sm_90 by tests/test_kernel_compile.py.
# gemv: decode (M <= GEMV_MAX_M), split-K so that even one row of x fills the GPU.
# tiled: prefill. BLOCK_K is a multiple of every block dim d in {1, 2, 4, 8, 16}.
GEMV_MAX_M = 16
# The dequantized [BLOCK_N, BLOCK_K] tile is built in registers from gathers; ptxas (sm_80/sm_90)
# spills once it exceeds about 16 values per thread next to the accumulator, hence the modest
# BLOCK_N x BLOCK_K (registers per config: bench/results/kernels_gpu_static.json).
MATMUL_CONFIGS = {
    "gemv": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "tiled": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "tiled_large": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
}


@triton.jit
def _codebook_matmul_kernel(
    x_ptr, packed_ptr, codebooks_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, K_IN, n_words, codebook_rows, scale_group, k_per_split,
    stride_xm, stride_xk,
    stride_ps, stride_pn, stride_pw,
    stride_cs, stride_cc, stride_ck, stride_cd,
    stride_sn, stride_sg,
    stride_on, stride_og,
    stride_ysplit, stride_ym, stride_yn,
    BITS: tl.constexpr, D: tl.constexpr, STAGES: tl.constexpr,
    HAS_SCALES: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr, SPLIT_OUTPUT: tl.constexpr, FP32_IEEE: tl.constexpr,
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
    cb_row = (offs_n // codebook_rows).to(tl.int64)                    # codebook of each row
    idx_mask: tl.constexpr = (1 << BITS) - 1

    NBK: tl.constexpr = BLOCK_K // D                                   # index blocks per step
    offs_d = tl.arange(0, D)
    cb_base = codebooks_ptr + cb_row * stride_cc                       # [BLOCK_N] pointers
    p_base = packed_ptr + offs_n64 * stride_pn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K_IN)                  # a multiple of D
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        x = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)

        # One index per (row, block): decode [BLOCK_N, NBK] indices from the bit stream,
        # then gather d contiguous codebook values per index: a [BLOCK_N, NBK, D] tile.
        blk = k0 // D + tl.arange(0, NBK)
        bmask = mask_n[:, None] & (blk < k_stop // D)[None, :]
        bitpos = blk * BITS
        word = bitpos // 32
        shift = (bitpos % 32).to(tl.uint32)
        w3 = tl.zeros([BLOCK_N, NBK, D], dtype=tl.float32)
        for s in tl.static_range(STAGES):
            pptr = p_base[:, None] + s * stride_ps + word[None, :] * stride_pw
            w0 = tl.load(pptr, mask=bmask, other=0).to(tl.uint32)
            idx = w0 >> shift[None, :]
            if 32 % BITS != 0:  # an index may straddle into the next word
                w1 = tl.load(pptr + stride_pw, mask=bmask & ((word + 1) < n_words)[None, :],
                             other=0).to(tl.uint32)
                hi = w1 << ((32 - shift) & 31)[None, :]
                idx = idx | tl.where(((shift + BITS) > 32)[None, :], hi, 0)
            idx = (idx & idx_mask).to(tl.int32)
            cptr = cb_base[:, None] + s * stride_cs + idx * stride_ck      # [BLOCK_N, NBK]
            c = tl.load(cptr[:, :, None] + offs_d[None, None, :] * stride_cd,
                        mask=bmask[:, :, None], other=0.0)
            w3 += c.to(tl.float32)
        if HAS_SCALES:
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
        w = tl.reshape(w3, [BLOCK_N, BLOCK_K])                             # W tile, rows x cols
        if FP32_IEEE:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)

    y_mask = mask_m[:, None] & mask_n[None, :]
    y_off = offs_m64[:, None] * stride_ym + offs_n64[None, :] * stride_yn
    if not SPLIT_OUTPUT:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc = acc + b[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.store(y_ptr + pid_k * stride_ysplit + y_off, acc, mask=y_mask)


def check_matmul_inputs(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                        scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                        scale_group: int) -> None:
    """Raise ValueError naming the argument when shapes or dtypes break the storage format."""
    if packed.dim() != 3 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32 [S, out, words], got {packed.dtype} {tuple(packed.shape)}")
    if codebooks.dim() != 4 or not codebooks.is_floating_point():
        raise ValueError(f"codebooks must be float [S, n_codebooks, K, d], got {codebooks.dtype} "
                         f"{tuple(codebooks.shape)}")
    stages, out = packed.shape[0], packed.shape[1]
    s2, n_cb, k, d = codebooks.shape
    if s2 != stages:
        raise ValueError(f"codebooks have {s2} stages, packed has {stages}")
    if in_features < 1 or in_features % d:
        raise ValueError(f"in_features ({in_features}) must be a positive multiple of block_dim ({d})")
    if codebook_rows < 1 or out % codebook_rows or n_cb != out // codebook_rows:
        raise ValueError(f"codebook_rows ({codebook_rows}) must divide out_features ({out}) into "
                         f"{n_cb} codebooks")
    want_words = words_per_row(in_features // d, index_bits(k))
    if packed.shape[2] != want_words:
        raise ValueError(f"packed has {packed.shape[2]} words per row, expected {want_words}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, expected in_features={in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if scale_group < 1 or in_features % scale_group:
        raise ValueError(f"scale_group ({scale_group}) must divide in_features ({in_features})")
    if scales is not None and tuple(scales.shape) != (out, in_features // scale_group):
        raise ValueError(f"scales must be {(out, in_features // scale_group)}, got {tuple(scales.shape)}")
    if offsets is not None:
        if scales is None:
            raise ValueError("offsets need scales")
        if offsets.shape != scales.shape:
            raise ValueError(f"offsets must have the shape of scales {tuple(scales.shape)}, "
                             f"got {tuple(offsets.shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias must be [{out}], got {tuple(bias.shape)}")


def pick_config(m: int) -> dict:
    """Production configuration for an x with m rows."""
    if m <= GEMV_MAX_M:
        return MATMUL_CONFIGS["gemv"]
    if m >= 256:
        return MATMUL_CONFIGS["tiled_large"]
    return MATMUL_CONFIGS["tiled"]


def _split_k_for(n_tiles: int, k_steps: int, device: torch.device) -> int:
    """Enough programs along the input dimension to occupy about two waves of SMs."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter: a little split-K so tests exercise the partial-sum path
    return max(1, min(k_steps, (2 * sms + n_tiles - 1) // n_tiles, 32))


def codebook_matmul_triton(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                           scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                           scale_group: int, config: Optional[dict] = None,
                           split_k: Optional[int] = None) -> torch.Tensor:
    """Triton codebook matmul (CUDA, or CPU under TRITON_INTERPRET=1).

    x [..., in] (fp16/bf16/fp32), packed int32 [S, out, words], codebooks [S, n_cb, K, d],
    scales/offsets [out, in/scale_group] or None, bias [out] or None -> y [..., out] in x.dtype.
    config overrides the production tile config (BLOCK_M/N/K, num_warps, num_stages);
    split_k overrides the number of input-dimension splits.
    """
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    stages, out = packed.shape[0], packed.shape[1]
    d, k = codebooks.shape[3], codebooks.shape[2]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    y = torch.empty(m, out, dtype=x.dtype, device=x.device)
    if m == 0 or out == 0:
        return y.reshape(*lead, out)
    cfg = dict(config or pick_config(m))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk % d:
        raise ValueError(f"BLOCK_K ({bk}) must be a multiple of block_dim ({d})")
    k_steps = triton.cdiv(in_features, bk)
    n_tiles = triton.cdiv(m, bm) * triton.cdiv(out, bn)
    if split_k is None:
        split_k = _split_k_for(n_tiles, k_steps, x.device) if m <= GEMV_MAX_M else 1
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
    grid = (triton.cdiv(m, bm), triton.cdiv(out, bn), split_k)
    _codebook_matmul_kernel[grid](
        x2, packed, codebooks, sc, of, bias if bias is not None else dummy, target,
        m, out, in_features, packed.shape[2], codebook_rows, scale_group, k_per_split,
        *x2.stride(), *packed.stride(), *codebooks.stride(), *sc_strides, *of_strides, *ys,
        BITS=index_bits(k), D=d, STAGES=stages,
        HAS_SCALES=scales is not None, HAS_OFFSETS=offsets is not None, HAS_BIAS=bias is not None,
        SCALE_PER_BLOCK=scale_group % d == 0,
        SPLIT_OUTPUT=split_k > 1, FP32_IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
    if split_k > 1:
        total = target.sum(0)
        if bias is not None:
            total += bias.float()
        y = total.to(x.dtype)
    return y.reshape(*lead, out)


def codebook_matmul_reference(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                              scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                              scale_group: int) -> torch.Tensor:
    """Reference: QuantizedWeight.dequantize() in fp32, then x @ W^T + bias in fp32, cast to x.dtype."""
    from physkern.quant.format import QuantizedWeight

    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    qw = QuantizedWeight(packed, codebooks, scales, offsets, in_features, packed.shape[1],
                         codebook_rows, scale_group)
    w = qw.dequantize(torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# CPU path
# ---------------------------------------------------------------------------------------------

class IndexCache:
    """Unpacked index layouts per packed tensor, reused across calls (CPU path).

    Unpacking a bit stream costs far more than the LUT GEMV it feeds, so the CPU path keeps the
    int64 layouts it needs, keyed by the packed tensor's identity. An entry is valid only while
    that very tensor is alive (weak reference) and its version counter is unchanged (an in-place
    write invalidates it). Memory: 8 bytes per stored index (1 byte/weight at d = 8), released
    with the packed tensor. `clear()` drops everything; `enabled = False` turns caching off.
    """

    def __init__(self, max_entries: int = 4096):
        self.enabled = True
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _version(t: torch.Tensor):
        try:
            return t._version
        except RuntimeError:  # inference tensors carry no version counter
            return None

    def get(self, packed: torch.Tensor, key: tuple, build):
        """Return build() for (packed, key), cached while packed is alive and unmodified."""
        if not self.enabled or packed.device.type != "cpu":
            return build()
        full_key = (id(packed), key)
        version = self._version(packed)
        with self._lock:
            entry = self._entries.get(full_key)
            if entry is not None and entry[0]() is packed and entry[1] == version:
                self.hits += 1
                return entry[2]
        value = build()
        self.misses += 1
        pid = id(packed)

        def _drop(_ref, pid=pid, cache_ref=weakref.ref(self)):
            cache = cache_ref()
            if cache is not None:
                with cache._lock:
                    for k in [k for k in cache._entries if k[0] == pid]:
                        if cache._entries[k][0] is _ref:
                            del cache._entries[k]

        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[full_key] = (weakref.ref(packed, _drop), version, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


INDEX_CACHE = IndexCache()

# LUT GEMV is used for x with at most this many rows (see codebook_matmul_cpu).
LUT_MAX_M = 4

# The fused C++ op serves x with at most this many rows. Measured on Zen 5 (1 thread, the five
# bench/bench_kernels.py recipes, three shapes): at M = 16 it ran at 0.9-1.3x the time of a dense
# fp32 matmul where the torch path took 2-4x; at M = 32, 1.5-1.8x vs the torch path's 1.6-2.8x.
# Beyond that the torch path's one dequantisation is amortised over more rows.
NATIVE_MAX_M = 32

_NATIVE_OP = "physkern::codebook_matmul_cpu"
_native: Optional[bool] = None


def native_matmul_available() -> bool:
    """Whether physkern._C is importable and registers a CPU kernel for
    physkern::codebook_matmul_cpu (False without the extension, or with a stale build)."""
    global _native
    if _native is None:
        from ._native import native_op_available
        _native = native_op_available(_NATIVE_OP)
        if _native:
            _register_native_fake()
    return _native


def _register_native_fake() -> None:
    """Shape function of the C++ op, so that it also traces (FakeTensor, torch.compile)."""
    try:
        @torch.library.register_fake(_NATIVE_OP)
        def _(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
              scale_group, method="auto"):
            return x.new_empty(*x.shape[:-1], packed.shape[1])
    except RuntimeError:  # already registered (module reloaded)
        pass


def native_isa() -> Optional[str]:
    """Instruction set the C++ op's kernels run with ("avx512", "avx2", "baseline"), or None."""
    return torch.ops.physkern.codebook_matmul_cpu_isa() if native_matmul_available() else None


def codebook_matmul_native(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                           scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                           scale_group: int, method: str = "direct") -> torch.Tensor:
    """The fused C++ op physkern::codebook_matmul_cpu (CPU tensors; needs physkern._C).

    Same contract as codebook_matmul_triton: x [..., in] -> y [..., out] in x.dtype, fp32
    accumulation. method: "direct" (decode-and-dot, any scope; what "auto" runs) or "lut" (per-row
    lookup tables of x-block . centroid products; shared codebooks, scale_group % d == 0).
    Bad arguments raise ValueError from the op itself.
    """
    if method not in ("auto", "direct", "lut"):
        raise ValueError(f"method must be 'auto', 'direct' or 'lut', got {method!r}")
    if not native_matmul_available():
        raise RuntimeError("physkern._C with physkern::codebook_matmul_cpu is not available "
                           "(run `make install`)")
    return torch.ops.physkern.codebook_matmul_cpu(x, packed, codebooks, scales, offsets, bias,
                                                 in_features, codebook_rows, scale_group, method)


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
    """The CPU path: the fused C++ op for small M, else vectorised torch; fp32 arithmetic.

    Same contract as codebook_matmul_triton. method: "auto" (the C++ op when x is a CPU tensor
    with at most NATIVE_MAX_M rows and physkern._C has it, else "lut" or "dequant" as below),
    "native" (the C++ op's direct method, any M), "native_lut" (its lookup-table method),
    "lut" (torch: gather-sum over a table of x-block . centroid products, AQLM-style; shared
    codebooks, small M) or "dequant" (torch: one gather rebuilds W, one matmul).
    """
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    if method in ("native", "native_lut"):
        return codebook_matmul_native(x, packed, codebooks, scales, offsets, bias, in_features,
                                      codebook_rows, scale_group,
                                      "lut" if method == "native_lut" else "direct")
    if (method == "auto" and x.device.type == "cpu" and x.numel() <= NATIVE_MAX_M * in_features
            and native_matmul_available()):
        return torch.ops.physkern.codebook_matmul_cpu(x, packed, codebooks, scales, offsets, bias,
                                                     in_features, codebook_rows, scale_group,
                                                     "direct")
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
        raise ValueError(f"method must be 'auto', 'native', 'native_lut', 'lut' or 'dequant', "
                         f"got {method!r}")
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
