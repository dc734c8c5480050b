"""`physkern prune`: compare truncated-SVD pruning rules at equal parameters removed."""
from __future__ import annotations

import argparse

from ._common import (ANALYSIS_OUT_DIR, add_eval_args, add_model_corpus_args, check_output_dir,
                      resolve_window)


def register(sub) -> None:
    from ..research.prune import RULES
    p = sub.add_parser("prune", help="RG-guided truncated-SVD pruning: compare rules by perplexity",
                       description="Factorise weight types by truncated SVD (only where the two "
                                   "factors are smaller than the dense weight) under each rule "
                                   f"({', '.join(RULES)}) at equal parameters removed, and "
                                   "measure perplexity (non-overlapping windows).")
    add_model_corpus_args(p)
    add_eval_args(p)
    p.add_argument("--removed", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.10],
                   help="fractions of decoder linear parameters to remove (default 0.01 0.02 0.05 0.1)")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES,
                   help="rules to compare (default all)")
    p.add_argument("--out-dir", default=ANALYSIS_OUT_DIR,
                   help=f"folder for prune.json and prune.png (default ./{ANALYSIS_OUT_DIR}; the "
                        "committed results were written with --out-dir bench/results/analysis)")
    p.add_argument("--name", default="prune", help="file stem (default 'prune')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data import evaluation_tokens, load_corpus
    from ..models import load_model, resolve_model_name
    from ..provenance import provenance, write_json
    from ..research.prune import compare_rules, plot_comparison
    for f in args.removed:
        if not 0 < f < 1:
            raise ValueError(f"removed: fractions must be in (0, 1), got {f}")
    if args.stride is not None and args.stride != args.window:
        raise ValueError("stride: pruning comparisons use non-overlapping windows; omit --stride")
    check_output_dir(args.out_dir, "--out-dir")
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    window = resolve_window(model, args.window)
    tokens = evaluation_tokens(tok, corpus, args.tokens or None)
    result = compare_rules(model, tokens, window, args.removed, args.rules,
                           batch_size=args.batch_size, progress=False,
                           log=lambda line: print(line, flush=True))
    print(f"unpruned perplexity {result['baseline_perplexity']:.3f} "
          f"({result['tokens_scored']} tokens, windows of {window})")
    print(f"{'rule':<10}{'target':>8}{'removed':>10}{'rel.rank':>10}{'layers':>8}{'ppl':>12}")
    for r in result["runs"]:
        print(f"{r['rule']:<10}{r['target_fraction']:>8.3f}{r['removed_fraction']:>10.4f}"
              f"{r['relative_rank']:>10.3f}{r['layers_factorised']:>8}{r['perplexity']:>12.3f}")
    out = Path(args.out_dir)
    payload = {"analysis": "prune", "model": resolve_model_name(args.model),
               "corpus": corpus.describe(), "protocol": "non-overlapping windows",
               "counting": "parameters of both factors (up [out,r] + down [r,in]); a layer is "
                           "factorised only where r*(out+in) < out*in",
               **result, "provenance": provenance(args.device)}
    write_json(out / f"{args.name}.json", payload)
    plot_comparison(result, out / f"{args.name}.png")
    print(f"wrote {out / (args.name + '.json')}, {out / (args.name + '.png')}")
    return 0
