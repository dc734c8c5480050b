"""A recipe: everything that turns a full-precision model into the quantized one, in one object.

    Recipe(config, embedding, dense_dtype, smooth, prune, finetune, lattice, calibration,
           name, seeds, label, note, description, factorize)

is read and validated here and nowhere else (`Recipe.from_dict`, `load_recipe`, `load_recipes`,
`load_preset`), written back by `Recipe.to_dict` (a round trip), and applied by `apply_recipe`.
The CLI (`physkern quantize`, `physkern run`), `physkern sweep quant` and the presets shipped in
physkern/presets/*.json all go through it.

JSON form (bench/recipes/*.json hold lists of these; a preset file holds one):
    {"name": str,                       unique in a file; the point's key in sweep results
     "config": {...} | null,            physkern.config.config_from_dict input (method, its
                                        settings, "layers" patterns, "overrides" pattern ->
                                        config); null = full precision
     "embedding": {...} | null,         a config for the output head + (tied) input embedding
                                        (physkern.head; no layers/overrides); null = both dense
     "dense_dtype": "float16" | "bfloat16" | null   the unquantized tensors rounded to and counted
                                        at 16 bits (physkern.dense); null = as loaded (fp32)
     "smooth": {"alpha": a in [0, 1]} | null        SmoothQuant scale migration
     "prune": {"rule": "seeds"|"opposite"|"uniform",
               "removed_fraction": f in (0, 1) | "relative_rank": f in (0, 1]} | null
     "finetune": {"steps": 100, "lr": 1e-3, "train_norms": true, "batch_size": 1, "holdout": 2,
                  "schedule": "constant", "windows": null, "code_update_every": 0,
                  "code_update_fraction": 0.1, "code_update_objective": "layer",
                  "code_update_step": 0.05} | null   (defaults shown; lr is RELATIVE, see
                                        physkern.finetune; needs "config"; code_update_every
                                        k > 0: discrete code updates every k steps, not with
                                        "smooth" or "factorize"; objective "linearized": on the
                                        end-to-end loss's gradient, step relative to |Q|)
     "lattice": {"xi": number > 0 | "inf", "eps": number in (0, 1) | null} | null
     "factorize": {"method": "mpo", "chi": int | "bits": b, "cores": 3, "sweeps": 2,
                   "weighted": false, "dtype": "float16", "layers": [...],
                   "quantize": {<a "config" without calibration>} | absent}
                 | {"method": "svd", "rank": int | "bits": b, "weighted": false, ...} | null
                                        layers REPLACED by an MPO / truncated SVD
                                        (physkern.methods.factorized; saved as format 2); with
                                        "quantize" the cores / factors are stored as codebooks
                                        or RTN grids (physkern.methods.factor_quant); with
                                        "finetune" the factors (or their codebooks and scales)
                                        are healed too
     "calibration": {"windows": 32, "window": 1024} | null   calibration windows drawn from the
                                        calibration half of the corpus; null = the caller's
                                        (CLI flags / sweep setup; 32 x 1024 by default)
     "seeds": [int, ...],               default [0] (used by `sweep quant`)
     "label": str, "note": str, "description": str}
See physkern/sweeps/quant.py's docstring for what each step does and how a sweep records it.

`apply_recipe(model, recipe, tokenizer, corpus, seed)` runs, in this order: smoothing ->
pruning -> factorization -> quantization (+ head/embedding) -> dense dtype -> fine-tuning (healing
of factorized layers too) -> lattice attention.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from .config import AnyConfig, config_from_dict

PRUNE_RULES = ("seeds", "opposite", "uniform")  # physkern.research.prune.RULES (checked in tests)
PRUNE_AMOUNTS = ("removed_fraction", "relative_rank")
LATTICE_KEYS = ("xi", "eps")
# The one set of fine-tuning defaults (physkern.finetune.finetune_quantized has the same). lr 1e-3
# is what every committed fine-tuned result used (bench/recipes/codebook_push.json); windows None
# = the quantizer's calibration windows; code_update_every 0 = codes fixed (every result before
# code updates existed), so sweep points recorded without the two keys resume as the same points.
FINETUNE_DEFAULTS = {"steps": 100, "lr": 1e-3, "train_norms": True, "batch_size": 1,
                     "holdout": 2, "schedule": "constant", "windows": None,
                     "code_update_every": 0, "code_update_fraction": 0.1}
# Optional fine-tuning keys: validated, kept in the parsed spec only when not at their default
# (so every spec written before they existed keeps its resume key).
FINETUNE_OPTIONAL = {"code_update_objective": "layer", "code_update_step": 0.05}
DEFAULT_CALIBRATION = {"windows": 32, "window": 1024}
DENSE_DTYPES = ("float16", "bfloat16")
RECIPE_KEYS = ("name", "config", "embedding", "dense_dtype", "smooth", "prune", "finetune",
               "lattice", "calibration", "seeds", "label", "note", "description", "factorize")
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# validators of the parts (each returns the canonical form: resume keys depend on it)


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
    "batch_size", "holdout", "schedule", "windows", "code_update_every",
    "code_update_fraction"} with the defaults filled in (so resume keys are canonical), or
    None."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be an object {{{', '.join(FINETUNE_DEFAULTS)}}} or "
                         f"null, got {spec!r}")
    valid = {**FINETUNE_DEFAULTS, **FINETUNE_OPTIONAL}
    unknown = set(spec) - set(valid)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {', '.join(valid)}")
    out = {**valid, **spec}
    for key in ("steps", "batch_size", "holdout"):
        v = out[key]
        if not _int(v) or v < 1:
            raise ValueError(f"{where}.{key} must be an integer >= 1, got {v!r}")
    lr = out["lr"]
    if not (_number(lr) and 0 < lr < math.inf):
        raise ValueError(f"{where}.lr must be a finite number > 0 (relative Adam step), "
                         f"got {lr!r}")
    from .finetune import SCHEDULES
    if out["schedule"] not in SCHEDULES:
        raise ValueError(f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got "
                         f"{out['schedule']!r}")
    w = out["windows"]
    if w is not None and (not _int(w) or w <= out["holdout"]):
        raise ValueError(f"{where}.windows must be null (the point's calibration windows) or an "
                         f"integer > holdout = {out['holdout']}, got {w!r}")
    if not isinstance(out["train_norms"], bool):
        raise ValueError(f"{where}.train_norms must be true or false, got "
                         f"{out['train_norms']!r}")
    from .finetune import check_code_update_args
    try:
        check_code_update_args(out["code_update_every"], out["code_update_fraction"],
                               out["steps"], out["code_update_objective"],
                               out["code_update_step"])
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None
    out = {**out, "lr": float(lr), "code_update_fraction": float(out["code_update_fraction"]),
           "code_update_step": float(out["code_update_step"])}
    return {k: v for k, v in out.items()
            if k not in FINETUNE_OPTIONAL or v != FINETUNE_OPTIONAL[k]}


def parse_calibration(spec, where: str = "calibration") -> dict | None:
    """Validate a recipe's "calibration" object; returns {"windows": int, "window": int} (the
    missing key from DEFAULT_CALIBRATION) or None (the caller's calibration)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: must be an object {{windows, window}} or null, got {spec!r}")
    unknown = set(spec) - set(DEFAULT_CALIBRATION)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: windows, window")
    out = {**DEFAULT_CALIBRATION, **spec}
    if not _int(out["windows"]) or out["windows"] < 1:
        raise ValueError(f"{where}.windows must be an integer >= 1, got {out['windows']!r}")
    if not _int(out["window"]) or out["window"] < 2:
        raise ValueError(f"{where}.window must be an integer >= 2 (tokens per window), got "
                         f"{out['window']!r}")
    return out


def parse_embedding(spec, where: str = "embedding") -> AnyConfig | None:
    """A config (object or its dict) for the output head + input embedding, or None."""
    if spec is None:
        return None
    cfg = spec
    if isinstance(spec, dict):
        try:
            cfg = config_from_dict(spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    if not hasattr(cfg, "to_dict") or not hasattr(cfg, "method"):
        raise ValueError(f"{where}: must be a quantization config (an object with a 'method') or "
                         f"null, got {spec!r}")
    if cfg.layers is not None or cfg.overrides:
        raise ValueError(f"{where}: the head/embedding config takes no `layers` or `overrides` "
                         "(it applies to the output head and input embedding)")
    return cfg


def parse_factorize(spec, where: str = "factorize"):
    """A factorization config (physkern.methods.factorized: "mpo", "svd"; object or its dict)
    or None."""
    if spec is None:
        return None
    from .methods.factorized import factorization_from_dict, is_factorization
    cfg = spec
    if isinstance(spec, dict):
        try:
            cfg = factorization_from_dict(spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    if not is_factorization(cfg):
        raise ValueError(f"{where}: must be a factorization config (an object with method "
                         f"\"mpo\" or \"svd\") or null, got {spec!r}")
    return cfg


def parse_dense_dtype(value, where: str = "dense_dtype") -> str | None:
    if value is None or value in DENSE_DTYPES:
        return value
    raise ValueError(f"{where} must be null (dense tensors as loaded), "
                     f"{' or '.join(repr(d) for d in DENSE_DTYPES)}, got {value!r}")


def _parse_config(spec, where: str) -> AnyConfig | None:
    if spec is None or not isinstance(spec, dict):
        return spec
    try:
        return config_from_dict(spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _all_configs(cfg):
    yield cfg
    for c in (cfg.overrides or {}).values():
        yield from _all_configs(c)


def needs_calibration(cfg) -> bool:
    return cfg is not None and any(c.needs_calibration for c in _all_configs(cfg))


def is_random(cfg, finetune: dict | None = None) -> bool:
    """A recipe varies with the seed when it fits codebooks (k-means init) or draws calibration
    (for the quantizer or for fine-tuning)."""
    if finetune is not None:
        return True
    if cfg is None:
        return False
    return any(c.method == "codebook" or c.needs_calibration for c in _all_configs(cfg))


def with_seed(cfg, seed: int):
    """Copy of cfg with every codebook config's k-means seed set to `seed` (None stays None)."""
    if cfg is None:
        return None
    ov = {k: with_seed(v, seed) for k, v in (cfg.overrides or {}).items()}
    if hasattr(cfg, "seed"):
        return replace(cfg, seed=seed, overrides=ov)
    return replace(cfg, overrides=ov)


def default_label(cfg, prune: dict | None, lattice: dict | None,
                  smooth: dict | None = None, finetune: dict | None = None,
                  factorize=None) -> str:
    """"FP" for a plain model, else the parts that apply joined by "+" (e.g. codebook+prune)."""
    parts = (["smooth"] if smooth else []) + \
        ([factorize.method] if factorize is not None else []) + \
        ([cfg.method] if cfg is not None else []) + \
        (["prune"] if prune else []) + (["finetune"] if finetune else []) + \
        (["lattice"] if lattice else [])
    return "+".join(parts) or "FP"


# ----------------------------------------------------------------------------------------------
# the Recipe


@dataclass
class Recipe:
    """One recipe (see the module docstring for every field's meaning). Constructing one
    validates it and puts every part in canonical form; `config`/`embedding` may be given as
    config objects or their dicts."""
    config: Optional[AnyConfig] = None
    embedding: Optional[AnyConfig] = None
    dense_dtype: Optional[str] = None
    smooth: Optional[dict] = None
    prune: Optional[dict] = None
    finetune: Optional[dict] = None
    lattice: Optional[dict] = None
    calibration: Optional[dict] = None
    name: str = "recipe"
    seeds: list = field(default_factory=lambda: [0])
    label: str = ""
    note: str = ""
    description: str = ""
    factorize: Optional[object] = None

    def __post_init__(self):
        self._validate("recipe")

    def _validate(self, where: str) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}: name must be a non-empty string, got {self.name!r}")
        self.config = _parse_config(self.config, f"{where}: config")
        if self.config is not None and not hasattr(self.config, "to_dict"):
            raise ValueError(f"{where}: config must be a quantization config object or null, got "
                             f"{self.config!r}")
        self.embedding = parse_embedding(self.embedding, f"{where}: embedding")
        self.dense_dtype = parse_dense_dtype(self.dense_dtype, f"{where}: dense_dtype")
        self.smooth = parse_smooth(self.smooth, f"{where}: smooth")
        self.prune = parse_prune(self.prune, f"{where}: prune")
        self.lattice = parse_lattice(self.lattice, f"{where}: lattice")
        self.finetune = parse_finetune(self.finetune, f"{where}: finetune")
        self.calibration = parse_calibration(self.calibration, f"{where}: calibration")
        self.factorize = parse_factorize(self.factorize, f"{where}: factorize")
        if self.finetune is not None and self.config is None and self.factorize is None:
            raise ValueError(f"{where}: finetune needs a quantization config (it trains the "
                             "quantized layers' codebooks and scales) or a factorize config "
                             "(it heals the factors), got both null")
        if self.finetune is not None and self.finetune["code_update_every"] and (
                self.smooth is not None or self.factorize is not None):
            raise ValueError(f"{where}: finetune.code_update_every needs the teacher's layers "
                             "to be what the quantized layers approximate (they are not after "
                             "smooth or factorize); set it to 0 or drop smooth / factorize")
        if self.embedding is not None and self.config is None:
            raise ValueError(f"{where}: embedding needs a quantization config for the decoder "
                             "layers too, got config null")
        seeds = self.seeds
        if not isinstance(seeds, (list, tuple)) or not seeds or not all(
                _int(s) and s >= 0 for s in seeds):
            raise ValueError(f"{where}: seeds must be a non-empty list of non-negative "
                             f"integers, got {seeds!r}")
        self.seeds = list(seeds)
        for key in ("label", "note", "description"):
            if getattr(self, key) is None:
                setattr(self, key, "")
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{where}: {key} must be a string, got {getattr(self, key)!r}")
        if not self.label:
            self.label = default_label(self.config, self.prune, self.lattice, self.smooth,
                                       self.finetune, self.factorize)

    # dict-style read access (r["config"]) for code written against the old list-of-dicts loader
    def __getitem__(self, key: str):
        if key not in RECIPE_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def from_dict(cls, d, where: str = "recipe") -> "Recipe":
        """Validate a recipe object (JSON form); errors start with `where` (file and name)."""
        if not isinstance(d, dict) or not isinstance(d.get("name", "recipe"), str) or \
                not d.get("name", "recipe"):
            raise ValueError(f"{where}: must be an object with a non-empty string 'name'")
        unknown = set(d) - set(RECIPE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: "
                             f"{', '.join(RECIPE_KEYS)}")
        obj = cls.__new__(cls)
        for f in fields(cls):
            if f.name in d:
                setattr(obj, f.name, d[f.name])
            else:
                setattr(obj, f.name, f.default_factory() if callable(f.default_factory)
                        else f.default)
        obj._validate(where)
        return obj

    def to_dict(self) -> dict:
        """JSON form; Recipe.from_dict(r.to_dict()) == r."""
        return {"name": self.name,
                "config": None if self.config is None else self.config.to_dict(),
                "embedding": None if self.embedding is None else self.embedding.to_dict(),
                "dense_dtype": self.dense_dtype, "smooth": self.smooth, "prune": self.prune,
                "finetune": self.finetune, "lattice": self.lattice,
                "calibration": self.calibration, "seeds": list(self.seeds),
                "label": self.label, "note": self.note, "description": self.description,
                **({"factorize": self.factorize.to_dict()} if self.factorize is not None
                   else {})}

    def needs_calibration(self) -> bool:
        """Whether applying it draws calibration windows (quantizer, smoothing or fine-tuning)."""
        return (needs_calibration(self.config) or needs_calibration(self.embedding)
                or self.smooth is not None or self.finetune is not None
                or (self.factorize is not None and self.factorize.needs_calibration))

    def is_random(self) -> bool:
        return is_random(self.config, self.finetune) or (
            self.embedding is not None and is_random(self.embedding)) or (
            self.factorize is not None and self.factorize.needs_calibration)

    def calibration_or_default(self) -> dict:
        return self.calibration or dict(DEFAULT_CALIBRATION)


def _read_json(path) -> object:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipes: {str(path)!r} is not a file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"recipes: {str(path)!r} is not valid JSON: {exc}") from exc


def load_recipes(path) -> list[Recipe]:
    """Read and validate a recipes file (a non-empty JSON list of recipe objects, names unique);
    errors name the file, the recipe and the key."""
    raw = _read_json(path)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"recipes: {str(path)!r} must hold a non-empty JSON list of recipe "
                         "objects")
    out, names = [], set()
    for i, r in enumerate(raw):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
            raise ValueError(f"recipes[{i}] in {path}: must be an object with a non-empty "
                             "string 'name'")
        if r["name"] in names:
            raise ValueError(f"recipes: name {r['name']!r} appears twice in {path}")
        names.add(r["name"])
        out.append(Recipe.from_dict(r, f"recipes[{i}] ({r['name']}) in {path}"))
    return out


def load_recipe(source, name: Optional[str] = None) -> Recipe:
    """One recipe from "FILE:NAME", from (FILE, NAME), or from a file holding one recipe object
    (a preset file) or a one-element list. Errors name the file (and the valid names)."""
    source = str(source)
    if name is None and not Path(source).is_file():
        path, sep, name = source.rpartition(":")
        if not sep or not path or not name:
            raise ValueError(f"recipe: {source!r} is neither a recipe file nor FILE:NAME")
        source = path
    raw = _read_json(source)
    if isinstance(raw, dict):
        r = Recipe.from_dict(raw, f"recipe {source}")
        if name is not None and r.name != name:
            raise ValueError(f"recipe: {source} holds recipe {r.name!r}, not {name!r}")
        return r
    recipes = {r.name: r for r in load_recipes(source)}
    if name is None:
        if len(recipes) != 1:
            raise ValueError(f"recipe: {source} holds {len(recipes)} recipes; name one as "
                             f"FILE:NAME (valid: {', '.join(recipes)})")
        return next(iter(recipes.values()))
    if name not in recipes:
        raise ValueError(f"recipe: no recipe {name!r} in {source}; valid: {', '.join(recipes)}")
    return recipes[name]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> Recipe:
    """The preset shipped in physkern/presets/<name>.json; an unknown name lists the valid ones."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"preset: no preset {name!r}; valid: {', '.join(names)}")
    return load_recipe(PRESETS_DIR / f"{name}.json")


# ----------------------------------------------------------------------------------------------
# applying a recipe


def finetune_windows(spec: dict, tokenizer, corpus, calib, window: int,
                     seed: int) -> tuple:
    """(windows [n, window] token ids, description) a validated fine-tuning spec trains on:
    with spec["windows"] n, n non-overlapping tiles of the calibration text picked with the seed
    (physkern.data.calibration_tiles); else `calib`, the quantizer's calibration windows."""
    if spec["windows"] is None:
        return calib, "the quantizer's calibration windows"
    from .data import calibration_tiles
    return (calibration_tiles(tokenizer, corpus, spec["windows"], window, seed),
            f"{spec['windows']} non-overlapping {window}-token tiles of the calibration part, "
            f"picked with seed {seed}")


def run_finetune(model, teacher, windows, spec: dict, seed: int, source: str) -> dict:
    """physkern.finetune.finetune_quantized with a validated spec; returns its report with
    "spec" and "windows_source" added."""
    from .finetune import finetune_quantized
    return {"spec": spec, "windows_source": source, **finetune_quantized(
        model, teacher, windows, steps=spec["steps"], lr=spec["lr"],
        batch_size=spec["batch_size"], seed=seed, holdout=spec["holdout"],
        train_norms=spec["train_norms"], schedule=spec["schedule"],
        code_update_every=spec["code_update_every"],
        code_update_fraction=spec["code_update_fraction"],
        **{k: spec.get(k, v) for k, v in FINETUNE_OPTIONAL.items()})}


def apply_prune(model, spec: dict) -> dict:
    """RG pruning of `model` in place by the validated spec (physkern/sweeps/quant.py docstring).

    Returns {"spec", "compressed_types", "relative_rank", "ranks" {type: rank},
    "layers_factorised", "layers_considered", "parameters_removed", "decoder_linear_parameters",
    "removed_fraction"}; parameters are counted by physkern.research.prune (both factors).
    """
    from .research.analysis._common import weight_groups
    from .research.prune import (compressed_types, prune_model, ranks_at_fraction, ranks_for_target,
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


@dataclass
class RecipeReport:
    """What apply_recipe did: the seeded config, the quantization report (None without config),
    the prune and fine-tuning reports (None when not in the recipe), the calibration windows
    drawn (None when none were needed) and the seconds up to the end of quantization."""
    recipe: Recipe
    config: Optional[AnyConfig]
    quantization: object
    prune: Optional[dict]
    finetune: Optional[dict]
    calibration: object
    seconds_quantize: float
    seconds: float
    factorize: Optional[dict] = None

    def to_dict(self) -> dict:
        calib = self.calibration
        return {"recipe": self.recipe.to_dict(),
                "config": None if self.config is None else self.config.to_dict(),
                "quantization": None if self.quantization is None else
                self.quantization.to_dict(),
                "prune": self.prune, "finetune": self.finetune,
                "calibration": None if calib is None else {
                    "windows": int(calib.shape[0]), "window": int(calib.shape[1])},
                "seconds_quantize": self.seconds_quantize, "seconds": self.seconds,
                **({"factorize": self.factorize} if self.factorize is not None else {})}


def apply_recipe(model, recipe: Recipe, tokenizer, corpus, seed: int = 0, progress: bool = True,
                 batch_size: int = 1) -> RecipeReport:
    """Apply `recipe` to `model` in place: smoothing -> pruning -> factorization -> quantization
    (+ head and embedding) -> dense dtype -> fine-tuning -> lattice attention.

    seed sets every codebook config's k-means seed and the draw of calibration windows (from
    the calibration half of `corpus`, recipe.calibration or DEFAULT_CALIBRATION) and of the
    fine-tuning windows. The fine-tuning teacher is `model` as given (copied first). With a
    dense dtype, the dense tensors are rounded after quantization and again after fine-tuning
    (fine-tuned norms stay on the stored grid). batch_size: smoothing's calibration batches.
    """
    from .api import quantize
    from .data import calibration_windows
    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a physkern.recipe.Recipe, got {type(recipe).__name__}")
    cfg = with_seed(recipe.config, seed)
    emb = with_seed(recipe.embedding, seed)
    cal = recipe.calibration_or_default()
    calib = None
    if recipe.needs_calibration():
        calib = calibration_windows(tokenizer, corpus, cal["windows"], cal["window"], seed)
    ft_windows = teacher = None
    if recipe.finetune is not None:  # windows drawn first: a bad count fails before the work
        ft_windows = finetune_windows(recipe.finetune, tokenizer, corpus, calib, cal["window"],
                                      seed)
        teacher = copy.deepcopy(model)  # the full-precision model as given
    if recipe.smooth is not None:  # 0. scale migration (model unchanged before quantizing)
        from .smoothquant import smooth_model
        smooth_model(model, calib, recipe.smooth["alpha"], batch_size)
    pruned = None
    if recipe.prune is not None:   # 1. RG pruning (SVD of the full-precision weights)
        pruned = apply_prune(model, recipe.prune)
        pruned["seconds"] = time.perf_counter() - t0
    factorized = None
    if recipe.factorize is not None:  # 1b. MPO / truncated SVD (layers replaced, not quantized)
        from .methods.factorized import apply_factorization
        factorized = apply_factorization(model, recipe.factorize, calib, progress=progress)
    report = None
    if cfg is not None:            # 2. quantization of the layers still dense (+ head)
        uses = needs_calibration(cfg) or needs_calibration(emb)
        report = quantize(model, cfg, calibration=calib if uses else None, progress=progress,
                          embedding=emb)
    if recipe.dense_dtype is not None:  # 3. unquantized tensors at 16 bits
        from .dense import set_dense_storage_dtype
        set_dense_storage_dtype(model, recipe.dense_dtype)
    t_q = time.perf_counter() - t0
    tuned = None
    if recipe.finetune is not None:  # 4. codebooks/scales (and norms) vs the FP teacher
        windows, source = ft_windows
        if recipe.factorize is not None:  # factors (+ codebooks, norms) healed together
            from .methods.factorized import heal_factorized
            spec = recipe.finetune
            tuned = {"spec": spec, "windows_source": source, **heal_factorized(
                model, teacher, windows, steps=spec["steps"], lr=spec["lr"],
                batch_size=spec["batch_size"], seed=seed, holdout=spec["holdout"],
                progress=progress, train_norms=spec["train_norms"],
                schedule=spec["schedule"])}
        else:
            tuned = run_finetune(model, teacher, windows, recipe.finetune, seed, source)
        del teacher
        if recipe.dense_dtype is not None:
            from .dense import set_dense_storage_dtype
            set_dense_storage_dtype(model, recipe.dense_dtype)
    if recipe.lattice is not None:  # 5. lattice attention
        from .research.attention import enable_lattice
        enable_lattice(model, float(recipe.lattice["xi"]), eps=recipe.lattice["eps"])
    return RecipeReport(recipe, cfg, report, pruned, tuned, calib, t_q,
                        time.perf_counter() - t0, factorized)
