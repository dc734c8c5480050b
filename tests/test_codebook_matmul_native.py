"""C++ CPU kernel of physkern::codebook_matmul (csrc/codebook_matmul.cpp: the fused kernel for few
rows, dequantize + GEMM above) against the independent reference: QuantizedWeight.dequantize()
in float64, then x @ W^T + b in float64. The fused kernel is reached at any M with its method
forced through codebook_matmul_native (the internal op physkern::_codebook_matmul_fused).

Every scope (row / group / layer), d in {1, 2, 3, 4, 8, 12, 16}, K in {1, 2, 16, 256, 4096}, 1 and
2 stages, per-row scales with scale groups (larger than, equal to and smaller than d, multiples of
the vector width and not), affine offsets, bias or not, odd in / out, M in {1, 2, 7} (and wider
tiles), fp32 / fp16 / bf16 inputs and codebooks, both methods, the dequantize path above
NATIVE_MAX_M rows, every instruction-set copy of the kernels (subprocesses with
PHYSKERN_CPU_ISA), the dispatch from physkern.ops / QuantizedLinear, the op's one schema, and the
torch fallback (same op, same schema) when physkern._C is missing.
"""
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from _subprocess import assert_snippet_prints_ok

from physkern import ops
from physkern.kernels.codebook_matmul import (INDEX_CACHE, NATIVE_MAX_M, codebook_matmul_cpu,
                                              codebook_matmul_native, codebook_matmul_reference,
                                              native_isa, native_matmul_available)
from physkern.layers import QuantizedLinear
from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import index_bits, pack_indices

needs_native = pytest.mark.skipif(not native_matmul_available(),
                                  reason="physkern._C without physkern::codebook_matmul")


