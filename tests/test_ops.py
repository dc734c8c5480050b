"""physkern.ops: custom ops (opcheck), dispatch, backends, autograd, torch.compile on CPU."""
import pytest
import torch

import physkern.ops as ops
from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import index_bits, pack_indices


def make_qw(out=24, inf=32, d=8, k=4, stages=2, codebook_rows=8, scale_group=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (stages, out, inf // d), generator=g)
    return QuantizedWeight(pack_indices(idx, index_bits(k)),
                           torch.randn(stages, out // codebook_rows, k, d, generator=g),
                           torch.rand(out, inf // scale_group, generator=g) + 0.5,
                           torch.randn(out, inf // scale_group, generator=g) * 0.1,
                           inf, out, codebook_rows, scale_group).validate()


def test_opcheck_codebook_matmul():
    qw = make_qw()
    for x, bias in [(torch.randn(3, 32, requires_grad=True), torch.randn(24, requires_grad=True)),
                    (torch.randn(2, 5, 32), None)]:
        torch.library.opcheck(ops._codebook_matmul_op,
                              (x, qw.packed, qw.codebooks, qw.scales, qw.offsets, bias,
                               qw.in_features, qw.codebook_rows, qw.scale_group))
    torch.library.opcheck(ops._codebook_matmul_op,
                          (torch.randn(4, 32), qw.packed, qw.codebooks, None, None, None, 32, 8, 32))
    # Above NATIVE_MAX_M rows (the C++ kernel's dequantize + GEMM path, when built).
    torch.library.opcheck(ops._codebook_matmul_op,
                          (torch.randn(ops.NATIVE_MAX_M + 3, 32, requires_grad=True), qw.packed,
                           qw.codebooks, qw.scales, qw.offsets, torch.randn(24), 32, 8, 16))


def test_codebook_matmul_is_one_registered_op():
    """ops._codebook_matmul_op is physkern::codebook_matmul with the documented schema, a CPU and
    a CUDA kernel, whether its schema came from physkern._C or from this module."""
    op = torch.ops.physkern.codebook_matmul.default
    assert ops._codebook_matmul_op is op
    assert str(op._schema) == "physkern::codebook_matmul" + ops.CODEBOOK_MATMUL_SCHEMA
    for key in ("CPU", "CUDA", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("physkern::codebook_matmul", key)


@pytest.mark.parametrize("importance", [None, "dim", "block"])
def test_opcheck_kmeans_assign(importance):
    blocks, cent = torch.randn(3, 10, 4), torch.randn(3, 5, 4)
    imp = {None: None, "dim": torch.rand(4), "block": torch.rand(3, 10, 4)}[importance]
    torch.library.opcheck(ops._kmeans_assign_op, (blocks, cent, imp))


def test_wrappers_dispatch_and_backends_agree():
    qw = make_qw()
    x, bias = torch.randn(5, 32), torch.randn(24)
    ref = ops.codebook_matmul(x, qw, bias, backend="reference")
    for backend in ("auto", "cpu", "triton"):
        torch.testing.assert_close(ops.codebook_matmul(x, qw, bias, backend=backend), ref,
                                   rtol=1e-5, atol=1e-5)
    blocks, cent = torch.randn(2, 30, 4), torch.randn(2, 6, 4)
    ri, rd = ops.kmeans_assign(blocks, cent, backend="reference")
    for backend in ("auto", "cpu", "triton"):
        i, d = ops.kmeans_assign(blocks, cent, backend=backend)
        assert torch.equal(i, ri)
        torch.testing.assert_close(d, rd)
    with pytest.raises(ValueError, match="backend"):
        ops.codebook_matmul(x, qw, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        ops.kmeans_assign(blocks, cent, backend="fast")


def test_autograd_through_codebook_matmul():
    qw = make_qw()
    x = torch.randn(3, 32, dtype=torch.float64).float().requires_grad_()
    bias = torch.randn(24, requires_grad=True)
    ops.codebook_matmul(x, qw, bias).square().sum().backward()
    w = qw.dequantize()
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    (x2 @ w.T + b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-4)


class _TinyQuantized(torch.nn.Module):
    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        for name in ("packed", "codebooks", "scales", "offsets"):
            self.register_buffer(name, getattr(qw, name))
        self.meta = (qw.in_features, qw.out_features, qw.codebook_rows, qw.scale_group)
        self.bias = torch.nn.Parameter(torch.randn(qw.out_features))
        self.head = torch.nn.Linear(qw.out_features, 8)

    def forward(self, x):
        inf, out, rows, g = self.meta
        qw = QuantizedWeight(self.packed, self.codebooks, self.scales, self.offsets, inf, out,
                             rows, g)
        return self.head(torch.nn.functional.gelu(ops.codebook_matmul(x, qw, self.bias)))


def test_torch_compile_cpu():
    torch._dynamo.reset()
    model = _TinyQuantized(make_qw()).eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for m in (1, 7):  # a second shape: recompiles or dynamic, either must be right
            x = torch.randn(m, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_prefill_dtype_bfloat16():
    """set_prefill_dtype(torch.bfloat16): many-row fp32 x runs one bf16 GEMM (x and W rounded to
    bf16, fp32 accumulation) and comes back fp32, close to the fp32 product within bf16
    rounding; few rows (decode) and the default are untouched; bad values are refused."""
    from physkern.layers import QuantizedLinear
    qw = make_qw(out=48, inf=64, d=4, k=16, stages=1, codebook_rows=48, scale_group=64)
    layer = QuantizedLinear(qw, torch.randn(48))
    big = torch.randn(2, ops.NATIVE_MAX_M + 7, 64)
    small = torch.randn(1, 64)
    w = qw.dequantize(torch.float64)
    try:
        with torch.no_grad():
            y32, s32 = layer(big), layer(small)
            ops.set_prefill_dtype(torch.bfloat16)
            assert ops.prefill_dtype() is torch.bfloat16
            y16, s16 = layer(big), layer(small)
    finally:
        ops.set_prefill_dtype(None)
    assert y16.dtype == torch.float32 and y16.shape == y32.shape
    assert torch.equal(s16, s32)                           # decode path unchanged
    exact = big.double() @ w.T + layer.bias.double()
    # bf16 rounding of x and W (2^-8 relative each) over 64 products, fp32 accumulation
    mag = big.double().abs() @ w.abs().T
    assert ((y16.double() - exact).abs() <= 2 * 2 ** -8 * mag + 1e-4).all()
    assert not torch.equal(y16, y32)                       # it did run in bf16
    with pytest.raises(ValueError, match="prefill dtype"):
        ops.set_prefill_dtype(torch.float16)
