import numpy as np
import pytest
import torch

from physkern.research.analysis.clusters import (check_threshold, cluster_analysis, cluster_count,
                                        fit_inverse_square, mean_offdiag_cosine)


def _groups(sizes, dim=16, spread=0.01, seed=0):
    """Rows in len(sizes) tight groups around orthogonal directions (1 - cos ~ spread^2 inside)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    rows = []
    for g, n in enumerate(sizes):
        centre = q[:, g] * (1 + g)  # norms differ: cosine must not care
        rows.append(centre + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64))
    return torch.cat(rows)


def test_known_groups_are_counted_at_the_right_threshold():
    h = _groups([5, 7, 3, 9])
    # inside a group 1 - cos ~ 1e-4; between groups (orthogonal) 1 - cos ~ 1
    assert cluster_count(h, 0.05) == 4
    assert cluster_count(h, 0.5) == 4
    assert cluster_count(h, 1e-9) == 24  # nothing merges
    assert cluster_count(h, 2.0) == 1  # everything merges


def test_average_linkage_against_hand_example():
    # three directions in the plane at angles 0, 30, 90 degrees: 1 - cos = 0.134 (0-30),
    # 1 (0-90), 0.5 (30-90). Average linkage merges 0 and 30 at 0.134, then the pair with 90 at
    # the mean distance (1 + 0.5) / 2 = 0.75.
    ang = np.deg2rad([0, 30, 90])
    h = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1))
    assert cluster_count(h, 0.13) == 3
    assert cluster_count(h, 0.14) == 2
    assert cluster_count(h, 0.74) == 2
    assert cluster_count(h, 0.76) == 1  # single linkage (0.5) would merge at 0.5 already
    assert cluster_count(h, 0.6) == 2


def test_mean_cosine_direct():
    h = torch.randn(6, 4, dtype=torch.float64)
    hn = h / h.norm(dim=1, keepdim=True)
    c = (hn @ hn.T).numpy()
    ref = np.mean([c[i, j] for i in range(6) for j in range(6) if i != j])
    assert mean_offdiag_cosine(h) == pytest.approx(ref, rel=1e-12)


def test_inverse_square_fit_and_r2():
    t = np.arange(1, 11, dtype=float)
    y = 3.0 + 5.0 / t ** 2
    f = fit_inverse_square(t, y)
    assert f["a"] == pytest.approx(3.0) and f["b"] == pytest.approx(5.0)
    assert f["r2"] == pytest.approx(1.0)
    # independent R^2 of the intercept-free law via numpy
    x = 1 / t ** 2
    b0 = (x @ y) / (x @ x)
    r2 = 1 - ((y - b0 * x) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert f["r2_no_intercept"] == pytest.approx(r2)
    assert f["r2_no_intercept"] < 0  # a constant plateau is fitted worse than by its mean


def test_thresholds_outside_range_raise():
    for bad in (0.0, -0.1, 2.5):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 2\]"):
            check_threshold(bad)
    check_threshold(2.0)


def test_cluster_analysis_pre_and_post_norm(tiny_llama):
    windows = torch.randint(0, 96, (2, 12))
    res = cluster_analysis(tiny_llama, windows, [0.05, 0.5])
    assert res["depth"] == [0, 1, 2]
    # post-norm count equals a direct count on transformers' last hidden state
    with torch.no_grad():
        hs = tiny_llama(input_ids=windows, output_hidden_states=True).hidden_states
    direct = np.mean([cluster_count(hs[-1][i], 0.5) for i in range(2)])
    assert res["post_norm"]["clusters"]["0.5"] == pytest.approx(direct)
    # depth 1 = output of block 0 = transformers' hidden_states[1]
    direct1 = np.mean([mean_offdiag_cosine(hs[1][i]) for i in range(2)])
    assert res["mean_cosine"][1] == pytest.approx(direct1)


def test_cli_rejects_bad_threshold(capsys):
    from physkern.cli import main
    assert main(["analyze", "clusters", "--thresholds", "0.05", "3"]) == 2
    assert "(0, 2]" in capsys.readouterr().err
