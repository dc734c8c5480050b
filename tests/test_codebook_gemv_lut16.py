"""Int16-table LUT GEMV (physkern::codebook_gemv_lut16, csrc/codebook_gemv_lut16.cpp).

Checked three ways: against a torch emulation of the same integer tables
(kernels/codebook_gemv_lut.codebook_gemv_lut16_reference, within one q step per chunk); against
the exact float64 dequantize-and-matmul reference within the rounding bound the format promises
(each lookup off by at most sigma / 2); and the scalar loop (non-VBMI copies, in a child process)
bit for bit against the vectorised kernel. Same formats as test_codebook_gemv_lut's CASES (every K
band 1..256, d 1..8, stages, several codebooks, scale groups, offsets, partial tiles), M 1/2/5,
1 and 2 threads, bad inputs, opcheck.
"""
import os
import subprocess
import sys

import pytest
import torch

from physkern.kernels import codebook_gemv_lut as L
from physkern.kernels import codebook_matmul as C
from physkern.layers import QuantizedLinear
from physkern.quant.packing import index_bits, unpack_indices

from test_codebook_gemv_lut import CASES as ALL_CASES, _ids, _qw, outputs_per_thread_count
from test_codebook_matmul_native import make_qw, reference

# The fp32 kernel's formats minus several codebooks of fewer than 64 rows (the int16 kernel's tiles
# are 64 rows), plus two stages of several 64-row codebooks with groups and offsets.
CASES = [c for c in ALL_CASES if c[5] in (0, c[0]) or c[5] % 64 == 0] + [
    (128, 96, 4, 32, 2, 64, 32, True, True)]
needs_lut16 = pytest.mark.skipif(not L.lut16_available(),
                                 reason="physkern._C without physkern::codebook_gemv_lut16")


def gemv16(qw, x, bias):
    return L.codebook_matmul_gemv_lut16(x, qw.packed, qw.codebooks, qw.scales, qw.offsets, bias,
                                        qw.in_features, qw.codebook_rows, qw.scale_group)


def emulate(qw, x, bias):
    idx = unpack_indices(qw.packed, index_bits(qw.k), qw.in_features // qw.block_dim).long()
    return L.codebook_gemv_lut16_reference(x.reshape(-1, qw.in_features), idx, qw.codebooks,
                                           qw.scales, qw.offsets, bias, qw.codebook_rows,
                                           qw.scale_group)


def check16(y, x, qw, bias):
    """y within one q step per chunk of the integer emulation, and within the rounding bound of
    the exact product."""
    y = y.double().reshape(-1, qw.out_features)
    emu, lsb = emulate(qw, x, bias)
    exact, mag = reference(x, qw, bias)
    slack = 2e-6 * (qw.in_features ** 0.5 + 4) * (mag + exact.abs())  # fp32 accumulation
    assert ((y - emu).abs() <= lsb + slack).all(), \
        f"vs emulation: max err/lsb {((y - emu).abs() / (lsb + 1e-30)).max():.3g}"
    bound = L.LUT16_CHUNK / 2 * lsb + slack
    assert ((y - exact).abs() <= bound).all(), \
        f"vs exact: max err/bound {((y - exact).abs() / bound).max():.3g}"


@needs_lut16
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_lut16_matches_integer_emulation_and_bound(case, m):
    qw = _qw(case, seed=m)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features) if m != 2 else None
    y = gemv16(qw, x, bias)
    assert y.shape == (m, qw.out_features) and y.dtype == torch.float32
    check16(y, x, qw, bias)


@needs_lut16
def test_lut16_error_is_small_on_the_deploy_format():
    # The bound is loose by construction; the actual error on the deploy layer shape is far below
    # the weights' own quantization error: relative to the output norm, ~1e-4.
    qw = make_qw(576, 576, 2, 64, 1, 576, 576, True, False, cb_dtype=torch.float16,
                 sc_dtype=torch.float16)
    x = torch.randn(1, 576)
    exact, _ = reference(x, qw, None)
    y = gemv16(qw, x, None).double()
    rel = (y - exact).norm() / exact.norm()
    assert rel < 5e-4, rel


@needs_lut16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lut16_half_precision(dtype):
    case = CASES[13]
    qw = _qw(case, cb_dtype=dtype, sc_dtype=dtype, seed=3)
    x = torch.randn(2, qw.in_features)
    bias = torch.randn(qw.out_features).to(dtype)
    check16(gemv16(qw, x, bias), x, qw, bias)
    y = gemv16(qw, x.to(dtype), bias)
    assert y.dtype == dtype and y.shape == (2, qw.out_features)


@needs_lut16
def test_lut16_zero_and_nonfinite_x():
    qw = _qw(CASES[0], seed=1)
    bias = torch.randn(qw.out_features)
    assert torch.equal(gemv16(qw, torch.zeros(1, qw.in_features), bias), bias[None])
    x = torch.randn(1, qw.in_features)
    for bad in (float("inf"), float("nan")):
        x[0, 5] = bad
        assert not torch.isfinite(gemv16(qw, x, None)).all()
    y = gemv16(qw, torch.randn(0, qw.in_features), None)
    assert y.shape == (0, qw.out_features)


@needs_lut16
@pytest.mark.parametrize("out, k", [(4100, 64), (2050, 256)])
def test_lut16_threads_give_identical_bits(out, k):
    qw, x, bias, ys = outputs_per_thread_count(gemv16, out, k)
    assert torch.equal(ys[0], ys[1])
    check16(ys[0], x, qw, bias)


