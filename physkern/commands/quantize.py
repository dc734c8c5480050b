"""`physkern quantize`: quantize a model's linear layers and save it.

The recipe comes from --preset NAME, --recipe FILE:NAME or the per-flag recipe (exclusive), with
--embedding, --dense-dtype, --calib-* and --finetune-* on top; physkern.recipe.apply_recipe
applies it."""
from __future__ import annotations

import argparse
import math

from ._common import (add_model_corpus_args, check_calib_window, int_in, positive_float,
                      seed_arg)

DEFAULT_CALIB_WINDOWS = 32     # = physkern.recipe.DEFAULT_CALIBRATION
DEFAULT_CALIB_WINDOW = 1024
# the per-flag recipe's flags (config fields of the same name); --seed and --calib-* are not in
# it: they apply to --preset and --recipe too
CONFIG_FLAGS = ("k", "block_dim", "scope", "group_size", "stages", "scales", "scale_group",
                "calibrate", "error_feedback", "bits", "symmetric", "act_order", "iters",
                "layers", "share", "rotation", "outliers")


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    from ..methods import CONFIG_CLASSES
    from ..recipe import preset_names
    presets = ", ".join(preset_names())
    g = p.add_argument_group("recipe (one of: --preset NAME, --recipe FILE:NAME, or the flags "
                             "below with --method)")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help=f"a recipe shipped with physkern (physkern/presets/NAME.json: "
                        f"{presets}); its fine-tuning and calibration included; "
                        "exclusive with --recipe and the config flags; --seed, --calib-*, "
                        "--finetune-*, --embedding and --dense-dtype apply")
    g.add_argument("--method", choices=list(CONFIG_CLASSES), default="codebook")
    g.add_argument("--k", type=int_in(1, 65536), default=256, help="codebook entries (codebook method)")
    g.add_argument("--block-dim", type=int, choices=[1, 2, 4, 8, 16], default=4, help="weights per vector d (1,2,4,8,16)")
    g.add_argument("--scope", choices=["row", "group", "layer", "shared"], default="layer",
                   help="codebook scope: one per row, per --group-size rows, per layer, or "
                        "shared across layers (--share)")
    g.add_argument("--share", choices=["type", "model"], default=None,
                   help="scope=shared: one codebook per layer type (e.g. every mlp.gate_proj) "
                        "or one for the whole model")
    g.add_argument("--rotation", choices=["none", "hadamard"], default="none",
                   help="seeded block-Hadamard input rotation (stored as its seed, no bits)")
    g.add_argument("--outliers", type=float, default=0.0,
                   help="fraction of each row's weights kept as exact sparse corrections "
                        "(int16 column + fp16 value each, counted in bits); default 0")
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
                   help="take the quantization config (per-layer overrides included), its "
                        "fine-tuning, head/embedding config, dense dtype and calibration from "
                        "recipe NAME of a recipes file (e.g. bench/recipes/codebook_push.json:"
                        "cb_mixed3_layer_ef_ft150); the config flags above are then not used, "
                        "--seed is")
    g.add_argument("--embedding", default=None, metavar="SPEC",
                   help="also quantize the output head and (tied) input embedding: METHOD or "
                        "METHOD:key=value,... (config fields, e.g. rtn:bits=4,group_size=64 or "
                        "codebook:k=256,block_dim=4,scope=layer) or a JSON config object; "
                        "default: the recipe's (presets: none)")
    g.add_argument("--dense-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="store and count the unquantized tensors (norms, biases, a dense "
                        "embedding/head) at this width; float32 = as loaded (default: the "
                        "recipe's, else float32)")
    g.add_argument("--calib-windows", type=int_in(1), default=None,
                   help=f"calibration windows (default: the recipe's, else "
                        f"{DEFAULT_CALIB_WINDOWS})")
    g.add_argument("--calib-window", type=int_in(2), default=None,
                   help=f"tokens per calibration window (default: the recipe's, else "
                        f"{DEFAULT_CALIB_WINDOW})")
    p.set_defaults(_config_flag_defaults={f: p.get_default(f) for f in CONFIG_FLAGS + ("method",)})


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (codebooks, scales and norms vs the full-precision "
                             "model; indices and bits unchanged)")
    g.add_argument("--finetune-steps", type=int, default=None,
                   help="Adam steps of end-to-end fine-tuning; 0 turns it off (default: the "
                        "recipe's own fine-tuning, else none)")
    g.add_argument("--finetune-lr", type=positive_float, default=None,
                   help="relative learning rate (default 1e-3, or the recipe's; "
                        "physkern.recipe.FINETUNE_DEFAULTS)")
    g.add_argument("--finetune-schedule", choices=["constant", "cosine"], default=None,
                   help="learning-rate schedule (default constant, or the recipe's)")
    g.add_argument("--finetune-windows", type=int, default=None,
                   help="fine-tune on this many non-overlapping calibration windows (default: "
                        "the quantizer's calibration windows)")
    g.add_argument("--finetune-code-update-every", type=int, default=None,
                   help="also re-assign codes (indices) before every Nth step, PV-tuning style "
                        "(physkern.quant.code_update; same bits; default 0 = off, or the recipe's)")
    g.add_argument("--finetune-code-update-fraction", type=float, default=None,
                   help="share of each layer's block columns a code update visits, in (0, 1] "
                        "(default 0.1, or the recipe's)")
    g.add_argument("--finetune-code-update-objective", default=None,
                   choices=("layer", "linearized"),
                   help="what code updates lower: each layer's output error (layer, default) or "
                        "the end-to-end loss linearised at the current codes (linearized)")
    g.add_argument("--finetune-code-update-step", type=float, default=None,
                   help="linearized code updates: the move relative to |Q| (default 0.05)")


def _given_config_flags(args: argparse.Namespace) -> list[str]:
    defaults = getattr(args, "_config_flag_defaults", {})
    return ["--" + f.replace("_", "-") for f, d in defaults.items() if getattr(args, f, d) != d]


def embedding_from_spec(spec: str):
    """--embedding SPEC -> a config: METHOD, METHOD:key=value,..., or a JSON config object."""
    import json as _json

    from ..config import config_from_dict
    text = spec.strip()
    if text.startswith("{"):
        try:
            d = _json.loads(text)
        except _json.JSONDecodeError as exc:
            raise ValueError(f"--embedding: not a valid JSON object: {exc}") from exc
    else:
        method, _, rest = text.partition(":")
        d = {"method": method}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"--embedding: expected key=value, got {item!r} (e.g. "
                                 "rtn:bits=4,group_size=64)")
            try:
                d[key.strip()] = _json.loads(value)
            except _json.JSONDecodeError:
                d[key.strip()] = value  # a bare string (scope=layer)
    try:
        return config_from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--embedding: {exc}") from exc


