"""`physkern sweep KIND ...`: parameter sweeps. The command line of every kind lives here; the
sweeps themselves are plain functions in physkern/sweeps/ (no argparse there):

    sweep quant   physkern.sweeps.quant.run   perplexity vs true bits for a recipes file
    sweep plot    physkern.sweeps.plot.replot redraw `sweep quant` PNGs from their JSON
    sweep xi      physkern.sweeps.xi.run      lattice attention perplexity and work vs xi
"""
from __future__ import annotations

import argparse
import math

from ..sweeps import plot as plot_sweep
from ..sweeps import quant as quant_sweep
from ..sweeps import xi as xi_sweep
from ._common import add_eval_args, add_model_corpus_args


def register(sub) -> None:
    p = sub.add_parser("sweep", help="sweep a parameter and record perplexity / work per point",
                       description="Sweeps; each kind writes a JSON (with provenance) and a plot.")
    kinds = p.add_subparsers(dest="sweep_kind", metavar="KIND")
    # Alphabetical, as the kinds were listed when they were discovered from physkern/sweeps/.
    _register_plot(kinds)
    _register_quant(kinds)
    _register_xi(kinds)

    def no_kind(args) -> int:
        p.print_help()
        return 2
    p.set_defaults(func=no_kind)


def _eval_kwargs(args: argparse.Namespace) -> dict:
    """The model / corpus / evaluation arguments (_common's) as the sweeps' keyword arguments."""
    return dict(model=args.model, corpus=args.corpus, device=args.device, tokens=args.tokens,
                window=args.window, stride=args.stride, batch_size=args.batch_size)


# ---- sweep quant ------------------------------------------------------------------------------

def _evaluating_kind(kinds, name: str, help: str, description: str, **eval_kw):
    """A sweep kind's parser with the model / corpus / evaluation arguments every such kind
    takes (_common's)."""
    p = kinds.add_parser(name, help=help, description=description)
    add_model_corpus_args(p)
    add_eval_args(p, **eval_kw)
    return p


def _register_quant(kinds) -> None:
    p = _evaluating_kind(
        kinds, "quant", "perplexity vs true bits/weight for a list of quantization recipes",
        "Quantizes the model with every recipe (and seed) of a JSON recipes file and records "
        "perplexity on the evaluation text and true bits (accounting). Resumable: points "
        "already in the output JSON are skipped.", tokens_default=quant_sweep.DEFAULT_TOKENS)
    p.add_argument("--recipes", required=True,
                   help="JSON list of {name, config, smooth, prune, finetune, lattice, seeds, "
                        "label, note}")
    p.add_argument("--name", default=None,
                   help="results name: writes <out-dir>/<name>.json and .png "
                        "(default: the recipes file's stem)")
    p.add_argument("--out-dir", default=quant_sweep.DEFAULT_OUT_DIR,
                   help=f"default {quant_sweep.DEFAULT_OUT_DIR}")
    p.add_argument("--only", nargs="*", default=None, help="run only these recipe names")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-window", type=int, default=None,
                   help="tokens per calibration window (default: the evaluation window)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="override the seeds of every random recipe (e.g. --seeds 0 for a quick "
                        "single-seed pass); deterministic recipes still run once")
    p.add_argument("--fresh", action="store_true",
                   help="start over: move an existing output JSON aside to "
                        "<name>.json.bak-<UTC timestamp> (kept, not deleted) instead of resuming "
                        "from it")
    p.add_argument("--also-eval", nargs="+", default=None, metavar="CORPUS",
                   help="also score every new point on the evaluation part of these corpora "
                        "(e.g. c4: text outside the calibration domain), same tokens and "
                        "windows; recorded per point under other_corpora")
    p.add_argument("--also-eval-tokens", type=int, default=None, metavar="N",
                   help="score the --also-eval corpora on N tokens instead of --tokens (same "
                        "windows; 0 = all of their evaluation part), e.g. when it is shorter")
    p.add_argument("--calib-corpus", default=None, metavar="CORPUS",
                   help="calibrate and fine-tune on this corpus's calibration part (default: "
                        "--corpus), e.g. a mixture wiki+code+multilingual+technical")
    p.add_argument("--save-models", default=None, metavar="DIR",
                   help="save every new quantized point's model to DIR/<recipe>-seed<seed> "
                        "(e.g. for `physkern generate` or bench_generate.py --model-dir)")
    p.set_defaults(func=_run_quant)


