"""`physkern sweep quant`: run a list of quantization recipes, record perplexity vs TRUE bits.

Plain functions (`run` takes keyword arguments); the command line is physkern/commands/sweep.py.

The recipe format is read, validated and applied by physkern.recipe (Recipe, load_recipes,
apply_recipe); this module runs the points, records them and resumes. Recipes also take
"embedding", "dense_dtype" and "calibration" (physkern.recipe's docstring; a recipe's
calibration must equal the sweep's --calib-windows/--calib-window).

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
                                                (physkern.research.prune.ranks_for_target: one relative rank
                                                for the compressed types; same meaning as
                                                `physkern prune --removed`), or
               "relative_rank": f in (0, 1]     rank floor(f * min(out, in)) for every compressed
                                                type (physkern.research.prune.ranks_at_fraction)}
     The rule picks the types (physkern.research.prune.compressed_types: "seeds" compresses the input
     projections and keeps the output projections, "opposite" the reverse, "uniform" all). Every
     layer of those types becomes a LowRankLinear (rank-r truncated SVD of its full-precision
     weight) where the two factors are smaller than the dense weight; elsewhere it stays dense.
  2. "config": quantization of the decoder linear layers that are still nn.Linear / Conv1D. The
     factorised (LowRankLinear) layers are NOT quantized: their two factors stay at the model's
     dtype (float32) and are counted so. Calibration statistics are taken on the pruned model.
  3. "finetune": {"steps": int >= 1 (default 100), "lr": number > 0 (default 1e-3, RELATIVE: each
                  tensor moves by about lr x its mean |value| per Adam step),
                  "train_norms": bool (default true), "batch_size": int >= 1 (default 1),
                  "holdout": int >= 1 (default 2), "schedule": "constant" | "cosine" (default
                  "constant"), "windows": int >= 2 or null (default null),
                  "code_update_every": int >= 0 (default 0 = off), "code_update_fraction":
                  number in (0, 1] (default 0.1)}  (needs "config")
     physkern.finetune.finetune_quantized: the codebooks, scales and offsets of every quantized
     layer (and the float32 norm weights/biases with train_norms) are trained with Adam on the
     token-averaged KL(teacher || student), the teacher being the full-precision model as loaded
     (a copy taken before steps 0-2). Packed indices and storage dtypes never change, so the
     bits are those of step 2; with "code_update_every": k the indices too are re-assigned
     before steps k, 2k, ... (physkern.quant.code_update: a seeded fraction of each layer's
     block columns, never increasing the layer's output error; same bits). Windows: with "windows": null the point's calibration windows
     (calibration half, random offsets drawn with the point's seed, which may overlap); with
     "windows": n, n NON-overlapping --calib-window tiles of the calibration half picked with the
     seed (physkern.data.calibration_tiles), so held-out and training windows share no text
     and more text than the quantizer's calibration can be used. They are shuffled with the
     seed; the last `holdout` are held out and the
     trained values are kept only if their KL went down (else the quantized values are
     restored; the point's "finetune" says which, with the KL before/after and the loss curve).
  4. "lattice": {"xi": number > 0 or "inf", "eps": number in (0, 1) or null (default null =
     exact)}: physkern.research.attention.enable_lattice for the evaluation (decay bias -(i - j)/xi).
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

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from ..commands._common import resolve_window
from .plot import plot

# A long run also reports the standard shorter run's figure (its windows are the leading ones),
# so one 102,400-token sweep fills both the 16k and the 100k tables.
PREFIX_TOKENS = (16384,)
DEFAULT_TOKENS = 131072  # 128 windows of 1024: 130,944 scored tokens (acceptance: >= 100k)
DEFAULT_OUT_DIR = "bench/results"


# ----------------------------------------------------------------------------------------------
# recipes


# The recipe format, its validators and the steps' glue live in physkern.recipe (one place);
# re-exported here for code that imports them from the sweep.
from ..recipe import (FINETUNE_DEFAULTS, LATTICE_KEYS, PRUNE_AMOUNTS, PRUNE_RULES,  # noqa: F401,E402
                      Recipe, apply_prune, apply_recipe, default_label, finetune_windows,
                      is_random, needs_calibration, parse_finetune, parse_lattice, parse_prune,
                      parse_smooth, run_finetune, with_seed)
from ..recipe import load_recipes as _load_recipes  # noqa: E402


def load_recipes(path: str) -> list[Recipe]:
    """Read and validate a recipes file (physkern.recipe.load_recipes): a list of Recipe
    objects (which also allow r["name"], r["config"], ... read access)."""
    return _load_recipes(path)


def prefixes(res) -> dict:
    """{"prefix": {"16384": {...}}}: the same point's perplexity on the leading PREFIX_TOKENS of
    the evaluation stream (the shorter protocol's exact windows), derived from the per-window
    NLLs; {} when the run was not longer or the protocol does not allow it."""
    from ..eval import prefix_perplexity
    got = {str(n): pre for n in PREFIX_TOKENS if (pre := prefix_perplexity(res, n)) is not None}
    return {"prefix": got} if got else {}


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def point_key(recipe: str, seed: int, config: dict | None, prune: dict | None,
              lattice: dict | None, smooth: dict | None = None,
              finetune: dict | None = None, embedding: dict | None = None,
              dense_dtype: str | None = None, factorize: dict | None = None) -> tuple:
    """What makes a point the same point when resuming. embedding, dense_dtype and factorize
    join the key only when set, so the keys of points recorded before they existed are
    unchanged."""
    key = (recipe, seed, _canon(config), _canon(prune), _canon(lattice), _canon(smooth),
           _canon(finetune))
    if embedding is not None or dense_dtype is not None:
        key += (_canon(embedding), _canon(dense_dtype))
    if factorize is not None:
        key += ("factorize", _canon(factorize))
    return key


def _key_of(point: dict) -> tuple:
    # points written before smooth/prune/finetune/lattice existed lack the keys: None, as for
    # plain recipes; those written before a fine-tuning key existed ran with its default
    ft = (point.get("finetune") or {}).get("spec")
    return point_key(point["recipe"], point["seed"], point["config"],
                     (point.get("prune") or {}).get("spec"), point.get("lattice"),
                     point.get("smooth"), None if ft is None else {**FINETUNE_DEFAULTS, **ft},
                     point.get("embedding"), point.get("dense_dtype"), point.get("factorize"))


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


def run(recipes: str, *, model: str | None = None, corpus: str | None = None,
        device: str = "cpu", tokens: int | None = DEFAULT_TOKENS, window: int | None = None,
        stride: int | None = None, batch_size: int = 1, name: str | None = None,
        out_dir: str = DEFAULT_OUT_DIR, only: list[str] | None = None, calib_windows: int = 32,
        calib_window: int | None = None, seeds: list[int] | None = None,
        fresh: bool = False, also_eval: list[str] | None = None,
        save_models: str | None = None, calib_corpus: str | None = None,
        also_eval_tokens: int | None = None) -> Path:
    """Run every recipe (and seed) of the recipes file `recipes`; returns the results JSON path
    (<out_dir>/<name>.json, name defaulting to the file's stem; a PNG and a markdown table are
    written / printed beside it).

    model / corpus: load_model / load_corpus specs (None = the packaged ones); device: torch
    device. Evaluation: `tokens` of the evaluation text (0 or None = all) in windows of `window`
    tokens (None = min(context, 1024)) with `stride` (None = window), `batch_size` windows per
    forward. Calibration: `calib_windows` windows of `calib_window` tokens (None = window).
    only: run only these recipe names; seeds: override the seeds of every random recipe;
    fresh: move an existing results file aside instead of resuming from it. also_eval: other
    corpora (load_corpus specs, e.g. ["c4"]) whose evaluation part every new point is also
    scored on, with the same token count and windows (out of the calibration domain: the
    recipes calibrate and fine-tune on `corpus` only); recorded per point under
    "other_corpora", never part of the resume key; a plain full-precision point already in the
    file gets the missing ones filled in. also_eval_tokens: score the also-eval corpora on this
    many tokens instead (same window; e.g. when their evaluation part is shorter than `tokens`;
    0 = all of it; recorded in the setup). save_models: a directory; every new point's model is
    saved (physkern.save_quantized, tokenizer beside it) to <save_models>/<recipe>-seed<seed>
    (replacing only a physkern model there), e.g. to time its decoding later. calib_corpus:
    calibrate and fine-tune on this corpus's calibration part instead of `corpus`'s (e.g. a
    mixture "wiki+code+multilingual+technical"; recorded in the setup). Bad values raise
    ValueError naming the argument.
    """
    from ..data import DEFAULT_CORPUS, evaluation_tokens, load_corpus
    from ..eval import perplexity
    from ..models import decoder_linear_layers, load_model, resolve_model_name
    from ..provenance import provenance, versions, write_json
    from ..quant.accounting import bits_report

    recipes_file = recipes
    recipes = load_recipes(recipes_file)
    if only:
        missing = set(only) - {r["name"] for r in recipes}
        if missing:
            raise ValueError(f"only: {sorted(missing)} not in {recipes_file} (recipes: "
                             f"{[r['name'] for r in recipes]})")
        recipes = [r for r in recipes if r["name"] in only]
    if tokens is not None and tokens < 0:
        raise ValueError(f"tokens must be >= 0 (0 = all), got {tokens}")
    if seeds is not None and any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative integers, got {seeds}")
    if calib_windows <= 0:
        raise ValueError(f"calib-windows must be positive, got {calib_windows}")
    also_eval = list(dict.fromkeys(also_eval or []))
    calibrated_on = set((calib_corpus or corpus or DEFAULT_CORPUS).split("+")) | \
        {corpus or DEFAULT_CORPUS}
    if calibrated_on & set(also_eval):
        raise ValueError(f"also-eval: {also_eval} includes {sorted(calibrated_on & set(also_eval))}"
                         ", the evaluation corpus or part of the calibration corpus; name "
                         "corpora outside the calibration domain only")
    name = name or Path(recipes_file).stem
    json_path = Path(out_dir) / f"{name}.json"
    old = None
    if fresh:
        backup = move_aside(json_path)
        if backup is not None:
            print(f"--fresh: moved {json_path} to {backup}")
    else:
        old = read_results(json_path)

    model_spec, n_tokens = model, tokens
    corpus = load_corpus(corpus)
    calib_source = corpus if calib_corpus is None else load_corpus(calib_corpus)
    model, tokenizer = load_model(model_spec, device=device)
    window = resolve_window(model, window)
    calib_window = calib_window or window
    resolve_window(model, calib_window)
    tokens = evaluation_tokens(tokenizer, corpus, n_tokens or None)
    others = {spec: load_corpus(spec) for spec in also_eval}
    if also_eval_tokens is not None and not also_eval:
        raise ValueError("also-eval-tokens: only used with also-eval")
    if also_eval_tokens is not None and also_eval_tokens < 0:
        raise ValueError(f"also-eval-tokens must be >= 0 (0 = all), got {also_eval_tokens}")
    n_other = n_tokens if also_eval_tokens is None else also_eval_tokens
    other_tokens = {spec: evaluation_tokens(tokenizer, c, n_other or None)
                    for spec, c in others.items()}
    model_name = resolve_model_name(model_spec)
    setup = {"model": model_name, "corpus": corpus.describe(),
             "protocol": {"kind": "non-overlapping" if stride in (None, window) else "sliding",
                          "window": window, "stride": stride or window,
                          "tokens_input": int(tokens.numel()), "batch_size": batch_size,
                          "dtype": "float32", "text": "evaluation part (second half of the "
                          "documents)"},
             "calibration": {"windows": calib_windows, "window": calib_window,
                             "tokens": calib_windows * calib_window,
                             "text": "calibration part (first half of the documents), windows at "
                                     "offsets drawn with the point's seed",
                             "disjoint_from_evaluation": True}}
    if calib_corpus is not None:   # absent otherwise: earlier results files keep their setup
        setup["calibration"]["corpus"] = calib_source.describe()
    if also_eval_tokens is not None:   # likewise
        setup["also_eval_tokens"] = also_eval_tokens
    points = []
    if old is not None:
        if _canon(old.get("setup")) != _canon(setup):
            raise ValueError(f"results: {str(json_path)!r} was made with another setup (model, "
                             "corpus, tokens, window or calibration); pass --fresh to start over "
                             "(the old file is moved to <name>.json.bak-<timestamp>) or --name "
                             "to write elsewhere")
        points = old["points"]
    done = {_key_of(p) for p in points}

    def score_others(m, have: dict | None = None) -> dict:
        """Perplexity of m on every also-eval corpus not in `have` (same protocol as wiki)."""
        out = dict(have or {})
        for spec, toks in other_tokens.items():
            if spec in out:
                continue
            o = perplexity(m, toks, window, stride, batch_size, model_name=model_name,
                           corpus_name=others[spec].name)
            out[spec] = {"perplexity": o.perplexity, "mean_nll": o.mean_nll,
                         "tokens_scored": o.tokens_scored, "windows": o.windows,
                         "corpus": others[spec].describe(), "seconds": o.seconds,
                         **prefixes(o)}
            print(f"  {spec}: perplexity {o.perplexity:.3f} ({o.tokens_scored} tokens)")
        return out

    def save():
        payload = {"experiment": "quantization recipes: perplexity vs true bits/weight",
                   "recipes_file": str(recipes_file), "setup": setup,
                   "seeds": "per point (k-means init and calibration-window draw)",
                   "points": points, "summary": summarize(points), **provenance(device)}
        write_json(json_path, payload)

    sweep_calibration = {"windows": calib_windows, "window": calib_window}
    for r in recipes:
        if r.calibration is not None and r.calibration != sweep_calibration:
            raise ValueError(f"recipe {r.name!r}: calibration {r.calibration} differs from this "
                             f"sweep's {sweep_calibration}; a sweep calibrates every point the "
                             "same way: set it with --calib-windows / --calib-window")
    if other_tokens:  # plain full-precision points: scoring them again is cheap and exact
        plain = {r.name for r in recipes if r.config is None and r.embedding is None
                 and not (r.smooth or r.prune or r.finetune or r.lattice or r.factorize)}
        for p in points:
            if p["recipe"] in plain and set(other_tokens) - set(p.get("other_corpora", {})):
                print(f"{p['recipe']}: scoring {sorted(other_tokens)}")
                m, _ = load_model(model_spec, device=device)
                p["other_corpora"] = score_others(m, p.get("other_corpora"))
                del m
                save()
    for r in recipes:
        varies = r.is_random()
        point_seeds = (seeds or r.seeds) if varies else r.seeds[:1]
        for seed in point_seeds:
            cfg = with_seed(r.config, seed)
            cfg_dict = None if cfg is None else cfg.to_dict()
            emb = with_seed(r.embedding, seed)
            emb_dict = None if emb is None else emb.to_dict()
            fact_dict = None if r.factorize is None else r.to_dict()["factorize"]
            if point_key(r.name, seed, cfg_dict, r.prune, r.lattice, r.smooth, r.finetune,
                         emb_dict, r.dense_dtype, fact_dict) in done:
                print(f"{r.name} seed {seed}: already in {json_path}, skipped")
                continue
            t0 = time.perf_counter()
            m, _ = load_model(model_spec, device=device)
            t_load = time.perf_counter() - t0
            # smooth -> prune -> quantize (+ head) -> dense dtype -> fine-tune -> lattice; the
            # fine-tuning teacher is the full-precision model as loaded
            applied = apply_recipe(m, replace(r, calibration=sweep_calibration), tokenizer,
                                   calib_source, seed, progress=True, batch_size=batch_size)
            calib, report, pruned, tuned = (applied.calibration, applied.quantization,
                                            applied.prune, applied.finetune)
            if pruned is not None:
                pruned["seconds"] += t_load  # since the load, as before recipes moved out
            t_q = t_load + applied.seconds_quantize
            if tuned is not None:
                print(f"{r.name} seed {seed}: finetune {tuned['note']} "
                      f"({tuned['seconds']:.0f} s)")
            rep = bits_report(m)
            res = perplexity(m, tokens, window, stride, batch_size,
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
            point = {"recipe": r.name, "label": r.label, "seed": seed,
                     "deterministic": not varies, "config": cfg_dict,
                     "smooth": r.smooth, "prune": pruned, "finetune": tuned,
                     "lattice": r.lattice,
                     **({"embedding": emb_dict} if emb_dict is not None else {}),
                     **({"dense_dtype": r.dense_dtype} if r.dense_dtype is not None else {}),
                     **({"factorize": fact_dict} if fact_dict is not None else {}),
                     "git_commit": versions()["git_commit"],  # points of one file may span commits
                     "perplexity": res.perplexity, "mean_nll": res.mean_nll,
                     "tokens_scored": res.tokens_scored, "windows": res.windows,
                     **prefixes(res),
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
                     "note": r.note}
            if other_tokens:
                point["other_corpora"] = score_others(m)
            if save_models is not None and rep.layers:
                from ..serialization import save_quantized
                saved = save_quantized(m, Path(save_models) / f"{r.name}-seed{seed}", tokenizer,
                                       overwrite=True)
                print(f"{r.name} seed {seed}: saved to {saved}")
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
                print(f"{r.name}: pruned {pruned['layers_factorised']} layers "
                      f"({pruned['removed_fraction']:.2%} of decoder linear parameters), ranks "
                      f"{pruned['ranks']}")
            print(f"{r.name} seed {seed}: perplexity {res.perplexity:.3f}; "
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
    return json_path


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
                    **_other_means(ps),
                    **_prefix_means(ps),
                    **({"prune": {k: ps[0]["prune"][k] for k in
                                  ("spec", "ranks", "parameters_removed", "removed_fraction")}}
                       if ps[0].get("prune") else {}),
                    **({"lattice": ps[0]["lattice"]} if ps[0].get("lattice") else {}),
                    **({"smooth": ps[0]["smooth"]} if ps[0].get("smooth") else {}),
                    **({"finetune": {"spec": ps[0]["finetune"]["spec"],
                                     "kept": [p["finetune"]["kept"] for p in ps]}}
                       if ps[0].get("finetune") else {})})
    return out


def _other_means(ps: list[dict]) -> dict:
    """{"other_corpora": {spec: {perplexity_mean, seeds}}} over the points scored on each other
    corpus ({} when none was)."""
    specs = sorted({s for p in ps for s in p.get("other_corpora", {})})
    if not specs:
        return {}
    out = {}
    for spec in specs:
        got = [p for p in ps if spec in p.get("other_corpora", {})]
        out[spec] = {"perplexity_mean": statistics.fmean(p["other_corpora"][spec]["perplexity"]
                                                         for p in got),
                     "seeds": [p["seed"] for p in got]}
    return {"other_corpora": out}


def _prefix_means(ps: list[dict]) -> dict:
    """{"prefix": {n: {perplexity_mean, perplexity_min, perplexity_max, tokens_scored}}} over the
    points that carry that prefix, and the same per other corpus ({} when no point has one)."""
    def means(get) -> dict:
        out = {}
        for n in sorted({n for p in ps for n in (get(p) or {})}, key=int):
            got = [get(p)[n] for p in ps if n in (get(p) or {})]
            ppl = [g["perplexity"] for g in got]
            out[n] = {"perplexity_mean": statistics.fmean(ppl), "perplexity_min": min(ppl),
                      "perplexity_max": max(ppl), "tokens_scored": got[0]["tokens_scored"],
                      "points": len(got)}
        return out
    got = means(lambda p: p.get("prefix"))
    specs = sorted({s for p in ps for s in p.get("other_corpora", {})})
    other = {spec: m for spec in specs
             if (m := means(lambda p: p.get("other_corpora", {}).get(spec, {}).get("prefix")))}
    return {**({"prefix": got} if got else {}), **({"prefix_other_corpora": other} if other else {})}


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
    other = [s for s in payload["summary"] if "other_corpora" in s]
    if other:
        n_other = payload["setup"].get("also_eval_tokens")
        lines += ["", "Out of the calibration domain (same windows, "
                  + ("same token count" if n_other is None else f"first {n_other} tokens")
                  + ", evaluation part of another packaged corpus): " + "; ".join(
                      f"{s['recipe']} " + ", ".join(
                          f"{spec} {o['perplexity_mean']:.2f} (seeds "
                          f"{','.join(map(str, o['seeds']))})"
                          for spec, o in s["other_corpora"].items()) for s in other)]
    pre = [s for s in payload["summary"] if "prefix" in s]
    if pre:
        lines += ["", "The same points on the leading windows only (the shorter run's exact "
                  "windows, from the per-window NLLs): " + "; ".join(
                      f"{s['recipe']} " + ", ".join(
                          f"{v['tokens_scored']} tokens {v['perplexity_mean']:.2f}"
                          for v in s["prefix"].values()) + "".join(
                          f", {spec} " + ", ".join(f"{v['tokens_scored']} tokens "
                                                   f"{v['perplexity_mean']:.2f}"
                                                   for v in o.values())
                          for spec, o in s.get("prefix_other_corpora", {}).items())
                      for s in pre)]
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
