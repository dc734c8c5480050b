"""MPO vs truncated SVD vs codebook on the same layers at equal true bits: PERPLEXITY, with and
without healing (issue 21.3). One command gives the JSON, the markdown table and the plot.

    python bench/mpo_ppl.py [--layers '*.mlp.gate_proj' '*.mlp.up_proj' '*.mlp.down_proj']
                            [--bits 2 4] [--heal-steps 50] [--tokens 4096]
                            [--calib-windows 16] [--calib-window 512] [--threads 1]
                            [--only NAME ...] [--fresh] [--out bench/results/mpo_ppl.json]
    python bench/mpo_ppl.py --table-only      (redraw the table and the PNG from the JSON)

Every point is a physkern.recipe.Recipe applied to a fresh copy of the packaged model
(SmolLM2-135M) by physkern.recipe.apply_recipe, so the recipe path ("factorize", "config",
"finetune") is what is measured:

- svd{b}:   "factorize": truncated SVD, the largest rank whose fp16 factors fit b bits/weight
- svdw{b}:  the same, activation-weighted (whitened by the layer input's X^T X, SVD-LLM)
- mpo2{b}:  "factorize": MPO with 2 cores (TT-SVD, which is Frobenius-optimal for 2 cores), the
            largest bond whose fp16 cores fit b
- mpo3{b}:  MPO with 3 cores, TT-SVD + 1 DMRG-style ALS sweep
- mpo2cb{b}: MPO with 2 cores (TT-SVD) whose cores are then quantized ("factorize"'s
            "quantize", physkern.methods.factor_quant): layer-scope codebooks K=256 d=2 with
            per-row fp16 scales, no calibration. The bond is the largest whose INDEX bits fit
            15/16 of b (target MPO_CB_TARGET * b), leaving room for the scales and codebooks,
            so that the TRUE bits (reported) land at ~b
- cb{b}:    "config": layer-scope codebooks with error feedback at ~b bits (b=2: K=256 d=4;
            b=4: K=256 d=2; b=3: K=4096 d=4)
- "+heal":  the same, then "finetune": `--heal-steps` Adam steps of KL(teacher || student) on the
            calibration windows (physkern.finetune for codebooks; heal_factorized for factors;
            norms trained too, lr 1e-3 relative, keep-if-better on 2 held-out windows)
Only the layers matched by --layers change; everything else stays FP32. Calibration (X^T X,
healing) uses windows of the CALIBRATION half of the corpus, evaluation the first --tokens of
the evaluation half (non-overlapping 1024-token windows). True bits: physkern.quant.accounting
over the changed layers. Results are written after every point; a rerun resumes (--fresh
starts over).
"""
import argparse
import copy
import fnmatch
import json
import math
import sys
import time
from pathlib import Path

import torch

CB = {2: {"k": 256, "block_dim": 4}, 3: {"k": 4096, "block_dim": 4},
      4: {"k": 256, "block_dim": 2}}
METHODS = ("svd", "svdw", "mpo2", "mpo3", "mpo2cb", "cb")
LABELS = {"svd": "truncated SVD", "svdw": "SVD, activation-weighted", "mpo2": "MPO 2 cores",
          "mpo3": "MPO 3 cores (+1 sweep)", "mpo2cb": "MPO 2 cores, codebook cores",
          "cb": "codebook (layer, EF)", "fp": "FP32"}
# mpo2cb: its cores' index bits target this fraction of b (per-row fp16 scales and the
# codebooks add ~1/16: the true bits come out at ~b, as the other points')
MPO_CB_TARGET = 15 / 16
MPO_CB = {"method": "codebook", "k": 256, "block_dim": 2, "scope": "layer", "calibrate": False}


