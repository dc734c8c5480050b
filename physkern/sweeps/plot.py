"""Plots of `physkern sweep quant` results, and re-plotting from a results JSON.

    physkern sweep plot bench/results/pareto_16k.json [--out FILE.png]
    python -m physkern.sweeps.plot bench/results/pareto_16k.json [--out FILE.png]

redraw the PNG beside the JSON (or at --out) from the JSON alone (`replot`); nothing is re-run.
The command line is physkern/commands/sweep.py; `main` here hands its arguments to it.

What a figure shows:
- Perplexity (log y) against true bits, in two panels: bits/parameter over the whole model and
  bits/weight over the quantized layers (physkern.quant.accounting). One colour per recipe label;
  each point is the mean over seeds with min-max bars, annotated with its recipe name. A line
  joins only points of one *family*: same label and same settings apart from K / bits (and the
  seed), sorted by bits; every other point stands alone, so no line suggests a trend that was
  not swept.
- When SmoothQuant migration was swept (one family at >= 2 alphas, or at one alpha and without
  smoothing), a panel of perplexity against alpha, the unsmoothed point as a dashed line of the
  same colour. If every quantized point sits at the same bits, only that panel is drawn (the bits
  panels would stack every point on one x).
- FP as a grey dashed line; one legend below the panels (labels can be long).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional, Sequence

BITS_AXES = (("model_bits_per_weight", "true bits/parameter (whole model)"),
             ("quantized_bits_per_weight", "true bits/weight (quantized layers)"))
# settings that move a point along its family's curve rather than starting a new family
_FAMILY_FREE_KEYS = ("k", "bits", "seed")


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _strip(cfg):
    """A config dict without the keys a family varies (in the base config and every override)."""
    if not isinstance(cfg, dict):
        return cfg
    out = {k: v for k, v in cfg.items() if k not in _FAMILY_FREE_KEYS}
    if isinstance(out.get("overrides"), dict):
        out["overrides"] = {pat: _strip(c) for pat, c in out["overrides"].items()}
    return out


def family_key(point: dict, with_smooth: bool = True) -> str:
    """Points with equal keys lie on one curve: label, config apart from K/bits/seed, smoothing
    (unless with_smooth is False), pruning spec, fine-tuning spec and lattice settings."""
    ft = (point.get("finetune") or {}).get("spec")
    prune = (point.get("prune") or {}).get("spec")
    return _canon([point.get("label"), _strip(point.get("config")),
                   point.get("smooth") if with_smooth else None, prune, ft,
                   point.get("lattice")])


def curves(payload: dict) -> list[dict]:
    """Summary rows (payload["summary"]) with "family" and "base_family" (without smoothing)
    added from each recipe's first point; FP rows get label "FP"."""
    first = {}
    for p in payload.get("points", []):
        first.setdefault(p["recipe"], p)
    out = []
    for s in payload["summary"]:
        p = first.get(s["recipe"], {"label": s["label"], "config": None})
        out.append({**s, "family": family_key(p), "base_family": family_key(p, False),
                    "alpha": (p.get("smooth") or {}).get("alpha")})
    return out


def _alpha_families(rows: list[dict]) -> dict[str, list[dict]]:
    """base family -> its rows, for families swept over SmoothQuant alpha."""
    by = {}
    for r in rows:
        if r["label"] != "FP":
            by.setdefault(r["base_family"], []).append(r)
    swept = {}
    for fam, rs in by.items():
        alphas = {r["alpha"] for r in rs if r["alpha"] is not None}
        plain = any(r["alpha"] is None for r in rs)
        if len(alphas) >= 2 or (alphas and plain):
            swept[fam] = rs
    return swept