_SCALAR_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_codebook_gemv_lut16 as T
from physkern.kernels import codebook_gemv_lut as L
from physkern.kernels import codebook_matmul as C
from physkern.layers import QuantizedLinear
print(L.lut16_isa())
ys = []
for i, case in enumerate(T.CASES):
    qw = T._qw(case, seed=i)
    g = torch.Generator().manual_seed(i)
    x = torch.randn(3, qw.in_features, generator=g)
    bias = torch.randn(qw.out_features, generator=g)
    ys.append(T.gemv16(qw, x, bias))
torch.save(ys, {path!r})
"""


@needs_lut16
def test_scalar_loop_is_bit_identical_to_vbmi(tmp_path):
    """The non-VBMI copy (PHYSKERN_CPU_ISA=avx2 -> the scalar loop) computes the same integers
    and the same fp32 operations in the same order as the VBMI kernel."""
    outs = {}
    for isa in ("avx512", "avx2"):
        path = str(tmp_path / f"{isa}.pt")
        code = _SCALAR_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path)
        env = dict(os.environ, PHYSKERN_CPU_ISA=isa, TRITON_INTERPRET="1")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[isa] = (res.stdout.split()[0], torch.load(path))
    if outs["avx512"][0] != "avx512_vbmi":
        pytest.skip(f"this CPU runs the int16 kernel as {outs['avx512'][0]}")
    assert outs["avx2"][0] == "scalar"
    for a, b in zip(outs["avx512"][1], outs["avx2"][1]):
        assert torch.equal(a, b)


@needs_lut16
def test_lut16_checks_its_arguments():
    qw = _qw(CASES[-1], seed=2)
    x = torch.randn(1, qw.in_features)
    gs = L.gemv_lut_group_slices(qw.in_features, qw.block_dim, qw.scale_group, True)
    lay = L.lut16_layout(qw.packed, qw.in_features, qw.block_dim, qw.k, gs)
    narrow = torch.ops.physkern.codebook_gemv_lut_pack(qw.packed, qw.in_features, qw.block_dim,
                                                       qw.k, gs)
    op = torch.ops.physkern.codebook_gemv_lut16
    good = (x, lay, qw.codebooks, qw.scales, qw.offsets, None, qw.in_features, qw.codebook_rows,
            gs)
    check16(op(*good), x, qw, None)

    def bad(i, v):
        a = list(good)
        a[i] = v
        return a

    for a, msg in [(bad(0, torch.randn(1, 8)), "features"),
                   (bad(1, narrow), "wide layout"),
                   (bad(1, lay.int()), "lut_idx"),
                   (bad(2, qw.codebooks[0]), "codebooks"),
                   (bad(3, qw.scales[:, :1]), "scales"),
                   (bad(5, torch.randn(3)), "bias"),
                   (bad(8, 5), "group_slices")]:
        with pytest.raises(ValueError, match=msg):
            op(*a)
    halves = list(good)  # four codebooks of 32 rows: same out, tiles would straddle codebooks
    halves[2], halves[7] = qw.codebooks.repeat_interleave(2, dim=1).contiguous(), 32
    with pytest.raises(ValueError, match="codebook_rows \\(32\\) must be a multiple of 64"):
        op(*halves)
    several = make_qw(96, 64, 2, 64, 1, 32, 64, True, False)   # codebooks of 32 rows
    with pytest.raises(ValueError, match="multiple of 64"):
        gemv16(several, torch.randn(1, 64), None)
    with pytest.raises(ValueError, match="decode tables"):
        L.set_decode_tables("int8")


@needs_lut16
def test_opcheck_lut16():
    qw = _qw(CASES[-1], seed=4)
    gs = L.gemv_lut_group_slices(qw.in_features, qw.block_dim, qw.scale_group, True)
    lay = L.lut16_layout(qw.packed, qw.in_features, qw.block_dim, qw.k, gs)
    for x, bias in [(torch.randn(1, qw.in_features), torch.randn(qw.out_features)),
                    (torch.randn(2, 3, qw.in_features), None)]:
        torch.library.opcheck(torch.ops.physkern.codebook_gemv_lut16.default,
                              (x, lay, qw.codebooks, qw.scales, qw.offsets, bias, qw.in_features,
                               qw.codebook_rows, gs))


@needs_lut16
def test_selector_picks_int16_tables_by_default():
    """codebook_matmul_small_m (QuantizedLinear's decode path) serves the deploy format with the
    int16 tables where VBMI exists (within their bound), the fp32 tables after
    set_decode_tables("fp32") (exact), and the direct kernel above GEMV_LUT_MAX_M rows."""
    qw = make_qw(256, 128, 2, 64, 1, 256, 128, True, False, cb_dtype=torch.float16)
    layer = QuantizedLinear(qw, None)
    vbmi = L.lut16_isa() == "avx512_vbmi"
    old = L.decode_tables()
    try:
        for mode in ("int16", "fp32"):
            L.set_decode_tables(mode)
            L.clear_gemv_lut_caches()
            x = torch.randn(1, 128)
            with torch.no_grad():
                y = layer(x)
            served = L.gemv_lut_serves(1, qw.packed, qw.codebooks, qw.scales, 128, 256, 128)
            if mode == "int16" and vbmi:
                assert served == "int16"
                check16(y, x, qw, None)
            else:
                assert served in ("fp32", None)
                exact, mag = reference(x, qw, None)
                assert ((y.double() - exact).abs() <= 1e-5 * (mag + exact.abs())).all()
            assert L.gemv_lut_serves(L.GEMV_LUT_MAX_M + 1, qw.packed, qw.codebooks, qw.scales,
                                     128, 256, 128) is None
    finally:
        L.set_decode_tables(old)
    # d = 1 (scalar grids) never takes the int16 tables: a byte per weight would double reads.
    assert not L.lut16_pays(256, 1, 16, 1, 256, 64, True)
