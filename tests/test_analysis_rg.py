import math

import numpy as np
import pytest
import torch

from physkern.research.analysis.rg_flow import classify, growth_rates, rg_flow, singular_value_stack


def _orthogonal(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def _stack(s0, rates, n_layers, out_f, in_f, seed=0):
    """Matrices W_l = U_l diag(s0 * exp(rates * l)) V_l^T with fresh random U_l, V_l."""
    gen = torch.Generator().manual_seed(seed)
    r = len(s0)
    mats = []
    for l in range(n_layers):
        u = _orthogonal(out_f, gen)[:, :r]
        v = _orthogonal(in_f, gen)[:, :r]
        s = torch.tensor([a * math.exp(g * l) for a, g in zip(s0, rates)], dtype=torch.float64)
        mats.append(u @ torch.diag(s) @ v.T)
    return mats


def test_growth_rates_recover_known_factor():
    s0 = [100.0, 50.0, 20.0, 10.0, 5.0]
    rates = [0.2, 0.1, 0.0, -0.05, -0.2]
    mats = _stack(s0, rates, n_layers=6, out_f=7, in_f=5)
    sigma = singular_value_stack(mats)
    assert sigma.shape == (6, 5)
    got = growth_rates(sigma)
    np.testing.assert_allclose(got["gamma"], rates, atol=1e-9)
    np.testing.assert_allclose(got["slope"], rates, atol=1e-9)
    np.testing.assert_allclose(np.exp(got["intercept"]), s0, rtol=1e-9)


def test_slope_is_least_squares_and_robust_to_one_odd_layer():
    L, r = 9, 4
    true = np.array([0.3, 0.1, -0.1, -0.3])
    log_s = np.log([40.0, 20.0, 10.0, 5.0]) + np.outer(np.arange(L), true)
    log_s[-1] += 1.0  # one odd last layer
    sigma = np.exp(log_s)
    got = growth_rates(sigma)
    # independent least squares: numpy polyfit per column
    ref = np.array([np.polyfit(np.arange(L), log_s[:, i], 1)[0] for i in range(r)])
    np.testing.assert_allclose(got["slope"], ref, atol=1e-12)
    # the end-point rate is pulled by 1/(L-1) = 0.125, the slope less
    assert np.all(np.abs(got["gamma"] - true) > 0.12)
    assert np.all(np.abs(got["slope"] - true) < np.abs(got["gamma"] - true))


def test_classify_thresholds():
    c = classify(np.array([0.5, 0.11, 0.1, 0.0, -0.1, -0.2]), 0.1, -0.1)
    assert c == {"relevant": 2 / 6, "irrelevant": 1 / 6, "marginal": 3 / 6}
    with pytest.raises(ValueError, match="irrelevant threshold"):
        classify(np.zeros(3), -0.1, 0.1)


def test_rg_flow_on_tiny_llama(tiny_llama):
    import copy
    model = copy.deepcopy(tiny_llama)
    s0 = [8.0, 4.0, 2.0] + list(np.linspace(1.0, 0.5, 29))  # full rank: no ln 0
    rates = [0.5, 0.0, -0.5] + [0.0] * 29  # 2 layers: gamma == slope == log ratio
    mats = _stack(s0, rates, n_layers=2, out_f=32, in_f=32, seed=1)
    with torch.no_grad():
        for l, w in enumerate(mats):
            model.model.layers[l].self_attn.q_proj.weight.copy_(w.float())
    res = rg_flow(model, types=["q"])
    t = res["types"]["self_attn.q_proj"]
    assert res["layers"] == 2 and t["shape"] == [32, 32]
    np.testing.assert_allclose(t["gamma"], rates, atol=1e-4)
    np.testing.assert_allclose(t["slope"], rates, atol=1e-4)


def test_rg_flow_all_types_gpt2(tiny_gpt2):
    res = rg_flow(tiny_gpt2)
    assert set(res["types"]) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    # canonical [out, in]: c_attn maps 32 -> 96
    assert res["types"]["attn.c_attn"]["shape"] == [96, 32]
    # sigma rows equal torch's own singular values of the canonical weight
    w0 = tiny_gpt2.transformer.h[0].attn.c_attn.weight.detach().double().T
    np.testing.assert_allclose(res["types"]["attn.c_attn"]["sigma"][0],
                               np.linalg.svd(w0.numpy(), compute_uv=False), rtol=1e-9)


def test_unknown_type_is_a_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="weight type 'qq' is unknown.*self_attn.q_proj"):
        rg_flow(tiny_llama, types=["qq"])


def test_cli_rejects_bad_thresholds(capsys):
    from physkern.cli import main
    assert main(["analyze", "rg", "--relevant", "-0.5", "--irrelevant", "0.5"]) == 2
    assert "irrelevant threshold" in capsys.readouterr().err


def test_cli_analyze_without_name(capsys):
    from physkern.cli import main
    assert main(["analyze"]) == 2
    assert "rg" in capsys.readouterr().err
