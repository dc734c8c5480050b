"""Empirical spectral densities of weight matrices, Marchenko-Pastur fits and power-law tails.

For a weight W seen as N x M with N >= M (transposed if needed), the correlation matrix
X = W^T W / N has M eigenvalues. If W were i.i.d. with variance sigma^2 they would follow the
Marchenko-Pastur law with aspect ratio q = M / N <= 1 and bulk

    lambda_-/+ = sigma^2 (1 -/+ sqrt(q))^2.

sigma is fitted (not taken from a median, the seeds' defect): it minimises the Kolmogorov-Smirnov
distance between the empirical CDF of all M eigenvalues and the MP CDF, over the bulk range.
Eigenvalues above the fitted edge are outliers ("spikes"); to keep finite-size (Tracy-Widom)
fluctuations of the largest eigenvalue of a random matrix from counting as spikes, an eigenvalue
counts only when it exceeds lambda_+ by `tw_margin` Tracy-Widom scales (default 4; Johnstone's
scale, see `tracy_widom_scale`). Eigenvalues above the edge at all are reported too.

The tail exponent alpha is a power-law fit p(lambda) ~ lambda^-alpha to the largest eigenvalues
in the manner of WeightWatcher (Clauset-Shalizi-Newman: maximum-likelihood alpha for each
candidate x_min, x_min chosen by minimum KS distance).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._common import pyplot, resolve_types, short_type, weight_groups

DEFAULT_TW_MARGIN = 4.0


def correlation_eigenvalues(weight: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """Eigenvalues (ascending, float64) of X = W^T W / N for W oriented N x M with N >= M.

    Returns (eigenvalues [M], N, M).
    """
    w = weight.detach().double().cpu()
    if w.dim() != 2 or min(w.shape) < 2:
        raise ValueError(f"weight must be a 2-D matrix with both sides >= 2, got {tuple(w.shape)}")
    if w.shape[0] < w.shape[1]:
        w = w.T
    n, m = w.shape
    eigs = np.linalg.eigvalsh((w.T @ w).numpy()).clip(min=0) / n
    return np.sort(eigs), n, m


def mp_edges(sigma2: float, q: float) -> tuple[float, float]:
    """Marchenko-Pastur bulk (lambda_-, lambda_+) for variance sigma2 and ratio q = M/N <= 1."""
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    return sigma2 * (1 - math.sqrt(q)) ** 2, sigma2 * (1 + math.sqrt(q)) ** 2


def mp_density(x: np.ndarray, sigma2: float, q: float) -> np.ndarray:
    """Marchenko-Pastur density at x (q <= 1: no mass at zero)."""
    lo, hi = mp_edges(sigma2, q)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > lo) & (x < hi)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = np.sqrt((hi - xi) * (xi - lo)) / (2 * math.pi * sigma2 * q * xi)
    return out


def mp_cdf(x: np.ndarray, sigma2: float, q: float, grid: int = 4001) -> np.ndarray:
    """Marchenko-Pastur CDF at x, by integrating the density on a Chebyshev-spaced grid
    (dense near the square-root edges)."""
    lo, hi = mp_edges(sigma2, q)
    t = (1 - np.cos(np.linspace(0, math.pi, grid))) / 2
    g = lo + (hi - lo) * t
    d = mp_density(g, sigma2, q)
    cdf = np.concatenate([[0.0], np.cumsum((d[1:] + d[:-1]) / 2 * np.diff(g))])
    cdf /= cdf[-1]
    return np.interp(np.asarray(x, dtype=np.float64), g, cdf, left=0.0, right=1.0)


def fit_mp_sigma2(eigs: np.ndarray, q: float) -> tuple[float, float]:
    """sigma^2 minimising sup |F_emp - F_MP| over the bulk (x <= lambda_+); returns
    (sigma2, KS distance). Outliers shift F_emp by their count / M only, so a few spikes barely
    move the fit."""
    eigs = np.sort(np.asarray(eigs, dtype=np.float64))
    m = eigs.size
    f_hi = np.arange(1, m + 1) / m
    f_lo = np.arange(0, m) / m

    # F_MP(x; sigma2) = F_MP(x / sigma2; 1): tabulate the unit law once.
    unit_edge = mp_edges(1.0, q)[1]
    table_x = np.linspace(0, unit_edge, 20001)
    table_f = mp_cdf(table_x, 1.0, q, grid=20001)

    def ks(s2: float) -> float:
        sel = eigs <= s2 * unit_edge
        if not sel.any():
            return 1.0
        f = np.interp(eigs[sel] / s2, table_x, table_f)
        return float(max(np.abs(f - f_hi[sel]).max(), np.abs(f - f_lo[sel]).max()))

    # The mean of the MP law is sigma^2: the trace estimate brackets the answer (spikes inflate it).
    centre = float(eigs.mean())
    grid = np.geomspace(centre / 20, centre * 2, 241)
    vals = [ks(s) for s in grid]
    k = int(np.argmin(vals))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    for _ in range(40):  # golden-section refinement
        a = hi - (hi - lo) * 0.618
        b = lo + (hi - lo) * 0.618
        if ks(a) <= ks(b):
            hi = b
        else:
            lo = a
    s2 = (lo + hi) / 2
    return s2, ks(s2)


def tracy_widom_scale(sigma2: float, n: int, m: int) -> float:
    """Scale of the Tracy-Widom fluctuations of the largest eigenvalue of X = W^T W / N
    (Johnstone 2001): sigma^2 (sqrt(N) + sqrt(M)) (1/sqrt(N) + 1/sqrt(M))^(1/3) / N."""
    return sigma2 * (math.sqrt(n) + math.sqrt(m)) * \
        (1 / math.sqrt(n) + 1 / math.sqrt(m)) ** (1 / 3) / n


def power_law_alpha(eigs: np.ndarray, min_tail: int = 10) -> dict:
    """Power-law tail fit p(x) ~ x^-alpha (continuous, Clauset-Shalizi-Newman).

    For each candidate x_min among the eigenvalues (leaving at least `min_tail` in the tail),
    alpha = 1 + n / sum ln(x_i / x_min); x_min minimises the KS distance between the tail and the
    fitted law. Returns {"alpha", "xmin", "n_tail", "ks"}.
    """
    x = np.sort(np.asarray(eigs, dtype=np.float64))
    x = x[x > 0]
    if x.size < min_tail + 1:
        raise ValueError(f"need more than {min_tail} positive eigenvalues, got {x.size}")
    best = None
    for j in range(0, x.size - min_tail + 1):
        tail = x[j:]
        xmin = tail[0]
        logs = np.log(tail / xmin)
        if logs.sum() <= 0:
            continue
        n = tail.size
        alpha = 1 + n / logs.sum()
        cdf_fit = 1 - (tail / xmin) ** (1 - alpha)
        emp = np.arange(n) / n
        ks = float(np.max(np.maximum(np.abs(cdf_fit - emp), np.abs(cdf_fit - emp - 1 / n))))
        if best is None or ks < best["ks"]:
            best = {"alpha": float(alpha), "xmin": float(xmin), "n_tail": int(n), "ks": ks}
    if best is None:
        raise ValueError("eigenvalues are all equal: no tail to fit")
    return best


def analyse_matrix(weight: torch.Tensor, tw_margin: float = DEFAULT_TW_MARGIN) -> dict:
    """ESD summary of one weight: N, M, q, fitted sigma^2, MP edges, outliers, power-law tail.

    Returns a dict; "eigenvalues" holds the M eigenvalues (ascending) for plotting.
    """
    if tw_margin < 0:
        raise ValueError(f"tw_margin must be >= 0, got {tw_margin}")
    eigs, n, m = correlation_eigenvalues(weight)
    q = m / n
    sigma2, ks = fit_mp_sigma2(eigs, q)
    lo, hi = mp_edges(sigma2, q)
    tw = tracy_widom_scale(sigma2, n, m)
    threshold = hi + tw_margin * tw
    tail = power_law_alpha(eigs)
    return {"N": n, "M": m, "q": q, "sigma2": sigma2, "ks": ks, "lambda_minus": lo,
            "lambda_plus": hi, "tw_scale": tw, "outlier_threshold": threshold,
            "outliers": int((eigs > threshold).sum()),
            "above_edge": int((eigs > hi).sum()), "lambda_max": float(eigs[-1]),
            "alpha": tail["alpha"], "alpha_xmin": tail["xmin"], "alpha_n_tail": tail["n_tail"],
            "alpha_ks": tail["ks"], "eigenvalues": eigs}


def spectra(model: nn.Module, types: Optional[Sequence[str]] = None,
            tw_margin: float = DEFAULT_TW_MARGIN) -> dict:
    """Per layer and weight type ESD summaries: {"types": {type: [per-layer dict]}}.

    The per-layer dicts keep "eigenvalues" (numpy) for plotting; `physkern analyze spectra`
    drops them from the JSON.
    """
    groups = weight_groups(model)
    chosen = resolve_types(list(groups), types)
    return {"tw_margin": tw_margin,
            "types": {t: [analyse_matrix(l.weight(), tw_margin) for l in groups[t]]
                      for t in chosen}}


def plot_spectra(result: dict, path_esd, path_depth) -> None:
    """ESD of the middle layer of each type with its MP fit; alpha and outliers over depth."""
    plt = pyplot()
    types = list(result["types"])
    ncol = min(4, len(types))
    nrow = math.ceil(len(types) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    for ax, t in zip(axes.flat, types):
        layers = result["types"][t]
        li = len(layers) // 2
        d = layers[li]
        eigs = d["eigenvalues"]
        top = max(d["lambda_plus"] * 1.6, np.quantile(eigs, 0.99))
        bins = np.linspace(0, top, 80)
        # density over all M eigenvalues (those beyond the cut still count in the normalisation)
        counts, _ = np.histogram(eigs, bins=bins)
        dens = counts / (eigs.size * np.diff(bins))
        ax.bar(bins[:-1], dens, width=np.diff(bins), align="edge", alpha=0.6, label="ESD")
        xs = np.linspace(top / 2000, top, 600)
        ax.plot(xs, mp_density(xs, d["sigma2"], d["q"]), "r-", lw=1.2, label="MP fit")
        ax.set_ylim(0, 1.3 * dens.max())  # the q = 1 MP density diverges at 0
        ax.axvline(d["lambda_plus"], color="r", ls="--", lw=0.8)
        ax.set_title(f"{short_type(t)} layer {li}: {d['outliers']} outliers, "
                     f"max {d['lambda_max']:.3g}", fontsize=9)
        ax.set_xlabel("eigenvalue of W^T W / N")
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Empirical spectral density (middle layer, x-axis cut at 1.6 lambda+) "
                 "with fitted Marchenko-Pastur law (dashed: fitted edge)")
    fig.tight_layout()
    fig.savefig(path_esd, dpi=110)
    plt.close(fig)

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    for t in types:
        layers = result["types"][t]
        x = np.arange(len(layers))
        a1.plot(x, [d["alpha"] for d in layers], "o-", ms=3, label=short_type(t))
        a2.plot(x, [d["outliers"] for d in layers], "o-", ms=3, label=short_type(t))
        a3.plot(x, [d["lambda_max"] / d["lambda_plus"] for d in layers], "o-", ms=3,
                label=short_type(t))
    a1.set_title("power-law tail exponent alpha")
    a2.set_title(f"outliers above lambda+ + {result['tw_margin']:g} TW scales")
    a3.set_title("lambda_max / fitted lambda+")
    a3.set_yscale("log")
    for a in (a1, a2, a3):
        a.set_xlabel("layer")
    a1.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path_depth, dpi=110)
    plt.close(fig)
