"""Lookup-table GEMVs for few rows of x (batch-1 decode) on CPU, and the choice between them.

Python side of csrc/codebook_gemv_lut.cpp (physkern::codebook_gemv_lut: fp32 tables, exact up to
fp32 rounding) and csrc/codebook_gemv_lut16.cpp (physkern::codebook_gemv_lut16: int16 tables,
the decode fast path; its header comment has the math): index layouts cached per packed tensor,
launchers, when each pays, and `gemv_plan`, which kernels/codebook_matmul.codebook_matmul_small_m
(the decode selector) asks per weight.

Int16 tables: per row of x, stage, codebook and chunk of up to 8 slices (d inputs each) of one
scale group the tables P[p, k] = x[slice p] . C[k] become q = round(P * 4095 / max|P|) (exact
int16 sums) and the chunk adds sigma * sum(q), sigma = max|P| / 4095: each lookup is off by at
most sigma / 2. `set_decode_tables("fp32")` (or PHYSKERN_DECODE_TABLES=fp32) keeps decode on the
exact fp32-table kernel; perplexity evaluation (long windows) runs neither.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._checks import check_matmul_inputs
from ._native import native_op_available
from .index_cache import IndexCache, PlanCache

# x with at most this many rows may take the LUT GEMV (each row of x builds its own table and
# re-reads the indices; wider x shares each decoded weight over up to 8 rows in the direct path).
GEMV_LUT_MAX_M = 4
# Largest K the LUT GEMV takes (one byte per cached index).
GEMV_LUT_MAX_K = 256
_GEMV_LUT_OP = "physkern::codebook_gemv_lut"

# The LUT GEMV's re-laid-out indices (uint8, 16 rows side by side), per packed tensor: built once
# (codebook_gemv_lut_pack), valid while that tensor lives unmodified. Apart from INDEX_CACHE (the
# torch path's layouts) so each path's cache counts only its own work.
GEMV_LUT_CACHE = IndexCache()


_available: dict = {}


def _op_available(op: str, register_fakes) -> bool:
    """Whether physkern._C registers `op` (False without the extension or with a build from
    before it existed); its fakes are registered the first time the answer is yes."""
    if op not in _available:
        _available[op] = native_op_available(op)
        if _available[op]:
            register_fakes()
    return _available[op]


def gemv_lut_available() -> bool:
    """Whether physkern._C registers physkern::codebook_gemv_lut."""
    return _op_available(_GEMV_LUT_OP, _register_gemv_lut_fakes)


def _register_gemv_lut_fakes() -> None:
    """Shape functions of the two C++ ops (FakeTensor, torch.compile, opcheck)."""
    try:
        @torch.library.register_fake("physkern::codebook_gemv_lut_pack")
        def _(packed, in_features, block_dim, k, group_slices, wide=False):
            nb = in_features // block_dim
            rows = 64 if wide else gemv_lut_rows_per_tile(k)
            vecs = nb if rows == 64 else (nb // group_slices) * ((group_slices + 3) // 4)
            return packed.new_empty(packed.shape[0], (packed.shape[1] + rows - 1) // rows, vecs,
                                    64, dtype=torch.uint8)

        torch.library.register_fake(_GEMV_LUT_OP)(_gemv_fake)
    except RuntimeError:  # already registered (module reloaded)
        pass


def _gemv_fake(x, lut_idx, codebooks, scales, offsets, bias, in_features, codebook_rows,
               group_slices):
    """Shape function of both LUT GEMV ops: x [..., in] -> [..., n_codebooks * codebook_rows]."""
    return x.new_empty(*x.shape[:-1], codebooks.shape[1] * codebook_rows)


def gemv_lut_rows_per_tile(k: int) -> int:
    """Output rows per tile of the LUT GEMV's layout: 16 for K <= 64 (fp32 register permutes),
    64 above (byte-plane permutes)."""
    return 16 if k <= 64 else 64


def gemv_lut_isa() -> Optional[str]:
    """What the LUT GEMV runs with: "avx512_vbmi" (every K vectorised), "avx512" (K <= 64),
    "scalar", or None without the op."""
    return torch.ops.physkern.codebook_gemv_lut_isa() if gemv_lut_available() else None


def gemv_lut_group_slices(in_features: int, d: int, scale_group: int, has_scales: bool) -> int:
    """Slices of d inputs per scale group as the LUT GEMV counts them (all of a row without
    scales)."""
    return scale_group // d if has_scales else in_features // d


def gemv_lut_supported(out: int, in_features: int, stages: int, n_codebooks: int, k: int, d: int,
                       codebook_rows: int, scale_group: int, has_scales: bool) -> bool:
    """Whether the format fits the LUT GEMV at all: K <= 256, scale groups whole blocks, and
    row tiles within one codebook (one codebook, or codebook_rows a multiple of the tile's
    gemv_lut_rows_per_tile(k) rows)."""
    return (1 <= k <= GEMV_LUT_MAX_K and (not has_scales or scale_group % d == 0)
            and (n_codebooks == 1 or codebook_rows % gemv_lut_rows_per_tile(k) == 0))


def gemv_lut_pays(out: int, in_features: int, stages: int, n_codebooks: int, k: int, d: int,
                  scale_group: int, has_scales: bool) -> bool:
    """Whether the LUT GEMV beats the direct C++ path (measured on Zen 4, AVX-512: 2.5-5x for the
    deploy model's K = 64 d = 2 layers). Per row of x and stage it builds tables with
    n_cb * in * K multiply-adds (K / 16 vector FMAs per slice of d inputs and codebook), then does
    one vector lookup (~4 instructions) per slice and 16 rows: the tables stay a minor cost while
    n_cb * K * d <= 4 * out. Scale groups are padded to 4 slices, so groups of few slices waste
    lookups (K <= 64 layout). K > 64 (64-row tiles, byte-plane tables) needs AVX-512 VBMI.
    d = 1 (scalar grids such as RTN 4-bit) stays on the direct path: one lookup per weight is no
    faster than its nibble permutes (measured 0.85-1.26x), and the byte layout doubles the
    index bytes read per token. Only the AVX-512 kernels look up with register permutes: the
    others run a scalar loop, slower than the direct path."""
    isa = gemv_lut_isa()
    if isa not in ("avx512", "avx512_vbmi") or (k > 64 and isa != "avx512_vbmi"):
        return False
    spg = gemv_lut_group_slices(in_features, d, scale_group, has_scales)
    padded = spg if k > 64 else (spg + 3) // 4 * 4
    return n_codebooks * k * d <= 4 * out and padded * 4 <= spg * 5 and d >= 2


def gemv_lut_layout(packed: torch.Tensor, in_features: int, d: int, k: int,
                    group_slices: int) -> torch.Tensor:
    """The LUT GEMV's index layout for `packed` (uint8 [S, ceil(out / 16), quads, 64]), cached in
    GEMV_LUT_CACHE."""
    return GEMV_LUT_CACHE.get(
        packed, ("gemv_lut", in_features, d, k, group_slices),
        lambda: torch.ops.physkern.codebook_gemv_lut_pack(packed, in_features, d, k, group_slices))


def codebook_matmul_gemv_lut(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                             scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                             scale_group: int) -> torch.Tensor:
    """The lookup-table GEMV physkern::codebook_gemv_lut (CPU tensors; needs physkern._C).

    Same contract as codebook_matmul_triton: x [..., in] -> y [..., out] in x.dtype, fp32
    arithmetic. Needs gemv_lut_supported (K <= 256, scale_group % d == 0, one codebook or
    codebook_rows a multiple of gemv_lut_rows_per_tile(k)); any number of rows of x (each builds
    its own table).
    """
    if not gemv_lut_available():
        raise RuntimeError("physkern._C with physkern::codebook_gemv_lut is not available "
                           "(run `make install`)")
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    stages, out = packed.shape[0], packed.shape[1]
    _, n_cb, k, d = codebooks.shape
    if not gemv_lut_supported(out, in_features, stages, n_cb, k, d, codebook_rows, scale_group,
                              scales is not None):
        raise ValueError(f"the LUT GEMV needs K <= {GEMV_LUT_MAX_K} (got {k}), scale_group "
                         f"({scale_group}) a multiple of block_dim ({d}) and one codebook or "
                         f"codebook_rows ({codebook_rows}) a multiple of "
                         f"{gemv_lut_rows_per_tile(k)}")
    gs = gemv_lut_group_slices(in_features, d, scale_group, scales is not None)
    lay = gemv_lut_layout(packed, in_features, d, k, gs)
    return torch.ops.physkern.codebook_gemv_lut(x, lay, codebooks, scales, offsets, bias,
                                                in_features, codebook_rows, gs)


LUT16_OP = "physkern::codebook_gemv_lut16"
LUT16_CHUNK = 8          # slices per int16 chunk (8 * 4095 < 2^15)
LUT16_QMAX = 4095.0
DECODE_TABLES = ("int16", "fp32")

_decode_tables = os.environ.get("PHYSKERN_DECODE_TABLES", "int16")


def set_decode_tables(mode: str) -> None:
    """Which tables decode-time LUT GEMVs use: "int16" (default: codebook_gemv_lut16 where the
    CPU has AVX-512 VBMI) or "fp32" (the exact fp32-table kernel)."""
    global _decode_tables
    if mode not in DECODE_TABLES:
        raise ValueError(f"decode tables must be one of {DECODE_TABLES}, got {mode!r}")
    _decode_tables = mode


def decode_tables() -> str:
    """The current decode-table setting (see set_decode_tables)."""
    if _decode_tables not in DECODE_TABLES:
        raise ValueError(f"PHYSKERN_DECODE_TABLES must be one of {DECODE_TABLES}, got "
                         f"{_decode_tables!r}")
    return _decode_tables


def lut16_available() -> bool:
    """Whether physkern._C registers physkern::codebook_gemv_lut16."""
    return _op_available(LUT16_OP, _register_fake)


def _register_fake() -> None:
    try:
        torch.library.register_fake(LUT16_OP)(_gemv_fake)
    except RuntimeError:  # already registered (module reloaded)
        pass


def lut16_isa() -> Optional[str]:
    """"avx512_vbmi" (vectorised), "scalar", or None without the op."""
    return torch.ops.physkern.codebook_gemv_lut16_isa() if lut16_available() else None


def lut16_supported(n_codebooks: int, k: int, d: int, codebook_rows: int, scale_group: int,
                    has_scales: bool) -> bool:
    """Whether the format fits the int16-table GEMV: K <= 256, scale groups of whole d-blocks,
    64-row tiles within one codebook."""
    return (1 <= k <= 256 and (not has_scales or scale_group % d == 0)
            and (n_codebooks == 1 or codebook_rows % 64 == 0))


def lut16_layout(packed: torch.Tensor, in_features: int, d: int, k: int,
                 group_slices: int) -> torch.Tensor:
    """The wide index layout (uint8 [S, ceil(out / 64), in / d, 64]: byte r of a slice's vector is
    row r of the tile), cached in GEMV_LUT_CACHE beside the fp32 kernel's layouts."""
    return GEMV_LUT_CACHE.get(
        packed, ("gemv_lut_wide", in_features, d, k, group_slices),
        lambda: torch.ops.physkern.codebook_gemv_lut_pack(packed, in_features, d, k,
                                                          group_slices, True))


def codebook_matmul_gemv_lut16(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                               scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], in_features: int,
                               codebook_rows: int, scale_group: int) -> torch.Tensor:
    """y = x W^T + b through physkern::codebook_gemv_lut16 (CPU tensors; needs physkern._C).

    x [..., in_features] -> y [..., out] in x.dtype; same weights and contract as
    codebook_matmul_triton, int16 tables (module docstring). Any number of rows of x.
    """
    if not lut16_available():
        raise RuntimeError("physkern._C with physkern::codebook_gemv_lut16 is not available "
                           "(run `make install`)")
    check_matmul_inputs(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                        scale_group)
    _, n_cb, k, d = codebooks.shape
    if not lut16_supported(n_cb, k, d, codebook_rows, scale_group, scales is not None):
        raise ValueError(f"the int16 LUT GEMV needs K <= 256 (got {k}), scale_group "
                         f"({scale_group}) a multiple of block_dim ({d}) and one codebook or "
                         f"codebook_rows ({codebook_rows}) a multiple of 64")
    gs = gemv_lut_group_slices(in_features, d, scale_group, scales is not None)
    lay = lut16_layout(packed, in_features, d, k, gs)
    return torch.ops.physkern.codebook_gemv_lut16(x, lay, codebooks, scales, offsets, bias,
                                                  in_features, codebook_rows, gs)


