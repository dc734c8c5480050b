"""Lattice attention: Triton kernel (interpreter) and banded torch path against the sdpa reference.

Exact mode must match the reference to float32 rounding; with skipping, the error must stay within
the derived bound 2 * eps * max|v|, and skipping must actually happen in the cases built for it.
"""
import math

import pytest
import torch

from physkern.research.attention import lattice_attention, record_work
from physkern.kernels.lattice_attention import (
    error_bound, kernel_config, lattice_attention_banded, lattice_attention_reference,
    lattice_attention_triton, lattice_bias, lattice_plan, score_range_bound, truncation_distance)

INF = float("inf")

# (batch, q_heads, kv_heads, n_q, n_kv, head_dim, xi)
SHAPES = [
    (1, 1, 1, 1, 1, 16, 4.0),                     # n = 1
    (1, 2, 2, 37, 37, 16, 8.0),                   # n not a multiple of the block
    (2, 4, 2, 48, 48, 16, 3.0),                   # GQA 4:2, multiple of the block
    (1, 6, 2, 33, 33, 32, [1.0, 2.0, 4.0, INF, 16.0, 0.5]),   # GQA 3:1, per-head xi
    (1, 2, 1, 5, 40, 16, 6.0),                    # fewer queries than keys (decoding)
    (1, 2, 2, 20, 20, 24, 5.0),                   # head_dim not a power of two
]


