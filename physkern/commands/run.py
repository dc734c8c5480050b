"""`physkern run` (what `make run` calls): quantize the packaged model with the default recipe and
print FP vs quantized perplexity and true bits/weight."""
from __future__ import annotations

import argparse
import copy
import time

import torch

from ._common import (add_eval_args, add_model_corpus_args, check_calib_window,
                      check_output_file, int_in, resolve_window, seed_arg)
from .quantize import DEFAULT_CALIB_WINDOW, DEFAULT_CALIB_WINDOWS


def default_recipe():
    """The recipe `make run` uses, the "fast" preset's config (physkern/presets/fast.json): one
    32-entry codebook of 2-dim vectors per layer, per-row fp16 scales, calibrated with GPTQ-style
    error feedback (2.53 true bits/weight on the packaged model's quantized layers)."""
    from ..recipe import load_preset
    return load_preset("fast").config


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: quantize the default model, print perplexity "
                                   "and true bits/weight",
                       description="Quantize the packaged SmolLM2-135M with the default codebook "
                                   "recipe (calibrated on the first half of the packaged "
                                   "Wikipedia articles) and compare its perplexity on the second "
                                   "half with the FP32 model's.")
    add_model_corpus_args(p)
    add_eval_args(p)
    p.add_argument("--calib-windows", type=int_in(1), default=DEFAULT_CALIB_WINDOWS)
    p.add_argument("--calib-window", type=int_in(2), default=DEFAULT_CALIB_WINDOW)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--json", default=None, help="write the results JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api import quantize
    from ..data import calibration_windows, evaluation_tokens, load_corpus
    from ..eval import perplexity
    from ..models import load_model, resolve_model_name
    from ..provenance import provenance, write_json
    from ..quant.accounting import bits_report
    t0 = time.perf_counter()
    if args.json:
        check_output_file(args.json, "--json")  # before the work, not after
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    window = resolve_window(model, args.window)
    check_calib_window(model, args.calib_window)
    tokens = evaluation_tokens(tok, corpus, args.tokens or None)
    name = resolve_model_name(args.model)
    print(f"model {name}\nevaluation: {corpus.name}, second half of the documents, "
          f"{tokens.numel()} tokens, windows of {window}, stride {args.stride or window}")
    fp = perplexity(model, tokens, window, args.stride, args.batch_size, model_name=name,
                    corpus_name=corpus.name)
    print(f"FP32 perplexity {fp.perplexity:.3f}")
    fp_bits = bits_report(model).model_bits_per_weight  # every tensor at its stored width
    fp_weight_bits = float(torch.finfo(next(model.parameters()).dtype).bits)
    recipe = default_recipe()
    calib = calibration_windows(tok, corpus, args.calib_windows, args.calib_window, args.seed)
    print(f"quantizing with {recipe}\ncalibration: {args.calib_windows} windows of "
          f"{args.calib_window} tokens from the first half of the documents (seed {args.seed})")
    report = quantize(model, recipe, calibration=calib)
    q = perplexity(model, tokens, window, args.stride, args.batch_size, model_name=name,
                   corpus_name=corpus.name)
    bits = bits_report(model)
    first = next(iter(bits.layers.values()))
    print(f"\n{'':28s}{'perplexity':>12s}{'bits/weight (quantized layers)':>33s}"
          f"{'bits/param (whole model)':>27s}")
    print(f"{'FP32':28s}{fp.perplexity:12.3f}{fp_weight_bits:33.3f}{fp_bits:27.3f}")
    print(f"{'codebook (this recipe)':28s}{q.perplexity:12.3f}"
          f"{bits.quantized_bits_per_weight:33.3f}{bits.model_bits_per_weight:27.3f}")
    print(f"\nseeds' formula log2(K)/d = {first['seeds_formula_bits_per_weight']:.3f} bits/weight "
          "(indices only: leaves out codebooks and scales, NOT the true figure)\n"
          f"whole model stores {bits.total_bytes / 2**20:.2f} MiB (embeddings and norms in fp32); "
          f"quantization took {report.seconds:.0f} s; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        write_json(args.json, {
            "model": name, "corpus": corpus.describe(), "recipe": recipe.to_dict(),
            "calibration": {"windows": args.calib_windows, "window": args.calib_window,
                            "seed": args.seed, "tokens": int(calib.numel())},
            "fp": fp.to_dict(), "quantized": q.to_dict(), "bits": {
                "quantized_bits_per_weight": bits.quantized_bits_per_weight,
                "model_bits_per_weight": bits.model_bits_per_weight,
                "total_bytes": bits.total_bytes,
                "seeds_formula_bits_per_weight": first["seeds_formula_bits_per_weight"]},
            "quantization_seconds": report.seconds, **provenance(args.device)})
    return 0
