"""Lookup-table GEMV (physkern::codebook_gemv_lut, csrc/codebook_gemv_lut.cpp) against the
independent float64 reference of test_codebook_matmul_native (dequantize, then matmul).

Every K the path takes (1..256: one permute, two-register permutes, permutes + blend; above 64
byte-plane permutes over 64-row tiles),
d in {1, 2, 3, 4, 8}, 1 and 2 stages, one codebook or several (codebook_rows a multiple of 16),
scales per row or per group (group slices a multiple of 4 or padded), offsets, bias, odd out
(partial 16-row tiles), M in {1, 2, 5}, fp32 / fp16 / bf16 inputs, codebooks and scales, 1 and 2
threads, every instruction-set copy, the selector (which path serves which format) and bad
inputs.
"""
import os
import subprocess
import sys

import pytest
import torch

from physkern import ops
from physkern.kernels import codebook_gemv_lut as L
from physkern.kernels import codebook_matmul as C
from physkern.layers import QuantizedLinear

from test_codebook_matmul_native import check, make_qw

needs_lut = pytest.mark.skipif(not L.gemv_lut_available(),
                               reason="physkern._C without physkern::codebook_gemv_lut")

# (out, in, d, K, stages, codebook_rows (0 = out: one codebook), scale_group, scales, offsets)
CASES = [
    (576, 576, 2, 64, 1, 0, 576, True, False),    # the deploy model's decoder layers
    (200, 576, 2, 256, 1, 0, 576, True, False),   # its head (K = 256: gathers)
    (37, 96, 2, 64, 1, 0, 96, True, False),       # partial tile
    (1, 24, 2, 64, 1, 0, 24, True, False),        # one row
    (48, 64, 1, 16, 1, 0, 16, True, True),        # scalar grid, groups, offsets (RTN-like)
    (33, 64, 1, 2, 1, 0, 8, True, True),          # groups of 8 slices
    (40, 48, 2, 1, 1, 0, 48, True, False),        # K = 1
    (40, 48, 2, 3, 2, 0, 48, False, False),       # K = 3, two stages, no scales
    (50, 96, 2, 17, 1, 0, 12, True, False),       # K = 17 (two-register permute), 6-slice groups
    (64, 96, 4, 32, 2, 16, 32, True, True),       # several codebooks, groups, offsets
    (96, 72, 3, 33, 1, 32, 72, True, False),      # d = 3, K = 33 (permutes + blend)
    (70, 64, 8, 100, 1, 0, 64, True, False),      # K = 100 (gathers), d = 8
    (19, 40, 2, 64, 1, 0, 2, True, True),         # one slice per group (padded to 4)
    (130, 128, 4, 256, 2, 0, 32, True, True),     # K = 256, two stages, groups, offsets
    (17, 24, 1, 5, 1, 0, 24, False, False),       # no scales, d = 1
    (192, 64, 2, 200, 1, 64, 32, True, True),     # K > 128, several codebooks of 64 rows
    (130, 48, 2, 128, 2, 0, 48, False, False),    # K = 128 (one byte permute per plane)
    (65, 40, 1, 65, 1, 0, 8, True, False),        # K = 65 (wide), partial 64-row tile
]


def _ids(c):
    return (f"{c[0]}x{c[1]}-d{c[2]}-K{c[3]}-S{c[4]}-cr{c[5] or c[0]}-g{c[6]}-"
            f"{'s' if c[7] else ''}{'o' if c[8] else ''}")


def _qw(case, **kw):
    out, inf, d, k, stages, rows, g, sc, of = case
    return make_qw(out, inf, d, k, stages, rows or out, g, sc, of, **kw)


def args(qw, x, bias):
    return (x, qw.packed, qw.codebooks, qw.scales, qw.offsets, bias, qw.in_features,
            qw.codebook_rows, qw.scale_group)


def gemv(qw, x, bias):
    return L.codebook_matmul_gemv_lut(*args(qw, x, bias))


@needs_lut
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_lut_matches_reference(case, m, with_bias):
    qw = _qw(case, seed=m)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features) if with_bias else None
    check(gemv(qw, x, bias), x, qw, bias)


@needs_lut
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[9], CASES[13]],
                         ids=[_ids(CASES[i]) for i in (0, 4, 9, 13)])
def test_gemv_lut_half_precision_storage(dtype, case):
    # Codebooks and scales stored in half precision (as saved models do), fp32 x; then x too.
    qw = _qw(case, cb_dtype=dtype, sc_dtype=dtype, seed=3)
    x = torch.randn(2, qw.in_features)
    bias = torch.randn(qw.out_features).to(dtype)
    check(gemv(qw, x, bias), x, qw, bias)
    xh = x.to(dtype)
    check(gemv(qw, xh, bias), xh, qw, bias)