def recipe_dict(method: str, bits: float, layers: list, heal: int) -> dict:
    name = f"{method}{bits:g}" + (f"+heal{heal}" if heal else "")
    d = {"name": name}
    if method == "svd":
        d["factorize"] = {"method": "svd", "bits": float(bits), "layers": layers}
    elif method == "svdw":
        d["factorize"] = {"method": "svd", "bits": float(bits), "weighted": True,
                          "layers": layers}
    elif method == "mpo2":
        d["factorize"] = {"method": "mpo", "bits": float(bits), "cores": 2, "sweeps": 0,
                          "layers": layers}
    elif method == "mpo2cb":
        d["factorize"] = {"method": "mpo", "bits": float(bits) * MPO_CB_TARGET, "cores": 2,
                          "sweeps": 0, "layers": layers, "quantize": dict(MPO_CB)}
    elif method == "mpo3":
        d["factorize"] = {"method": "mpo", "bits": float(bits), "cores": 3, "sweeps": 1,
                          "layers": layers}
    elif method == "cb":
        if int(bits) not in CB:
            raise ValueError(f"no codebook point at {bits} bits (have {sorted(CB)})")
        d["config"] = {"method": "codebook", **CB[int(bits)], "scope": "layer",
                       "error_feedback": True, "layers": layers}
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if heal:
        d["finetune"] = {"steps": heal, "lr": 1e-3, "train_norms": True, "holdout": 2}
    return d


def changed_bits(model, layers) -> dict:
    from physkern.quant.accounting import bits_report
    rep = bits_report(model)
    sel = {n: v for n, v in rep.layers.items()
           if any(fnmatch.fnmatchcase(n, p) for p in layers)}
    bits = sum(v["total_bits"] for v in sel.values())
    weights = sum(v["weights"] for v in sel.values())
    return {"bits_per_weight": bits / weights if weights else None, "layers": len(sel),
            "weights": weights, "model_bits_per_weight": rep.model_bits_per_weight,
            "total_bytes": rep.total_bytes}


