"""Greedy generation speed, batch 1, on CPU: prefill and decode tokens/s per recipe and thread count.

    python bench/bench_generate.py [--recipe NAME ...] [--threads 1 2] [--prompt-tokens 512]
                                   [--new-tokens 128] [--repeats 2] [--profile-recipe NAME]
                                   [--out bench/results/generate_cpu.json]

Model: the packaged SmolLM2-135M-Instruct. Prompt: the first --prompt-tokens tokens of the packaged
evaluation text (physkern.data.evaluation_tokens). Every run: physkern.generate.generate_timed,
greedy, exactly --new-tokens new tokens (no EOS stop), after an untimed warm-up on the same prompt;
prefill = the first forward over the prompt, decode = the later single-token steps. Each recipe's
row reports the best of --repeats runs (all runs are kept under "runs").

Recipes (quantized ones are quantized once, saved with physkern.save_quantized under
$PHYSKERN_CACHE/bench_generate/<recipe>, and loaded back from there, as a user would deploy them;
reruns skip quantization):
  fp32         the transformers model in float32
  bf16         the same model cast to bfloat16 (activations bf16 too)
  rtn4_g64     ScalarConfig(bits=4, group_size=64) on every decoder linear layer
  cb_k64_d2    CodebookConfig(k=64, block_dim=2, scope="layer", calibrate=False): plain k-means,
               no calibration, no error feedback (about a minute to quantize on a quiet machine)
  cb_k64_d2_ef CodebookConfig(k=64, block_dim=2, scope="layer", error_feedback=True), calibrated on
               32 windows of 1024 calibration tokens (seed 0); ~200 s quiet, far longer loaded
  deploy       the whole model `make run` saves ($PHYSKERN_CACHE/run/deploy: decoder K=64 d=2 EF,
               tied head/embedding K=256 d=2, norms bf16)
  deploy_direct the same model with the LUT GEMV off (kernels/codebook_gemv_lut.GEMV_LUT_MAX_M = 0):
               every decode matmul on the direct C++ op, i.e. before/after in one run
  deploy_fp32tables the same model with the LUT GEMV on exact fp32 tables
               (set_decode_tables("fp32")) instead of the default int16 tables
  deploy_bf16prefill the same model with bf16 prompt GEMMs (set_prefill_dtype(torch.bfloat16))
  cb_k64_d2_rot  cb_k64_d2 with the input Hadamard rotation on every decoder layer
  cb_k64_d2_rot_torchrot the same model with decode rows rotated by the torch form, not the C++
               op physkern::hadamard_rotate (physkern.rotation.NATIVE_MAX_ROWS = 0)
The two codebook recipes store the same format (K=64, d=2, one codebook per layer, per-row
scales) and run the same kernel with the same work per token: decode speed does not depend on
how the centroids were fitted, only quality does: cb_k64_d2 is the quick stand-in when there is
no time to quantize cb_k64_d2_ef (the default). On a loaded machine quantize with
OMP_NUM_THREADS=1: with 2 OpenMP threads competing for busy cores k-means ran ~10x slower.
The packaged weights sit on a 4-bit group-32 grid (Q4_1 GGUF), so rtn4_g64's quality here
flatters it; this bench is about speed.

Decode-path quality (--decode-ppl-tokens, default 1024): per recipe, the perplexity of the
evaluation tokens after the prompt scored in one forward (the evaluation path) and token by token
with a KV cache (the decode path, i.e. the LUT GEMV and its int16 or fp32 tables), so the table
arithmetic's cost in quality is measured beside its speed.

Profile (--profile-recipe): torch.profiler over --profile-steps decode steps after a
--profile-prompt-token prompt, at each --profile-threads count; the top ops by self CPU time, per
generated token, with their share of the profiled self CPU time.

The machine's load average (os.getloadavg) is recorded before and after: on a shared machine the
figures are only as good as the quiet they were taken in.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

RECIPES = {
    "fp32": None,
    "bf16": None,
    "rtn4_g64": {"method": "rtn", "bits": 4, "group_size": 64},
    "cb_k64_d2": {"method": "codebook", "k": 64, "block_dim": 2, "scope": "layer",
                  "calibrate": False, "error_feedback": False},
    "cb_k64_d2_ef": {"method": "codebook", "k": 64, "block_dim": 2, "scope": "layer",
                     "error_feedback": True},
    # cb_k64_d2 with the input Hadamard rotation on every decoder layer (stored as a seed)
    "cb_k64_d2_rot": {"method": "codebook", "k": 64, "block_dim": 2, "scope": "layer",
                      "calibrate": False, "error_feedback": False, "rotation": "hadamard"},
    # the whole model as `make run` saves it (physkern/presets/deploy.json, head included)
    "deploy": "preset",
    # the same saved model with the LUT GEMV turned off (GEMV_LUT_MAX_M = 0): every decode matmul
    # on the direct C++ op, as before the LUT GEMV existed: the before/after in one run
    "deploy_direct": "preset",
    # the same saved model decoding with the exact fp32-table LUT GEMV (int16 tables are default)
    "deploy_fp32tables": "preset",
    # the same saved model with bf16 prompt GEMMs (physkern.set_prefill_dtype(torch.bfloat16))
    "deploy_bf16prefill": "preset",
}
# cb_k64_d2_rot's saved model with decode rows rotated by the torch form instead of the C++ op
# physkern::hadamard_rotate (NATIVE_MAX_ROWS = 0): before/after in one run. A variant runs its base
# recipe's saved model, so it shares the base's config object rather than a copy that could drift.
RECIPES["cb_k64_d2_rot_torchrot"] = RECIPES["cb_k64_d2_rot"]
DIRECT_SUFFIX = "_direct"
FP32_TABLES_SUFFIX = "_fp32tables"
BF16_PREFILL_SUFFIX = "_bf16prefill"
TORCH_ROTATION_SUFFIX = "_torchrot"
VARIANT_SUFFIXES = (DIRECT_SUFFIX, FP32_TABLES_SUFFIX, BF16_PREFILL_SUFFIX, TORCH_ROTATION_SUFFIX)
DEFAULT_RECIPES = ["fp32", "bf16", "rtn4_g64", "cb_k64_d2_ef"]
CALIB_WINDOWS, CALIB_WINDOW, CALIB_SEED = 32, 1024, 0


def _dir_mb(path: Path) -> float:
    """Size of the weight files (*.safetensors) in a model directory, in MB (1e6 bytes)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e6