def _qkv(b, hq, hkv, nq, nkv, d, scale_q=1.0, dtype=torch.float32):
    q = torch.randn(b, hq, nq, d) * scale_q
    k = torch.randn(b, hkv, nkv, d)
    v = torch.randn(b, hkv, nkv, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _naive(q, k, v, xi, scale=None):
    """Independent loop reference: one query at a time, explicit softmax in float64."""
    b, hq, nq, d = q.shape
    hkv, nkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    xis = [float(x) for x in (xi if isinstance(xi, (list, tuple)) else [xi] * hq)]
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)].double(), v[:, h // (hq // hkv)].double()
        for i in range(nq):
            pos = i + nkv - nq
            s = (q[:, h, i].double()[:, None, :] * kh[:, :pos + 1]).sum(-1) * scale
            dist = torch.arange(pos, -1, -1, dtype=torch.float64)
            s = s - (0.0 if math.isinf(xis[h]) else 1.0 / xis[h]) * dist
            out[:, h, i] = (torch.softmax(s, -1)[:, :, None] * vh[:, :pos + 1]).sum(1)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_reference_matches_naive(shape):
    b, hq, hkv, nq, nkv, d, xi = shape
    q, k, v = _qkv(b, hq, hkv, nq, nkv, d)
    ref = lattice_attention_reference(q, k, v, xi)
    torch.testing.assert_close(ref.double(), _naive(q, k, v, xi), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_exact_mode_matches_reference(shape):
    b, hq, hkv, nq, nkv, d, xi = shape
    q, k, v = _qkv(b, hq, hkv, nq, nkv, d)
    ref = lattice_attention_reference(q, k, v, xi)
    tri = lattice_attention_triton(q, k, v, xi, block_m=16, block_n=16)
    band = lattice_attention_banded(q, k, v, xi, chunk=16)
    torch.testing.assert_close(tri, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(band, ref, atol=2e-5, rtol=1e-4)


def test_xi_inf_is_plain_causal_attention():
    q, k, v = _qkv(2, 4, 2, 45, 45, 16)
    plain = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    for eps in (None, 1e-3):  # xi = inf never skips, whatever eps says
        tri = lattice_attention_triton(q, k, v, INF, eps=eps, block_m=16, block_n=16)
        torch.testing.assert_close(tri, plain, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lattice_attention(q, k, v, INF, eps=eps), plain,
                                   atol=2e-5, rtol=1e-4)
        assert lattice_plan(q, k, INF, eps, 0.25, 16, 16).fraction_visited == 1.0


@pytest.mark.parametrize("eps", [1e-1, 1e-3])
@pytest.mark.parametrize("xi", [0.5, 2.0, [0.5, 1.0, 2.0, INF]])
def test_skipping_error_within_derived_bound(xi, eps):
    # Small queries keep the score range small, so the truncation distance is short and many
    # key blocks are skipped; the error must stay within 2 * eps * max|v|.
    q, k, v = _qkv(1, 4, 2, 150, 150, 16, scale_q=0.3)
    ref = lattice_attention_reference(q, k, v, xi)
    bound = error_bound(v, eps).repeat_interleave(2, dim=1)
    plan = lattice_plan(q, k, xi, eps, 0.25, 16, 16)
    assert plan.fraction_visited < 0.8, "the case was built to skip blocks"
    tri = lattice_attention_triton(q, k, v, xi, eps=eps, block_m=16, block_n=16)
    band = lattice_attention_banded(q, k, v, xi, eps=eps, chunk=16)
    for out in (tri, band):
        err = (out - ref).abs()
        assert (err <= bound + 1e-6).all(), float((err - bound).max())


def test_skipped_mass_below_eps_per_row():
    # Check the bound on the quantity it is about: the exact softmax mass beyond D per row.
    q, k, _ = _qkv(1, 2, 2, 120, 120, 16, scale_q=0.5)
    xi, eps, scale = 3.0, 1e-3, 0.25
    rows = score_range_bound(q, k, scale)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    s = s + lattice_bias(120, 120, xi, 2, dtype=torch.float64)[None]
    p = torch.softmax(s, -1)
    i = torch.arange(120)[:, None]
    j = torch.arange(120)[None, :]
    for h in range(2):
        for row in range(0, 120, 7):
            real_range = (s[0, h, row, :row + 1].max() - s[0, h, row, :row + 1].min()
                          - (row / xi))  # scores without the bias span less than this
            assert real_range <= rows[0, h, row] + 1e-6
            dist = truncation_distance(xi, eps, float(rows[0, h, row]))
            skipped = p[0, h, row][(i[row] - j[0]) > dist].sum()
            assert skipped <= eps


@pytest.mark.parametrize("xi, scale_q", [(2.0, 0.5), (8.0, 0.3), (32.0, 0.1)])
def test_blockwise_plan_skips_below_eps_per_row(xi, scale_q):
    # The default (data-derived) plan: for every row, the exact softmax mass of the keys in the
    # skipped tiles is <= eps. Keys with a structured outlier (a "sink" key far behind) included.
    q, k, _ = _qkv(1, 4, 2, 500, 520, 16, scale_q=scale_q)
    k[:, :, 3] *= 6.0
    eps, scale = 1e-3, 0.25
    plan = lattice_plan(q, k, xi, eps, scale, 32, 16)
    assert plan.fraction_visited < 1.0
    kk = k.repeat_interleave(2, dim=1).double()
    s = torch.einsum("bhid,bhjd->bhij", q.double(), kk) * scale
    p = torch.softmax(s + lattice_bias(500, 520, xi, 4, dtype=torch.float64)[None], -1)
    cum = torch.cumsum(p, -1)                             # mass of keys <= j
    for h in range(4):
        for qb in range(plan.start_block.shape[-1]):
            first = int(plan.start_block[0, h, qb]) * 16
            if first == 0:
                continue
            rows = slice(qb * 32, min(500, qb * 32 + 32))
            assert float(cum[0, h, rows, first - 1].max()) <= eps


def test_truncation_distance_formula():
    # r^(D+1) <= eps / (e^R + eps) and D is the smallest such integer.
    for xi, eps, rng in [(16.0, 1e-3, 0.0), (64.0, 1e-2, 5.0), (1.5, 0.3, 2.0)]:
        dist = truncation_distance(xi, eps, rng)
        r = math.exp(-1.0 / xi)
        target = eps / (math.exp(rng) + eps)
        assert r ** (dist + 1) <= target * (1 + 1e-9)
        assert dist == 0 or r ** dist > target
    assert truncation_distance(INF, 1e-3, 1.0) == INF


def test_user_dispatch_cpu_records_work():
    q, k, v = _qkv(1, 2, 1, 1000, 1000, 16, scale_q=0.2)
    with record_work(block_m=16, block_n=16) as work:
        out = lattice_attention(q, k, v, 1.0, eps=1e-3)
    ref = lattice_attention_reference(q, k, v, 1.0)
    assert (out - ref).abs().max() <= error_bound(v, 1e-3).max() + 1e-6
    assert work.calls == 1 and work.paths == {"banded": 1}
    assert 0 < work.fraction_blocks_visited < 0.5
    assert work.pairs_computed < work.pairs_causal
    assert work.tiles == {(16, 16)}


def test_oracle_visits_no_more_than_the_bound():
    # The provable plan may only visit more tiles than exact weights need, never fewer.
    q, k, v = _qkv(1, 2, 1, 400, 400, 16, scale_q=0.5)
    with record_work(block_m=32, block_n=16, oracle=True) as work:
        lattice_attention(q, k, v, 4.0, eps=1e-3)
    assert work.oracle_blocks_visited <= work.blocks_visited
    assert work.fraction_oracle_blocks_visited < 1.0


def test_low_precision_banded_path():
    # fp16 / bf16 inputs on the CPU path (float32 softmax inside): close to the float32 result.
    q, k, v = _qkv(1, 2, 1, 40, 40, 16)
    ref = lattice_attention_reference(q, k, v, 8.0)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        out = lattice_attention(q.to(dtype), k.to(dtype), v.to(dtype), 8.0)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_gradients_flow_on_cpu_path():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1, 20, 20, 16))
    lattice_attention(q, k, v, 4.0).sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(xi=0.0), "xi must be > 0"),
    (dict(xi=-3.0), "xi must be > 0"),
    (dict(xi=float("nan")), "xi must be > 0"),
    (dict(xi=[1.0, 2.0, 3.0]), "one value per query head"),
    (dict(xi=4.0, eps=0.0), "eps must lie in"),
    (dict(xi=4.0, eps=1.0), "eps must lie in"),
    (dict(xi=4.0, eps=-0.5), "eps must lie in"),
    (dict(xi=4.0, causal=False), "causal"),
])
def test_bad_arguments(kwargs, match):
    q, k, v = _qkv(1, 2, 1, 8, 8, 16)
    with pytest.raises(ValueError, match=match):
        lattice_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, _, _ = _qkv(1, 6, 4, 8, 8, 16)
    k = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="GQA"):
        lattice_attention(q, k, k, 4.0)
    with pytest.raises(ValueError, match="head_dim"):
        lattice_attention(q, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), 4.0)
    with pytest.raises(ValueError, match=r"\[batch, heads, n, head_dim\]"):
        lattice_attention(q[0], k[0], k[0], 4.0)
    with pytest.raises(ValueError, match="outnumber"):
        lattice_attention(torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16),
                          torch.randn(1, 2, 8, 16), 4.0)
    with pytest.raises(ValueError, match="dtype"):
        lattice_attention(q.half(), k[:, :2], k[:, :2], 4.0)


def test_triton_production_tiles_interpreter():
    # The production tiling (kernel_config for head_dim 64), fp32 in the interpreter, with
    # skipping, GQA and a ragged last block.
    q, k, v = _qkv(1, 2, 1, 300, 300, 64, scale_q=0.3)
    ref = lattice_attention_reference(q, k, v, 4.0)
    plan = lattice_plan(q, k, 4.0, 1e-3, 0.125, *kernel_config(64)[:2])
    assert plan.fraction_visited < 1.0
    out = lattice_attention_triton(q, k, v, 4.0, eps=1e-3)
    bound = error_bound(v, 1e-3).repeat_interleave(2, dim=1)
    assert ((out - ref).abs() <= bound + 1e-6).all()
    torch.testing.assert_close(lattice_attention_triton(q, k, v, 4.0), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_low_precision(dtype, head_dim):
    q, k, v = (t.cuda() for t in _qkv(2, 8, 2, 1000, 1000, head_dim))
    ref = lattice_attention_reference(q, k, v, 64.0)
    out = lattice_attention(q.to(dtype), k.to(dtype), v.to(dtype), 64.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
