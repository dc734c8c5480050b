"""Combined entropy + Fisher bit allocation vs each criterion alone (and uniform) at equal total
true bits, on a GPTQ and a codebook recipe: perplexity (issue 21.4). One command: JSON + table.

    python bench/alloc_combined.py [--tokens 4096] [--calib-windows 8] [--calib-window 512]
                                   [--weights 1 0 0.5] [--recipes gptq codebook] [--threads 1]
                                   [--fresh] [--out bench/results/alloc_combined.json]
    python bench/alloc_combined.py --table-only

On the packaged model (SmolLM2-135M), every decoder linear layer (210):
1. sensitivities on CALIBRATION windows (first half of the documents): input-activation entropy
   (physkern.research.alloc.entropy_sensitivity, 256 bins) and the empirical Fisher per weight
   (fisher_trace's "mean"), with their correlation;
2. per recipe, options per layer and a budget = the uniform middle option's TRUE stored bits:
   gptq: GPTQ {3, 4, 5} bits, group 64, asymmetric; budget = GPTQ 4-bit everywhere
   codebook: layer-scope codebooks with error feedback, d=2, K {16, 64, 256} (2/3/4 bits);
   budget = K=64 everywhere;
3. allocators, all the same knapsack on true bits (physkern.research.alloc.combined_allocation,
   cost s_i n_i 4^(-b_i)): weight 1 = entropy alone, 0 = Fisher alone, 0.5 = combined; plus
   uniform (no knapsack);
4. each allocation applied through physkern.recipe.apply_recipe (config with per-layer
   overrides, the same calibration windows), perplexity on the first --tokens tokens of the
   evaluation half (non-overlapping 1024-token windows); true bits by physkern.quant.accounting.
Written after every point; a rerun resumes.
"""
import argparse
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

RECIPES = {
    "gptq": {"options": [{"method": "gptq", "bits": b, "group_size": 64} for b in (3, 4, 5)],
             "labels": ["3", "4", "5"], "uniform": 1},
    "codebook": {"options": [{"method": "codebook", "k": k, "block_dim": 2, "scope": "layer",
                              "error_feedback": True} for k in (16, 64, 256)],
                 "labels": ["K16", "K64", "K256"], "uniform": 1},
}


def allocator_name(w):
    return {1.0: "entropy", 0.0: "fisher"}.get(float(w), f"combined w={w:g}")