def prepare(name: str):
    """(model, tokenizer, info) for a recipe; quantized recipes come from the on-disk cache."""
    from physkern.cache import cache_dir
    from physkern.config import config_from_dict
    from physkern.models import load_model, packaged_model_dir, save_pretrained_once
    from physkern.serialization import is_quantized_dir, load_quantized, save_quantized
    from physkern.quant.accounting import bits_report

    info: dict = {"recipe": name, "config": RECIPES[name]}
    base = name   # a variant (VARIANT_SUFFIXES) runs its base recipe's saved model
    for suffix in VARIANT_SUFFIXES:
        base = base.removesuffix(suffix)
    if isinstance(RECIPES[name], Path):      # --model-dir NAME=DIR: a model saved elsewhere
        out = RECIPES[name]
        if not is_quantized_dir(out):
            raise SystemExit(f"--model-dir {name}={out}: not a physkern model directory")
        model, tok = load_quantized(out)
        import json
        meta = json.loads((out / "physkern.json").read_text())
        info.update(config=meta.get("recipe"), saved_dir=str(out), file_mb=_dir_mb(out))
    elif RECIPES[name] == "preset":
        out = cache_dir() / "run" / base
        if not is_quantized_dir(out):
            raise SystemExit(f"--recipe {name}: no saved model at {out}; run `make run` first "
                             "(it saves the deploy model there)")
        model, tok = load_quantized(out)
        import json
        meta = json.loads((out / "physkern.json").read_text())
        info.update(config=meta.get("recipe"), saved_dir=str(out), file_mb=_dir_mb(out))
    elif RECIPES[name] is None:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model, tok = load_model(None, dtype=dtype)
        src = packaged_model_dir()
        if name == "fp32":
            info["saved_dir"], info["file_mb"] = str(src), _dir_mb(src)
        else:
            out = cache_dir() / "bench_generate" / name
            if not (out / "config.json").exists():
                save_pretrained_once(model, tok, out)
            info["saved_dir"], info["file_mb"] = str(out), _dir_mb(out)
    else:
        cfg = config_from_dict(RECIPES[name])
        out = cache_dir() / "bench_generate" / base
        if is_quantized_dir(out):
            info["quantized_now"] = False
        else:
            from physkern.api import quantize
            from physkern.data import calibration_windows, load_corpus
            model, tok = load_model(None)
            calib = None
            if cfg.needs_calibration:
                calib = calibration_windows(tok, load_corpus(), CALIB_WINDOWS, CALIB_WINDOW,
                                            seed=CALIB_SEED)
            t0 = time.perf_counter()
            quantize(model, cfg, calibration=calib)
            extra = {"recipe": cfg.to_dict(), "quantize_seconds": time.perf_counter() - t0,
                     "calibration": None if calib is None else {
                         "windows": CALIB_WINDOWS, "window": CALIB_WINDOW, "seed": CALIB_SEED}}
            save_quantized(model, out, tokenizer=tok, extra=extra)
            info["quantized_now"] = True
            del model
        model, tok = load_quantized(out)
        import json
        meta = json.loads((out / "physkern.json").read_text())
        info.update(config=cfg.to_dict(), saved_dir=str(out), file_mb=_dir_mb(out),
                    calibration=meta.get("calibration"),
                    quantize_seconds=meta.get("quantize_seconds"))
    rep = bits_report(model)
    info["bits"] = {"quantized_bits_per_weight": rep.quantized_bits_per_weight if rep.layers
                    else None,
                    "model_bits_per_weight": rep.model_bits_per_weight,
                    "total_bytes": rep.total_bytes, "quantized_layers": len(rep.layers)}
    return model.eval(), tok, info


