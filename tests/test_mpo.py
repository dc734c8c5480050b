"""physkern.research.mpo: TT-SVD, DMRG-style ALS sweeps, MPOLinear, accounting, factorisation.

References are independent of the module: an element-by-element product of core slices for the
dense contraction, autograd for the optimality of a solved core, hand counts for the bits.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from physkern.models import linear_layers, replace_layer
from physkern.quant.accounting import bits_report
from physkern.research.mpo import (MPOLinear, bits_per_weight, chi_for_bits, dmrg_sweeps,
                                   factorize, mpo_decompose, mpo_objective, mpo_to_dense)


def _gram(n, seed=1, samples=None):
    """A random SPD Gram X^T X with unequal scales per input (so weighting matters)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples or 3 * n, n, generator=g, dtype=torch.float64)
    X = X * torch.logspace(-1, 1, n, dtype=torch.float64)
    return X.t() @ X


def _weight(out, inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


def _dense_by_elements(cores):
    """W[a, b] = prod_k G_k[:, a_k, b_k, :] as matrices, indices row-major: a loop, no einsum."""
    of = [g.shape[1] for g in cores]
    inf = [g.shape[2] for g in cores]
    W = torch.zeros(math.prod(of), math.prod(inf), dtype=torch.float64)
    for ai, a in enumerate(itertools.product(*map(range, of))):
        for bi, b in enumerate(itertools.product(*map(range, inf))):
            m = torch.ones(1, 1, dtype=torch.float64)
            for g, ak, bk in zip(cores, a, b):
                m = m @ g[:, ak, bk, :].double()
            W[ai, bi] = m[0, 0]
    return W


# ----------------------------------------------------------------------------------------------
# decomposition and contraction


def test_mpo_to_dense_matches_elementwise_products():
    g = torch.Generator().manual_seed(3)
    shapes = [(1, 3, 4, 2), (2, 2, 1, 3), (3, 2, 5, 1)]
    cores = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    torch.testing.assert_close(mpo_to_dense(cores, (3, 2, 2), (4, 1, 5)),
                               _dense_by_elements(cores))


@pytest.mark.parametrize("shape,of,inf", [((12, 20), (3, 2, 2), (5, 2, 2)),
                                          ((24, 18), (2, 3, 4), (3, 3, 2)),
                                          ((16, 16), (2, 2, 2, 2), (2, 2, 2, 2))])
def test_full_bond_dimension_is_exact(shape, of, inf):
    W = _weight(*shape)
    cores = mpo_decompose(W, of, inf, chi=10_000)
    assert [c.shape[1] for c in cores] == list(of) and [c.shape[2] for c in cores] == list(inf)
    rel = (mpo_to_dense(cores, of, inf) - W).norm() / W.norm()
    assert rel < 1e-5
    # and the same through the independent elementwise contraction
    assert (_dense_by_elements(cores).float() - W).norm() / W.norm() < 1e-5


def test_bonds_capped_by_chi():
    cores = mpo_decompose(_weight(24, 18), (2, 3, 4), (3, 3, 2), chi=4)
    assert cores[0].shape[0] == 1 and cores[-1].shape[3] == 1
    assert all(c.shape[3] <= 4 for c in cores)
    assert [c.shape[3] for c in cores[:-1]] == [4, 4]


def test_error_decreases_as_chi_grows():
    W = _weight(24, 18)
    of, inf = (2, 3, 4), (3, 3, 2)
    errs = [(mpo_to_dense(mpo_decompose(W, of, inf, chi)) - W).norm().item()
            for chi in (1, 2, 4, 6, 8, 16, 64)]
    for a, b in zip(errs, errs[1:]):
        assert b <= a * (1 + 1e-6)
    assert errs[-1] < 1e-4 * errs[0]  # full bond: exact
    assert errs[2] < 0.97 * errs[0]


# ----------------------------------------------------------------------------------------------
# sweeps


@pytest.mark.parametrize("weighted", [False, True])
def test_sweeps_never_increase_objective(weighted):
    W = _weight(12, 20, seed=5)
    of, inf = (3, 2, 2), (5, 2, 2)
    H = _gram(20) if weighted else None
    for chi in (1, 2, 3):
        cores0 = mpo_decompose(W, of, inf, chi)
        cores, objs = dmrg_sweeps(W, cores0, 4, H=H)
        assert len(objs) == 5
        # recorded objectives are the true ones (recomputed independently here)
        E0 = (W.double() - _dense_by_elements(cores0))
        ref0 = float((E0 * E0).sum()) if H is None else float(((E0 @ H) * E0).sum())
        assert objs[0] == pytest.approx(ref0, rel=1e-9)
        E = (W.double() - _dense_by_elements(cores))
        ref = float((E * E).sum()) if H is None else float(((E @ H) * E).sum())
        assert objs[-1] == pytest.approx(ref, rel=1e-6)
        for a, b in zip(objs, objs[1:]):
            assert b <= a * (1 + 1e-9) + 1e-9
        # bonds unchanged by the sweeps
        assert [c.shape for c in cores] == [c.shape for c in cores0]


def test_weighted_sweeps_beat_tt_svd_on_weighted_objective():
    W = _weight(12, 20, seed=7)
    H = _gram(20, seed=2)
    of, inf = (3, 2, 2), (5, 2, 2)
    for chi in (1, 2, 3):
        cores0 = mpo_decompose(W, of, inf, chi)
        before = mpo_objective(W, cores0, H)
        cores, objs = dmrg_sweeps(W, cores0, 2, H=H)
        after = mpo_objective(W, cores, H)
        assert after <= before
        assert after < 0.95 * before  # unequal input scales: weighting must help
        # the plain sweeps optimise the other objective: not better than the weighted ones on it
        plain, _ = dmrg_sweeps(W, cores0, 2)
        assert after <= mpo_objective(W, plain, H) * (1 + 1e-9)


@pytest.mark.parametrize("weighted", [False, True])
def test_last_solved_core_is_a_stationary_point(weighted):
    """Each local solve is exact least squares: after a sweep (which ends on core 0) the gradient
    of the objective with respect to core 0 vanishes (autograd, independent of the solver)."""
    W = _weight(12, 20, seed=11).double()
    H = _gram(20, seed=4) if weighted else None
    cores, _ = dmrg_sweeps(W, mpo_decompose(W, (3, 2, 2), (5, 2, 2), 2), 1, H=H)
    cores = [c.detach().double().requires_grad_(True) for c in cores]
    E = W - mpo_to_dense(cores)
    obj = (E * E).sum() if H is None else ((E @ H) * E).sum()
    obj.backward()
    solved = cores[0].grad.norm().item()
    # a perturbed core 0 has a clearly non-zero gradient (so the check can fail)
    cores2 = [c.detach().clone().requires_grad_(True) for c in cores]
    with torch.no_grad():
        cores2[0].add_(0.01 * cores2[0].norm() / cores2[0].numel() ** 0.5)
    E = W - mpo_to_dense(cores2)
    ((E * E).sum() if H is None else ((E @ H) * E).sum()).backward()
    perturbed = cores2[0].grad.norm().item()
    assert perturbed > 0
    assert solved < 1e-6 * perturbed


def test_sweeps_reject_bad_H():
    W = _weight(12, 20)
    cores = mpo_decompose(W, (3, 2, 2), (5, 2, 2), 2)
    with pytest.raises(ValueError, match="H must be"):
        dmrg_sweeps(W, cores, 1, H=torch.eye(12))
    with pytest.raises(ValueError, match="sweeps"):
        dmrg_sweeps(W, cores, -1)


# ----------------------------------------------------------------------------------------------
# MPOLinear


@pytest.mark.parametrize("mode", ["contract", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mpo_linear_forward_equals_dense_product(dtype, mode):
    torch.manual_seed(0)
    lin = nn.Linear(20, 12, bias=True)
    m = MPOLinear.from_linear(lin, chi=3, cores=3, out_factors=(3, 4, 1), in_factors=(4, 5, 1),
                              dtype=dtype)
    m.mode = mode
    assert m.out_factors == (3, 4, 1) and m.in_factors == (4, 5, 1)
    assert all(c.dtype == dtype for c in m.cores)
    x = torch.randn(2, 3, 20)
    ref = x.double() @ _dense_by_elements([c.float() for c in m.cores]).t() + m.bias.double()
    y = m(x)
    assert y.shape == (2, 3, 12) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, x @ mpo_to_dense([c.float() for c in m.cores]).t() + m.bias,
                               rtol=1e-5, atol=1e-5)


def test_contract_mode_never_forms_w_and_auto_picks_the_cheaper_path(monkeypatch):
    torch.manual_seed(0)
    m = MPOLinear.from_linear(torch.randn(48, 40), chi=16, cores=2, dtype=torch.float32)
    x1, xs = torch.randn(1, 40), torch.randn(4096, 40)
    ref1, refs = x1 @ m.weight().t(), xs @ m.weight().t()
    # explicit multiply-add count of the contraction for one token (cores [1,o1,i1,r], [r,o2,i2,1])
    (_, o1, i1, r), (_, o2, i2, _) = (tuple(g.shape) for g in m.cores)
    assert m.flops(1)["contract"] == i2 * r * o1 * i1 + o1 * r * o2 * i2
    assert m.flops(1)["dense"] == o1 * i1 * r + o1 * i1 * r * o2 * i2 + 40 * 48
    f1, fs = m.flops(1), m.flops(4096)
    assert f1["contract"] < f1["dense"] and fs["dense"] < fs["contract"]
    calls = []
    real = MPOLinear.weight
    monkeypatch.setattr(MPOLinear, "weight", lambda self: calls.append(1) or real(self))
    m.mode = "contract"
    torch.testing.assert_close(m(xs), refs, rtol=1e-4, atol=1e-4)
    assert not calls
    m.mode = "auto"
    torch.testing.assert_close(m(x1), ref1, rtol=1e-4, atol=1e-4)
    assert not calls  # one token: contracted
    torch.testing.assert_close(m(xs), refs, rtol=1e-4, atol=1e-4)
    assert calls  # 4096 tokens: W formed once
    m.mode = "bogus"
    with pytest.raises(ValueError, match="mode must be one of"):
        m(x1)


def test_mpo_linear_default_factors_odd_shapes_no_bias():
    torch.manual_seed(1)
    lin = nn.Linear(20, 12, bias=False)
    m = MPOLinear.from_linear(lin, chi=100, cores=3, sweeps=1, dtype=torch.float32)
    assert m.out_factors == factorize(12, 3) and m.in_factors == factorize(20, 3)
    x = torch.randn(4, 20)
    torch.testing.assert_close(m(x), x @ mpo_to_dense(list(m.cores)).t(), rtol=1e-5, atol=1e-5)
    # full bond: the layer reproduces the original
    torch.testing.assert_close(m(x), lin(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        m(torch.randn(4, 12))


def test_from_linear_layer_conv1d_full_bond_reproduces_layer(tiny_gpt2):
    """A LinearLayer over GPT-2's Conv1D (weight stored [in, out]) is read as [out, in]."""
    layer = next(l for l in linear_layers(tiny_gpt2) if l.kind == "conv1d")
    m = MPOLinear.from_linear(layer, chi=10_000, cores=2, sweeps=1, dtype=torch.float32)
    assert (m.out_features, m.in_features) == (layer.out_features, layer.in_features)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(m(x), layer.module(x), rtol=1e-4, atol=1e-5)


def test_mpo_linear_does_not_form_the_weight(monkeypatch):
    import physkern.research.mpo as mpo
    m = MPOLinear(mpo_decompose(_weight(12, 20), (3, 2, 2), (5, 2, 2), 2))

    def boom(*a, **k):
        raise AssertionError("forward formed W")
    monkeypatch.setattr(mpo, "mpo_to_dense", boom)
    monkeypatch.setattr(mpo, "_left_env", boom)
    assert m(torch.randn(3, 20)).shape == (3, 12)


def test_accounting_counts_the_cores(tiny_llama):
    model = copy.deepcopy(tiny_llama)  # the fixture is shared by the session
    name = "model.layers.0.mlp.up_proj"  # nn.Linear(32 -> 64), no bias
    lin = model.get_submodule(name)
    before = bits_report(model)
    n_params = before.model_parameters
    m = MPOLinear.from_linear(lin, chi=4, out_factors=(4, 4, 4), in_factors=(4, 4, 2),
                              sweeps=1)
    replace_layer(model, name, m)
    # by hand: bonds r = [1, 4, 4, 1] (chi=4 < 16 and < 8), fp16 cores:
    # [1,4,4,4] = 64, [4,4,4,4] = 256, [4,4,2,1] = 32 values -> 352 * 16 bits
    expected = (1 * 4 * 4 * 4 + 4 * 4 * 4 * 4 + 4 * 4 * 2 * 1) * 16
    assert expected == 5632
    rep = bits_report(model)
    info = rep.layers[name]
    assert info["kind"] == "MPOLinear"
    assert info["total_bits"] == expected and rep.quantized_bits == expected
    assert info["weights"] == 64 * 32 and rep.quantized_weights == 2048
    assert rep.quantized_bits_per_weight == pytest.approx(5632 / 2048)
    assert m.bits_per_weight() == pytest.approx(5632 / 2048)
    assert bits_per_weight((4, 4, 4), (4, 4, 2), 4) == pytest.approx(5632 / 2048)
    # whole model: the 2048 fp32 weights leave, the fp16 cores come in; parameters unchanged
    assert rep.model_parameters == n_params
    assert rep.model_bits == before.model_bits - 2048 * 32 + expected
    # bits equal bytes: the state dict holds exactly these core bytes under the layer
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(name + ".")}
    assert sum(v.numel() * v.element_size() for v in sd.values()) * 8 == expected
    # and the model still runs
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_mpo_linear_counts_bias_outside_the_weight_bits():
    torch.manual_seed(2)
    lin = nn.Linear(32, 64, bias=True)
    m = MPOLinear.from_linear(lin, chi=2, out_factors=(4, 4, 4), in_factors=(4, 4, 2), sweeps=0)
    # bonds [1, 2, 2, 1]: 1*16*2 + 2*16*2 + 2*8*1 = 32 + 64 + 16 = 112 values
    assert sum(m.storage_bits().values()) == 112 * 16
    assert "bias" not in m.storage_bits()


# ----------------------------------------------------------------------------------------------
# budgets and factorisation


def test_chi_for_bits_is_the_largest_fitting():
    of, inf = (16, 12, 8), (9, 8, 8)
    for target in (0.5, 1.0, 2.0, 4.0):
        chi = chi_for_bits(of, inf, target)
        assert bits_per_weight(of, inf, chi) <= target
        assert bits_per_weight(of, inf, chi + 1) > target
    # hand count: chi=1 -> 144 + 96 + 64 values over 1536*576 weights at 16 bits
    assert bits_per_weight(of, inf, 1) == pytest.approx((144 + 96 + 64) * 16 / (1536 * 576))
    # beyond full bond nothing grows: capped
    top = chi_for_bits((3, 2, 2), (5, 2, 2), 1e6)
    assert top == 15
    with pytest.raises(ValueError, match="target_bits"):
        chi_for_bits(of, inf, 1e-6)
    with pytest.raises(ValueError, match="target_bits"):
        chi_for_bits(of, inf, -1)


@pytest.mark.parametrize("n,cores,expected", [(576, 3, (9, 8, 8)), (1536, 3, (16, 12, 8)),
                                              (576, 2, (24, 24)), (1536, 2, (48, 32)),
                                              (12, 3, (3, 2, 2)), (20, 3, (5, 2, 2)),
                                              (64, 3, (4, 4, 4)), (1, 3, (1, 1, 1)),
                                              (30, 1, (30,)), (7, 3, (7, 1, 1)),
                                              (49157, 2, (49157, 1)), (14, 3, (7, 2, 1))])
def test_factorize(n, cores, expected):
    assert factorize(n, cores) == expected


def test_factorize_is_balanced_by_brute_force():
    for n in (36, 96, 360, 576, 1000, 1536):
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        for cores in (2, 3):
            f = factorize(n, cores)
            assert math.prod(f) == n and len(f) == cores and list(f) == sorted(f, reverse=True)
            best = min(max(c + (n // math.prod(c),))
                       for c in itertools.product(divisors, repeat=cores - 1)
                       if n % math.prod(c) == 0)
            assert max(f) == best


@pytest.mark.parametrize("args,name", [((0, 3), "n"), ((-4, 3), "n"), ((576, 0), "cores"),
                                       ((576, -1), "cores"), ((5.0, 2), "n"), ((True, 2), "n")])
def test_factorize_bad_inputs(args, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        factorize(*args)


def test_bad_decompose_inputs():
    W = _weight(12, 20)
    with pytest.raises(ValueError, match="chi"):
        mpo_decompose(W, (3, 2, 2), (5, 2, 2), 0)
    with pytest.raises(ValueError, match="does not match"):
        mpo_decompose(W, (3, 2, 3), (5, 2, 2), 2)
    with pytest.raises(ValueError, match="as many factors"):
        mpo_decompose(W, (3, 4), (5, 2, 2), 2)
