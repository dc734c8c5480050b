"""Activation entropy of every linear layer's input (the seeds' Direction 1, "Thermodynamic
Quantization": high-entropy layers get more bits).

Calibration windows (first half of the corpus' documents) run through the model twice
(physkern.research.histogram.activation_entropy): first the finite min/max of each layer's input, then
streaming int64 histograms with --bins equal-width bins over that range (C++ op
physkern::histogram_update). Per layer: the entropy of all its input values in bits (Miller-Madow
corrected, and plug-in), and the spread of its per-input-channel entropies (same range, so they
compare at equal bin width). An entropy over b bins is at most log2(b + 2) (bins plus the two
outside-range cells, which stay empty with ranges from a first pass).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._common import pyplot, split_layer_name

DEFAULT_WINDOWS = 32
DEFAULT_BINS = 256


def entropy_analysis(model: nn.Module, windows: torch.Tensor, bins: int = DEFAULT_BINS,
                     per_channel: bool = True, progress: bool = False) -> dict:
    """Per-layer activation entropy of `model` over token windows [n, seq].

    Returns {"layers": [{name, layer, type, entropy_bits, entropy_plugin_bits, lo, hi, values,
    nan, outside, channels: {mean, std, min, max} bits | None}], "max_bits": log2(bins + 2),
    "by_type": {type: mean entropy_bits}}.
    """
    from ..histogram import activation_entropy
    res = activation_entropy(model, windows, bins=bins, per_channel=per_channel,
                             progress=progress)
    layers = []
    for name, e in res.items():
        idx, wtype = split_layer_name(name)
        ch = None
        if e.channel_entropy is not None:
            c = e.channel_entropy[torch.isfinite(e.channel_entropy)]
            ch = {"mean": float(c.mean()), "std": float(c.std()) if c.numel() > 1 else 0.0,
                  "min": float(c.min()), "max": float(c.max())} if c.numel() else None
        layers.append({"name": name, "layer": idx, "type": wtype,
                       "entropy_bits": e.entropy, "entropy_plugin_bits": e.entropy_plugin,
                       "lo": e.lo, "hi": e.hi, "values": e.values, "nan": e.nan,
                       "outside": e.outside, "channels": ch})
    by_type: dict[str, list[float]] = {}
    for row in layers:
        by_type.setdefault(row["type"], []).append(row["entropy_bits"])
    return {"layers": layers, "max_bits": math.log2(bins + 2),
            "by_type": {t: sum(v) / len(v) for t, v in by_type.items()}}


def plot_entropy(result: dict, path, title: str = "") -> None:
    """Bar chart: one bar per layer (model order), coloured by weight type; whiskers show the
    min..max of the per-channel entropies."""
    plt = pyplot()
    layers = result["layers"]
    types = list(dict.fromkeys(r["type"] for r in layers))
    cmap = plt.get_cmap("tab10")
    colors = {t: cmap(i % 10) for i, t in enumerate(types)}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.07 * len(layers) + 3), 4.5))
    xs = range(len(layers))
    ax.bar(xs, [r["entropy_bits"] for r in layers], color=[colors[r["type"]] for r in layers],
           width=0.85)
    for x, r in zip(xs, layers):
        if r["channels"] is not None:
            ax.plot([x, x], [r["channels"]["min"], r["channels"]["max"]], color="k", lw=0.4,
                    alpha=0.5)
    ax.axhline(result["max_bits"], color="grey", ls="--", lw=0.8)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=colors[t], label=t) for t in types], fontsize=7,
              ncol=min(len(types), 7), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylabel("input entropy (bits, Miller-Madow)")
    ax.set_title(title or "Activation entropy per linear layer (dashed: log2(bins + 2))",
                 fontsize=10)
    ax.set_xlim(-1, len(layers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def report(result: dict, file=None) -> None:
    """Print one line per layer and the per-type means."""
    print(f"{'layer':<44}{'H bits':>8}{'plug-in':>9}{'ch mean':>9}{'ch min':>8}{'ch max':>8}"
          f"{'range':>24}", file=file)
    for r in result["layers"]:
        ch = r["channels"] or {"mean": math.nan, "min": math.nan, "max": math.nan}
        rng = f"[{r['lo']:.3g}, {r['hi']:.3g}]"
        print(f"{r['name']:<44}{r['entropy_bits']:>8.3f}{r['entropy_plugin_bits']:>9.3f}"
              f"{ch['mean']:>9.3f}{ch['min']:>8.3f}{ch['max']:>8.3f}{rng:>24}", file=file)
    print("mean by type: " + ", ".join(f"{t} {v:.3f}" for t, v in result["by_type"].items()),
          file=file)