def decode_path(name: str) -> dict:
    """How a recipe's decode runs: the LUT GEMV on or off and which tables it uses."""
    from physkern.kernels import codebook_gemv_lut as lut
    return {"lut_gemv": not name.endswith(DIRECT_SUFFIX),
            "decode_tables": "fp32" if name.endswith(FP32_TABLES_SUFFIX) else lut.decode_tables(),
            "prefill_dtype": "bfloat16" if name.endswith(BF16_PREFILL_SUFFIX) else "float32",
            "rotation_op": not name.endswith(TORCH_ROTATION_SUFFIX)}


@contextlib.contextmanager
def decode_setting(name: str):
    """Run the body with the recipe's decode path (decode_path): the small-M LUT GEMV allowed
    (as shipped) or off (direct C++ op only), int16 or fp32 tables, the rotation op on or off."""
    from physkern import ops, rotation
    from physkern.kernels import codebook_gemv_lut as lut
    path = decode_path(name)
    old_m, old_tables, old_prefill = lut.GEMV_LUT_MAX_M, lut.decode_tables(), ops.prefill_dtype()
    old_rot = rotation.NATIVE_MAX_ROWS
    rotation.NATIVE_MAX_ROWS = old_rot if path["rotation_op"] else 0
    lut.GEMV_LUT_MAX_M = old_m if path["lut_gemv"] else 0
    lut.set_decode_tables(path["decode_tables"])
    ops.set_prefill_dtype(torch.bfloat16 if path["prefill_dtype"] == "bfloat16" else None)
    try:
        yield
    finally:
        lut.GEMV_LUT_MAX_M = old_m
        lut.set_decode_tables(old_tables)
        ops.set_prefill_dtype(old_prefill)
        rotation.NATIVE_MAX_ROWS = old_rot