@needs_lut
def test_gemv_lut_leading_dims_and_empty():
    qw = _qw(CASES[0], seed=1)
    x = torch.randn(2, 1, 3, qw.in_features)
    check(gemv(qw, x, None), x, qw, None)
    y = gemv(qw, torch.randn(0, qw.in_features), None)
    assert y.shape == (0, qw.out_features)


def outputs_per_thread_count(fn, out, k):
    """fn(qw, x, bias) at 1 and 2 threads for an [out, 576] layer large enough to be split
    (K = 64 / 256 layouts, partial last tile): (qw, x, bias, [y_1thread, y_2threads])."""
    qw = make_qw(out, 576, 2, k, 1, out, 576, True, False, cb_dtype=torch.float16,
                 sc_dtype=torch.float16)
    x = torch.randn(1, 576)
    bias = torch.randn(out)
    old = torch.get_num_threads()
    try:
        ys = []
        for t in (1, 2):
            torch.set_num_threads(t)
            ys.append(fn(qw, x, bias))
    finally:
        torch.set_num_threads(old)
    return qw, x, bias, ys


@needs_lut
@pytest.mark.parametrize("out, k", [(4100, 64), (2050, 256)])
def test_gemv_lut_threads_give_identical_bits(out, k):
    # Tiles are split over threads (these layers are large enough for the parallel grain, for
    # both layouts; partial last tile); each tile is computed the same way whatever the split.
    qw, x, bias, ys = outputs_per_thread_count(gemv, out, k)
    assert torch.equal(ys[0], ys[1])
    check(ys[0], x, qw, bias)
    check(ys[1], x, qw, bias)


@needs_lut
def test_gemv_lut_layout_cached_and_invalidated():
    qw = _qw(CASES[2], seed=5)
    x = torch.randn(1, qw.in_features)
    L.GEMV_LUT_CACHE.clear()
    y0 = gemv(qw, x, None)
    check(y0, x, qw, None)
    misses = L.GEMV_LUT_CACHE.misses
    check(gemv(qw, x, None), x, qw, None)
    assert L.GEMV_LUT_CACHE.misses == misses
    # An in-place write to the indices must not reuse the stale layout.
    qw.packed.copy_(_qw(CASES[2], seed=6).packed)
    y1 = gemv(qw, x, None)
    check(y1, x, qw, None)
    assert not torch.equal(y0, y1)
    assert L.GEMV_LUT_CACHE.misses == misses + 1


@pytest.fixture
def fp32_tables():
    """Decode on the exact fp32-table kernel (int16 tables are the default where VBMI exists;
    tests/test_codebook_gemv_lut16.py covers those)."""
    old = L.decode_tables()
    L.set_decode_tables("fp32")
    yield
    L.set_decode_tables(old)


@needs_lut
def test_selector_picks_lut_where_it_pays(fp32_tables):
    """With fp32 decode tables, codebook_matmul_small_m (ops.codebook_linear's decode path,
    QuantizedLinear's forward) runs the fp32 LUT GEMV for the deploy format on AVX-512 at
    M <= GEMV_LUT_MAX_M, the direct op otherwise; both equal the reference."""
    qw = make_qw(256, 128, 2, 64, 1, 256, 128, True, False, cb_dtype=torch.float16)
    layer = QuantizedLinear(qw, None)
    pays = L.gemv_lut_pays(256, 128, 1, 1, 64, 2, 128, True)
    assert pays == (C.native_isa() == "avx512")
    for m in (1, L.GEMV_LUT_MAX_M, L.GEMV_LUT_MAX_M + 1, C.NATIVE_MAX_M):
        L.clear_gemv_lut_caches()
        x = torch.randn(m, 128)
        with torch.no_grad():
            check(layer(x), x, qw, None)
        check(ops.codebook_matmul(x, qw, None), x, qw, None)
        check(C.codebook_matmul_cpu(*args(qw, x, None)), x, qw, None)
        used = len(L.GEMV_LUT_CACHE._entries) == 1  # the layout was built
        assert used == (pays and m <= L.GEMV_LUT_MAX_M), (m, pays)
    # Formats the LUT GEMV does not take always run the direct op.
    assert not L.gemv_lut_supported(64, 64, 1, 64, 4096, 2, 1, 64, True)   # K > 256
    assert not L.gemv_lut_supported(64, 64, 1, 8, 16, 2, 8, 64, True)      # rows of 8
    assert not L.gemv_lut_supported(64, 64, 1, 4, 100, 2, 16, 64, True)    # K > 64: rows of 64
    assert L.gemv_lut_supported(128, 64, 1, 2, 100, 2, 64, 64, True)
    assert not L.gemv_lut_supported(64, 64, 1, 1, 16, 4, 64, 2, True)      # groups < d
    qw = make_qw(64, 64, 2, 64, 1, 1, 64, True, False)                     # row scope
    L.clear_gemv_lut_caches()
    x = torch.randn(1, 64)
    check(C.codebook_matmul_small_m(*args(qw, x, None)), x, qw, None)
    assert L.gemv_plan(qw.packed, qw.codebooks, qw.scales, 64, 1, 64) is None


