"""`physkern sweep quant`: run a list of quantization recipes, record perplexity vs TRUE bits.

Recipes file: a JSON list of objects
    {"name": str,                       unique; the point's key in the results
     "config": {...} | null,            physkern.config.config_from_dict input; null = full precision
     "smooth": {"alpha": a} | null,     optional SmoothQuant-style scale migration (below)
     "prune": {...} | null,             optional RG pruning by truncated SVD (below)
     "lattice": {...} | null,           optional lattice attention for the evaluation (below)
     "finetune": {...} | null,          optional end-to-end fine-tuning of codebooks/scales (below)
     "seeds": [int, ...],               optional (default [0])
     "label": str,                      optional curve name in the plot (default: the method, with
                                        "+prune" / "+finetune" / "+lattice" appended; "FP" when
                                        none applies)
     "note": str}                       optional, copied into every point
Each seed s sets the k-means seed of every codebook config (base and overrides) and the draw of
the calibration windows (from the calibration half of the corpus; never evaluation text). A
recipe with no codebook config and no calibration (RTN, FP) is deterministic: only its first seed
runs (a recipe with "finetune" draws calibration windows, so it runs every seed). Pruning and
lattice attention are deterministic. Bits come from physkern.quant.accounting
(quantized layers and whole model).

Combined recipes (the seeds' "combined compression" table): for one point the steps run in this
order on a freshly loaded model:
  0. "smooth": {"alpha": a in [0, 1]}: physkern.smoothquant.smooth_model with max |x_j| from the
     point's calibration windows (calibration half, drawn with the point's seed); per-input-channel
     scales s_j = max|x_j|^a / max|W_:,j|^(1-a) multiply the weight columns and divide the
     preceding norm, so the model is unchanged before quantization (the alpha sweep of issue 8).
  1. "prune": {"rule": "seeds" | "opposite" | "uniform",
               and exactly one of
               "removed_fraction": f in (0, 1)  remove about f of the decoder linear parameters
                                                (physkern.prune.ranks_for_target: one relative rank
                                                for the compressed types; same meaning as
                                                `physkern prune --removed`), or
               "relative_rank": f in (0, 1]     rank floor(f * min(out, in)) for every compressed
                                                type (physkern.prune.ranks_at_fraction)}
     The rule picks the types (physkern.prune.compressed_types: "seeds" compresses the input
     projections and keeps the output projections, "opposite" the reverse, "uniform" all). Every
     layer of those types becomes a LowRankLinear (rank-r truncated SVD of its full-precision
     weight) where the two factors are smaller than the dense weight; elsewhere it stays dense.
  2. "config": quantization of the decoder linear layers that are still nn.Linear / Conv1D. The
     factorised (LowRankLinear) layers are NOT quantized: their two factors stay at the model's
     dtype (float32) and are counted so. Calibration statistics are taken on the pruned model.
  3. "finetune": {"steps": int >= 1 (default 100), "lr": number > 0 (default 1e-4, RELATIVE: each
                  tensor moves by about lr x its mean |value| per Adam step),
                  "train_norms": bool (default true), "batch_size": int >= 1 (default 1),
                  "holdout": int >= 1 (default 2), "schedule": "constant" | "cosine" (default
                  "constant"), "windows": int >= 2 or null (default null)}  (needs "config")
     physkern.finetune.finetune_quantized: the codebooks, scales and offsets of every quantized
     layer (and the float32 norm weights/biases with train_norms) are trained with Adam on the
     token-averaged KL(teacher || student), the teacher being the full-precision model as loaded
     (a copy taken before steps 0-2). Packed indices and storage dtypes never change, so the
     bits are those of step 2. Windows: with "windows": null the point's calibration windows
     (calibration half, random offsets drawn with the point's seed, which may overlap); with
     "windows": n, n NON-overlapping --calib-window tiles of the calibration half picked with the
     seed (physkern.data.calibration_tiles), so held-out and training windows share no text
     and more text than the quantizer's calibration can be used. They are shuffled with the
     seed; the last `holdout` are held out and the
     trained values are kept only if their KL went down (else the quantized values are
     restored; the point's "finetune" says which, with the KL before/after and the loss curve).
  4. "lattice": {"xi": number > 0 or "inf", "eps": number in (0, 1) or null (default null =
     exact)}: physkern.attention.enable_lattice for the evaluation (decay bias -(i - j)/xi).
Bits of a point: "quantized_bits_per_weight" is accounting's compressed-layer figure, i.e. over
the quantized AND the factorised layers (factors at their dtype, over the out*in weights they
replace; FP and lattice-only points: the dense width); "by_kind" splits it (kind "quantized" /
"LowRankLinear"); "model_bits_per_weight" counts every stored tensor over the original model's
parameters. Points also record the prune settings and outcome (ranks per type, layers
factorised, parameters removed), the fine-tuning spec and report ("finetune": spec, holdout KL
before/after, kept, loss curve, seconds) and the lattice settings.

Writes <out-dir>/<name>.json after every point (resumable: points already there with the same
recipe config, smooth, prune, finetune and lattice settings, seed and setup are skipped) and a
PNG of perplexity vs true bits/weight (physkern.sweeps.plot; `physkern sweep plot X.json`
redraws it from the JSON alone). A results file that cannot be resumed (truncated or corrupt
JSON, not a sweep results object, another setup) raises ValueError naming the file; `--fresh`
starts over after moving the old file aside to <name>.json.bak-<UTC timestamp> (never deleted).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

from ..commands._common import add_eval_args, add_model_corpus_args, resolve_window
from .plot import plot

DEFAULT_TOKENS = 131072  # 128 windows of 1024: 130,944 scored tokens (acceptance: >= 100k)
DEFAULT_OUT_DIR = "bench/results"


def register_sweep(kinds) -> None:
    p = kinds.add_parser(
        "quant", help="perplexity vs true bits/weight for a list of quantization recipes",
        description="Quantizes the model with every recipe (and seed) of a JSON recipes file and "
                    "records perplexity on the evaluation text and true bits (accounting). "
                    "Resumable: points already in the output JSON are skipped.")
    add_model_corpus_args(p)
    add_eval_args(p, tokens_default=DEFAULT_TOKENS)
    p.add_argument("--recipes", required=True,
                   help="JSON list of {name, config, smooth, prune, finetune, lattice, seeds, "
                        "label, note}")
    p.add_argument("--name", default=None,
                   help="results name: writes <out-dir>/<name>.json and .png "
                        "(default: the recipes file's stem)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"default {DEFAULT_OUT_DIR}")
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
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------
# recipes


PRUNE_RULES = ("seeds", "opposite", "uniform")  # physkern.prune.RULES (checked in tests)
PRUNE_AMOUNTS = ("removed_fraction", "relative_rank")
LATTICE_KEYS = ("xi", "eps")
FINETUNE_DEFAULTS = {"steps": 100, "lr": 1e-4, "train_norms": True, "batch_size": 1,
                     "holdout": 2, "schedule": "constant", "windows": None}
# (physkern.finetune.finetune_quantized's defaults; windows None = the point's calibration)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_prune(spec, where: str = "prune") -> dict | None:
    """Validate a recipe's "prune" object; returns {"rule", <amount key>: float} or None."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be an object {{rule, removed_fraction | relative_rank}} "
                         f"or null, got {spec!r}")
    unknown = set(spec) - {"rule", *PRUNE_AMOUNTS}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: rule, "
                         f"{', '.join(PRUNE_AMOUNTS)}")
    rule = spec.get("rule")
    if rule not in PRUNE_RULES:
        raise ValueError(f"{where}.rule must be one of {', '.join(PRUNE_RULES)}, got {rule!r}")
    given = [k for k in PRUNE_AMOUNTS if k in spec]
    if len(given) != 1:
        raise ValueError(f"{where}: give exactly one of {', '.join(PRUNE_AMOUNTS)}, got "
                         f"{given or 'none'}")
    key, value = given[0], spec[given[0]]
    if key == "removed_fraction" and not (_number(value) and 0 < value < 1):
        raise ValueError(f"{where}.removed_fraction must be a number in (0, 1) (fraction of the "
                         f"decoder linear parameters removed), got {value!r}")
    if key == "relative_rank" and not (_number(value) and 0 < value <= 1):
        raise ValueError(f"{where}.relative_rank must be a number in (0, 1] (rank / min(out, in) "
                         f"of every compressed type), got {value!r}")
    return {"rule": rule, key: float(value)}