def recipe_from_args(args: argparse.Namespace):
    """The physkern.recipe.Recipe `physkern quantize` applies: from --preset, --recipe or the
    flags, then --embedding, --dense-dtype, --calib-* and --finetune-* on top."""
    from dataclasses import replace

    from ..recipe import Recipe, load_preset, load_recipe, parse_finetune
    if args.preset is not None and args.recipe is not None:
        raise ValueError("--preset and --recipe are exclusive: give one")
    source = ("--preset" if args.preset is not None else
              "--recipe" if args.recipe is not None else None)
    if args.preset is not None:  # (--recipe keeps its old behaviour: the flags are unused)
        flags = _given_config_flags(args)
        if flags:
            raise ValueError(f"{source} and the per-flag recipe are exclusive: drop "
                             f"{', '.join(flags)} (or write them into a recipe file)")
    if args.preset is not None:
        recipe = load_preset(args.preset)
    elif args.recipe is not None:
        path, sep, name = args.recipe.rpartition(":")
        if not sep or not path or not name:
            raise ValueError(f"--recipe must be FILE:NAME, got {args.recipe!r}")
        try:
            recipe = load_recipe(path, name)
        except ValueError as exc:  # name the file: a config error inside says only its key
            msg = str(exc)
            raise ValueError(msg if path in msg else f"--recipe {path}: {msg}") from exc
    else:
        recipe = Recipe(config=config_from_args(args), name="flags")
    if source is not None:
        extra = [k for k in ("smooth", "prune", "lattice") if recipe[k] is not None]
        if recipe.config is None and recipe.factorize is None:
            extra = ["no config or factorize"]
        if extra:
            raise ValueError(f"{source} {recipe.name!r}: `physkern quantize` runs a quantization "
                             f"config and/or a factorization with optional fine-tuning; this "
                             f"recipe has {', '.join(extra)} (run it with `physkern sweep quant`)")
    changes = {}
    if args.embedding is not None:
        changes["embedding"] = embedding_from_spec(args.embedding)
    if args.dense_dtype is not None:
        changes["dense_dtype"] = None if args.dense_dtype == "float32" else args.dense_dtype
    cal = recipe.calibration_or_default()
    changes["calibration"] = {
        "windows": args.calib_windows if args.calib_windows is not None else cal["windows"],
        "window": args.calib_window if args.calib_window is not None else cal["window"]}
    given = {k: v for k, v in (("steps", args.finetune_steps), ("lr", args.finetune_lr),
                               ("schedule", args.finetune_schedule),
                               ("windows", args.finetune_windows),
                               ("code_update_every", args.finetune_code_update_every),
                               ("code_update_fraction", args.finetune_code_update_fraction),
                               ("code_update_objective", args.finetune_code_update_objective),
                               ("code_update_step", args.finetune_code_update_step))
             if v is not None}
    if given.get("steps") == 0:
        changes["finetune"] = None
    elif given:
        if recipe.finetune is None and "steps" not in given:
            raise ValueError(f"--finetune-{sorted(given)[0].replace('_', '-')} needs "
                             "--finetune-steps N (no "
                             "recipe fine-tuning to adjust)")
        # flags override the recipe's own spec key by key; the rest are the defaults
        changes["finetune"] = parse_finetune({**(recipe.finetune or {}), **given}, "--finetune")
    return replace(recipe, **changes)