def codebook_gemv_lut16_reference(x: torch.Tensor, indices: torch.Tensor,
                                  codebooks: torch.Tensor, scales: Optional[torch.Tensor],
                                  offsets: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                                  codebook_rows: int, scale_group: int
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The int16-table sums in plain torch (float64 accumulation of the same integers), for tests.

    x [M, in]; indices int64 [S, out, in / d]; codebooks [S, n_cb, K, d]; scales/offsets
    [out, G] or None. Returns (y float64 [M, out], lsb float64 [M, out]) where
    lsb = sum over chunks of sigma * |scale|: what one q off by one in every chunk would move y
    by. Tables are built in float32 as x0 * c0 + x1 * c1 + ... (the kernel fuses multiply-adds,
    so an entry can sit one rounding step away and its q differ by 1: compare within lsb).
    Rounding each lookup costs at most sigma / 2, so |y - exact| <= LUT16_CHUNK / 2 * lsb.
    """
    S, n_cb, K, d = codebooks.shape
    out, nb = indices.shape[1], indices.shape[2]
    m_rows = x.shape[0]
    spg = scale_group // d if scales is not None else nb
    G = nb // spg
    xb = x.float().reshape(m_rows, nb, d)
    cb = codebooks.float()
    row_cb = torch.arange(out) // codebook_rows
    y = torch.zeros(m_rows, out, dtype=torch.float64)
    lsb = torch.zeros(m_rows, out, dtype=torch.float64)
    for m in range(m_rows):
        tot = torch.zeros(out, dtype=torch.float64)
        for gi in range(G):
            acc = torch.zeros(out, dtype=torch.float64)
            unit = torch.zeros(out, dtype=torch.float64)
            for s in range(S):
                for p0 in range(0, spg, LUT16_CHUNK):
                    sl = slice(gi * spg + p0, gi * spg + min(spg, p0 + LUT16_CHUNK))
                    # P[c, p, k] for the chunk's slices
                    P = torch.einsum("pj,ckj->cpk", xb[m, sl], cb[s])
                    mx = P.abs().amax(dim=(1, 2))                                  # [n_cb]
                    inv = torch.where(mx > 0, LUT16_QMAX / mx, torch.zeros_like(mx))
                    q = torch.round(P * inv[:, None, None])                        # half-even
                    sigma = (mx / LUT16_QMAX).double()
                    idx = indices[s, :, sl]                                        # [out, n]
                    picked = q[row_cb[:, None], torch.arange(idx.shape[1])[None, :], idx]
                    acc += picked.double().sum(1) * sigma[row_cb]
                    unit += sigma[row_cb]
            sc = scales[:, gi].double() if scales is not None else 1.0
            tot += acc * sc
            lsb[m] += unit * (sc.abs() if scales is not None else 1.0)
            if offsets is not None:
                tot += offsets[:, gi].double() * x[m, gi * spg * d:(gi + 1) * spg * d].double().sum()
        y[m] = tot + (bias.double() if bias is not None else 0.0)
    return y, lsb


_GEMV_LUT_PLANS = PlanCache()


def clear_gemv_lut_caches() -> None:
    """Drop the LUT GEMV's cached layouts and the small-M path's cached decisions."""
    GEMV_LUT_CACHE.clear()
    _GEMV_LUT_PLANS.clear()


def lut16_pays(out: int, n_codebooks: int, k: int, d: int, codebook_rows: int,
               scale_group: int, has_scales: bool) -> bool:
    """Whether the int16-table GEMV serves this format at decode: the CPU has AVX-512 VBMI (the
    scalar loop is for checking, slower than the direct path), the format fits, d >= 2 (d = 1,
    e.g. RTN 4-bit, would read a byte per weight instead of half of one), and the tables
    (n_cb * K * d multiply-adds per slice) stay small beside the out rows they serve."""
    return (lut16_isa() == "avx512_vbmi"
            and lut16_supported(n_codebooks, k, d, codebook_rows, scale_group, has_scales)
            and d >= 2 and n_codebooks * k * d <= 4 * out)


def gemv_plan(packed: torch.Tensor, codebooks: torch.Tensor, scales: Optional[torch.Tensor],
              in_features: int, codebook_rows: int, scale_group: int):
    """(op, layout, group_slices) of the LUT GEMV that serves this weight at decode, or None (the
    direct C++ kernel then serves it): the int16-table kernel where it pays and decode tables are
    "int16", else the fp32-table kernel where it pays. Cached per packed tensor, keyed by the
    format and the decode-table setting."""
    has_scales = scales is not None
    mode = decode_tables()
    key = (in_features, codebook_rows, scale_group, has_scales, codebooks.shape, mode)

    def build():
        stages, out = packed.shape[0], packed.shape[1]
        _, n_cb, k, d = codebooks.shape
        gs = gemv_lut_group_slices(in_features, d, scale_group, has_scales)
        if mode == "int16" and lut16_pays(out, n_cb, k, d, codebook_rows, scale_group,
                                          has_scales):
            return (torch.ops.physkern.codebook_gemv_lut16.default,
                    lut16_layout(packed, in_features, d, k, gs), gs)
        if (gemv_lut_available()
                and gemv_lut_supported(out, in_features, stages, n_cb, k, d, codebook_rows,
                                       scale_group, has_scales)
                and gemv_lut_pays(out, in_features, stages, n_cb, k, d, scale_group,
                                  has_scales)):
            return (torch.ops.physkern.codebook_gemv_lut.default,
                    gemv_lut_layout(packed, in_features, d, k, gs), gs)
        return None

    return _GEMV_LUT_PLANS.get(packed, key, build)


def gemv_lut_serves(m: int, packed: torch.Tensor, codebooks: torch.Tensor,
                    scales: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                    scale_group: int) -> Optional[str]:
    """Which LUT GEMV codebook_matmul_small_m runs for x with m rows and this weight: "int16",
    "fp32", or None (the direct C++ kernel); for benchmarks and tests."""
    if m > GEMV_LUT_MAX_M:
        return None
    plan = gemv_plan(packed, codebooks, scales, in_features, codebook_rows, scale_group)
    if plan is None:
        return None
    return "int16" if plan[0] is torch.ops.physkern.codebook_gemv_lut16.default else "fp32"