def parse_smooth(spec, where: str = "smooth") -> dict | None:
    """Validate a recipe's "smooth" object; returns {"alpha": float} or None."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"alpha"}:
        raise ValueError(f"{where}: must be an object {{\"alpha\": a}} with a in [0, 1], or null, "
                         f"got {spec!r}")
    a = spec["alpha"]
    if not (_number(a) and 0.0 <= a <= 1.0):
        raise ValueError(f"{where}.alpha must be a number in [0, 1] (migration strength), got {a!r}")
    return {"alpha": float(a)}


def parse_lattice(spec, where: str = "lattice") -> dict | None:
    """Validate a recipe's "lattice" object; returns {"xi": float or "inf", "eps": float or None}
    or None."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be an object {{xi, eps}} or null, got {spec!r}")
    unknown = set(spec) - set(LATTICE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: xi, eps")
    if "xi" not in spec:
        raise ValueError(f"{where}.xi is required: a number > 0 or \"inf\"")
    xi = spec["xi"]
    if xi == "inf" or (_number(xi) and math.isinf(xi) and xi > 0):
        xi = "inf"
    elif not (_number(xi) and xi > 0):
        raise ValueError(f"{where}.xi must be a number > 0 or \"inf\", got {xi!r}")
    else:
        xi = float(xi)
    eps = spec.get("eps")
    if eps is not None and not (_number(eps) and 0 < eps < 1):
        raise ValueError(f"{where}.eps must be a number in (0, 1) or null (exact), got {eps!r}")
    return {"xi": xi, "eps": None if eps is None else float(eps)}


def parse_finetune(spec, where: str = "finetune") -> dict | None:
    """Validate a recipe's "finetune" object; returns {"steps", "lr", "train_norms",
    "batch_size", "holdout", "schedule", "windows"} with the defaults filled in (so resume keys
    are canonical), or None."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be an object {{{', '.join(FINETUNE_DEFAULTS)}}} or "
                         f"null, got {spec!r}")
    unknown = set(spec) - set(FINETUNE_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: "
                         f"{', '.join(FINETUNE_DEFAULTS)}")
    out = {**FINETUNE_DEFAULTS, **spec}
    for key in ("steps", "batch_size", "holdout"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{key} must be an integer >= 1, got {v!r}")
    lr = out["lr"]
    if not (_number(lr) and 0 < lr < math.inf):
        raise ValueError(f"{where}.lr must be a finite number > 0 (relative Adam step), "
                         f"got {lr!r}")
    from ..finetune import SCHEDULES
    if out["schedule"] not in SCHEDULES:
        raise ValueError(f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got "
                         f"{out['schedule']!r}")
    w = out["windows"]
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or
                          w <= out["holdout"]):
        raise ValueError(f"{where}.windows must be null (the point's calibration windows) or an "
                         f"integer > holdout = {out['holdout']}, got {w!r}")
    if not isinstance(out["train_norms"], bool):
        raise ValueError(f"{where}.train_norms must be true or false, got "
                         f"{out['train_norms']!r}")
    return {**out, "lr": float(lr)}


def finetune_windows(spec: dict, tokenizer, corpus, calib, window: int,
                     seed: int) -> tuple:
    """(windows [n, window] token ids, description) a validated fine-tuning spec trains on:
    with spec["windows"] n, n non-overlapping tiles of the calibration text picked with the seed
    (physkern.data.calibration_tiles); else `calib`, the quantizer's calibration windows."""
    if spec["windows"] is None:
        return calib, "the quantizer's calibration windows"
    from ..data import calibration_tiles
    return (calibration_tiles(tokenizer, corpus, spec["windows"], window, seed),
            f"{spec['windows']} non-overlapping {window}-token tiles of the calibration part, "
            f"picked with seed {seed}")


def run_finetune(model, teacher, windows, spec: dict, seed: int, source: str) -> dict:
    """physkern.finetune.finetune_quantized with a validated spec; returns its report with
    "spec" and "windows_source" added."""
    from ..finetune import finetune_quantized
    return {"spec": spec, "windows_source": source, **finetune_quantized(
        model, teacher, windows, steps=spec["steps"], lr=spec["lr"],
        batch_size=spec["batch_size"], seed=seed, holdout=spec["holdout"],
        train_norms=spec["train_norms"], schedule=spec["schedule"])}


def default_label(cfg, prune: dict | None, lattice: dict | None,
                  smooth: dict | None = None, finetune: dict | None = None) -> str:
    """"FP" for a plain model, else the parts that apply joined by "+" (e.g. codebook+prune)."""
    parts = (["smooth"] if smooth else []) + ([cfg.method] if cfg is not None else []) + \
        (["prune"] if prune else []) + (["finetune"] if finetune else []) + \
        (["lattice"] if lattice else [])
    return "+".join(parts) or "FP"


def load_recipes(path: str) -> list[dict]:
    """Read and validate a recipes file; returns [{name, config (object or None), smooth, prune,
    finetune, lattice (each a dict or None), seeds, label, note}]."""
    from ..config import config_from_dict
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipes: {path!r} is not a file")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"recipes: {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"recipes: {path!r} must hold a non-empty JSON list of recipe objects")
    out, names = [], set()
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
            raise ValueError(f"recipes[{i}]: must be an object with a non-empty string 'name'")
        unknown = set(r) - {"name", "config", "smooth", "prune", "finetune", "lattice", "seeds",
                            "label", "note"}
        if unknown:
            raise ValueError(f"recipes[{i}] ({r['name']}): unknown keys {sorted(unknown)}; "
                             "valid: name, config, smooth, prune, finetune, lattice, seeds, "
                             "label, note")
        if r["name"] in names:
            raise ValueError(f"recipes: name {r['name']!r} appears twice")
        names.add(r["name"])
        seeds = r.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"recipes[{i}] ({r['name']}): seeds must be a non-empty list of "
                             f"non-negative integers, got {seeds!r}")
        cfg = None if r.get("config") is None else config_from_dict(r["config"])
        where = f"recipes[{i}] ({r['name']})"
        smooth = parse_smooth(r.get("smooth"), f"{where}: smooth")
        prune = parse_prune(r.get("prune"), f"{where}: prune")
        lattice = parse_lattice(r.get("lattice"), f"{where}: lattice")
        finetune = parse_finetune(r.get("finetune"), f"{where}: finetune")
        if finetune is not None and cfg is None:
            raise ValueError(f"{where}: finetune needs a quantization config (it trains the "
                             "quantized layers' codebooks and scales), got config null")
        label = r.get("label") or default_label(cfg, prune, lattice, smooth, finetune)
        out.append({"name": r["name"], "config": cfg, "smooth": smooth, "prune": prune,
                    "finetune": finetune, "lattice": lattice,
                    "seeds": seeds, "label": label, "note": r.get("note", "")})
    return out