@needs_lut
def test_gemv_lut_checks_its_arguments():
    qw = _qw(CASES[9], seed=2)
    x = torch.randn(1, qw.in_features)
    gs = L.gemv_lut_group_slices(qw.in_features, qw.block_dim, qw.scale_group, True)
    lay = L.gemv_lut_layout(qw.packed, qw.in_features, qw.block_dim, qw.k, gs)
    op = torch.ops.physkern.codebook_gemv_lut
    good = (x, lay, qw.codebooks, qw.scales, qw.offsets, None, qw.in_features, qw.codebook_rows,
            gs)
    check(op(*good), x, qw, None)

    def bad(i, v):
        a = list(good)
        a[i] = v
        return a

    for a, msg in [(bad(0, torch.randn(1, 8)), "features"),
                   (bad(1, lay.int()), "lut_idx"),
                   (bad(1, lay[:, :1].contiguous()), "lut_idx has shape"),
                   (bad(2, qw.codebooks[0]), "codebooks"),
                   (bad(3, qw.scales[:, :1]), "scales"),
                   (bad(4, qw.offsets[:1]), "offsets"),
                   (bad(5, torch.randn(3)), "bias"),
                   (bad(7, 15), "codebook_rows"),
                   (bad(8, 5), "group_slices")]:
        with pytest.raises(ValueError, match=msg):
            op(*a)
    with pytest.raises(ValueError, match="k \\(codebook entries\\)"):
        torch.ops.physkern.codebook_gemv_lut_pack(qw.packed, qw.in_features, qw.block_dim, 300, gs)
    with pytest.raises(ValueError, match="packed"):
        torch.ops.physkern.codebook_gemv_lut_pack(qw.packed.float(), qw.in_features,
                                                  qw.block_dim, qw.k, gs)
    with pytest.raises(ValueError, match="words per row"):
        torch.ops.physkern.codebook_gemv_lut_pack(qw.packed, qw.in_features, qw.block_dim, 256,
                                                  gs)
    big = make_qw(16, 16, 2, 4096, 1, 16, 16, True, False)
    with pytest.raises(ValueError, match="K <= 256"):
        gemv(big, torch.randn(1, 16), None)


@needs_lut
def test_opcheck_gemv_lut_ops():
    qw = _qw(CASES[9], seed=4)
    gs = L.gemv_lut_group_slices(qw.in_features, qw.block_dim, qw.scale_group, True)
    lay = L.gemv_lut_layout(qw.packed, qw.in_features, qw.block_dim, qw.k, gs)
    torch.library.opcheck(torch.ops.physkern.codebook_gemv_lut_pack.default,
                          (qw.packed, qw.in_features, qw.block_dim, qw.k, gs))
    for x, bias in [(torch.randn(1, qw.in_features), torch.randn(qw.out_features)),
                    (torch.randn(2, 3, qw.in_features), None)]:
        torch.library.opcheck(torch.ops.physkern.codebook_gemv_lut.default,
                              (x, lay, qw.codebooks, qw.scales, qw.offsets, bias, qw.in_features,
                               qw.codebook_rows, gs))


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_codebook_gemv_lut as T
isa = torch.ops.physkern.codebook_matmul_cpu_isa()
if isa != {isa!r}:
    print('unsupported', isa)
    sys.exit(0)
n = 0
for case in T.CASES:
    for m in (1, 3):
        for cb_dtype in (torch.float32, torch.float16):
            qw = T._qw(case, cb_dtype=cb_dtype, seed=m)
            x = torch.randn(m, qw.in_features)
            bias = torch.randn(qw.out_features)
            T.check(T.gemv(qw, x, bias), x, qw, bias)
            n += 1
print('ok', isa, n)
"""


@needs_lut
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set(isa):
    """The AVX-512 kernel and the scalar loop (other copies) against the reference, in a child
    process (the copy is picked once per process); copies the CPU cannot run are skipped."""
    code = _ISA_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), isa=isa)
    env = dict(os.environ, PHYSKERN_CPU_ISA=isa, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("unsupported"):
        pytest.skip(f"this CPU cannot run the {isa} kernels ({out.stdout.strip()})")
    assert out.stdout.strip().startswith(f"ok {isa}"), out.stdout + out.stderr[-3000:]