def make_qw(out, inf, d, k, stages=1, codebook_rows=1, scale_group=None, scales=False,
            offsets=False, cb_dtype=torch.float32, sc_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (stages, out, inf // d), generator=g)
    cb = torch.randn(stages, out // codebook_rows, k, d, generator=g).to(cb_dtype)
    sg = scale_group or inf
    sc = (torch.rand(out, inf // sg, generator=g) + 0.5).to(sc_dtype) if scales else None
    of = (torch.randn(out, inf // sg, generator=g) * 0.1).to(sc_dtype) if offsets else None
    return QuantizedWeight(pack_indices(idx, index_bits(k)), cb, sc, of, inf, out, codebook_rows,
                           sg).validate()


def reference(x, qw, bias):
    """float64 dequantize + matmul, and the magnitude |x| @ |W|^T + |b| that bounds fp32 error."""
    w = qw.dequantize(torch.float64)
    xd = x.double().reshape(-1, qw.in_features)
    # Broadcast-and-sum rather than a BLAS call: tiny float64 GEMMs wake BLAS threads, which on a
    # loaded machine costs more than the product.
    prod = xd[:, None, :] * w[None, :, :]
    y = prod.sum(-1)
    mag = prod.abs().sum(-1)
    if bias is not None:
        y = y + bias.double()
        mag = mag + bias.double().abs()
    return y, mag


def check(y, x, qw, bias, rtol=None):
    ref, mag = reference(x, qw, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.out_features)
    if rtol is None:
        # fp32 accumulation over in_features terms (plus the stage sum and scale/offset terms);
        # half-precision outputs add their own rounding of the result.
        rtol = {torch.float32: 2e-6 * (qw.in_features ** 0.5 + 4),
                torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x.dtype]
    err = (y.double().reshape(ref.shape) - ref).abs()
    bound = rtol * (mag + ref.abs()) + 1e-30
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


def args(qw, x, bias):
    return (x, qw.packed, qw.codebooks, qw.scales, qw.offsets, bias, qw.in_features,
            qw.codebook_rows, qw.scale_group)


def run(qw, x, bias, method="direct"):
    """The fused kernel at any M, method forced."""
    return codebook_matmul_native(*args(qw, x, bias), method=method)


def op(qw, x, bias):
    """physkern::codebook_matmul itself (fused kernel up to NATIVE_MAX_M rows, dequantize above)."""
    return torch.ops.physkern.codebook_matmul(*args(qw, x, bias))


# (out, in, d, K, stages, scope, scale_group, scales, offsets): scope "row" = 1 row per codebook,
# "group" = a divisor of out, "layer" = out. Odd in/out, in not a multiple of 16 (vector tails),
# straddling bit widths (3, 5, 7, 12 bits), K = 1 and 2, scale groups < d, == d, multiples of 16
# and not, d with no vector kernel (3, 12: one weight at a time).
CASES = [
    (37, 40, 8, 5, 1, "row", None, False, False),
    (20, 48, 4, 128, 2, "group", 16, True, True),
    (33, 24, 1, 8, 1, "layer", 8, True, True),
    (17, 32, 16, 7, 2, "row", 16, True, False),
    (1, 16, 2, 1, 1, "row", None, False, False),
    (24, 40, 2, 32, 1, "layer", 4, True, True),
    (18, 36, 4, 64, 1, "group", 2, True, True),
    (9, 48, 8, 256, 1, "layer", 16, True, False),
    (8, 64, 8, 4096, 1, "layer", None, False, False),
    (5, 32, 1, 2, 2, "layer", 16, True, True),
    (29, 96, 3, 10, 2, "row", 12, True, True),
    (31, 160, 8, 64, 1, "row", 32, True, False),
    (30, 128, 1, 16, 1, "layer", 64, True, True),       # RTN 4-bit g64 (register permute)
    (30, 128, 1, 16, 2, "layer", 32, True, True),
    (22, 144, 1, 256, 1, "layer", 48, True, True),      # d = 1, K > 16 (no permute)
    (27, 96, 12, 16, 1, "group", 24, True, False),
    (19, 112, 16, 4096, 2, "layer", 16, True, True),
    (21, 80, 2, 2, 1, "row", 40, True, True),
    (35, 256, 4, 256, 1, "layer", 64, True, False),     # groups of 4 vectors (AVX-512)
    (14, 256, 8, 16, 2, "group", 128, True, False),     # groups of 8 vectors (AVX-512)
    (11, 64, 8, 256, 1, "layer", 32, True, False),      # groups of 2 vectors (AVX-512)
    (7, 48, 16, 2, 1, "row", 48, True, True),           # 3 vectors per group (run-time count)
    (3, 8, 8, 3, 1, "row", 8, True, False),             # in < one vector
    (9, 136, 1, 12, 2, "row", 8, True, True),           # 4-bit d = 1 read from the packed words
    (10, 160, 1, 16, 1, "group", 32, True, False),      # (AVX2 / AVX-512: in % 16 == 8, == 0)
]


def _rows(case):
    out, scope = case[0], case[5]
    if scope == "row":
        return 1
    if scope == "layer":
        return out
    return next(r for r in range(2, out) if out % r == 0) if out > 2 else out


def _ids(c):
    return f"{c[0]}x{c[1]}-d{c[2]}-K{c[3]}-S{c[4]}-{c[5]}-g{c[6]}-{'s' if c[7] else ''}{'o' if c[8] else ''}"


def _qw(case, **kw):
    out, inf, d, k, stages, _, g, sc, of = case
    return make_qw(out, inf, d, k, stages, _rows(case), g, sc, of, **kw)


@needs_native
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("m", [1, 2, 7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_direct_matches_reference(case, m, with_bias):
    qw = _qw(case, seed=m)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features) if with_bias else None
    check(run(qw, x, bias), x, qw, bias)


@needs_native
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("m", [1, 7])
def test_lut_matches_reference(case, m):
    qw = _qw(case, seed=m + 11)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    if qw.scales is not None and qw.scale_group % qw.block_dim:
        with pytest.raises(ValueError, match="scale_group"):
            run(qw, x, bias, "lut")
        return
    check(run(qw, x, bias, "lut"), x, qw, bias)


@needs_native
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 7, 12, 16, 19)],
                         ids=[_ids(CASES[i]) for i in (1, 2, 7, 12, 16, 19)])
@pytest.mark.parametrize("m", [3, 8, 9, 16, 21, 40])
def test_wide_tiles(case, m):
    # Rows of x go in tiles of 8 / 4 / 2 / 1 sharing each gathered weight vector.
    qw = _qw(case, seed=m)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    check(run(qw, x, bias), x, qw, bias)
    check(run(qw, x, bias, "auto"), x, qw, bias)
    y = op(qw, x, bias)
    check(y, x, qw, bias)
    if m <= NATIVE_MAX_M:  # the op runs the very same kernel
        assert torch.equal(y, run(qw, x, bias))


@needs_native
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("cb_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_path_above_native_max_m(case, cb_dtype):
    """Above NATIVE_MAX_M rows the op dequantizes W in C++ and runs one GEMM: equal to the
    float64 reference, to codebook_matmul_reference and to the torch path it replaced."""
    qw = _qw(case, cb_dtype=cb_dtype, seed=5)
    for m, with_bias in ((NATIVE_MAX_M + 1, True), (2 * NATIVE_MAX_M + 7, False)):
        x = torch.randn(m, qw.in_features)
        bias = torch.randn(qw.out_features) if with_bias else None
        y = op(qw, x, bias)
        check(y, x, qw, bias)
        for other in (codebook_matmul_reference(*args(qw, x, bias)),
                      codebook_matmul_cpu(*args(qw, x, bias), method="dequant")):
            torch.testing.assert_close(y, other, rtol=1e-5, atol=1e-5 * other.abs().max().item())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_path_dtypes_and_shapes(dtype):
    qw = make_qw(40, 96, 8, 16, 2, 8, 32, True, True, cb_dtype=torch.float16)
    bias = torch.randn(40).to(dtype)
    x3 = torch.randn(3, 20, 96).to(dtype)                      # [..., in], 60 rows
    y = op(qw, x3, bias)
    assert y.dtype == dtype and y.shape == (3, 20, 40)
    check(y, x3, qw, bias, rtol=2e-6 * 12 if dtype == torch.float64 else None)
    xt = torch.randn(96, 50).T.to(dtype)                       # transposed
    check(op(qw, xt, None), xt, qw, None, rtol=2e-6 * 12 if dtype == torch.float64 else None)


@needs_native
@pytest.mark.parametrize("cb_dtype,sc_dtype", [(torch.float16, torch.float16),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32),
                                               (torch.float32, torch.bfloat16),
                                               (torch.float64, torch.float64)])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 3, 12, 15, 17)],
                         ids=[_ids(CASES[i]) for i in (0, 1, 2, 3, 12, 15, 17)])
def test_codebook_and_scale_dtypes(cb_dtype, sc_dtype, case):
    qw = _qw(case, cb_dtype=cb_dtype, sc_dtype=sc_dtype, seed=3)
    x = torch.randn(2, qw.in_features)
    bias = torch.randn(qw.out_features)
    for method in ("direct", "lut"):
        if method == "lut" and qw.scales is not None and qw.scale_group % qw.block_dim:
            continue
        check(run(qw, x, bias, method), x, qw, bias)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m", [1, 2, 7])
def test_half_and_double_inputs(dtype, m):
    qw = make_qw(24, 64, 8, 16, 2, 24, 32, True, True, cb_dtype=torch.float16)
    x = torch.randn(m, 64).to(dtype)
    bias = torch.randn(24).to(dtype)
    y = run(qw, x, bias)
    if dtype == torch.float64:  # computed in fp32, returned in x's dtype
        check(y, x, qw, bias, rtol=2e-6 * 12)
    else:
        check(y, x, qw, bias)


@needs_native
def test_exhaustive_small_grid():
    """Every scope x d x K x stages x scales/offsets combination on one odd shape."""
    out, inf = 12, 48
    n = 0
    for d, k, stages, scope, (g, sc, of) in itertools.product(
            (1, 2, 4, 8, 16), (1, 2, 16, 256, 4096), (1, 2), ("row", "group", "layer"),
            ((None, False, False), (16, True, False), (8, True, True), (48, True, True),
             (2, True, False))):
        rows = {"row": 1, "group": 4, "layer": out}[scope]
        qw = make_qw(out, inf, d, k, stages, rows, g, sc, of, cb_dtype=torch.float16,
                     seed=n)
        x = torch.randn(3, inf)
        bias = torch.randn(out) if n % 2 else None
        check(run(qw, x, bias), x, qw, bias)
        if not sc or g % d == 0:
            check(run(qw, x, bias, "lut"), x, qw, bias)
        n += 1
    assert n == 5 * 5 * 2 * 3 * 5


@needs_native
def test_shapes_strides_and_empty():
    qw = make_qw(40, 96, 8, 16, 1, 8, 32, True, True)
    bias = torch.randn(40)
    x3 = torch.randn(2, 3, 96)                                 # [..., in]
    check(run(qw, x3, bias), x3, qw, bias)
    xs = torch.randn(3, 192)[:, ::2]                           # non-unit stride along in
    check(run(qw, xs, bias), xs, qw, bias)
    xt = torch.randn(96, 4).T                                  # transposed
    check(run(qw, xt, None), xt, qw, None)
    x1 = torch.randn(96)                                       # a single vector
    check(run(qw, x1, bias), x1, qw, bias)
    y0 = run(qw, torch.randn(0, 96), bias)
    assert y0.shape == (0, 40) and y0.dtype == torch.float32
    # Non-contiguous packed / codebooks / scales.
    qw2 = QuantizedWeight(qw.packed.transpose(0, 1).contiguous().transpose(0, 1), qw.codebooks,
                          qw.scales.T.contiguous().T, qw.offsets, 96, 40, 8, 32)
    x = torch.randn(2, 96)
    check(run(qw2, x, bias), x, qw, bias)


@needs_native
def test_threads_give_identical_bits():
    # Rows of y are split over threads; each row is computed the same way whatever the split.
    qw = make_qw(300, 256, 8, 64, 2, 1, 64, True, False, cb_dtype=torch.float16)
    x = torch.randn(3, 256)
    bias = torch.randn(300)
    old = torch.get_num_threads()
    try:
        ys = []
        for t in (1, 2):
            torch.set_num_threads(t)
            ys.append((run(qw, x, bias), run(qw, x, bias, "lut")))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(ys[0][0], ys[1][0]) and torch.equal(ys[0][1], ys[1][1])
    check(ys[0][0], x, qw, bias)


@needs_native
def test_op_checks_its_arguments():
    qw = make_qw(8, 16, 4, 4, 1, 8, 8, True, True)
    x = torch.randn(2, 16)
    a = list(args(qw, x, None))
    with pytest.raises(ValueError, match="in_features"):
        run(qw, torch.randn(2, 12), None)
    with pytest.raises(ValueError, match="in_features"):               # above NATIVE_MAX_M too
        torch.ops.physkern.codebook_matmul(torch.randn(NATIVE_MAX_M + 1, 12), *a[1:])
    with pytest.raises(ValueError, match="method"):
        torch.ops.physkern._codebook_matmul_fused(*a, "fast")
    bad = list(a)
    bad[5] = torch.randn(7)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.physkern.codebook_matmul(*bad)
    bad = list(a)
    bad[1] = qw.packed.to(torch.int64)
    with pytest.raises(ValueError, match="packed"):
        torch.ops.physkern.codebook_matmul(*bad)
    bad = list(a)
    bad[3] = None
    with pytest.raises(ValueError, match="offsets need scales"):
        torch.ops.physkern.codebook_matmul(*bad)
    bad = list(a)
    bad[7] = 3
    with pytest.raises(ValueError, match="codebook_rows"):
        torch.ops.physkern.codebook_matmul(*bad)
    bad = list(a)
    bad[8] = 5
    with pytest.raises(ValueError, match="scale_group"):
        torch.ops.physkern.codebook_matmul(*bad)
    bad = list(a)
    bad[3] = torch.rand(8, 3)
    with pytest.raises(ValueError, match="scales"):
        torch.ops.physkern.codebook_matmul(*bad)
    bad = list(a)
    bad[2] = torch.randn(1, 1, 4096, 4)                        # 12-bit indices: 2 words a row
    with pytest.raises(ValueError, match="words per row"):
        torch.ops.physkern.codebook_matmul(*bad)
    with pytest.raises(ValueError, match="method"):
        codebook_matmul_native(*a, method="fast")


@needs_native
def test_opcheck_op_with_cpp_kernel():
    # The C++ schema + CPU kernel with the fake, CUDA kernel and autograd formula registered from
    # physkern.ops: both sides of NATIVE_MAX_M, with and without gradients, half inputs.
    qw = make_qw(24, 32, 8, 4, 2, 8, 16, True, True)
    assert ops._codebook_matmul_op is torch.ops.physkern.codebook_matmul.default
    for x, bias in [(torch.randn(3, 32, requires_grad=True), torch.randn(24, requires_grad=True)),
                    (torch.randn(2, 5, 32), None), (torch.randn(1, 32).half(), torch.randn(24).half()),
                    (torch.randn(NATIVE_MAX_M + 1, 32, requires_grad=True), torch.randn(24)),
                    (torch.randn(NATIVE_MAX_M + 1, 32), None)]:
        torch.library.opcheck(ops._codebook_matmul_op, args(qw, x, bias))


@needs_native
def test_one_schema_defined_in_cpp():
    """physkern::codebook_matmul is the one op: its schema comes from physkern._C and is the
    string physkern.ops would define without it; the old separately named op is gone."""
    schema = torch.ops.physkern.codebook_matmul.default._schema
    assert str(schema) == "physkern::codebook_matmul" + ops.CODEBOOK_MATMUL_SCHEMA
    assert torch._C._dispatch_has_kernel_for_dispatch_key("physkern::codebook_matmul", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("physkern::codebook_matmul", "CUDA")
    with pytest.raises(RuntimeError, match="does not exist"):
        torch._C._dispatch_has_kernel_for_dispatch_key("physkern::codebook_matmul_cpu", "CPU")
    # The CPU kernel is C++ (the Python fallback is not registered next to it).
    assert not hasattr(ops, "_codebook_matmul_torch_cpu")


def test_native_max_m_matches_cpp():
    """kernels' NATIVE_MAX_M mirrors the C++ kernel's kFusedMaxM (the selector and the op must
    switch paths at the same M)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "csrc",
                       "codebook_matmul.cpp")
    if not os.path.exists(src):
        pytest.skip("csrc/ not beside the tests")
    with open(src) as f:
        found = re.search(r"constexpr int64_t kFusedMaxM = (\d+);", f.read())
    assert found and int(found.group(1)) == NATIVE_MAX_M


@needs_native
def test_dispatch_small_m_native_large_m_torch():
    """ops.codebook_matmul / codebook_matmul_cpu / QuantizedLinear run C++ for every M (the torch
    path's index cache is not touched): the decode selector up to NATIVE_MAX_M, the op's
    dequantize + GEMM above; the explicit torch methods still use the cache."""
    qw = make_qw(48, 64, 8, 16, 1, 48, 32, True, False, cb_dtype=torch.float16)
    bias = torch.randn(48)
    layer = QuantizedLinear(qw, bias)
    INDEX_CACHE.clear()
    misses = INDEX_CACHE.misses
    for m in (1, 2, 7, NATIVE_MAX_M):
        x = torch.randn(m, 64)
        check(ops.codebook_matmul(x, qw, bias), x, qw, bias)
        check(ops.codebook_matmul(x, qw, bias, backend="cpu"), x, qw, bias)
        check(codebook_matmul_cpu(*args(qw, x, bias)), x, qw, bias)
        with torch.no_grad():
            check(layer(x), x, qw, bias)
        check(layer(x), x, qw, bias)
    assert INDEX_CACHE.misses == misses
    x = torch.randn(NATIVE_MAX_M + 1, 64)
    check(ops.codebook_matmul(x, qw, bias), x, qw, bias)
    check(codebook_matmul_cpu(*args(qw, x, bias)), x, qw, bias)
    with torch.no_grad():
        check(layer(x), x, qw, bias)
    assert INDEX_CACHE.misses == misses
    check(codebook_matmul_cpu(*args(qw, x, bias), method="dequant"), x, qw, bias)
    assert INDEX_CACHE.misses == misses + 1
    # Explicit methods of codebook_matmul_cpu.
    x = torch.randn(3, 64)
    for method in ("native", "native_lut", "lut", "dequant"):
        check(codebook_matmul_cpu(*args(qw, x, bias), method=method), x, qw, bias)
    with pytest.raises(ValueError, match="method"):
        codebook_matmul_cpu(*args(qw, x, bias), method="fast")


@needs_native
def test_autograd_and_compile_still_use_the_custom_op():
    qw = make_qw(24, 32, 8, 4, 2, 8, 16, True, True)
    x = torch.randn(2, 32, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    ops.codebook_matmul(x, qw, bias).square().sum().backward()
    w = qw.dequantize()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    (x2 @ w.T + b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    f = torch.compile(lambda t: ops.codebook_matmul(t, qw, None), fullgraph=True)
    with torch.no_grad():
        xc = torch.randn(1, 32)
        check(f(xc), xc, qw, None)


@needs_native
def test_decode_path_under_fake_tensors_and_dispatch_modes():
    """The selector's below-autograd call is for plain tensors only: FakeTensors (and any Python
    dispatch mode) take the op's full dispatch, its fake giving the shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    qw = make_qw(40, 96, 8, 16, 2, 8, 32, True, True)
    with torch.no_grad():
        for m in (1, NATIVE_MAX_M + 1):
            with FakeTensorMode(allow_non_fake_inputs=True):
                x = torch.randn(m, 96)
                for y in (ops.codebook_linear(*args(qw, x, None)),
                          codebook_matmul_cpu(*args(qw, x, None))):
                    assert type(y).__name__ == "FakeTensor" and y.shape == (m, 40)
            x = torch.randn(m, 96)
            with Seen() as seen:
                y = ops.codebook_linear(*args(qw, x, None))
            assert "physkern.codebook_matmul.default" in seen.ops
            check(y, x, qw, None)


@needs_native
def test_native_isa_reported():
    assert native_isa() in ("avx512", "avx2", "baseline")


_ISA_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_codebook_matmul_native as T
isa = torch.ops.physkern.codebook_matmul_cpu_isa()
if isa != {isa!r}:
    print('unsupported', isa)
    sys.exit(0)
n = 0
for case in T.CASES:
    for m in (1, 3, 9):
        for cb_dtype in (torch.float32, torch.float16, torch.bfloat16):
            qw = T._qw(case, cb_dtype=cb_dtype, seed=m)
            x = torch.randn(m, qw.in_features)
            bias = torch.randn(qw.out_features)
            T.check(T.run(qw, x, bias), x, qw, bias)
            if qw.scales is None or qw.scale_group % qw.block_dim == 0:
                T.check(T.run(qw, x, bias, 'lut'), x, qw, bias)
            n += 1
        x = torch.randn(T.NATIVE_MAX_M + 1, qw.in_features)   # the op's dequantize path
        T.check(T.op(qw, x, bias), x, qw, bias)
print('ok', isa, n)
"""


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_every_instruction_set_copy(isa):
    """Each copy of the kernels (chosen by PHYSKERN_CPU_ISA) against the reference, in a child
    process (the copy is picked once per process). Copies the CPU cannot run are skipped."""
    code = _ISA_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), isa=isa)
    env = dict(os.environ, PHYSKERN_CPU_ISA=isa, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.startswith("unsupported"):
        pytest.skip(f"this CPU cannot run the {isa} kernels ({out.stdout.strip()})")
    assert out.stdout.strip().startswith(f"ok {isa}"), out.stdout + out.stderr[-3000:]


def test_falls_back_without_extension():
    """With physkern._C unimportable, the CPU path and QuantizedLinear run the torch path."""
    code = (
        "import sys, warnings\n"
        "sys.modules['physkern._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch\n"
        "from physkern.kernels import codebook_matmul as C\n"
        "from physkern import ops\n"
        "from physkern.layers import QuantizedLinear\n"
        "from physkern.quant.format import QuantizedWeight\n"
        "from physkern.quant.packing import pack_indices\n"
        "assert not C.native_matmul_available() and C.native_isa() is None\n"
        "g = torch.Generator().manual_seed(0)\n"
        "qw = QuantizedWeight(pack_indices(torch.randint(0, 16, (2, 20, 12), generator=g), 4),\n"
        "                     torch.randn(2, 5, 16, 4, generator=g).half(),\n"
        "                     torch.rand(20, 3, generator=g) + 0.5, None, 48, 20, 4, 16)\n"
        "b = torch.randn(20)\n"
        "w = qw.dequantize(torch.float64)\n"
        "for m in (1, 3, 40):\n"
        "    x = torch.randn(m, 48)\n"
        "    ref = (x.double() @ w.T + b.double()).float()\n"
        "    for y in (C.codebook_matmul_cpu(x, qw.packed, qw.codebooks, qw.scales, None, b,\n"
        "                                    48, 4, 16), ops.codebook_matmul(x, qw, b),\n"
        "              QuantizedLinear(qw, b)(x)):\n"
        "        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)\n"
        "try:\n"
        "    C.codebook_matmul_cpu(x, qw.packed, qw.codebooks, qw.scales, None, b, 48, 4, 16,\n"
        "                          method='native')\n"
        "    raise SystemExit('native without the extension should fail')\n"
        "except RuntimeError as e:\n"
        "    assert 'make install' in str(e)\n"
        "# The same op, defined from the same schema string, with the torch CPU kernel.\n"
        "op = torch.ops.physkern.codebook_matmul.default\n"
        "assert ops._codebook_matmul_op is op\n"
        "assert str(op._schema) == 'physkern::codebook_matmul' + ops.CODEBOOK_MATMUL_SCHEMA\n"
        "for x in (torch.randn(3, 48, requires_grad=True), torch.randn(40, 48)):\n"
        "    torch.library.opcheck(op, (x, qw.packed, qw.codebooks, qw.scales, None, b, 48, 4, 16))\n"
        "x = torch.randn(3, 48, requires_grad=True)\n"
        "ops.codebook_matmul(x, qw, b).sum().backward()\n"
        "torch.testing.assert_close(x.grad, w.float().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n")
    assert_snippet_prints_ok(code)