def _all_configs(cfg):
    yield cfg
    for c in (cfg.overrides or {}).values():
        yield from _all_configs(c)


def is_random(cfg, finetune: dict | None = None) -> bool:
    """A recipe varies with the seed when it fits codebooks (k-means init) or draws calibration
    (for the quantizer or for fine-tuning)."""
    if finetune is not None:
        return True
    if cfg is None:
        return False
    return any(c.method == "codebook" or c.needs_calibration for c in _all_configs(cfg))


def with_seed(cfg, seed: int):
    """Copy of cfg with every codebook config's k-means seed set to `seed`."""
    from dataclasses import replace
    ov = {k: with_seed(v, seed) for k, v in (cfg.overrides or {}).items()}
    if cfg.method == "codebook":
        return replace(cfg, seed=seed, overrides=ov)
    return replace(cfg, overrides=ov)


def needs_calibration(cfg) -> bool:
    return cfg is not None and any(c.needs_calibration for c in _all_configs(cfg))


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def point_key(recipe: str, seed: int, config: dict | None, prune: dict | None,
              lattice: dict | None, smooth: dict | None = None,
              finetune: dict | None = None) -> tuple:
    """What makes a point the same point when resuming."""
    return (recipe, seed, _canon(config), _canon(prune), _canon(lattice), _canon(smooth),
            _canon(finetune))