def config_from_args(args: argparse.Namespace):
    """The per-flag recipe: the --method's config class (physkern.methods registry) built from
    the flags that are fields of it."""
    from dataclasses import fields

    from ..methods import config_class
    cls = config_class(args.method)
    names = {f.name for f in fields(cls)}
    kw = {f: getattr(args, f) for f in CONFIG_FLAGS if f in names}
    if "seed" in names:
        kw["seed"] = args.seed
    if "scope" in kw and kw["scope"] != "group":
        kw["group_size"] = None  # --group-size means rows per codebook only with scope=group
    if "error_feedback" in kw:
        kw["error_feedback"] = kw["error_feedback"] and kw.get("calibrate", True)
    return cls(**kw)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize the decoder linear layers of a model with a recipe "
                                   "(physkern.recipe): a shipped preset (--preset NAME), a "
                                   "recipe of a file (--recipe FILE:NAME) or the "
                                   "flags below; optionally the output head and embedding "
                                   "(--embedding) and 16-bit dense tensors (--dense-dtype). "
                                   "Saves with safetensors; physkern.json records the whole "
                                   "recipe. Calibration text is the calibration half of "
                                   "--corpus (never the evaluation half).")
    add_model_corpus_args(p)
    add_recipe_args(p)
    add_finetune_args(p)
    p.add_argument("--out", required=True,
                   help="output directory (checked before any work: it must not exist, be an "
                        "empty folder, or hold a physkern model and --overwrite be given)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing physkern model at --out")
    g = p.add_argument_group("memory (streaming: a local safetensors checkpoint is read one "
                             "transformer block at a time, physkern.streaming; torchrun "
                             "--nproc-per-node N splits each block's layers across N ranks)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype the weights are loaded and calibrated in (statistics are "
                        "accumulated in fp32/fp64 whatever it is; default fp32)")
    g.add_argument("--in-memory", action="store_true",
                   help="load the whole model instead of streaming it (the path taken anyway "
                        "for hub names, GGUF files and recipes with fine-tuning)")
    g.add_argument("--max-shard-size", default="1GB", metavar="SIZE",
                   help="largest model-*.safetensors shard (bytes or e.g. 500MB, 2GB; default "
                        "1GB); a model that fits is one model.safetensors")
    g.add_argument("--activations", choices=["memory", "disk"], default="memory",
                   help="streaming: keep the calibration activations of the current block in "
                        "memory, or on disk beside --out (read one batch at a time)")
    g.add_argument("--fresh", action="store_true",
                   help="streaming: ignore the state an interrupted run left beside --out and "
                        "start from block 0 (default: resume after its last finished block)")
    p.set_defaults(func=run)


def stream_source(args: argparse.Namespace, recipe):
    """The local checkpoint directory `physkern quantize` streams from (local_checkpoint), or
    None for the in-memory path (--in-memory, no local checkpoint, and recipes with fine-tuning
    or factorization, which need the whole model)."""
    if args.in_memory or recipe.finetune is not None or recipe.factorize is not None or \
            uses_shared_codebooks(recipe):
        return None
    return local_checkpoint(args)