def _run_quant(args: argparse.Namespace) -> int:
    quant_sweep.run(args.recipes, name=args.name, out_dir=args.out_dir, only=args.only,
                    calib_windows=args.calib_windows, calib_window=args.calib_window,
                    seeds=args.seeds, fresh=args.fresh, also_eval=args.also_eval,
                    also_eval_tokens=args.also_eval_tokens,
                    save_models=args.save_models, calib_corpus=args.calib_corpus,
                    **_eval_kwargs(args))
    return 0


# ---- sweep plot -------------------------------------------------------------------------------

def _register_plot(kinds) -> None:
    """`physkern sweep plot RESULTS.json ...`: redraw sweep PNGs from their JSON."""
    p = kinds.add_parser("plot", help="redraw `sweep quant` PNGs from their results JSON",
                         description="Redraws the PNG of `physkern sweep quant` results from the "
                                     "JSON alone (nothing is re-run).")
    p.add_argument("results", nargs="+", help="results JSON written by `physkern sweep quant`")
    p.add_argument("--out", default=None,
                   help="PNG path (one results file only; default: the JSON's path with .png)")
    p.set_defaults(func=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    if args.out and len(args.results) > 1:
        raise ValueError("--out takes one results file; got "
                         f"{len(args.results)}: {args.results}")
    for r in args.results:
        print(f"wrote {plot_sweep.replot(r, args.out)}")
    return 0


# ---- sweep xi ---------------------------------------------------------------------------------

def parse_xi(text: str) -> float:
    """argparse type of one --xi value: a positive number or 'inf'."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"xi must be a positive number or 'inf', got {text!r}")
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"xi must be > 0 (or 'inf'), got {text!r}")
    return value


def _register_xi(kinds) -> None:
    p = _evaluating_kind(
        kinds, "xi", "perplexity and attention work vs lattice correlation length xi",
        "Runs the model with lattice attention (bias -(i-j)/xi) for each xi and records "
        "perplexity and the fraction of key blocks visited under the derived truncation "
        "distance. Offline on the packaged model and text by default.")
    p.add_argument("--xi", nargs="+", type=parse_xi,
                   default=[float(x) for x in xi_sweep.DEFAULT_XI],
                   help="correlation lengths (tokens), 'inf' = plain causal "
                        f"(default: {' '.join(xi_sweep.DEFAULT_XI)})")
    p.add_argument("--eps", type=float, default=1e-3,
                   help="skipped softmax mass bound per query row (default 1e-3)")
    p.add_argument("--exact", action="store_true", help="no skipping (eps = None)")
    p.add_argument("--score-range", type=float, default=None,
                   help="assert a bound on each row's score range instead of the provable "
                        "data-derived one (then the eps guarantee is the caller's assumption)")
    p.add_argument("--no-oracle", action="store_true",
                   help="skip counting the tiles exact attention weights would need (O(n^2))")
    p.add_argument("--json", default=xi_sweep.DEFAULT_JSON,
                   help=f"result JSON (default {xi_sweep.DEFAULT_JSON})")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--markdown", default=None,
                   help="also write a markdown table (ours beside the seeds' GPT-2 numbers)")
    p.set_defaults(func=_run_xi)


def _run_xi(args: argparse.Namespace) -> int:
    xi_sweep.run(xi=args.xi, eps=None if args.exact else args.eps, score_range=args.score_range,
                 oracle=not args.no_oracle, json_path=args.json, plot_path=args.plot,
                 markdown=args.markdown, **_eval_kwargs(args))
    return 0