def _key_of(point: dict) -> tuple:
    # points written before smooth/prune/finetune/lattice existed lack the keys: None, as for
    # plain recipes; those written before a fine-tuning key existed ran with its default
    ft = (point.get("finetune") or {}).get("spec")
    return point_key(point["recipe"], point["seed"], point["config"],
                     (point.get("prune") or {}).get("spec"), point.get("lattice"),
                     point.get("smooth"), None if ft is None else {**FINETUNE_DEFAULTS, **ft})


def apply_prune(model, spec: dict) -> dict:
    """RG pruning of `model` in place by the validated spec (see module docstring).

    Returns {"spec", "compressed_types", "relative_rank", "ranks" {type: rank},
    "layers_factorised", "layers_considered", "parameters_removed", "decoder_linear_parameters",
    "removed_fraction"}; parameters are counted by physkern.prune (both factors).
    """
    from ..analysis._common import weight_groups
    from ..prune import (compressed_types, prune_model, ranks_at_fraction, ranks_for_target,
                         total_parameters)
    groups = weight_groups(model)
    types = compressed_types(list(groups), spec["rule"])
    total = total_parameters(groups)
    if "relative_rank" in spec:
        relative = spec["relative_rank"]
        ranks = ranks_at_fraction(groups, types, relative)
    else:
        plan = ranks_for_target(groups, types, int(round(spec["removed_fraction"] * total)))
        relative, ranks = plan["fraction"], plan["ranks"]
    records = prune_model(model, groups, ranks)
    removed = sum(r["dense_parameters"] - r["parameters"] for r in records)
    return {"spec": spec, "compressed_types": types, "relative_rank": relative, "ranks": ranks,
            "layers_factorised": sum(r["factorised"] for r in records),
            "layers_considered": len(records), "parameters_removed": removed,
            "decoder_linear_parameters": total, "removed_fraction": removed / total}