def decode_path_perplexity(model, ids: torch.Tensor, threads: int) -> dict:
    """Perplexity of ids [1, n] scored two ways: one forward over all n tokens (the prefill /
    evaluation path: long x, dequantize + GEMM) and token by token with a KV cache (the decode
    path: one-row x, the LUT GEMVs with their tables). Same text and model, so the difference is
    what the decode kernels' arithmetic costs."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    from physkern.generate import num_threads
    with torch.no_grad(), num_threads(threads):  # as generate_timed
        full = model(input_ids=ids).logits[0, :-1].float()
        nll_full = F.cross_entropy(full, ids[0, 1:]).item()
        cache = DynamicCache(config=model.config)
        steps = []
        for i in range(ids.shape[1] - 1):
            out = model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
            steps.append(out.logits[0, -1].float())
        nll_dec = F.cross_entropy(torch.stack(steps), ids[0, 1:]).item()
    import math
    return {"tokens_scored": int(ids.shape[1] - 1), "perplexity_one_forward": math.exp(nll_full),
            "perplexity_token_by_token": math.exp(nll_dec)}


def profile_decode(model, prompt_ids: torch.Tensor, steps: int, threads: int,
                   top: int = 15) -> dict:
    """torch.profiler over `steps` greedy decode steps after the prompt's prefill."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from physkern.generate import generate_timed, num_threads
    generate_timed(model, None, prompt_ids, 4, stop_at_eos=False, threads=threads)  # warm-up
    with torch.no_grad(), num_threads(threads):  # as generate_timed
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = torch.tensor([[int(out.logits[0, -1].argmax())]])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
                token = torch.tensor([[int(out.logits[0, -1].argmax())]])
            wall = time.perf_counter() - t0
    events = list(prof.key_averages())
    total_self = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [{"op": e.key, "self_cpu_ms_per_token": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_token": e.count / steps,
             "self_cpu_us_per_call": e.self_cpu_time_total / max(e.count, 1),
             "share": e.self_cpu_time_total / total_self} for e in events[:top]]
    return {"threads": threads, "prompt_tokens": int(prompt_ids.shape[1]), "steps": steps,
            "wall_ms_per_token_under_profiler": 1e3 * wall / steps,
            "self_cpu_ms_per_token_all_ops": total_self / 1e3 / steps, "top_ops": rows,
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-recipe", default="cb_k64_d2_ef",
                    help="recipe to profile (must be among --recipe); 'none' to skip")
    ap.add_argument("--profile-threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--profile-prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-ppl-tokens", type=int, default=1024,
                    help="evaluation tokens scored token by token (decode path) and in one "
                         "forward, per recipe; 0 to skip")
    ap.add_argument("--model-dir", nargs="+", default=[], metavar="NAME=DIR",
                    help="also time models saved elsewhere (e.g. by `physkern sweep quant "
                         "--save-models`), under NAME")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_cpu.json"))
    args = ap.parse_args(argv)
    for spec in args.model_dir:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in RECIPES:
            raise SystemExit(f"--model-dir: expected NAME=DIR with a new NAME (not one of "
                             f"{sorted(RECIPES)}), got {spec!r}")
        RECIPES[name] = Path(path)
        args.recipe.append(name)
    if args.decode_ppl_tokens < 0:
        raise SystemExit("--decode-ppl-tokens must be >= 0")
    for name in ("prompt_tokens", "new_tokens", "repeats", "profile_steps",
                 "profile_prompt_tokens"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if any(t <= 0 for t in args.threads + args.profile_threads):
        raise SystemExit("--threads / --profile-threads must be positive")

    from physkern.data import evaluation_tokens, load_corpus
    from physkern.generate import generate_timed

    load_before = os.getloadavg()
    corpus = load_corpus()
    results, profiles, fp32_tokens, quality = [], [], None, []
    models = {name: prepare(name) for name in args.recipe}  # quantize/save once, keep loaded
    prompt = evaluation_tokens(models[args.recipe[0]][1], corpus, args.prompt_tokens)
    prompt = prompt.reshape(1, -1)
    if args.profile_recipe in models:
        model = models[args.profile_recipe][0]  # profiled first: short, never cut off
        for threads in args.profile_threads:
            p = profile_decode(model, prompt[:, :args.profile_prompt_tokens],
                               args.profile_steps, threads)
            profiles.append({"recipe": args.profile_recipe, **p})
            print(f"profile {args.profile_recipe}, {threads} threads:\n{p['table']}", flush=True)
            _write(args, corpus, load_before, results, profiles, fp32_tokens, quality)
    if args.decode_ppl_tokens:
        # Text after the prompt (same evaluation part), so the two measurements do not overlap.
        text = evaluation_tokens(models[args.recipe[0]][1], corpus,
                                 args.prompt_tokens + args.decode_ppl_tokens)
        ids = text[args.prompt_tokens:].reshape(1, -1)
        for name in args.recipe:
            with decode_setting(name):
                q = decode_path_perplexity(models[name][0], ids, max(args.threads))
            quality.append({"recipe": name, **decode_path(name), **q})
            print(f"{name:14s} perplexity on {q['tokens_scored']} tokens: one forward "
                  f"{q['perplexity_one_forward']:.3f}, token by token "
                  f"{q['perplexity_token_by_token']:.3f}", flush=True)
            _write(args, corpus, load_before, results, profiles, fp32_tokens, quality)
    # Thread counts outer, recipes inner: a run cut short still has every recipe at 1 thread.
    for threads in args.threads:
        for name in args.recipe:
            model, tok, info = models[name]
            runs = []
            for _ in range(args.repeats):
                with decode_setting(name):
                    r = generate_timed(model, tok, prompt, args.new_tokens, stop_at_eos=False,
                                       threads=threads, warmup=True)
                runs.append({**r.to_dict(), "loadavg_1min": os.getloadavg()[0]})
            best = min(runs, key=lambda d: d["decode_seconds"])
            row = {**info, "threads": threads, **decode_path(name),
                   "prompt_tokens": best["prompt_tokens"],
                   "new_tokens": best["new_tokens"],
                   "prefill_tokens_per_second": max(d["prefill_tokens_per_second"] for d in runs),
                   "decode_tokens_per_second": best["decode_tokens_per_second"],
                   "decode_ms_per_token": best["decode_ms_per_token"],
                   "token_ids": best["token_ids"], "text_head": best["text"][:160],
                   "runs": [{k: v for k, v in d.items() if k not in ("text", "token_ids")}
                            for d in runs]}
            results.append(row)
            if name == "fp32" and fp32_tokens is None:
                fp32_tokens = row["token_ids"]
            print(f"{name:14s} threads {threads}: prefill {row['prefill_tokens_per_second']:7.1f} "
                  f"tok/s, decode {row['decode_tokens_per_second']:6.2f} tok/s "
                  f"({row['decode_ms_per_token']:.1f} ms/token), {info['file_mb']:.1f} MB, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            _write(args, corpus, load_before, results, profiles, fp32_tokens, quality)  # partial too
    return 0


def _write(args, corpus, load_before, results, profiles, fp32_tokens, quality) -> None:
    from physkern.models import resolve_model_name
    from physkern.provenance import provenance, write_json
    for row in results:  # greedy agreement with FP32: how many leading new tokens are equal
        row["leading_tokens_equal_to_fp32"] = None if fp32_tokens is None else next(
            (i for i, (a, b) in enumerate(zip(row["token_ids"], fp32_tokens)) if a != b),
            min(len(row["token_ids"]), len(fp32_tokens)))
    payload = {
        "benchmark": "greedy generation, batch 1, CPU (physkern.generate.generate_timed)",
        "model": resolve_model_name(None), "corpus": corpus.describe(),
        "prompt": f"first {args.prompt_tokens} tokens of the evaluation text",
        "protocol": {"batch": 1, "greedy": True, "new_tokens": args.new_tokens,
                     "stop_at_eos": False, "warmup": "one untimed 2-token run on the same prompt",
                     "repeats": args.repeats, "reported": "best of repeats (min decode time; "
                     "max prefill rate)",
                     "prefill": "first forward over the prompt + argmax",
                     "decode": "each later single-token forward + argmax (new_tokens - 1 steps)"},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "note": "measured on a shared 2-core machine under load from other jobs; see loadavg",
        "results": results, "profiles": profiles,
        "decode_path_quality": {"text": f"the {args.decode_ppl_tokens} evaluation tokens after "
                                        "the prompt", "rows": quality},
        **provenance("cpu"),
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