def table(payload: dict) -> str:
    pts = {p["name"]: p for p in payload["points"]}
    fp = pts.get("fp")
    out = [f"FP32: {fp['perplexity']:.2f}" if fp else "",
           "", "| method | target bits | true bits/weight | size | rel. weight error (mean) | "
           "perplexity | + healing (steps) | heal kept |", "|---|---|---|---|---|---|---|---|"]
    bits = sorted({p["target_bits"] for p in payload["points"] if p["target_bits"]}, reverse=True)
    for m in METHODS:
        for b in bits:
            p = pts.get(f"{m}{b:g}")
            hs = [q for q in payload["points"] if q.get("method") == m and
                  q.get("target_bits") == b and q.get("heal_steps")]
            h = hs[-1] if hs else None
            if p is None and h is None:
                continue
            q = p or h
            size = q.get("size", "")
            err = q.get("relative_weight_error_mean")
            err = f"{err:.3f}" if err is not None else ""
            head = f"| {LABELS[m]} | {b:g} | {q['bits']['bits_per_weight']:.3f} | {size} | {err} | "
            out.append(head + (f"{p['perplexity']:,.2f} | " if p else "- | "))
            out[-1] += (f"{h['perplexity']:,.2f} ({h['heal_steps']}) | {h['heal']['kept']} |"
                        if h else "- | - |")
    return "\n".join(out)


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"svd": "C0", "svdw": "C1", "mpo2": "C2", "mpo3": "C3", "cb": "C4",
              "mpo2cb": "C5"}
    for m in METHODS:
        for healed in (False, True):
            ps = [p for p in payload["points"] if p.get("method") == m and
                  bool(p.get("heal_steps")) == healed]
            if not ps:
                continue
            ps.sort(key=lambda p: p["bits"]["bits_per_weight"])
            ax.plot([p["bits"]["bits_per_weight"] for p in ps], [p["perplexity"] for p in ps],
                    marker="o", ls="-" if healed else "--", color=colors[m],
                    mfc=colors[m] if healed else "white",
                    label=LABELS[m] + (" + healing" if healed else ""))
    fp = [p for p in payload["points"] if p["name"] == "fp"]
    if fp:
        ax.axhline(fp[0]["perplexity"], color="k", lw=0.8, ls=":", label="FP32")
    ax.set_yscale("log")
    ax.set_xlabel("true bits/weight of the changed layers (" +
                  ", ".join(payload["setup"]["layers"]) + ")")
    ax.set_ylabel(f"perplexity ({payload['setup']['tokens']} eval tokens)")
    ax.set_title("MPO vs truncated SVD vs codebook, SmolLM2-135M")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="+",
                   default=["*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"])
    p.add_argument("--bits", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--heal-steps", type=int, default=50)
    p.add_argument("--no-heal", action="store_true", help="only the un-healed points")
    p.add_argument("--heal-only", action="store_true", help="only the healed points")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="+", default=None, help="point names to run")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="add the points of other runs' JSONs (same setup, run in parallel with "
                        "another --out) to --out, then print the table and draw the plot")
    p.add_argument("--out", default="bench/results/mpo_ppl.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        plan_keys = ("bits", "heal_steps")
        payload = json.loads(out.read_text())
        strip = lambda d: {k: v for k, v in d.items() if k not in plan_keys}
        names = {q["name"] for q in payload["points"]}
        for extra in args.merge:
            other = json.loads(Path(extra).read_text())
            if strip(other["setup"]) != strip(payload["setup"]):
                raise SystemExit(f"{extra} was made with another setup than {out}")
            new = [q for q in other["points"] if q["name"] not in names]
            payload["points"] += new
            names |= {q["name"] for q in new}
            payload.setdefault("merged_from", []).append(
                {"file": extra, "points": [q["name"] for q in new],
                 "command": other.get("command")})
        for key in plan_keys:
            payload["setup"][key] = sorted({q[key if key == "heal_steps" else "target_bits"]
                                            for q in payload["points"]
                                            if q.get(key if key == "heal_steps" else
                                                     "target_bits")})
        from physkern.provenance import write_json
        write_json(out, payload)
        plot(payload, out.with_suffix(".png"))
        print(table(payload))
        return 0
    if args.table_only:
        payload = json.loads(out.read_text())
        plot(payload, out.with_suffix(".png"))
        print(table(payload))
        return 0
    torch.set_num_threads(args.threads)
    from physkern.data import evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import load_model, resolve_model_name
    from physkern.provenance import provenance, write_json
    from physkern.recipe import Recipe, apply_recipe

    corpus = load_corpus()
    base, tok = load_model()
    tokens = evaluation_tokens(tok, corpus, args.tokens)
    setup = {"model": resolve_model_name(None), "corpus": corpus.describe(),
             "tokens": int(tokens.numel()), "layers": args.layers,
             "heal_steps": args.heal_steps,
             "protocol": {"kind": "non-overlapping", "window": args.window, "dtype": "float32",
                          "text": "evaluation part (second half of the documents)"},
             "calibration": {"windows": args.calib_windows, "window": args.calib_window,
                             "text": "calibration part (first half of the documents), seeded "
                                     "offsets", "disjoint_from_evaluation": True,
                             "used_for": "X^T X (svdw, codebook EF) and the healing windows"},
             "seed": args.seed, "threads": args.threads}
    points, merged_from, earlier = [], [], []
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        plan_keys = ("bits", "heal_steps")  # what a run adds to the file, not how it measures
        old_setup = {k: v for k, v in old.get("setup", {}).items() if k not in plan_keys}
        if old_setup != {k: v for k, v in json.loads(json.dumps(setup)).items()
                         if k not in plan_keys}:
            raise SystemExit(f"{out} was made with another setup; pass --fresh or --out")
        points = old["points"]
        merged_from = old.get("merged_from", [])
        earlier = old.get("earlier_commands", []) + [old.get("command")]
    done = {q["name"] for q in points}

    def save():
        payload = {"experiment": "MPO vs truncated SVD vs codebook on the same layers at equal "
                                 "true bits: perplexity with and without healing (issue 21.3)",
                   "setup": {**setup, "bits": sorted({q["target_bits"] for q in points
                                                      if q["target_bits"]}),
                             "heal_steps": sorted({q["heal_steps"] for q in points
                                                   if q["heal_steps"]})},
                   "points": points, **provenance("cpu"),
                   **({"merged_from": merged_from} if merged_from else {}),
                   **({"earlier_commands": earlier} if earlier else {})}
        write_json(out, payload)
        return payload

    plan = [("fp", None, None, 0)]
    heals = [0] if args.no_heal else [args.heal_steps] if args.heal_only else \
        [0, args.heal_steps]
    for h in heals:
        for b in sorted(args.bits, reverse=True):
            for m in args.methods:
                if m == "cb" and int(b) not in CB:
                    continue
                plan.append((f"{m}{b:g}" + (f"+heal{h}" if h else ""), m, b, h))
    if args.only:
        plan = [x for x in plan if x[0] in args.only]
    calib = {"windows": args.calib_windows, "window": args.calib_window}
    for name, m, b, h in plan:
        if name in done:
            print(f"{name}: already in {out}, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        rep = None
        if m is not None:
            r = Recipe.from_dict({**recipe_dict(m, b, args.layers, h), "calibration": calib})
            rep = apply_recipe(model, r, tok, corpus, args.seed, progress=False)
        t_apply = time.perf_counter() - t0
        res = perplexity(model, tokens, args.window, progress=False,
                         model_name=setup["model"], corpus_name=corpus.name)
        point = {"name": name, "method": m, "target_bits": b, "heal_steps": h,
                 "perplexity": res.perplexity, "mean_nll": res.mean_nll,
                 "tokens_scored": res.tokens_scored, "seconds_apply": t_apply,
                 "seconds_eval": res.seconds}
        if rep is not None:
            point["recipe"] = r.to_dict()
            point["bits"] = changed_bits(model, args.layers)
            if rep.factorize is not None:
                lay = rep.factorize["layers"]
                point["relative_weight_error_mean"] = sum(
                    x["relative_weight_error"] for x in lay) / len(lay)
                sizes = sorted({f"chi={x['chi']}" if "chi" in x else f"r={x['rank']}"
                                for x in lay})
                point["size"] = ", ".join(sizes)
                if "relative_weight_error_float" in lay[0]:  # quantized cores
                    point["size"] += f", K={MPO_CB['k']} d={MPO_CB['block_dim']} cores"
                    point["relative_weight_error_float_mean"] = sum(
                        x["relative_weight_error_float"] for x in lay) / len(lay)
                point["factorize"] = {k: v for k, v in rep.factorize.items() if k != "layers"}
                point["factorize"]["layers"] = [{k: v for k, v in x.items()} for x in lay]
            if rep.quantization is not None:
                point["relative_weight_error_mean"] = sum(
                    x.relative_weight_error for x in rep.quantization.layers) / \
                    len(rep.quantization.layers)
                cbk = CB[int(b)]
                point["size"] = f"K={cbk['k']} d={cbk['block_dim']}"
            if rep.finetune is not None:
                point["heal"] = {k: v for k, v in rep.finetune.items() if k != "loss_curve"}
                point["heal"]["loss_first_last"] = [rep.finetune["loss_curve"][:1],
                                                    rep.finetune["loss_curve"][-1:]]
            point["calibration"] = {**calib, "seed": args.seed}
        if m == "mpo2cb":  # added to a file made by earlier commands: its own provenance
            point["provenance"] = provenance("cpu")
        points.append(point)
        save()
        bits = point.get("bits", {}).get("bits_per_weight")
        print(f"{name}: perplexity {res.perplexity:,.2f}"
              + (f" at {bits:.3f} bits/weight" if bits else "")
              + f" ({t_apply:.0f} s apply, {res.seconds:.0f} s eval)", flush=True)
        del model
    payload = save()
    plot(payload, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