_FRESH_HINT = ("pass --fresh to start over (the old file is moved to "
               "<name>.json.bak-<timestamp>, not deleted)")


def read_results(json_path: Path) -> dict | None:
    """The results a sweep resumes from: None when `json_path` does not exist, else its payload.

    Raises ValueError naming the file, what is wrong with it and the --fresh flag when it is not
    valid JSON (e.g. truncated by a killed run), not an object, or its "setup"/"points" are
    missing or malformed (every point needs recipe, seed and config to be matched on resume)."""
    json_path = Path(json_path)
    if not json_path.exists():
        return None
    where = f"results: {str(json_path)!r}"
    try:
        payload = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} cannot be resumed: it is not valid JSON ({exc}; truncated or "
                         f"corrupt?); {_FRESH_HINT}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} cannot be resumed: it is not UTF-8 text ({exc}); "
                         f"{_FRESH_HINT}") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{where} cannot be resumed: it holds a JSON "
                         f"{type(payload).__name__}, not a sweep results object; {_FRESH_HINT}")
    if not isinstance(payload.get("setup"), dict):
        raise ValueError(f"{where} cannot be resumed: it has no 'setup' object; {_FRESH_HINT}")
    points = payload.get("points")
    if not isinstance(points, list):
        raise ValueError(f"{where} cannot be resumed: 'points' must be a list, got "
                         f"{type(points).__name__}; {_FRESH_HINT}")
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not {"recipe", "seed", "config"} <= set(p):
            raise ValueError(f"{where} cannot be resumed: points[{i}] is not a point object "
                             f"with recipe, seed and config; {_FRESH_HINT}")
    return payload


def move_aside(json_path: Path) -> Path | None:
    """Rename an existing `json_path` to <name>.json.bak-<UTC timestamp> (a counter is added if
    that exists); returns the new path, or None when there was nothing to move."""
    json_path = Path(json_path)
    if not json_path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = json_path.with_name(f"{json_path.name}.bak-{stamp}")
    n = 1
    while backup.exists():
        backup = json_path.with_name(f"{json_path.name}.bak-{stamp}-{n}")
        n += 1
    json_path.rename(backup)
    return backup


# ----------------------------------------------------------------------------------------------
# run


