"""`physkern quantize`: quantize a model's linear layers and save it."""
from __future__ import annotations

import argparse
import json

from ._common import (add_model_corpus_args, check_calib_window, int_in, positive_float,
                      seed_arg)

DEFAULT_CALIB_WINDOWS = 32
DEFAULT_CALIB_WINDOW = 1024


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe")
    g.add_argument("--method", choices=["codebook", "rtn", "gptq"], default="codebook")
    g.add_argument("--k", type=int_in(1, 65536), default=256, help="codebook entries (codebook method)")
    g.add_argument("--block-dim", type=int, choices=[1, 2, 4, 8, 16], default=4, help="weights per vector d (1,2,4,8,16)")
    g.add_argument("--scope", choices=["row", "group", "layer"], default="layer",
                   help="codebook scope: one per row, per --group-size rows, or per layer")
    g.add_argument("--group-size", type=int_in(1), default=None,
                   help="rows per codebook (scope=group); columns per scale (rtn/gptq)")
    g.add_argument("--stages", type=int_in(1, 8), default=1, help="residual codebook stages")
    g.add_argument("--scales", choices=["auto", "none", "row", "columns"], default="auto")
    g.add_argument("--scale-group", type=int_in(1), default=None, help="columns per scale (scales=columns)")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="weight k-means by E[x^2] from calibration text")
    g.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ-style error feedback over vectors (needs --calibrate)")
    g.add_argument("--bits", type=int_in(2, 8), default=4, help="bits (rtn/gptq)")
    g.add_argument("--symmetric", action="store_true", help="symmetric grid (rtn/gptq)")
    g.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    g.add_argument("--iters", type=int_in(0), default=25, help="k-means iterations")
    g.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of the calibration windows and k-means (0 .. 2**63-1)")
    g.add_argument("--layers", nargs="*", default=None,
                   help="glob patterns of layer names to quantize (default: all decoder linears)")
    g.add_argument("--recipe", default=None, metavar="FILE:NAME",
                   help="take the quantization config (per-layer overrides included) and its "
                        "fine-tuning from recipe NAME of a `physkern sweep quant` recipes file "
                        "(e.g. bench/recipes/codebook_push.json:cb_mixed3_layer_ef_ft150); the "
                        "recipe flags above are then not used, --seed is")
    g.add_argument("--calib-windows", type=int_in(1), default=DEFAULT_CALIB_WINDOWS,
                   help=f"calibration windows (default {DEFAULT_CALIB_WINDOWS})")
    g.add_argument("--calib-window", type=int_in(2), default=DEFAULT_CALIB_WINDOW,
                   help=f"tokens per calibration window (default {DEFAULT_CALIB_WINDOW})")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (codebooks, scales and norms vs the full-precision "
                             "model; indices and bits unchanged)")
    g.add_argument("--finetune-steps", type=int, default=None,
                   help="Adam steps of end-to-end fine-tuning; 0 turns it off (default: the "
                        "--recipe's own fine-tuning, else none)")
    g.add_argument("--finetune-lr", type=positive_float, default=None,
                   help="relative learning rate (default 1e-3, or the --recipe's; "
                        "physkern.finetune)")
    g.add_argument("--finetune-schedule", choices=["constant", "cosine"], default=None,
                   help="learning-rate schedule (default constant, or the --recipe's)")
    g.add_argument("--finetune-windows", type=int, default=None,
                   help="fine-tune on this many non-overlapping calibration windows (default: "
                        "the quantizer's calibration windows)")


def recipe_from_args(args: argparse.Namespace) -> tuple:
    """(quantization config, validated fine-tuning spec or None) from --recipe or the flags."""
    from ..sweeps.quant import load_recipes, parse_finetune, with_seed
    finetune = None
    if args.recipe is not None:
        path, sep, name = args.recipe.rpartition(":")
        if not sep or not path or not name:
            raise ValueError(f"--recipe must be FILE:NAME, got {args.recipe!r}")
        try:
            recipes = {r["name"]: r for r in load_recipes(path)}
        except ValueError as exc:  # name the file: a config error inside says only its key
            msg = str(exc)
            raise ValueError(msg if path in msg else f"--recipe {path}: {msg}") from exc
        if name not in recipes:
            raise ValueError(f"--recipe: no recipe {name!r} in {path}; valid: "
                             f"{', '.join(recipes)}")
        r = recipes[name]
        extra = [k for k in ("smooth", "prune", "lattice") if r[k] is not None]
        if r["config"] is None or extra:
            raise ValueError(f"--recipe {name!r}: `physkern quantize` runs a quantization config "
                             f"with optional fine-tuning; this recipe has "
                             f"{'no config' if r['config'] is None else ', '.join(extra)} "
                             "(run it with `physkern sweep quant`)")
        config, finetune = with_seed(r["config"], args.seed), r["finetune"]
    else:
        config = config_from_args(args)
    given = {k: v for k, v in (("steps", args.finetune_steps), ("lr", args.finetune_lr),
                               ("schedule", args.finetune_schedule),
                               ("windows", args.finetune_windows)) if v is not None}
    if given.get("steps") == 0:
        return config, None
    if finetune is None and given and "steps" not in given:
        raise ValueError(f"--finetune-{sorted(given)[0]} needs --finetune-steps N (no --recipe "
                         "fine-tuning to adjust)")
    if given:  # flags override the recipe's own spec key by key; the rest are the defaults
        base = {"lr": 1e-3} if finetune is None else finetune
        finetune = parse_finetune({**base, **given}, "--finetune")
    return config, finetune


