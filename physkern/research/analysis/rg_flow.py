"""RG flow of singular values across depth (the seeds' Direction 2).

For each weight type (GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; LLaMA: q, k, v, o,
gate, up, down) take the singular values sigma[l, i] (descending) of that matrix in every layer
l = 0..L-1. Per rank index i:

- the seeds' growth rate  gamma_i = ln(sigma[L-1, i] / sigma[0, i]) / (L - 1)   (end points only)
- the least-squares slope of ln sigma[l, i] against l over all layers (one odd first or last
  layer cannot dominate it).

Rank indices are classified relevant (rate > relevant threshold, default 0.1), irrelevant
(rate < irrelevant threshold, default -0.1) or marginal, for both rates.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._common import pyplot, resolve_types, short_type, singular_values, weight_groups

DEFAULT_RELEVANT = 0.1
DEFAULT_IRRELEVANT = -0.1


def singular_value_stack(weights: Sequence[torch.Tensor]) -> np.ndarray:
    """[L, r] singular values (descending) of L matrices of one shape, r = min(out, in), float64."""
    shapes = {tuple(w.shape) for w in weights}
    if len(shapes) != 1:
        raise ValueError(f"weights of one type must share a shape, got {sorted(shapes)}")
    if len(weights) < 2:
        raise ValueError(f"need at least 2 layers to measure a growth rate, got {len(weights)}")
    return np.stack([singular_values(w).numpy() for w in weights])


def growth_rates(sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Growth rates per rank index of a [L, r] singular-value stack.

    Returns {"gamma": [r] end-point rate (the seeds'), "slope": [r] least-squares slope of
    ln sigma over l = 0..L-1, "intercept": [r]}. Zero singular values raise (ln 0).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.ndim != 2 or sigma.shape[0] < 2:
        raise ValueError(f"sigma must be [L >= 2, r], got shape {sigma.shape}")
    if np.any(sigma <= 0):
        raise ValueError("sigma: zero singular values have no logarithm; the matrices are "
                         "rank deficient at the reported rank indices")
    L = sigma.shape[0]
    log_s = np.log(sigma)
    gamma = (log_s[-1] - log_s[0]) / (L - 1)
    depth = np.arange(L, dtype=np.float64)
    centred = depth - depth.mean()
    slope = centred @ (log_s - log_s.mean(0)) / (centred @ centred)
    intercept = log_s.mean(0) - slope * depth.mean()
    return {"gamma": gamma, "slope": slope, "intercept": intercept}


def classify(rates: np.ndarray, relevant: float = DEFAULT_RELEVANT,
             irrelevant: float = DEFAULT_IRRELEVANT) -> dict[str, float]:
    """Fractions of rank indices that are relevant / irrelevant / marginal."""
    if not irrelevant <= relevant:
        raise ValueError(f"irrelevant threshold ({irrelevant}) must not exceed the relevant "
                         f"threshold ({relevant})")
    rates = np.asarray(rates)
    n = rates.size
    rel = int((rates > relevant).sum())
    irr = int((rates < irrelevant).sum())
    return {"relevant": rel / n, "irrelevant": irr / n, "marginal": (n - rel - irr) / n}


def rg_flow(model: nn.Module, types: Optional[Sequence[str]] = None,
            relevant: float = DEFAULT_RELEVANT, irrelevant: float = DEFAULT_IRRELEVANT) -> dict:
    """RG-flow analysis of a model's decoder weights.

    Returns {"layers": L, "thresholds": {...}, "types": {type: {"shape": [out, in],
    "sigma": [L, r] list, "gamma": [r], "slope": [r], "mean_gamma", "mean_slope",
    "median_gamma", "classes_gamma": {...}, "classes_slope": {...}}}}.
    """
    groups = weight_groups(model)
    chosen = resolve_types(list(groups), types)
    out = {"thresholds": {"relevant": relevant, "irrelevant": irrelevant}, "types": {}}
    for wtype in chosen:
        layers = groups[wtype]
        sigma = singular_value_stack([l.weight() for l in layers])
        rates = growth_rates(sigma)
        out["layers"] = len(layers)
        out["types"][wtype] = {
            "shape": list(layers[0].weight().shape),
            "sigma": sigma.tolist(),
            "gamma": rates["gamma"].tolist(),
            "slope": rates["slope"].tolist(),
            "mean_gamma": float(rates["gamma"].mean()),
            "median_gamma": float(np.median(rates["gamma"])),
            "mean_slope": float(rates["slope"].mean()),
            "median_slope": float(np.median(rates["slope"])),
            "classes_gamma": classify(rates["gamma"], relevant, irrelevant),
            "classes_slope": classify(rates["slope"], relevant, irrelevant),
        }
    return out


def plot_rg(result: dict, path_traj, path_hist) -> None:
    """Two PNGs: ln sigma_i over depth per type (a few rank indices), and gamma histograms."""
    plt = pyplot()
    types = list(result["types"])
    ncol = min(4, len(types))
    nrow = math.ceil(len(types) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    for ax, wtype in zip(axes.flat, types):
        sigma = np.array(result["types"][wtype]["sigma"])
        r = sigma.shape[1]
        picks = sorted({0, 1, 3, 7, 15, 31, 63, 127, 255, r // 2, r - 1} & set(range(r)))
        cmap = plt.get_cmap("viridis")
        for k, i in enumerate(picks):
            ax.plot(np.arange(sigma.shape[0]), sigma[:, i], color=cmap(k / max(1, len(picks) - 1)),
                    label=f"i={i}", lw=1.2)
        ax.set_yscale("log")
        ax.set_title(short_type(wtype), fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("singular value")
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Singular values over depth per weight type (rank index i, descending)")
    fig.tight_layout()
    fig.savefig(path_traj, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
    thr = result["thresholds"]
    for ax, wtype in zip(axes.flat, types):
        t = result["types"][wtype]
        ax.hist(t["gamma"], bins=40, alpha=0.6, label="gamma (end points)")
        ax.hist(t["slope"], bins=40, alpha=0.6, label="LS slope")
        for x in (thr["relevant"], thr["irrelevant"]):
            ax.axvline(x, color="k", ls="--", lw=0.8)
        ax.set_title(f"{short_type(wtype)}: mean gamma {t['mean_gamma']:+.3f}, "
                     f"slope {t['mean_slope']:+.3f}", fontsize=9)
        ax.set_xlabel("growth rate per layer")
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Growth-rate histograms (dashed: relevant / irrelevant thresholds)")
    fig.tight_layout()
    fig.savefig(path_hist, dpi=110)
    plt.close(fig)
