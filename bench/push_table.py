"""docs/RESULTS.md's "pushing layer codebooks" table: what each addition to a layer-codebook recipe did.

Reads sweep results (default bench/results/codebook_push_16k.json, from
`physkern sweep quant --recipes bench/recipes/codebook_push.json --name codebook_push_16k
--tokens 16384 --seeds 0 --calib-windows 32 --only <recipe>`) and prints one markdown row per
point, sorted by true bits/weight: its label, the additions (SmoothQuant alpha, per-layer K
overrides, refine steps, damping, end-to-end fine-tuning with its held-out KL), true bits over the
quantized layers and the whole model, perplexity, and seconds spent quantizing and fine-tuning.

    python bench/push_table.py [--results A.json B.json ...] [--only RECIPE ...] [--out FILE]

The table in docs/RESULTS.md adds the plain layer-codebook rows of bench/results/pareto_16k.json (same
model, text, protocol and calibration) as the baseline: files of different setups are refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def additions(p: dict) -> str:
    """What the recipe adds to plain layer-scope codebooks with error feedback."""
    cfg, out = p.get("config") or {}, []
    if p.get("smooth"):
        out.append(f"SmoothQuant alpha {p['smooth']['alpha']}")
    if cfg.get("overrides"):
        parts = [f"{pat}: K{c['k']} d{c['block_dim']}" for pat, c in cfg["overrides"].items()]
        out.append(f"base K{cfg['k']} d{cfg['block_dim']}; " + ", ".join(parts))
    if cfg.get("refine_steps"):
        out.append(f"layer-local codebook refit, {cfg['refine_steps']} Adam steps")
    if cfg.get("percdamp") not in (None, 0.01):
        out.append(f"damping {cfg['percdamp']}")
    ft = p.get("finetune")
    if ft:
        rep = ft.get("report", ft)
        spec = ft.get("spec") or {}
        how = ""
        if spec.get("windows"):
            how += f", {spec['windows']} non-overlapping windows"
        if spec.get("schedule", "constant") != "constant":
            how += f", {spec['schedule']} lr"
        out.append(f"end-to-end fine-tuning {rep['steps']} steps{how} (held-out KL "
                   f"{rep['holdout_kl_before']:.3f} -> {rep['holdout_kl_after']:.3f}, "
                   f"{'kept' if rep['kept'] else 'not kept'})")
    return "; ".join(out) or "—"


def load_points(paths: list[str], only: list[str] | None) -> list[dict]:
    """Points of the given sweep files (filtered by recipe name); refuses mixed setups."""
    setup, points = None, []
    for path in paths:
        payload = json.loads(Path(path).read_text())
        if setup is not None and payload["setup"] != setup:
            raise ValueError(f"results: {path} has a different setup (model, text, protocol or "
                             f"calibration) from {paths[0]}; not mixing them in one table")
        setup = payload["setup"]
        points += [p for p in payload["points"] if not only or p["recipe"] in only]
    return points


def table(points: list[dict]) -> str:
    rows = ["| recipe | K, d | additions | true bits/weight (quantized layers) | true bits/param "
            "(whole model) | perplexity | quantize (s) | fine-tune (s) |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    pts = sorted(points, key=lambda p: (p["bits"]["quantized_bits_per_weight"],
                                                    p["recipe"]))
    n_points = {}
    for p in pts:
        n_points[p["recipe"]] = n_points.get(p["recipe"], 0) + 1
    for p in pts:
        name = p["recipe"] + (f" (seed {p['seed']})" if n_points[p["recipe"]] > 1 else "")
        cfg = p.get("config")
        kd = "FP" if cfg is None else f"K{cfg['k']} d{cfg['block_dim']}"
        ft = p.get("finetune")
        ft_s = f"{ft.get('report', ft)['seconds']:.0f}" if ft else "—"
        rows.append(f"| {name} | {kd} | {additions(p)} | "
                    f"{p['bits']['quantized_bits_per_weight']:.3f} | "
                    f"{p['bits']['model_bits_per_weight']:.3f} | {p['perplexity']:.2f} | "
                    f"{p.get('seconds_quantize', 0):.0f} | {ft_s} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", default=["bench/results/codebook_push_16k.json"])
    ap.add_argument("--only", nargs="+", default=None, help="recipe names to keep")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args()
    md = table(load_points(args.results, args.only))
    print(md, end="")
    if args.out:
        Path(args.out).write_text(md)


if __name__ == "__main__":
    main()