def uses_shared_codebooks(recipe) -> bool:
    """Whether any layer config of the recipe (overrides included) has scope "shared": its
    groups are fitted over all their layers at once, which streaming block by block cannot."""
    cfg = None if recipe.config is None else recipe.config.to_dict()
    stack = [cfg]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if d.get("scope") == "shared":
                return True
            stack.extend(d.get("overrides", {}).values())
    return False


def local_checkpoint(args: argparse.Namespace):
    """--model as a local checkpoint directory that can stream (config.json + model.safetensors
    or HF shards; the packaged model's converted copy included), or None (hub names, GGUF,
    physkern-quantized directories)."""
    import os
    from pathlib import Path

    from ..checkpoint import INDEX_FILE, SINGLE_FILE
    from ..models import PACKAGED_ALIASES, packaged_model_dir
    from ..serialization import is_quantized_dir
    spec = args.model
    if spec is None or spec in PACKAGED_ALIASES:
        return packaged_model_dir()
    if not os.path.isdir(spec) or is_quantized_dir(spec):
        return None
    d = Path(spec)
    if (d / "config.json").is_file() and ((d / SINGLE_FILE).is_file() or
                                          (d / INDEX_FILE).is_file()):
        return d
    return None


def _streamable(args: argparse.Namespace) -> bool:
    """Whether --model would stream (local_checkpoint), without converting the packaged model."""
    from ..models import PACKAGED_ALIASES
    return args.model is None or args.model in PACKAGED_ALIASES or \
        local_checkpoint(args) is not None


def finetune_memory_note(args: argparse.Namespace) -> str:
    """What the in-memory path needs for end-to-end fine-tuning (which does not stream): the
    model twice (student being quantized + the full-precision teacher) at --dtype, plus
    activations and optimizer state for codebooks/scales/norms (small)."""
    import os
    from pathlib import Path

    from ..checkpoint import Checkpoint
    from ..models import PACKAGED_ALIASES, packaged_model_dir
    spec = args.model
    d = packaged_model_dir() if spec is None or spec in PACKAGED_ALIASES else Path(spec)
    if not os.path.isdir(d):
        return ("fine-tuning does not stream: it holds the model twice (quantized student + "
                "full-precision teacher) in memory")
    try:
        ck = Checkpoint(d)
        n = sum(math.prod(shape) for _, shape in ck.header.values())
    except ValueError:
        return ("fine-tuning does not stream: it holds the model twice (quantized student + "
                "full-precision teacher) in memory")
    per = {"fp32": 4, "bf16": 2, "fp16": 2}[args.dtype]
    return (f"fine-tuning does not stream: the in-memory path holds the model twice (student "
            f"+ full-precision teacher): about {2 * n * per / 2**30:.2f} GiB for {n / 1e6:.0f}M "
            f"parameters at {args.dtype}, plus activations")


def run(args: argparse.Namespace) -> int:
    import sys

    from ..distributed import init_from_env
    from ..serialization import validate_output_dir
    from ..streaming import parse_dtype
    validate_output_dir(args.out, args.overwrite)  # before the (possibly long) work
    from ..checkpoint import parse_size
    parse_size(args.max_shard_size)
    recipe = recipe_from_args(args)
    dist, device = init_from_env(args.device)
    source = stream_source(args, recipe)
    if source is None and dist.world > 1:
        raise ValueError("torchrun: several ranks need the streaming path (a local safetensors "
                         "checkpoint, no --in-memory, no fine-tuning, no factorize)")
    if recipe.factorize is not None and not args.in_memory and _streamable(args):
        # streaming quantizes one block at a time from the checkpoint; factorization (its
        # layers replaced before quantization, healed with the whole model) does not stream
        print(f"note: recipe {recipe.name!r} has factorize ({recipe.factorize.method}): it "
              "does not stream, the model is quantized in memory", file=sys.stderr)
    if uses_shared_codebooks(recipe) and not args.in_memory and _streamable(args):
        print(f"note: recipe {recipe.name!r} has shared codebooks (scope 'shared'): they are "
              "fitted over every layer of a group at once, so the model is quantized in memory",
              file=sys.stderr)
    if recipe.finetune is not None:
        print(finetune_memory_note(args), file=sys.stderr)
    if source is not None:
        from ..distributed import shutdown
        try:
            return _run_streaming(args, recipe, source, dist, device)
        finally:
            shutdown()
    return _run_in_memory(args, recipe, parse_dtype(args.dtype))