def run(args: argparse.Namespace) -> int:
    from ..api import quantize
    from ..attention import enable_lattice
    from ..data import calibration_windows, evaluation_tokens, load_corpus
    from ..eval import perplexity
    from ..models import decoder_linear_layers, load_model, resolve_model_name
    from ..provenance import provenance, write_json
    from ..quant.accounting import bits_report
    from ..smoothquant import smooth_model

    recipes = load_recipes(args.recipes)
    if args.only:
        missing = set(args.only) - {r["name"] for r in recipes}
        if missing:
            raise ValueError(f"only: {sorted(missing)} not in {args.recipes} (recipes: "
                             f"{[r['name'] for r in recipes]})")
        recipes = [r for r in recipes if r["name"] in args.only]
    if args.tokens is not None and args.tokens < 0:
        raise ValueError(f"tokens must be >= 0 (0 = all), got {args.tokens}")
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        raise ValueError(f"seeds must be non-negative integers, got {args.seeds}")
    if args.calib_windows <= 0:
        raise ValueError(f"calib-windows must be positive, got {args.calib_windows}")
    name = args.name or Path(args.recipes).stem
    json_path = Path(args.out_dir) / f"{name}.json"
    old = None
    if args.fresh:
        backup = move_aside(json_path)
        if backup is not None:
            print(f"--fresh: moved {json_path} to {backup}")
    else:
        old = read_results(json_path)

    corpus = load_corpus(args.corpus)
    model, tokenizer = load_model(args.model, device=args.device)
    window = resolve_window(model, args.window)
    calib_window = args.calib_window or window
    resolve_window(model, calib_window)
    tokens = evaluation_tokens(tokenizer, corpus, args.tokens or None)
    model_name = resolve_model_name(args.model)
    setup = {"model": model_name, "corpus": corpus.describe(),
             "protocol": {"kind": "non-overlapping" if args.stride in (None, window) else "sliding",
                          "window": window, "stride": args.stride or window,
                          "tokens_input": int(tokens.numel()), "batch_size": args.batch_size,
                          "dtype": "float32", "text": "evaluation part (second half of the "
                          "documents)"},
             "calibration": {"windows": args.calib_windows, "window": calib_window,
                             "tokens": args.calib_windows * calib_window,
                             "text": "calibration part (first half of the documents), windows at "
                                     "offsets drawn with the point's seed",
                             "disjoint_from_evaluation": True}}
    points = []
    if old is not None:
        if _canon(old.get("setup")) != _canon(setup):
            raise ValueError(f"results: {str(json_path)!r} was made with another setup (model, "
                             "corpus, tokens, window or calibration); pass --fresh to start over "
                             "(the old file is moved to <name>.json.bak-<timestamp>) or --name "
                             "to write elsewhere")
        points = old["points"]
    done = {_key_of(p) for p in points}

    def save():
        payload = {"experiment": "quantization recipes: perplexity vs true bits/weight",
                   "recipes_file": str(args.recipes), "setup": setup,
                   "seeds": "per point (k-means init and calibration-window draw)",
                   "points": points, "summary": summarize(points), **provenance(args.device)}
        write_json(json_path, payload)

    for r in recipes:
        varies = is_random(r["config"], r["finetune"])
        seeds = (args.seeds or r["seeds"]) if varies else r["seeds"][:1]
        for seed in seeds:
            cfg = None if r["config"] is None else with_seed(r["config"], seed)
            cfg_dict = None if cfg is None else cfg.to_dict()
            if point_key(r["name"], seed, cfg_dict, r["prune"], r["lattice"],
                         r["smooth"], r["finetune"]) in done:
                print(f"{r['name']} seed {seed}: already in {json_path}, skipped")
                continue
            t0 = time.perf_counter()
            m, _ = load_model(args.model, device=args.device)
            # the fine-tuning teacher is the full-precision model as loaded (before smooth,
            # prune and quantization); a copy is cheaper than a second load
            teacher = copy.deepcopy(m) if r["finetune"] is not None else None
            calib = None
            if needs_calibration(cfg) or r["smooth"] is not None or r["finetune"] is not None:
                calib = calibration_windows(tokenizer, corpus, args.calib_windows, calib_window,
                                            seed)
            if r["smooth"] is not None:  # 0. scale migration (model unchanged before quantizing)
                smooth_model(m, calib, r["smooth"]["alpha"], args.batch_size)
            pruned = None
            if r["prune"] is not None:   # 1. RG pruning (SVD of the full-precision weights)
                pruned = apply_prune(m, r["prune"])
                pruned["seconds"] = time.perf_counter() - t0
            report = None
            if cfg is not None:          # 2. quantization of the layers still dense
                report = quantize(m, cfg, calibration=calib if needs_calibration(cfg) else None)
            t_q = time.perf_counter() - t0
            tuned = None
            if r["finetune"] is not None:  # 3. codebooks/scales (and norms) vs the FP teacher
                windows, source = finetune_windows(r["finetune"], tokenizer, corpus, calib,
                                                   calib_window, seed)
                tuned = run_finetune(m, teacher, windows, r["finetune"], seed, source)
                del teacher
                print(f"{r['name']} seed {seed}: finetune {tuned['note']} "
                      f"({tuned['seconds']:.0f} s)")
            if r["lattice"] is not None:  # 4. lattice attention for the evaluation
                enable_lattice(m, float(r["lattice"]["xi"]), eps=r["lattice"]["eps"])
            rep = bits_report(m)
            res = perplexity(m, tokens, window, args.stride, args.batch_size,
                             model_name=model_name, corpus_name=corpus.name)
            kinds = rep.by_kind()
            seeds_formula = None
            quant = [l for l in rep.layers.values() if l["kind"] == "quantized"]
            if quant:
                seeds_formula = sum(l["seeds_formula_bits_per_weight"] * l["weights"]
                                    for l in quant) / sum(l["weights"] for l in quant)
            fp_bits = None
            if not rep.layers:
                ws = [l.weight() for l in decoder_linear_layers(m)]
                fp_bits = ws[0].element_size() * 8
            point = {"recipe": r["name"], "label": r["label"], "seed": seed,
                     "deterministic": not varies, "config": cfg_dict,
                     "smooth": r["smooth"], "prune": pruned, "finetune": tuned,
                     "lattice": r["lattice"],
                     "perplexity": res.perplexity, "mean_nll": res.mean_nll,
                     "tokens_scored": res.tokens_scored, "windows": res.windows,
                     "bits": {"quantized_bits_per_weight": rep.quantized_bits_per_weight
                              if rep.layers else fp_bits,
                              "model_bits_per_weight": rep.model_bits_per_weight,
                              "total_bytes": rep.total_bytes,
                              "quantized_weights": rep.quantized_weights,
                              "quantized_layers": len(rep.layers),
                              "by_kind": kinds,
                              "seeds_formula_bits_per_weight": seeds_formula},
                     "calibration": None if calib is None else {
                         "windows": int(calib.shape[0]), "window": int(calib.shape[1]),
                         "tokens": int(calib.numel()), "seed": seed},
                     "seconds_quantize": t_q, "seconds_eval": res.seconds,
                     "note": r["note"]}
            if report is not None:
                point["layers"] = [{"name": l.name, "bits_per_weight": l.bits_per_weight,
                                    "relative_weight_error": l.relative_weight_error,
                                    "relative_output_error": l.relative_output_error}
                                   for l in report.layers]
            points.append(point)
            save()
            q = point["bits"]["quantized_bits_per_weight"]
            what = "quantized layers" if pruned is None else "quantized + factorised layers"
            if pruned is not None:
                print(f"{r['name']}: pruned {pruned['layers_factorised']} layers "
                      f"({pruned['removed_fraction']:.2%} of decoder linear parameters), ranks "
                      f"{pruned['ranks']}")
            print(f"{r['name']} seed {seed}: perplexity {res.perplexity:.3f}; "
                  f"{q:.3f} bits/weight ({what}), "
                  f"{rep.model_bits_per_weight:.3f} (whole model); "
                  f"quantize {t_q:.0f} s, eval {res.seconds:.0f} s")
            del m
    save()
    print(f"wrote {json_path}")
    png = json_path.with_suffix(".png")
    plot(json.loads(json_path.read_text()), png)
    print(f"wrote {png}")
    print(markdown_table(json.loads(json_path.read_text())))
    return 0