def table(payload: dict) -> str:
    out = ["| recipe | allocator | true bits/weight (decoder linear) | perplexity | layers per "
           "option |", "|---|---|---|---|---|"]
    for p in payload["points"]:
        if p["name"] == "fp":
            continue
        per = ", ".join(f"{k}: {v}" for k, v in p["layers_per_option"].items())
        out.append(f"| {p['recipe']} | {p['allocator']} | {p['bits']['quantized_bits_per_weight']:.4f} "
                   f"| {p['perplexity']:.2f} | {per} |")
    fp = [p for p in payload["points"] if p["name"] == "fp"]
    c = payload["sensitivities"]["correlation"]
    head = (f"FP32 {fp[0]['perplexity']:.2f}; " if fp else "") + \
        (f"entropy vs Fisher (per weight) over {c['n']} layers: Pearson {c['pearson']:.2f}, "
         f"Spearman {c['spearman']:.2f}")
    return head + "\n\n" + "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 0.0])
    p.add_argument("--recipes", nargs="+", default=["gptq", "codebook"], choices=list(RECIPES))
    p.add_argument("--no-uniform", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--out", default="bench/results/alloc_combined.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        print(table(json.loads(out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    from physkern.config import config_from_dict
    from physkern.data import calibration_windows, evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import decoder_linear_layers, load_model, resolve_model_name
    from physkern.provenance import provenance, write_json
    from physkern.quant.accounting import bits_report
    from physkern.recipe import Recipe, apply_recipe
    from physkern.research.alloc import (combined_allocation, correlation, entropy_sensitivity,
                                         fisher_trace, option_bits)

    corpus = load_corpus()
    base, tok = load_model()
    tokens = evaluation_tokens(tok, corpus, args.tokens)
    calib = calibration_windows(tok, corpus, args.calib_windows, args.calib_window, args.seed)
    layers = decoder_linear_layers(base)
    shapes = {l.name: (l.out_features, l.in_features) for l in layers}
    setup = {"model": resolve_model_name(None), "corpus": corpus.describe(),
             "tokens": int(tokens.numel()),
             "protocol": {"kind": "non-overlapping", "window": args.window, "dtype": "float32",
                          "text": "evaluation part (second half of the documents)"},
             "calibration": {"windows": args.calib_windows, "window": args.calib_window,
                             "seed": args.seed, "text": "calibration part (first half of the "
                             "documents)", "disjoint_from_evaluation": True,
                             "used_for": "sensitivities and the quantizers' statistics"},
             "recipes": {k: RECIPES[k] for k in args.recipes}, "weights": args.weights,
             "cost_model": "s_i * n_i * 4^(-bits_i / n_i), s = entropy^w * fisher_mean^(1-w) "
                           "(each normalised by its geometric mean)",
             "threads": args.threads}
    old = json.loads(out.read_text()) if out.exists() and not args.fresh else None
    if old is not None and old.get("setup") != json.loads(json.dumps(setup)):
        raise SystemExit(f"{out} was made with another setup; pass --fresh or --out")
    points = old["points"] if old else []
    sens = old["sensitivities"] if old else None
    if sens is None:
        t0 = time.perf_counter()
        ent = entropy_sensitivity(base, calib)
        t1 = time.perf_counter()
        fis = {n: v["mean"] for n, v in fisher_trace(base, calib).items()}
        sens = {"entropy_bits": ent, "fisher_mean": fis, "correlation": correlation(ent, fis),
                "seconds": {"entropy": t1 - t0, "fisher": time.perf_counter() - t1}}
        print(f"sensitivities: {time.perf_counter() - t0:.0f} s; correlation "
              f"{sens['correlation']}", flush=True)
    done = {q["name"] for q in points}

    def save():
        payload = {"experiment": "combined entropy + Fisher allocation vs each alone at equal "
                                 "true bits (issue 21.4)", "setup": setup,
                   "sensitivities": sens, "points": points, **provenance("cpu")}
        write_json(out, payload)
        return payload

    save()
    plan = [("fp", None, None)]
    for r in args.recipes:
        plan += [(f"{r}/{allocator_name(w)}", r, w) for w in args.weights]
        if not args.no_uniform:
            plan.append((f"{r}/uniform", r, None))
    for name, r, w in plan:
        if name in done:
            print(f"{name}: already in {out}, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        point = {"name": name}
        if r is not None:
            spec = RECIPES[r]
            cfgs = [config_from_dict(c) for c in spec["options"]]
            uni = cfgs[spec["uniform"]]
            budget = sum(option_bits(uni, *s) for s in shapes.values())
            if w is None:
                cfg, counts, info = uni, {spec["labels"][spec["uniform"]]: len(shapes)}, None
            else:
                alloc = combined_allocation(shapes, cfgs, sens["entropy_bits"],
                                            sens["fisher_mean"], w, budget, spec["labels"])
                cfg = copy.deepcopy(uni)
                cfg.overrides = dict(alloc.overrides)
                counts = dict(Counter(alloc.options[n][j].label
                                      for n, j in alloc.choice.items()))
                info = {"total_bits": alloc.total_bits, "notes": alloc.notes,
                        "choice": alloc.to_dict()["choice"]}
            rec = Recipe(config=cfg, name=name, calibration={"windows": args.calib_windows,
                                                             "window": args.calib_window})
            apply_recipe(model, rec, tok, corpus, args.seed, progress=False)
            rep = bits_report(model)
            point.update(recipe=r, allocator="uniform" if w is None else allocator_name(w),
                         weight=w, budget_bits=budget, allocation=info,
                         layers_per_option={k: counts.get(k, 0) for k in spec["labels"]},
                         bits={"quantized_bits_per_weight": rep.quantized_bits_per_weight,
                               "quantized_total_bits": sum(v["total_bits"]
                                                           for v in rep.layers.values()),
                               "model_bits_per_weight": rep.model_bits_per_weight,
                               "total_bytes": rep.total_bytes})
            assert point["bits"]["quantized_total_bits"] <= budget
        t_apply = time.perf_counter() - t0
        res = perplexity(model, tokens, args.window, progress=False,
                         model_name=setup["model"], corpus_name=corpus.name)
        point.update(perplexity=res.perplexity, mean_nll=res.mean_nll,
                     tokens_scored=res.tokens_scored, seconds_apply=t_apply,
                     seconds_eval=res.seconds)
        points.append(point)
        save()
        print(f"{name}: perplexity {res.perplexity:.2f}"
              + (f" at {point['bits']['quantized_bits_per_weight']:.4f} bits/weight "
                 f"{point['layers_per_option']}" if r else "")
              + f" ({t_apply:.0f} s apply, {res.seconds:.0f} s eval)", flush=True)
        del model
    payload = save()
    print(f"wrote {out}")
    print(table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