def _spread_labels(ax, items: list[tuple[float, float, str]], fontsize: float = 6) -> None:
    """Annotate points, nudging labels up so that labels of nearby points do not overlap.
    Points in the right 40% of the panel get their label on the left (no spill into the next
    panel)."""
    if not items:
        return
    ax.figure.canvas.draw()  # fixes limits and the data -> pixel transform
    to_px = ax.transData.transform
    x0, _, w, _ = ax.get_window_extent().bounds
    px = sorted(((*to_px((x, y)), x, y, t) for x, y, t in items), key=lambda r: (r[1], r[0]))
    pt = ax.figure.dpi / 72
    line_h = fontsize * 1.35 * pt
    placed = []  # (left_px, right_px, label_y_px)
    for xp, yp, x, y, text in px:
        width = len(text) * fontsize * 0.6 * pt
        left = xp > x0 + 0.6 * w
        lo, hi = (xp - width - 3 * pt, xp) if left else (xp, xp + width + 3 * pt)
        ly = yp + 3 * pt
        moved = True
        while moved:
            moved = False
            for olo, ohi, oy in placed:
                if abs(ly - oy) < line_h and lo < ohi and olo < hi:
                    ly = oy + line_h + 0.5  # margin: float rounding must not re-collide
                    moved = True
        placed.append((lo, hi, ly))
        ax.annotate(text, (x, y), xytext=(-3 if left else 3, (ly - yp) / pt),
                    textcoords="offset points", fontsize=fontsize,
                    ha="right" if left else "left",
                    arrowprops=None if ly - yp < line_h else
                    {"arrowstyle": "-", "lw": 0.4, "color": "0.5"})


def _log_y(ax) -> None:
    """Log y with plain numbers; over less than a decade and a half, evenly spaced labels."""
    import matplotlib.ticker as mticker
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo < 30:
        ticks = [t for t in mticker.MaxNLocator(8).tick_values(lo, hi) if lo <= t <= hi and t > 0]
        ax.yaxis.set_major_locator(mticker.FixedLocator(ticks))
        ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.yaxis.set_major_formatter(
        mticker.FuncFormatter(lambda v, _: f"{v:g}" if v < 1e5 else f"{v:.0e}"))