def config_from_args(args: argparse.Namespace):
    from ..config import CodebookConfig, GPTQConfig, ScalarConfig
    if args.method == "codebook":
        calibrate = args.calibrate
        return CodebookConfig(k=args.k, block_dim=args.block_dim, scope=args.scope,
                              group_size=args.group_size if args.scope == "group" else None,
                              stages=args.stages, scales=args.scales, scale_group=args.scale_group,
                              calibrate=calibrate, error_feedback=args.error_feedback and calibrate,
                              iters=args.iters, seed=args.seed, layers=args.layers)
    if args.method == "rtn":
        return ScalarConfig(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                            layers=args.layers)
    return GPTQConfig(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                      act_order=args.act_order, layers=args.layers)


def calibration_for(config, tokenizer, corpus, args):
    from ..api import select_layers  # noqa: F401  (config validated before loading text)
    from ..data import calibration_windows
    needs = config.needs_calibration or any(c.needs_calibration for c in config.overrides.values())
    if not needs:
        return None
    return calibration_windows(tokenizer, corpus, args.calib_windows, args.calib_window, args.seed)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize the decoder linear layers of a model with a codebook "
                                   "(k-means) or scalar (RTN/GPTQ) recipe and save it with "
                                   "safetensors. Calibration text is the calibration half of "
                                   "--corpus (never the evaluation half).")
    add_model_corpus_args(p)
    add_recipe_args(p)
    add_finetune_args(p)
    p.add_argument("--out", required=True,
                   help="output directory (checked before any work: it must not exist, be an "
                        "empty folder, or hold a physkern model and --overwrite be given)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing physkern model at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy

    from ..api import quantize
    from ..data import calibration_windows, load_corpus
    from ..models import load_model
    from ..serialization import save_quantized, validate_output_dir
    from ..sweeps.quant import finetune_windows, run_finetune
    validate_output_dir(args.out, args.overwrite)  # before the (possibly long) work
    config, ft = recipe_from_args(args)
    model, tok = load_model(args.model, device=args.device)
    if ft is not None or config.needs_calibration or \
            any(c.needs_calibration for c in config.overrides.values()):
        check_calib_window(model, args.calib_window)  # before loading text or quantizing
    corpus = load_corpus(args.corpus)
    calib = calibration_for(config, tok, corpus, args)
    teacher, windows, tuned = None, None, None
    if ft is not None:  # windows drawn first: a bad count fails before the long work
        if calib is None and ft["windows"] is None:
            calib_ft = calibration_windows(tok, corpus, args.calib_windows, args.calib_window,
                                           args.seed)
        else:
            calib_ft = calib
        windows, source = finetune_windows(ft, tok, corpus, calib_ft, args.calib_window,
                                           args.seed)
        teacher = copy.deepcopy(model)  # the full-precision model as loaded
    report = quantize(model, config, calibration=calib)
    if ft is not None:
        tuned = run_finetune(model, teacher, windows, ft, args.seed, source)
        del teacher
    save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite,
                   extra={"recipe": config.to_dict(), "calibration": {
                       "corpus": corpus.describe(), "windows": args.calib_windows,
                       "window": args.calib_window, "seed": args.seed} if calib is not None else None,
                       "finetune": tuned, "report": report.to_dict()})
    print(report.table())
    if tuned is not None:
        print(f"\nfine-tuning ({tuned['steps']} steps, {tuned['seconds']:.0f} s): {tuned['note']}")
    bits = report.quantized_bits_per_weight, report.model_bits_per_weight
    print(f"\nquantized layers: {bits[0]:.3f} bits/weight; whole model "
          f"{bits[1]:.3f} bits/parameter; {report.total_bytes / 2**20:.2f} MiB;"
          f" {report.seconds:.0f} s\nsaved to {args.out}")
    return 0