def _print_result(report, final, seconds: float, out, tuned=None, factorized=None) -> None:
    if factorized is not None:
        print(f"factorized {len(factorized['layers'])} layers ({factorized['spec']['method']}): "
              f"{factorized['bits_per_weight']:.3f} bits/weight over their "
              f"{factorized['weights']:,} weights")
    if report is not None:  # None: a factorize-only recipe quantizes nothing
        print(report.table())
    if tuned is not None:
        print(f"\nfine-tuning ({tuned['steps']} steps, {tuned['seconds']:.0f} s): {tuned['note']}")
    bits = final.quantized_bits_per_weight, final.model_bits_per_weight
    print(f"\nquantized layers: {bits[0]:.3f} bits/weight; whole model "
          f"{bits[1]:.3f} bits/parameter; {final.total_bytes / 2**20:.2f} MiB;"
          f" {seconds:.0f} s\nsaved to {out}")


def _run_streaming(args, recipe, source, dist, device) -> int:
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from ..data import calibration_windows, load_corpus
    from ..recipe import needs_calibration, with_seed
    from ..streaming import quantize_streaming
    tok = AutoTokenizer.from_pretrained(source)
    if recipe.needs_calibration():  # before loading text or quantizing
        check_calib_window(SimpleNamespace(config=AutoConfig.from_pretrained(source)),
                           recipe.calibration["window"])
    corpus = load_corpus(args.corpus)
    cfg, emb = with_seed(recipe.config, args.seed), with_seed(recipe.embedding, args.seed)
    cal = recipe.calibration_or_default()
    calib = (calibration_windows(tok, corpus, cal["windows"], cal["window"], args.seed)
             if recipe.needs_calibration() else None)
    uses = needs_calibration(cfg) or needs_calibration(emb)
    extra = {"recipe": cfg.to_dict(), "whole_recipe": recipe.to_dict(), "seed": args.seed,
             "calibration": {"corpus": corpus.describe(), "windows": int(calib.shape[0]),
                             "window": int(calib.shape[1]), "seed": args.seed}
             if calib is not None else None, "finetune": None}
    rep = quantize_streaming(source, args.out, cfg, calib if uses else None, embedding=emb,
                             dense_dtype=recipe.dense_dtype, dtype=args.dtype, device=device,
                             tokenizer=tok, extra=extra, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size, resume=not args.fresh,
                             activations=args.activations)
    if rep is None:  # another rank than 0: rank 0 wrote and reports
        return 0
    q = rep.quantization
    _print_result(q, q, q.seconds, args.out)
    print(f"streamed {rep.blocks} blocks ({rep.blocks_resumed} resumed), {dist.world} "
          f"rank(s), calibration activations {rep.activation_bytes / 2**20:.1f} MiB per block")
    return 0


def _run_in_memory(args, recipe, dtype) -> int:
    from ..data import load_corpus
    from ..models import load_model
    from ..quant.accounting import bits_report
    from ..recipe import apply_recipe
    from ..serialization import save_quantized
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    if recipe.needs_calibration():
        # before loading text or quantizing
        check_calib_window(model, recipe.calibration["window"])
    corpus = load_corpus(args.corpus)
    applied = apply_recipe(model, recipe, tok, corpus, args.seed)
    report, tuned, calib = applied.quantization, applied.finetune, applied.calibration
    extra = {"recipe": None if applied.config is None else applied.config.to_dict(),
             "whole_recipe": recipe.to_dict(), "seed": args.seed,
             "calibration": {
                 "corpus": corpus.describe(), "windows": int(calib.shape[0]),
                 "window": int(calib.shape[1]), "seed": args.seed}
             if calib is not None else None,
             "finetune": tuned, "report": None if report is None else report.to_dict()}
    if applied.factorize is not None:  # absent otherwise: older files unchanged
        extra["factorize"] = applied.factorize
    save_quantized(model, args.out, tokenizer=tok, overwrite=args.overwrite,
                   max_shard_size=args.max_shard_size, extra=extra)
    seconds = report.seconds if report is not None else applied.seconds_quantize
    _print_result(report, bits_report(model), seconds, args.out, tuned,  # after dense dtype
                  applied.factorize)
    return 0