def _bits_panel(ax, rows: list[dict], key: str, xlabel: str,
                colors: dict) -> list[tuple[float, float, str]]:
    """Draw one bits panel; returns the (x, y, recipe) labels to place once the layout is set."""
    fams = {}
    for r in rows:
        if r["label"] != "FP":
            fams.setdefault(r["family"], []).append(r)
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r[key])
        xs = [r[key] for r in rs]
        ys = [r["perplexity_mean"] for r in rs]
        err = [[r["perplexity_mean"] - r["perplexity_min"] for r in rs],
               [r["perplexity_max"] - r["perplexity_mean"] for r in rs]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-" if len(rs) > 1 else "o", capsize=3,
                    color=colors[rs[0]["label"]], markersize=5)
    for r in rows:
        if r["label"] == "FP":
            ax.axhline(r["perplexity_mean"], color="gray", ls="--")
    _log_y(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    return [(r[key], r["perplexity_mean"], r["recipe"]) for r in rows if r["label"] != "FP"]


def _alpha_panel(ax, swept: dict[str, list[dict]], rows: list[dict], colors: dict) -> None:
    for fam, rs in swept.items():
        color = colors[rs[0]["label"]]
        pts = sorted((r for r in rs if r["alpha"] is not None), key=lambda r: r["alpha"])
        ax.errorbar([r["alpha"] for r in pts], [r["perplexity_mean"] for r in pts],
                    yerr=[[r["perplexity_mean"] - r["perplexity_min"] for r in pts],
                          [r["perplexity_max"] - r["perplexity_mean"] for r in pts]],
                    fmt="o-", capsize=3, color=color)
        for r in pts:
            ax.annotate(f"{r['perplexity_mean']:.2f}", (r["alpha"], r["perplexity_mean"]),
                        xytext=(4, 4), textcoords="offset points", fontsize=7)
        for r in rs:
            if r["alpha"] is None:
                ax.axhline(r["perplexity_mean"], color=color, ls=":", lw=1.2)
                ax.annotate(f"no smoothing ({r['recipe']}): {r['perplexity_mean']:.2f}",
                            (0.02, r["perplexity_mean"]), xycoords=("axes fraction", "data"),
                            xytext=(0, 3), textcoords="offset points", fontsize=7, color=color)
    for r in rows:
        if r["label"] == "FP":
            ax.axhline(r["perplexity_mean"], color="gray", ls="--")
    _log_y(ax)
    alphas = sorted({r["alpha"] for rs in swept.values() for r in rs if r["alpha"] is not None})
    ax.set_xticks(alphas)
    ax.set_xlim(min(alphas + [0.0]) - 0.05, max(alphas + [1.0]) + 0.05)
    ax.set_xlabel("SmoothQuant alpha (migration strength)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3, which="both")
    bits = sorted({(round(r["quantized_bits_per_weight"], 3), round(r["model_bits_per_weight"], 3))
                   for rs in swept.values() for r in rs})
    ax.set_title("; ".join(f"{q:.3f} true bits/weight (quantized layers), {m:.3f} "
                           "bits/parameter (whole model)" for q, m in bits), fontsize=8)


def plot(payload: dict, path: Path | str) -> Path:
    """Draw a `physkern sweep quant` results payload (the JSON it writes) to `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = curves(payload)
    quant = [r for r in rows if r["label"] != "FP"]
    swept = _alpha_families(rows)
    same_bits = bool(quant) and len({round(r["quantized_bits_per_weight"], 6)
                                     for r in quant}) == 1
    panels = ([] if swept and same_bits else list(BITS_AXES)) + (["alpha"] if swept else [])
    labels = []
    for r in quant:
        if r["label"] not in labels:
            labels.append(r["label"])
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    to_label = []
    for ax, panel in zip(axes[0], panels):
        if panel == "alpha":
            _alpha_panel(ax, swept, rows, colors)
        else:
            to_label.append((ax, _bits_panel(ax, rows, panel[0], panel[1], colors)))

    handles = [Line2D([], [], color=colors[lab], marker="o", label=lab) for lab in labels]
    handles += [Line2D([], [], color="gray", ls="--", label=f"FP ({r['perplexity_mean']:.2f})")
                for r in rows if r["label"] == "FP"]
    proto = payload["setup"]["protocol"]
    title = (f"{payload['setup']['model']}: {proto['tokens_input']} evaluation tokens, "
             f"{proto['kind']} windows of {proto['window']}; mean over seeds, bars min-max; "
             "lines join one family (same settings, K/bits varied)")
    fig.suptitle(textwrap.fill(title, 95 * len(panels)), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    for ax, items in to_label:  # after the layout: label spacing is computed in pixels
        _spread_labels(ax, items)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=1 if max((len(h.get_label()) for h in handles), default=0) > 60 else 2,
               fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def read_payload(json_path: Path | str) -> dict:
    """Load a `physkern sweep quant` results JSON; ValueError naming the file if it is not one."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"results: {str(json_path)!r} is not a file")
    try:
        payload = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"results: {str(json_path)!r} is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), list) or \
            not isinstance(payload.get("setup"), dict):
        raise ValueError(f"results: {str(json_path)!r} is not a `physkern sweep quant` results "
                         "file (needs an object with 'setup' and 'summary')")
    return payload


def replot(json_path: Path | str, out: Path | str | None = None) -> Path:
    """Redraw the PNG of a results JSON (default: the JSON's path with .png); returns its path."""
    json_path = Path(json_path)
    return plot(read_payload(json_path), Path(out) if out else json_path.with_suffix(".png"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m physkern.sweeps.plot RESULTS.json ... [--out PNG]`: the same as
    `physkern sweep plot ...` (its arguments, errors and exit status; argv defaults to
    sys.argv[1:])."""
    import sys

    from ..cli import main as cli_main  # the CLI finds its commands at run time: no cycle
    return cli_main(["sweep", "plot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