def summarize(points: list[dict]) -> list[dict]:
    """Per recipe: mean, std (sample, when >= 2 seeds), min, max of perplexity; bits (mean);
    prune (rule, ranks, parameters removed) and lattice settings when the recipe has them."""
    by = {}
    for p in points:
        by.setdefault(p["recipe"], []).append(p)
    out = []
    for name, ps in by.items():
        ppl = [p["perplexity"] for p in ps]
        mean = lambda key: statistics.fmean(p["bits"][key] for p in ps) \
            if all(p["bits"][key] is not None for p in ps) else None
        out.append({"recipe": name, "label": ps[0]["label"], "seeds": [p["seed"] for p in ps],
                    "deterministic": ps[0]["deterministic"],
                    "perplexity_mean": statistics.fmean(ppl),
                    "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else None,
                    "perplexity_min": min(ppl), "perplexity_max": max(ppl),
                    "quantized_bits_per_weight": mean("quantized_bits_per_weight"),
                    "model_bits_per_weight": mean("model_bits_per_weight"),
                    "seeds_formula_bits_per_weight": mean("seeds_formula_bits_per_weight"),
                    "tokens_scored": ps[0]["tokens_scored"],
                    **({"prune": {k: ps[0]["prune"][k] for k in
                                  ("spec", "ranks", "parameters_removed", "removed_fraction")}}
                       if ps[0].get("prune") else {}),
                    **({"lattice": ps[0]["lattice"]} if ps[0].get("lattice") else {}),
                    **({"smooth": ps[0]["smooth"]} if ps[0].get("smooth") else {}),
                    **({"finetune": {"spec": ps[0]["finetune"]["spec"],
                                     "kept": [p["finetune"]["kept"] for p in ps]}}
                       if ps[0].get("finetune") else {})})
    return out


