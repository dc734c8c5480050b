"""The bit-budget table (issue 19): for each budget, its recipe's perplexity as a ratio to FP on
the same protocol, at 16,384 and at 102,400 wiki evaluation tokens and on c4 (never calibrated
on), mean over the seeds measured, beside the issue's goal, met or not.

It measures nothing: it reads one `physkern sweep quant` results file (default
bench/results/budgets_100k.json, written by

    physkern sweep quant --recipes bench/recipes/budgets.json --name budgets_100k \\
        --tokens 102400 --calib-windows 32 --also-eval c4 --also-eval-tokens 48128 --seeds 0 1 2

); the 16k column is each point's "prefix" (its first 16 windows, the 16k protocol's exact
windows), so one run fills both tables.

    python bench/budget_table.py [--results bench/results/budgets_100k.json [MORE.json ...]]
                                 [--recipes NAME ...]

Several results files (points run in parallel processes under different sweep names, or a
technique sweep without its own FP point) are joined when their setups (model, corpus,
protocol, calibration, also-eval tokens) are equal; a (recipe, seed) in two files is refused.
`--recipes` keeps only those recipes (and FP).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# budget (true bits/weight over the quantized layers) -> the goal (perplexity / FP)
GOALS = {3.0: 1.12, 2.5: 1.30, 2.0: 1.60}
PREFIX = "16384"


def _mean(values: list) -> float | None:
    return statistics.fmean(values) if values else None


def figures(points: list[dict], other: str) -> dict:
    """Mean perplexities of one recipe's points: wiki (full), wiki prefix, other corpus."""
    wiki = [p["perplexity"] for p in points]
    pre = [p["prefix"][PREFIX]["perplexity"] for p in points if PREFIX in p.get("prefix", {})]
    oth = [p["other_corpora"][other]["perplexity"] for p in points
           if other in p.get("other_corpora", {})]
    return {"wiki": _mean(wiki), "wiki_min": min(wiki), "wiki_max": max(wiki),
            "prefix": _mean(pre), "other": _mean(oth), "seeds": [p["seed"] for p in points],
            "tokens": points[0]["tokens_scored"],
            "prefix_tokens": next((p["prefix"][PREFIX]["tokens_scored"] for p in points
                                   if PREFIX in p.get("prefix", {})), None),
            "other_tokens": next((p["other_corpora"][other]["tokens_scored"] for p in points
                                  if other in p.get("other_corpora", {})), None),
            "bits": statistics.fmean(p["bits"]["quantized_bits_per_weight"] for p in points),
            "model_bits": statistics.fmean(p["bits"]["model_bits_per_weight"] for p in points)}


def budget_of(bits: float) -> float | None:
    """The tightest budget these bits fit under."""
    fits = [b for b in GOALS if bits <= b]
    return min(fits) if fits else None


def table(payload: dict, other: str = "c4") -> str:
    by: dict[str, list] = {}
    for p in payload["points"]:
        by.setdefault(p["recipe"], []).append(p)
    if "fp" not in by:
        raise SystemExit("results: no FP point ('fp' recipe) to take ratios against")
    fp = figures(by.pop("fp"), other)
    ratio = lambda v, ref: "—" if v is None or ref is None else f"{v:.2f} ({v / ref:.2f}x)"
    lines = [f"FP: wiki {fp['wiki']:.2f} ({fp['tokens']:,} tokens), {fp['prefix']:.2f} "
             f"({fp['prefix_tokens']:,}); {other} {fp['other']:.2f} ({fp['other_tokens']:,})", "",
             f"| budget | recipe | bits/weight (layers) | bits/param (model) | wiki "
             f"{fp['prefix_tokens']:,} | wiki {fp['tokens']:,} (spread) | {other} "
             f"{fp['other_tokens']:,} | goal | met (wiki 100k / {other}) | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, pts in by.items():
        f = figures(pts, other)
        b = budget_of(f["bits"])
        goal = GOALS.get(b)
        met = "—" if goal is None else " / ".join(
            "—" if v is None else ("yes" if v / ref <= goal else "no")
            for v, ref in ((f["wiki"], fp["wiki"]), (f["other"], fp["other"])))
        spread = f" ({f['wiki_min']:.2f}-{f['wiki_max']:.2f})" if len(pts) > 1 else ""
        lines.append(f"| {f'<= {b}' if b is not None else f'> {max(GOALS)}'} | {name} | {f['bits']:.3f} | "
                     f"{f['model_bits']:.3f} | {ratio(f['prefix'], fp['prefix'])} | "
                     f"{ratio(f['wiki'], fp['wiki'])}{spread} | {ratio(f['other'], fp['other'])} "
                     f"| {'—' if goal is None else f'<= {goal:.2f}x'} | {met} | "
                     f"{','.join(map(str, f['seeds']))} |")
    return "\n".join(lines) + "\n"


# What must agree for two results files' points to share a table.
SETUP_KEYS = ("model", "corpus", "protocol", "calibration", "also_eval_tokens")


def join(payloads: list[dict], names: list[str]) -> dict:
    """One payload with every file's points. Raises SystemExit naming the files when their
    setups differ or a (recipe, seed) appears twice (an FP point, deterministic, may repeat:
    the first is kept)."""
    first = payloads[0].get("setup", {})
    points, seen = [], {}
    for payload, name in zip(payloads, names):
        setup = payload.get("setup", {})
        for key in SETUP_KEYS:
            if setup.get(key) != first.get(key):
                raise SystemExit(f"results: {name} has setup {key} {setup.get(key)!r}, "
                                 f"{names[0]} has {first.get(key)!r}: not one protocol")
        for p in payload["points"]:
            key = (p["recipe"], p["seed"])
            if key in seen:
                if p["recipe"] == "fp":
                    continue
                raise SystemExit(f"results: {p['recipe']} seed {p['seed']} is in both "
                                 f"{seen[key]} and {name}")
            seen[key] = name
            points.append(p)
    return {"setup": first, "points": points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", default=["bench/results/budgets_100k.json"])
    ap.add_argument("--recipes", nargs="+", help="only these recipes (and FP)")
    ap.add_argument("--other", default="c4", help="the also-eval corpus to show (default c4)")
    args = ap.parse_args(argv)
    paths = [Path(r) for r in args.results]
    for path in paths:
        if not path.is_file():
            print(f"results: {path} not found (run the sweep in this file's docstring)",
                  file=sys.stderr)
            return 2
    payload = join([json.loads(p.read_text()) for p in paths], [str(p) for p in paths])
    if args.recipes:
        known = {p["recipe"] for p in payload["points"]}
        missing = sorted(set(args.recipes) - known)
        if missing:
            raise SystemExit(f"recipes: {missing} not in the results; known: {sorted(known)}")
        payload["points"] = [p for p in payload["points"]
                             if p["recipe"] in args.recipes or p["recipe"] == "fp"]
    print(table(payload, args.other), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
