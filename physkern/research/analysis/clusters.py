"""Metastable token clusters across depth (the seeds' Direction 4).

For each window of text, take the hidden state of every token at every depth (0 = embedding
output, l = output of block l, the last one before the final norm, and once more after the final
norm), compute pairwise cosine similarity, and count clusters by average-linkage agglomerative
clustering on the distance 1 - cos, cut at a distance threshold (flat clusters whose members'
cophenetic distance is at most the threshold). The seeds used threshold 0.05; a sweep is
reported beside it.

The seeds' "layer 12 collapse" is the hidden state after the final layer norm (NOTES.md item 8),
so the last block's output is reported both before and after the final norm.

The seeds also fitted a 1/t^2 decay. We fit y(t) = a + b / t^2 by least squares over depths
t = 1..L (pre-norm states) for y = cluster count at the seeds' threshold and y = 1 - mean cosine,
and report R^2 = 1 - SS_res / SS_tot (in [0, 1] for a least-squares fit with an intercept), and
the R^2 of the intercept-free law y = b / t^2 (which can be negative: it may fit worse than the
mean).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ._common import all_hidden_states, pyplot

SEEDS_THRESHOLD = 0.05
DEFAULT_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.4)


def check_threshold(t: float) -> float:
    """Distance thresholds on 1 - cos live in (0, 2]."""
    if not 0 < t <= 2:
        raise ValueError(f"threshold must be in (0, 2] (a distance 1 - cos), got {t}")
    return float(t)


def cosine_matrix(h: torch.Tensor) -> np.ndarray:
    """[T, T] cosine similarities of the rows of h [T, d] (float64)."""
    x = h.detach().double().cpu()
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return (x @ x.T).numpy()


def cluster_count(h: torch.Tensor, threshold: float) -> int:
    """Clusters among the rows of h [T, d]: average linkage on 1 - cos, cut at `threshold`."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    check_threshold(threshold)
    if h.shape[0] < 2:
        return int(h.shape[0])
    dist = np.clip(1.0 - cosine_matrix(h), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    dist = (dist + dist.T) / 2
    z = linkage(squareform(dist, checks=False), method="average")
    return int(fcluster(z, t=threshold, criterion="distance").max())


def mean_offdiag_cosine(h: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of rows of h [T, d]."""
    c = cosine_matrix(h)
    n = c.shape[0]
    return float((c.sum() - np.trace(c)) / (n * (n - 1)))


def fit_inverse_square(t: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares y = a + b / t^2 and y = b / t^2; R^2 = 1 - SS_res / SS_tot for each."""
    t = np.asarray(t, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if np.any(t <= 0):
        raise ValueError("t must be positive for a 1/t^2 fit")
    x = 1.0 / t ** 2
    ss_tot = float(((y - y.mean()) ** 2).sum())
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    res = y - (a + b * x)
    b0 = float(x @ y / (x @ x))
    res0 = y - b0 * x
    r2 = (lambda ss: 1 - ss / ss_tot if ss_tot > 0 else float("nan"))
    return {"a": float(a), "b": float(b), "r2": r2(float(res @ res)),
            "b_no_intercept": b0, "r2_no_intercept": r2(float(res0 @ res0))}


@torch.no_grad()
def cluster_analysis(model: nn.Module, windows: torch.Tensor,
                     thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """Cluster counts and mean cosine at every depth, averaged over windows.

    windows: [n_windows, T] token ids. Returns {"depth": [0..L], "clusters": {threshold: [L+1]},
    "mean_cosine": [L+1], "post_norm": {"clusters": {threshold: value}, "mean_cosine": value},
    "fits": {...}} with pre-norm values at depths 0..L.
    """
    thresholds = [check_threshold(t) for t in thresholds]
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T >= 2] token ids, got {tuple(windows.shape)}")
    per_window = []
    for row in windows:
        hs = all_hidden_states(model, row[None])
        states = [s[0] for s in hs["states"]] + [hs["post_norm"][0]]
        per_window.append({
            "cos": [mean_offdiag_cosine(s) for s in states],
            "clusters": {t: [cluster_count(s, t) for s in states] for t in thresholds}})
    depth_n = len(per_window[0]["cos"]) - 1  # L + 1 pre-norm depths, then post-norm
    cos = np.mean([w["cos"] for w in per_window], axis=0)
    clusters = {t: np.mean([w["clusters"][t] for w in per_window], axis=0) for t in thresholds}
    depths = np.arange(depth_n)
    fits = {}
    nearest = min(thresholds, key=lambda t: abs(t - SEEDS_THRESHOLD))
    fits[f"clusters_at_{nearest:g}"] = fit_inverse_square(depths[1:], clusters[nearest][1:depth_n])
    fits["one_minus_mean_cosine"] = fit_inverse_square(depths[1:], 1 - cos[1:depth_n])
    return {"depth": depths.tolist(), "tokens_per_window": int(windows.shape[1]),
            "windows": int(windows.shape[0]), "thresholds": thresholds,
            "mean_cosine": cos[:depth_n].tolist(),
            "clusters": {str(t): clusters[t][:depth_n].tolist() for t in thresholds},
            "post_norm": {"mean_cosine": float(cos[depth_n]),
                          "clusters": {str(t): float(clusters[t][depth_n]) for t in thresholds}},
            "fits": fits}


def plot_clusters(result: dict, path) -> None:
    """Clusters and mean cosine vs depth, one curve per threshold; open markers after the norm."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    depth = np.array(result["depth"])
    last = depth[-1]
    for t in result["thresholds"]:
        line, = a1.plot(depth, result["clusters"][str(t)], "o-", ms=3, label=f"threshold {t:g}")
        a1.plot([last + 1], [result["post_norm"]["clusters"][str(t)]], "o", mfc="none",
                color=line.get_color(), ms=7)
    a1.set_xlabel(f"depth (0 = embeddings; open markers at {last + 1} = after the final norm)")
    a1.set_ylabel(f"clusters per window of {result['tokens_per_window']} tokens")
    a1.set_title("Average-linkage clusters on 1 - cos")
    a1.legend(fontsize=8)
    a2.plot(depth, result["mean_cosine"], "o-", ms=3, label="before final norm")
    a2.plot([last + 1], [result["post_norm"]["mean_cosine"]], "o", mfc="none", ms=7,
            label="after final norm")
    a2.set_xlabel("depth")
    a2.set_ylabel("mean pairwise cosine")
    a2.set_title("Mean cosine similarity between tokens")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
