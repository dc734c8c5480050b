import math

import numpy as np
import pytest
import torch

from physkern.research.analysis.spectra import (analyse_matrix, correlation_eigenvalues, mp_cdf,
                                       power_law_alpha, spectra)


def test_eigenvalues_are_those_of_wtw_over_n():
    w = torch.randn(30, 50, dtype=torch.float64)  # wide: oriented as 50 x 30
    eigs, n, m = correlation_eigenvalues(w)
    assert (n, m) == (50, 30)
    ref = np.sort(np.linalg.eigvalsh((w @ w.T).numpy() / 50))
    np.testing.assert_allclose(eigs, ref, rtol=1e-9, atol=1e-12)


def test_mp_cdf_matches_quadrature():
    from scipy.integrate import quad
    q, s2 = 0.4, 1.7
    lo, hi = s2 * (1 - math.sqrt(q)) ** 2, s2 * (1 + math.sqrt(q)) ** 2

    def dens(x):
        return math.sqrt((hi - x) * (x - lo)) / (2 * math.pi * s2 * q * x)

    for x in (lo + 0.1 * (hi - lo), (lo + hi) / 2, lo + 0.9 * (hi - lo)):
        assert mp_cdf(np.array([x]), s2, q)[0] == pytest.approx(quad(dens, lo, x)[0], abs=2e-4)


@pytest.mark.parametrize("n,m,scale", [(400, 200, 1.0), (300, 300, 0.5)])
def test_gaussian_edge_matches_theory_and_no_outliers(n, m, scale):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n, m, generator=gen, dtype=torch.float64) * scale
    d = analyse_matrix(w)
    theory = scale ** 2 * (1 + math.sqrt(m / n)) ** 2  # sigma^2 (1 + sqrt q)^2
    assert d["lambda_plus"] == pytest.approx(theory, rel=0.03)
    assert d["sigma2"] == pytest.approx(scale ** 2, rel=0.03)
    assert d["outliers"] == 0


def test_planted_spike_is_found():
    n, m = 400, 200
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(n, m, generator=gen, dtype=torch.float64)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(m, generator=gen, dtype=torch.float64)
    # rank-1 spike with strength theta: eigenvalue of W^T W/N near (1 + theta)(1 + q/theta) > edge
    theta = 3.0
    w = w + math.sqrt(theta * n) * torch.outer(u / u.norm(), v / v.norm())
    d = analyse_matrix(w)
    q = m / n
    assert d["outliers"] == 1
    assert d["lambda_max"] == pytest.approx((1 + theta) * (1 + q / theta), rel=0.1)
    assert d["lambda_plus"] == pytest.approx((1 + math.sqrt(q)) ** 2, rel=0.03)


def test_power_law_alpha_recovers_pareto():
    rng = np.random.default_rng(0)
    alpha = 2.5
    x = (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # Pareto with pdf ~ x^-alpha, x >= 1
    fit = power_law_alpha(x)
    assert fit["alpha"] == pytest.approx(alpha, rel=0.08)


def test_spectra_on_tiny_model(tiny_llama):
    res = spectra(tiny_llama, types=["gate", "o"])
    assert list(res["types"]) == ["mlp.gate_proj", "self_attn.o_proj"]
    d = res["types"]["mlp.gate_proj"][0]
    assert (d["N"], d["M"]) == (64, 32) and d["q"] == 0.5
    with pytest.raises(ValueError, match="unknown"):
        spectra(tiny_llama, types=["c_fc"])
