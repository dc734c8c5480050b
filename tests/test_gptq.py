"""GPTQ: beats RTN on the proxy loss, equals a slow reference of the published algorithm."""
import pytest
import torch

from physkern.quant.gptq import _gptq_scalar, gptq_error_feedback, gptq_quantize_scalar
from physkern.quant.scalar import rtn_quantize, scalar_grid_params

OUT, IN = 24, 64


def make_layer(seed=0, dead=()):
    """Random W and correlated calibration inputs X [tokens, in] with a few large channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=g) / IN ** 0.5
    x = torch.randn(256, IN, generator=g) @ (torch.eye(IN) + 2 * mix)
    x = x * (1 + 3 * torch.rand(IN, generator=g))      # uneven channel scales (act order matters)
    for j in dead:
        x[:, j] = 0
    w = torch.randn(OUT, IN, generator=g) * 0.1
    return w, x, x.T @ x


def proxy_loss(w, q, x):
    return float(((w - q) @ x.T).pow(2).sum())


def reference_gptq(w, h, bits, group_size=None, symmetric=False, act_order=False,
                   static_groups=True, percdamp=0.01):
    """Published GPTQ, column by column without lazy batching, in float64."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    gs = n if group_size is None else group_size
    dynamic = group_size is not None and not static_groups
    params = {}
    if not dynamic:
        for g in range(n // gs):
            params[g] = scalar_grid_params(w[:, g * gs:(g + 1) * gs].float(), bits, symmetric)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order \
        else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)    # H^-1 = U^T U
    q = torch.zeros_like(w)
    maxq = 2 ** bits - 1
    for j in range(n):
        col = int(perm[j])
        if dynamic and col % gs == 0:
            params[col // gs] = scalar_grid_params(w[:, j:j + gs].float(), bits, symmetric)
        s, o = (p.double() for p in params[col // gs])
        q[:, j] = torch.clamp(torch.round((w[:, j] - o) / s), 0, maxq) * s + o
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return q[:, torch.argsort(perm)].float()


CASES = [dict(bits=3, group_size=16), dict(bits=4, group_size=None),
         dict(bits=3, group_size=16, act_order=True), dict(bits=2, group_size=32, symmetric=True),
         dict(bits=3, group_size=16, static_groups=False),
         dict(bits=3, group_size=8, act_order=True, symmetric=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptq_matches_slow_reference(case):
    w, x, h = make_layer()
    qw, loop = _gptq_scalar(w, h, case["bits"], case.get("group_size"),
                            case.get("symmetric", False), case.get("act_order", False),
                            case.get("static_groups", True), 0.01, 16)
    ref = reference_gptq(w, h, **case)
    assert torch.allclose(loop, ref, atol=1e-5, rtol=0), float((loop - ref).abs().max())
    # The stored weight reproduces the loop's values exactly.
    assert torch.equal(qw.dequantize(), loop)
    assert qw.k == 2 ** case["bits"] and qw.block_dim == 1
    # The public entry point gives the same weight.
    qw2 = gptq_quantize_scalar(w, h, case["bits"], case.get("group_size"),
                               case.get("symmetric", False), case.get("act_order", False),
                               case.get("static_groups", True), 0.01, 16)
    assert torch.equal(qw2.packed, qw.packed) and torch.equal(qw2.scales, qw.scales)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size", [(3, 16), (4, None), (2, 32)])
def test_gptq_beats_rtn_on_same_grid(bits, group_size, act_order):
    w, x, h = make_layer(seed=1)
    rtn = rtn_quantize(w, bits, group_size)
    gq = gptq_quantize_scalar(w, h, bits, group_size, act_order=act_order, blocksize=32)
    # Static groups: GPTQ uses exactly RTN's grid (same scales and offsets).
    assert torch.equal(gq.scales, rtn.scales) and torch.equal(gq.offsets, rtn.offsets)
    l_gptq, l_rtn = proxy_loss(w, gq.dequantize(), x), proxy_loss(w, rtn.dequantize(), x)
    assert l_gptq < 0.8 * l_rtn, (l_gptq, l_rtn)


def test_blocksize_does_not_change_result():
    w, x, h = make_layer(seed=2)
    a = gptq_quantize_scalar(w, h, 3, 16, blocksize=8).dequantize()
    b = gptq_quantize_scalar(w, h, 3, 16, blocksize=128).dequantize()
    assert (a != b).float().mean() < 0.01       # float32 rounding may flip a rare tie


def test_dead_columns():
    w, x, h = make_layer(seed=3, dead=(5, 40))
    qw, loop = _gptq_scalar(w, h, 3, 16, False, True, True, 0.01, 16)
    assert torch.isfinite(loop).all()
    ref = reference_gptq(w, h, 3, 16, act_order=True)
    assert torch.allclose(loop, ref, atol=1e-5, rtol=0)


# ---- the generic loop with step > 1 (GPTVQ-style vectors) --------------------------------------

def vq_step(codebook):
    """Nearest 2-d codeword for each row's pair of columns."""
    def q(w_cols):
        d = (w_cols[:, None, :].double() - codebook[None].double()).pow(2).sum(-1)
        return codebook[d.argmin(1)].to(w_cols.dtype)
    return q


def reference_vector_feedback(w, h, quant, step, percdamp=0.01, perm=None):
    """Column-by-column error feedback on the full matrix, `step` columns quantized jointly."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    perm = torch.arange(n) if perm is None else perm
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    for j0 in range(0, n, step):
        q[:, j0:j0 + step] = quant(w[:, j0:j0 + step]).double()
        for j in range(j0, j0 + step):
            err = (w[:, j] - q[:, j]) / u[j, j]
            w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return q[:, torch.argsort(perm)].float(), u


@pytest.mark.parametrize("use_perm", [False, True])
def test_error_feedback_step2_matches_reference(use_perm):
    w, x, h = make_layer(seed=4)
    codebook = torch.randn(16, 2) * 0.15
    quant = vq_step(codebook)
    perm = torch.randperm(IN) if use_perm else None
    calls = []

    def step_fn(col_start, w_cols, u_diag):
        calls.append((col_start, u_diag.clone()))
        assert w_cols.shape == (OUT, 2) and u_diag.shape == (2,)
        return quant(w_cols)

    got = gptq_error_feedback(w, h, step_fn, step=2, blocksize=8, perm=perm)
    ref, u = reference_vector_feedback(w, h, quant, 2, perm=perm)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), float((got - ref).abs().max())
    assert [c for c, _ in calls] == list(range(0, IN, 2))
    for c, ud in calls:
        assert torch.allclose(ud.double(), torch.diagonal(u)[c:c + 2], rtol=1e-5)
    # Vector feedback beats nearest-codeword rounding without feedback on the proxy loss.
    plain = torch.cat([quant(w[:, j:j + 2]) for j in range(0, IN, 2)], dim=1)
    assert proxy_loss(w, got, x) < proxy_loss(w, plain, x)


def test_error_feedback_identity_quantizer_is_exact():
    w, x, h = make_layer(seed=5)
    got = gptq_error_feedback(w, h, lambda c, wc, u: wc, step=4, blocksize=16)
    assert torch.allclose(got, w, atol=1e-6)


def test_error_feedback_bad_input():
    w, x, h = make_layer()
    ident = lambda c, wc, u: wc
    with pytest.raises(ValueError, match="blocksize"):
        gptq_error_feedback(w, h, ident, step=4, blocksize=10)
    with pytest.raises(ValueError, match="step"):
        gptq_error_feedback(w, h, ident, step=3, blocksize=12)       # 3 does not divide 64
    with pytest.raises(ValueError, match="hessian"):
        gptq_error_feedback(w, h[:10, :10], ident)
    with pytest.raises(ValueError, match="perm"):
        gptq_error_feedback(w, h, ident, perm=torch.zeros(IN, dtype=torch.long))
    with pytest.raises(ValueError, match="quantize_step"):
        gptq_error_feedback(w, h, lambda c, wc, u: wc[:, :1], step=2, blocksize=8)


def test_gptq_bad_input():
    w, x, h = make_layer()
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize_scalar(w, h, 9)
    with pytest.raises(ValueError, match=r"group_size \(24\)"):
        gptq_quantize_scalar(w, h, 4, group_size=24)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize_scalar(w, h, 4, group_size=16, act_order=True, static_groups=False)