def markdown_table(payload: dict) -> str:
    """Pareto table: one row per recipe with true bits (both axes) and perplexity over seeds."""
    proto = payload["setup"]["protocol"]
    first = payload["points"][0] if payload["points"] else {}
    lines = [f"{payload['setup']['model']}, {first.get('tokens_scored', '?')} evaluation tokens "
             f"({proto['kind']} windows of {proto['window']}, fp32), calibration "
             f"{payload['setup']['calibration']['windows']} x "
             f"{payload['setup']['calibration']['window']} tokens from the disjoint calibration "
             f"half. From `{payload['command']}`.", "",
             "| recipe | method | bits/weight (quantized layers, true) | bits/parameter (whole "
             "model, true) | perplexity (mean) | spread (min-max) | seeds |",
             "|---|---|---:|---:|---:|---:|---|"]
    for s in payload["summary"]:
        fmt = lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
        spread = (f"{s['perplexity_min']:.2f}-{s['perplexity_max']:.2f}"
                  if len(s["seeds"]) > 1 else "deterministic" if s["deterministic"] else "1 seed")
        lines.append(f"| {s['recipe']} | {s['label']} | {fmt(s['quantized_bits_per_weight'])} | "
                     f"{fmt(s['model_bits_per_weight'])} | {s['perplexity_mean']:.2f} | {spread} | "
                     f"{','.join(map(str, s['seeds']))} |")
    if any("prune" in s for s in payload["summary"]):
        lines += ["", "Pruned recipes: the layer column covers the quantized and the factorised "
                  "(LowRankLinear, both factors at their dtype, not quantized) layers over the "
                  "weights they replace."]
        for s in payload["summary"]:
            if "prune" in s:
                lines.append(f"- {s['recipe']}: rule {s['prune']['spec']['rule']}, "
                             f"{s['prune']['parameters_removed']:,} decoder linear parameters "
                             f"removed ({s['prune']['removed_fraction']:.2%}), ranks "
                             f"{s['prune']['ranks']}")
    tuned = [s for s in payload["summary"] if "finetune" in s]
    if tuned:
        lines += ["", "Fine-tuned codebooks/scales (indices fixed, KL to the FP model on "
                  "calibration windows, kept only if the held-out KL went down): " + "; ".join(
                      f"{s['recipe']} {s['finetune']['spec']['steps']} steps, lr "
                      f"{s['finetune']['spec']['lr']:g}, kept {s['finetune']['kept']}"
                      for s in tuned)]
    lat = [s for s in payload["summary"] if "lattice" in s]
    if lat:
        lines += ["", "Lattice attention: " + "; ".join(
            f"{s['recipe']} xi = {s['lattice']['xi']}, eps = {s['lattice']['eps']}" for s in lat)]
    return "\n".join(lines) + "\n"
