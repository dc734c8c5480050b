"""Save and load quantized models: safetensors + JSON, written atomically, loaded defensively.

A saved model is a directory:
  physkern.json       format version, quantized layers and their buffer layout, factorized
                      (MPO / low-rank) layers and theirs ("factorized_layers", format version 2:
                      only written when the model has such layers, so an older physkern refuses
                      the file instead of loading it without them), recipe, bits,
                      and "files": every other file this save wrote (relative paths)
                      shared codebooks ("shared_codebooks", format version 3: only written when
                      the model has them; each such layer's layout names its group in
                      "shared_codebook")
  model.safetensors   every tensor of the model (tied tensors once); a shared codebook once, under
                      "shared_codebooks.<group>.codebooks" (its layers store no codebooks of their
                      own); loading ties the group's layers to that one tensor again
  config.json, tokenizer files   as transformers writes them
Saving never deletes what it did not write: a new directory is written under a temporary name
beside the target and renamed into place; an existing physkern model is replaced (only with
overwrite=True) file by file, the marker physkern.json removed first and written last, so a
crash never leaves something that is taken for a valid model. Other files in the directory stay.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import (INDEX_FILE, MAX_HEADER, ST_DTYPES, TORCH_TO_ST, Checkpoint,  # noqa: F401
                         assign_tensor, init_empty_params, one_line, parse_size,
                         read_safetensors_header, tensor_groups, write_sharded)
from .dense import QUANTIZED_BUFFERS

MARKER = "physkern.json"
FORMAT_VERSION = 1             # quantized layers and embeddings only
FACTORIZED_FORMAT_VERSION = 2  # + "factorized_layers" (MPOLinear / LowRankLinear layouts)
SHARED_FORMAT_VERSION = 3      # + "shared_codebooks" (codebooks shared across layers)
OUTLIERS_FORMAT_VERSION = 4    # + layers with "outliers" (sparse corrections, any of the above)
# what this physkern reads
FORMAT_VERSIONS = (FORMAT_VERSION, FACTORIZED_FORMAT_VERSION, SHARED_FORMAT_VERSION,
                   OUTLIERS_FORMAT_VERSION)
SHARED_PREFIX = "shared_codebooks."   # file key of group g: SHARED_PREFIX + g + ".codebooks"
MAX_GROUP_NAME = 200
MODEL_FILE = "model.safetensors"
# Temporary folders of a save: `.<name>.partial-*` beside a new target, `.physkern.partial-*`
# inside an existing one; `.<name>.old-*` beside it (left by physkern versions that swapped whole
# directories). Only these, for that target, are ever removed as leftovers of a killed save.
_INNER_PARTIAL = ".physkern.partial-"
_PREVIOUS_MARKER = "previous-" + MARKER  # the old marker, set aside in the temporary folder


def is_quantized_dir(path) -> bool:
    """True when `path` is a directory holding a physkern model (its physkern.json marker)."""
    return os.path.isfile(os.path.join(path, MARKER))


def _writable(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK)


def validate_output_dir(path, overwrite: bool = False) -> Path:
    """Check, cheaply and before any work, that save_quantized(..., path, overwrite=overwrite)
    may write there; returns Path(path). Raises ValueError with one line naming the path when:
    it exists and is not a directory; it is a non-empty directory that is not a physkern model;
    it holds a physkern model and overwrite is False (pass overwrite=True / --overwrite); it (or,
    for a new directory, its nearest existing parent) is not writable."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"output path {str(path)!r} is a dangling symbolic link")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"output path {str(path)!r} exists and is not a directory")
        if is_quantized_dir(path) or _interrupted_saves(path):
            if not overwrite:
                what = ("a physkern model" if is_quantized_dir(path)
                        else "an interrupted physkern save")
                raise ValueError(f"output path {str(path)!r} already holds {what}; pass "
                                 "overwrite=True (--overwrite) to replace it")
        else:
            try:
                non_empty = any(path.iterdir())
            except OSError as exc:
                raise ValueError(f"output path {str(path)!r} cannot be listed: "
                                 f"{_one_line(exc)}") from None
            if non_empty:
                raise ValueError(f"output path {str(path)!r} is a non-empty directory that is not a "
                                 "physkern model; refusing to write into it (use a new or empty "
                                 "directory)")
        if not _writable(path):
            raise ValueError(f"output path {str(path)!r} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise ValueError(f"output path {str(path)!r}: {str(parent)!r} is a dangling symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"output path {str(path)!r}: {str(parent)!r} is not a directory")
    if not _writable(parent):
        raise ValueError(f"output path {str(path)!r}: parent directory {str(parent)!r} is not writable")
    return path


def _interrupted_saves(path: Path) -> list[Path]:
    """The `.physkern.partial-*` folders a killed save left inside `path` (such a directory may
    lack its marker when the kill came while files were being swapped in)."""
    try:
        return [e for e in path.iterdir() if e.name.startswith(_INNER_PARTIAL) and e.is_dir()
                and not e.is_symlink()]
    except OSError:
        return []


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory parent/prefix<random> with the usual umask-derived mode (mkdtemp's
    0700 would otherwise end up as the model directory's mode)."""
    for _ in range(100):
        d = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            os.mkdir(d)  # 0o777 & ~umask, applied by the kernel
            return d
        except FileExistsError:
            continue
    raise OSError(f"could not create a temporary directory in {str(parent)!r}")


def _clean_leftovers(path: Path) -> None:
    """Remove temporary folders a killed save of this target left behind (physkern's own
    prefixes for this target only)."""
    patterns = []
    if path.parent.is_dir():
        patterns += [(path.parent, f".{path.name}.partial-"), (path.parent, f".{path.name}.old-")]
    if path.is_dir():
        patterns.append((path, _INNER_PARTIAL))
    for folder, prefix in patterns:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(prefix) and e.is_dir() and not e.is_symlink():
                shutil.rmtree(e, ignore_errors=True)


def _files_under(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under root, sorted."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.append((Path(dirpath) / f).relative_to(root).as_posix())
    return sorted(out)


def _owned_file(path: Path, rel) -> Optional[Path]:
    """path/rel if `rel` (an entry of an old physkern.json "files" list, which may be crafted)
    names a file strictly inside `path`; else None (never removed)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or rel == MARKER:
        return None
    target = path / Path(*p.parts)
    try:
        real_parent = target.parent.resolve(strict=True)
    except OSError:
        return None
    root = path.resolve()
    if real_parent != root and root not in real_parent.parents:
        return None
    return target


def _listed_files(marker: Path) -> list:
    try:
        with open(marker, "rb") as f:
            files = json.loads(f.read()).get("files", [])
        return files if isinstance(files, list) else []
    except (OSError, ValueError, AttributeError):
        return []


def _old_files(path: Path) -> list:
    """Files the previous model in `path` listed as its own: from its marker, and from the
    marker a save killed mid-swap had set aside in its temporary folder."""
    files = _listed_files(path / MARKER)
    for d in _interrupted_saves(path):
        files += _listed_files(d / _PREVIOUS_MARKER)
    return files


def save_quantized(model: nn.Module, path, tokenizer=None, extra: Optional[dict] = None,
                   overwrite: bool = False, max_shard_size=None) -> Path:
    """Write `model` (with QuantizedLinear layers) to directory `path`; returns the path.

    path        a new directory (created, with the usual umask-derived mode), an empty one, or
                one holding a physkern model, which is replaced only with overwrite=True.
                Everything else in an existing directory (the user's files and folders) and
                the directory's own mode are kept; of the previous model only the files its
                physkern.json lists ("files") and this save does not write again are removed.
    tokenizer   saved beside the model when given.
    extra       extra JSON-serialisable keys for physkern.json.
    max_shard_size  None: one model.safetensors; else bytes (int) or "500MB"/"2GB": tensors go
                to shards of at most that size (model-00001-of-0000N.safetensors +
                model.safetensors.index.json, Hugging Face's convention) when they do not fit one.

    Atomic: the files are written to a temporary folder first (beside a new target, inside an
    existing one). A new target is renamed into place; into an existing one, the old marker
    physkern.json is removed first (a half-swapped directory is never taken for a model), each
    new file is moved in with os.replace, and the marker is written last.
    """
    from .quant.accounting import bits_report
    path = Path(path)
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    validate_output_dir(path, overwrite)
    layers, embeddings = quantized_module_layouts(model)
    factorized = factorized_module_layouts(model)  # checked as loading will: before any write
    shared = shared_codebook_layouts(model)
    report = bits_report(model)
    meta = model_marker(model, layers, embeddings, report, extra, factorized, shared)

    def write(tmp: Path) -> None:
        _write_config(model, layers, embeddings, tmp, factorized, shared)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_tensors(model, tmp, max_bytes, shared)
    return write_model_dir(path, meta, write)


def model_marker(model: nn.Module, layers: dict, embeddings: dict, report,
                 extra: Optional[dict] = None, factorized: Optional[dict] = None,
                 shared: Optional[dict] = None) -> dict:
    """physkern.json's content (without "files") for `model` with these layouts and bits;
    factorized: factorized_module_layouts(model), shared: shared_codebook_layouts(model) (None:
    computed here)."""
    if factorized is None:
        factorized = factorized_module_layouts(model)
    if shared is None:
        shared = shared_codebook_layouts(model)
    return {"format_version": _format_version(factorized, shared, has_outliers(layers)),
            "architecture": type(model).__name__,
            "quantized_layers": layers, "quantized_embeddings": embeddings,
            **({"factorized_layers": factorized} if factorized else {}),
            **({"shared_codebooks": shared} if shared else {}),
            "dense_dtype": getattr(model.config, "physkern_dense_dtype", None), "bits": {
                "quantized_bits_per_weight": report.quantized_bits_per_weight,
                "model_bits_per_weight": report.model_bits_per_weight,
                "total_bytes": report.total_bytes}, **(extra or {})}


def write_model_dir(path, meta: dict, write) -> Path:
    """The atomic part of save_quantized: write(folder) puts every file of the model (config,
    tokenizer, tensors) in a temporary folder; this then installs them at `path` as
    save_quantized's docstring says, physkern.json (`meta` + "files") last. Call
    validate_output_dir(path, overwrite) first."""
    path = Path(path)
    meta = dict(meta)
    existing = path.is_dir()
    if not existing:
        path.parent.mkdir(parents=True, exist_ok=True)
    old_files = _old_files(path) if existing else []  # before leftovers are cleaned
    _clean_leftovers(path)
    tmp = _make_temp_dir(path, _INNER_PARTIAL) if existing else \
        _make_temp_dir(path.parent, f".{path.name}.partial-")
    try:
        write(tmp)
        for reserved in (MARKER, _PREVIOUS_MARKER):
            if (tmp / reserved).exists():
                raise ValueError(f"the tokenizer or config wrote a file named {reserved}, "
                                 "which physkern reserves")
        files = _files_under(tmp)
        meta["files"] = files
        marker_text = json.dumps(meta, indent=2)
        if not existing:
            with open(tmp / MARKER, "w") as f:
                f.write(marker_text)
            os.replace(tmp, path)
            return path
        # The old marker goes first (set aside where a killed save's successor finds its
        # "files" list), so a half-swapped directory is never taken for a model.
        with open(tmp / _PREVIOUS_MARKER, "w") as f:
            json.dump({"files": old_files}, f)
        try:
            os.unlink(path / MARKER)
        except FileNotFoundError:
            pass
        for rel in files:
            dst = path / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / rel, dst)
        new = set(files)
        for rel in old_files:
            if rel in new:
                continue
            target = _owned_file(path, rel)
            if target is not None and (target.is_file() or target.is_symlink()):
                target.unlink()
        with open(tmp / MARKER, "w") as f:
            f.write(marker_text)
        os.replace(tmp / MARKER, path / MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def quantized_module_layouts(model: nn.Module) -> tuple[dict, dict]:
    """({layer name: QuantizedLinear.layer_meta()}, {embedding name: QuantizedEmbedding meta
    with "source", the layer holding its table}) of `model`; factorized modules are described
    by factorized_module_layouts; any other compressed module is an error (save_quantized
    cannot store it)."""
    from .embedding import QuantizedEmbedding
    from .layers import QuantizedLinear
    names = {id(m): n for n, m in model.named_modules()}
    factorized = {id(m) for m in model.modules() if isinstance(m, factorized_classes())}
    layers, embeddings, other = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            layers[name] = m.layer_meta()
        elif isinstance(m, QuantizedEmbedding):
            embeddings[name] = {**m.layer_meta(), "source": names[id(m.weight_source)]}
        elif hasattr(m, "weight_numel") and hasattr(m, "storage_bits") and \
                id(m) not in factorized:
            other.append(name)
    if other:
        raise ValueError(f"save_quantized supports QuantizedLinear, QuantizedEmbedding, "
                         f"MPOLinear and LowRankLinear only; found other compressed modules: "
                         f"{other[:3]}")
    return layers, embeddings


def factorized_module_layouts(model: nn.Module) -> dict:
    """{layer name: factorized_layer_meta} of every MPOLinear / LowRankLinear,
    the factors' dtypes as the file stores them (stored_dtype: a dense storage dtype narrower
    than the factors applies to them, as physkern.dense rounded them), each layout checked as
    load_quantized will check it (ValueError naming the layer)."""
    from .dense import dense_storage_dtype
    dense = dense_storage_dtype(model)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, factorized_classes()):
            fm = factorized_layer_meta(
                m, lambda buf, t, name=name: stored_dtype(f"{name}.{buf}", t, dense))
            out[name] = check_factorized_meta(f"layer {name}", fm)
    return out


def shared_codebook_layouts(model: nn.Module) -> dict:
    """{group: {"stages", "k", "block_dim", "codebook_dtype", "layers": [names]}} of the model's
    shared codebooks (physkern.shared_codebook; {} when none). ValueError unless each group is
    one tensor held by all of its layers (physkern.quant.accounting.shared_codebook_groups)."""
    from .quant.accounting import shared_codebook_groups
    out = {}
    for group, g in shared_codebook_groups(model).items():
        cb = model.get_submodule(g["layers"][0]).codebooks
        s, _, k, d = cb.shape
        out[group] = {"stages": int(s), "k": int(k), "block_dim": int(d),
                      "codebook_dtype": _dtype_name(cb), "layers": list(g["layers"])}
    return out


def shared_key(group: str) -> str:
    """The file key of a shared codebook group's tensor."""
    return f"{SHARED_PREFIX}{group}.codebooks"


def has_outliers(layers: dict) -> bool:
    """Whether any layer layout has sparse outliers (an untied quantized embedding's own table
    is one of the layers, "<name>.table")."""
    return any(isinstance(lm, dict) and lm.get("outliers") is not None for lm in layers.values())


def _format_version(factorized: dict, shared: Optional[dict] = None,
                    outliers: bool = False) -> int:
    """Version 1 unless the model has factorized layers (2), shared codebooks (3) or sparse
    outliers (4, with or without the others): older readers then refuse the file instead of
    loading it without them."""
    if outliers:
        return OUTLIERS_FORMAT_VERSION
    if shared:
        return SHARED_FORMAT_VERSION
    return FACTORIZED_FORMAT_VERSION if factorized else FORMAT_VERSION


def _write_config(model: nn.Module, layers: dict, embeddings: dict, folder: Path,
                  factorized: Optional[dict] = None, shared: Optional[dict] = None) -> None:
    """config.json under model type "physkern" (physkern.hf_config; the factorized layouts
    beside the quantized ones, format version 2, and the shared codebooks, version 3, when there
    are any) and, for a model that generates, generation_config.json. factorized / shared:
    None = computed from the model."""
    from .hf_config import physkern_config_dict
    if factorized is None:
        factorized = factorized_module_layouts(model)
    if shared is None:
        shared = shared_codebook_layouts(model)
    d = physkern_config_dict(model.config.to_diff_dict(), layers, embeddings)
    outliers = has_outliers(layers)
    if factorized or shared or outliers:
        d["quantization_config"]["format_version"] = _format_version(factorized, shared,
                                                                     outliers)
    if factorized:
        d["quantization_config"]["factorized_layers"] = factorized
    if shared:
        d["quantization_config"]["shared_codebooks"] = shared
    with open(folder / "config.json", "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)


def stored_dtype(key: str, t: torch.Tensor, dense: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the file stores state-dict entry `key` in: a dense float tensor (physkern.dense)
    wider than the dense storage dtype at that dtype, anything else at its own."""
    from .dense import is_dense
    if dense is not None and is_dense(key, t) and t.element_size() > dense.itemsize:
        return dense
    return t.dtype


def stored_tensor(key: str, t: torch.Tensor, dense: Optional[torch.dtype]) -> torch.Tensor:
    """State-dict entry `key` as the file stores it: dense float tensors at the dense storage
    dtype (physkern.dense; lossless: they were rounded to it in memory), contiguous, on CPU."""
    dt = stored_dtype(key, t, dense)
    if dt != t.dtype:
        t = t.to(dt)
    return t.detach().contiguous().cpu()


def _write_tensors(model: nn.Module, folder: Path, max_bytes: Optional[int] = None,
                   shared: Optional[dict] = None) -> None:
    """model.safetensors (or shards under max_bytes, physkern.checkpoint.write_sharded): every
    state-dict tensor once (a tensor shared by several names is stored under the first), dense
    float tensors at the model's dense storage dtype; each shared codebook group's tensor once,
    under shared_key(group), instead of under its layers' names. shared: None = computed."""
    from .dense import dense_storage_dtype
    dense = dense_storage_dtype(model)
    if shared is None:
        shared = shared_codebook_layouts(model)
    skip = {f"{name}.codebooks" for g in shared.values() for name in g["layers"]}
    seen, tensors = set(), {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        if key in skip or (t.numel() and ident in seen):
            continue
        seen.add(ident)
        tensors[key] = stored_tensor(key, t, dense)
    for group, g in shared.items():
        tensors[shared_key(group)] = stored_tensor(
            shared_key(group), model.get_submodule(g["layers"][0]).codebooks, dense)
    write_sharded(folder, [(k, t.numel() * t.element_size()) for k, t in tensors.items()],
                  tensors.__getitem__, max_bytes)


# ---- loading ---------------------------------------------------------------------------------

# Floating dtypes a quantized layer may store its codebooks / scales / offsets / bias in.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_K = 65536  # what the kernels take (csrc/codebook_matmul.cpp, packing's 16-bit limit)
_LAYER_INTS = ("in_features", "out_features", "stages", "k", "block_dim", "codebook_rows",
               "scale_group")
_LAYER_DTYPES = ("codebook_dtype", "scales_dtype", "offsets_dtype", "bias_dtype")
_ST_DTYPES, _TORCH_TO_ST, _MAX_HEADER = ST_DTYPES, TORCH_TO_ST, MAX_HEADER
# Rows of packed indices unpacked at a time by the index check (bounds its temporary memory).
_INDEX_CHECK_ROWS = 4096


_one_line = one_line


def _read_marker(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{file}: cannot be read as JSON: {_one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if type(version) is not int or version not in FORMAT_VERSIONS:
        raise ValueError(f"{file}: format_version {version!r} is not supported (this physkern "
                         f"reads {', '.join(map(str, FORMAT_VERSIONS))})")
    layers = meta.get("quantized_layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{file}: quantized_layers must be an object of layer name -> layout, "
                         f"got {type(layers).__name__}")
    check_factorized_version(file, version, meta.get("factorized_layers"))
    check_shared_version(file, version, meta.get("shared_codebooks"))
    check_outliers_version(file, version, layers)
    return meta


def check_factorized_version(file, version, factorized) -> None:
    """factorized_layers (absent, or an object of layer name -> layout) needs format_version 2
    or later (a version-1 reader would ignore it and load those layers uninitialised)."""
    if factorized is None:
        return
    if not isinstance(factorized, dict):
        raise ValueError(f"{file}: factorized_layers must be an object of layer name -> layout, "
                         f"got {type(factorized).__name__}")
    if factorized and version not in (FACTORIZED_FORMAT_VERSION, SHARED_FORMAT_VERSION,
                                      OUTLIERS_FORMAT_VERSION):
        raise ValueError(f"{file}: factorized_layers need format_version "
                         f"{FACTORIZED_FORMAT_VERSION} or later, got {version!r}")


def check_shared_version(file, version, shared) -> None:
    """Format version 3 is exactly the files with shared codebooks: "shared_codebooks" (a
    non-empty object of group -> layout) needs it, and it needs them (no other writer uses 3)."""
    if version != SHARED_FORMAT_VERSION and shared is None:
        return
    if version == OUTLIERS_FORMAT_VERSION and shared is None:
        return
    if not isinstance(shared, dict) or not shared:
        raise ValueError(f"{file}: format_version {SHARED_FORMAT_VERSION} needs shared_codebooks, "
                         f"a non-empty object of group name -> layout, got "
                         f"{type(shared).__name__ if shared is not None else 'none'}")
    if version not in (SHARED_FORMAT_VERSION, OUTLIERS_FORMAT_VERSION):
        raise ValueError(f"{file}: shared_codebooks need format_version {SHARED_FORMAT_VERSION} "
                         f"(or {OUTLIERS_FORMAT_VERSION} with outliers), got {version!r}")


def check_outliers_version(file, version, layers: dict) -> None:
    """Format version 4 is exactly the files with sparse outliers: a layout with "outliers"
    needs it (an older reader would load the layer without them), and it needs one."""
    has = has_outliers(layers)
    if has and version != OUTLIERS_FORMAT_VERSION:
        raise ValueError(f"{file}: layers with outliers need format_version "
                         f"{OUTLIERS_FORMAT_VERSION}, got {version!r}")
    if version == OUTLIERS_FORMAT_VERSION and not has:
        raise ValueError(f"{file}: format_version {OUTLIERS_FORMAT_VERSION} needs a layer with "
                         "outliers, found none")


def check_layer_meta(file: Path, name, lm) -> dict:
    """Types and ranges of one layer's layout in physkern.json (no tensor is touched)."""
    if not isinstance(name, str) or not name or any(not p for p in name.split(".")):
        raise ValueError(f"{file}: quantized layer name {name!r} is not a module path")
    where = f"{file}: layer {name}"
    if not isinstance(lm, dict):
        raise ValueError(f"{where}: layout must be an object, got {type(lm).__name__}")
    if lm.get("kind") not in ("linear", "conv1d"):
        raise ValueError(f"{where}: kind must be 'linear' or 'conv1d', got {lm.get('kind')!r}")
    for f in _LAYER_INTS:
        v = lm.get(f)
        if type(v) is not int or v < 1:
            raise ValueError(f"{where}: {f} must be a positive integer, got {v!r}")
    if lm["k"] > MAX_K:
        raise ValueError(f"{where}: k must be in [1, {MAX_K}], got {lm['k']}")
    if lm["in_features"] % lm["block_dim"]:
        raise ValueError(f"{where}: block_dim ({lm['block_dim']}) must divide in_features "
                         f"({lm['in_features']})")
    if lm["out_features"] % lm["codebook_rows"]:
        raise ValueError(f"{where}: codebook_rows ({lm['codebook_rows']}) must divide "
                         f"out_features ({lm['out_features']})")
    if lm["in_features"] % lm["scale_group"]:
        raise ValueError(f"{where}: scale_group ({lm['scale_group']}) must divide in_features "
                         f"({lm['in_features']})")
    for f in _LAYER_DTYPES:
        v = lm.get(f)
        if (v is None and f != "codebook_dtype") or v in FLOAT_DTYPES:
            continue
        raise ValueError(f"{where}: {f} must be one of {FLOAT_DTYPES}"
                         f"{'' if f == 'codebook_dtype' else ' or null'}, got {v!r}")
    if lm.get("offsets_dtype") is not None and lm.get("scales_dtype") is None:
        raise ValueError(f"{where}: offsets_dtype is set but scales_dtype is null (offsets need "
                         "scales)")
    if lm.get("recipe") is not None and not isinstance(lm["recipe"], dict):
        raise ValueError(f"{where}: recipe must be an object or null, got "
                         f"{type(lm['recipe']).__name__}")
    if lm.get("outliers") is not None:
        _check_outliers_layout(where, lm["outliers"], lm["in_features"])
    if "shared_codebook" in lm:
        _check_group_name(where, "shared_codebook", lm["shared_codebook"])
        if lm["codebook_rows"] != lm["out_features"]:
            raise ValueError(f"{where}: a shared codebook has layer scope: codebook_rows must be "
                             f"out_features ({lm['out_features']}), got {lm['codebook_rows']}")
    return lm


def _check_outliers_layout(where: str, o, in_features: int) -> None:
    """{"per_row": 0 <= n <= in_features, "columns_dtype": the narrowest int that holds the
    columns, "values_dtype": a float dtype} and nothing else."""
    from .quant.outliers import VALUE_DTYPES, column_dtype
    keys = {"per_row", "columns_dtype", "values_dtype"}
    if not isinstance(o, dict) or set(o) != keys:
        raise ValueError(f"{where}: outliers must be an object with exactly {sorted(keys)}, got "
                         f"{str(o)[:200]}")
    n = o["per_row"]
    if type(n) is not int or not 0 <= n <= in_features:
        raise ValueError(f"{where}: outliers.per_row must be an integer in [0, {in_features}], "
                         f"got {n!r}")
    want = str(column_dtype(in_features)).replace("torch.", "")
    if o["columns_dtype"] != want:
        raise ValueError(f"{where}: outliers.columns_dtype must be {want!r} for in_features="
                         f"{in_features}, got {o['columns_dtype']!r}")
    if o["values_dtype"] not in VALUE_DTYPES:
        raise ValueError(f"{where}: outliers.values_dtype must be one of "
                         f"{', '.join(VALUE_DTYPES)}, got {o['values_dtype']!r}")


def _check_group_name(where: str, field: str, v) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_GROUP_NAME or \
            any(c in v for c in "\x00/\\"):
        raise ValueError(f"{where}: {field} must be a group name (a non-empty string of at most "
                         f"{MAX_GROUP_NAME} characters, no '/', '\\' or NUL), got {str(v)[:200]!r}")
    return v


_SHARED_FIELDS = ("stages", "k", "block_dim", "codebook_dtype")


def check_shared_codebooks(file, shared, layers: dict) -> dict:
    """The "shared_codebooks" entry ({group: {"stages", "k", "block_dim", "codebook_dtype",
    "layers"}}, or None) against the checked layer layouts: every group's layers exist and name
    it, every layer naming a group is listed by it, and they agree on the codebook's shape and
    dtype. Touches no tensor. Returns it ({} for None)."""
    if shared is None:
        shared = {}
    if not isinstance(shared, dict):
        raise ValueError(f"{file}: shared_codebooks must be an object, got "
                         f"{type(shared).__name__}")
    for name, lm in layers.items():   # first: a layer naming a group the file lacks
        group = lm.get("shared_codebook")
        if group is not None and group not in shared:
            raise ValueError(f"{file}: layer {name}: shared codebook group {group!r} is missing "
                             f"from shared_codebooks")
    for group, g in shared.items():
        where = f"{file}: shared codebook {str(group)[:200]!r}"
        _check_group_name(f"{file}: shared_codebooks", "group name", group)
        if not isinstance(g, dict) or set(g) != set(_SHARED_FIELDS) | {"layers"}:
            raise ValueError(f"{where}: must be an object with exactly the fields "
                             f"{sorted(set(_SHARED_FIELDS) | {'layers'})}")
        if not isinstance(g["layers"], list) or not g["layers"] or \
                len(set(map(str, g["layers"]))) != len(g["layers"]):
            raise ValueError(f"{where}: layers must be a non-empty list of distinct layer names")
        for name in g["layers"]:
            lm = layers.get(name) if isinstance(name, str) else None
            if lm is None or lm.get("shared_codebook") != group:
                raise ValueError(f"{where}: layer {str(name)[:200]!r} is not a quantized layer "
                                 f"naming this group in shared_codebook")
            for f in _SHARED_FIELDS:
                if lm[f] != g[f]:
                    raise ValueError(f"{where}: layer {name} has {f} {lm[f]!r}, the group "
                                     f"{g[f]!r}")
    for name, lm in layers.items():
        group = lm.get("shared_codebook")
        if group is not None and name not in shared[group]["layers"]:
            raise ValueError(f"{file}: layer {name}: shared codebook group {group!r} does not "
                             f"list it in shared_codebooks")
    return shared


def _layer_tensors(lm: dict) -> dict:
    """{buffer name: (torch dtype, shape)} that a layer with layout `lm` stores."""
    from .quant.packing import index_bits, words_per_row
    s, out, inf = lm["stages"], lm["out_features"], lm["in_features"]
    k, d = lm["k"], lm["block_dim"]
    want = {"packed": (torch.int32, (s, out, words_per_row(inf // d, index_bits(k))))}
    if "shared_codebook" not in lm:   # a shared codebook is stored once, under its group
        want["codebooks"] = (getattr(torch, lm["codebook_dtype"]),
                             (s, out // lm["codebook_rows"], k, d))
    n_sc = (out, inf // lm["scale_group"])
    if lm.get("scales_dtype"):
        want["scales"] = (getattr(torch, lm["scales_dtype"]), n_sc)
    if lm.get("offsets_dtype"):
        want["offsets"] = (getattr(torch, lm["offsets_dtype"]), n_sc)
    if lm.get("bias_dtype"):
        want["bias"] = (getattr(torch, lm["bias_dtype"]), (out,))
    if lm.get("outliers") is not None:
        o = lm["outliers"]
        want["outlier_columns"] = (getattr(torch, o["columns_dtype"]), (out, o["per_row"]))
        want["outlier_values"] = (getattr(torch, o["values_dtype"]), (out, o["per_row"]))
    return want


def _check_layer_header(st_file, header: dict, name: str, want: dict) -> None:
    """Each of a layer's tensors `want` ({name: (dtype, shape)}) is in the file's header with
    that shape and dtype (a bias: any float dtype, cast on loading like other dense tensors)."""
    for buf, (dt, shape) in want.items():
        key = f"{name}.{buf}"
        if key not in header:
            raise ValueError(f"{st_file}: layer {name}: tensor {buf} is missing")
        st_dtype, st_shape = header[key]
        if st_shape != shape:
            raise ValueError(f"{st_file}: layer {name}: {buf} has shape {list(st_shape)}, "
                             f"{MARKER} implies {list(shape)}")
        if st_dtype != dt and (buf != "bias" or not st_dtype.is_floating_point):
            raise ValueError(f"{st_file}: layer {name}: {buf} has dtype "
                             f"{_TORCH_TO_ST[st_dtype]} ({_fmt(st_dtype)}), {MARKER} "
                             f"implies {_fmt(dt)}")


# ---- factorized layers (MPOLinear, LowRankLinear): one JSON layout each ----------------------

FACTORIZED_TYPES = ("mpo", "lowrank")
MAX_CORES = 64  # bounds the loops over a crafted layout (the recipes allow 2-6)


def factorized_classes() -> tuple[type, type]:
    """(MPOLinear, LowRankLinear): the factorized modules (physkern.methods.factorized) this
    format stores."""
    from .research.mpo import MPOLinear
    from .research.prune import LowRankLinear
    return MPOLinear, LowRankLinear


def _dtype_name(t: Optional[torch.Tensor]) -> Optional[str]:
    return None if t is None else str(t.dtype).replace("torch.", "")


def factorized_layer_meta(module: nn.Module,
                          stored_dtype: Optional[Callable] = None) -> dict:
    """The layout of an MPOLinear / LowRankLinear: everything needed to rebuild its tensors.

    mpo:     {"type": "mpo", "in_features", "out_features", "out_factors": [o_k],
              "in_factors": [i_k], "bonds": [r_0 = 1, ..., r_N = 1], "dtype", "bias_dtype"}
              (core k is [r_k, o_k, i_k, r_{k+1}])
    lowrank: {"type": "lowrank", "in_features", "out_features", "rank", "up_dtype",
              "down_dtype", "bias_dtype"} (up [out, rank], down [rank, in])
    stored_dtype(buffer name, tensor) -> torch.dtype: the dtype the file stores a factor in
    (physkern.serialization's dense-dtype rule); default: its own dtype. bias_dtype is the
    in-memory dtype (the bias is a dense tensor, cast on loading like any other).
    """
    MPOLinear, LowRankLinear = factorized_classes()
    sd = stored_dtype or (lambda _name, t: t.dtype)
    name = lambda n, t: str(sd(n, t)).replace("torch.", "")
    base = {"in_features": int(module.in_features), "out_features": int(module.out_features)}
    quantized = _quantized_factor_layouts(module)
    if quantized is not None:  # quantized factors: no float dtype, one layout per factor
        if isinstance(module, MPOLinear):
            bonds = [int(module.cores[0].shape[0])] + [int(q.shape[3]) for q in module.cores]
            return {"type": "mpo", **base, "out_factors": list(module.out_factors),
                    "in_factors": list(module.in_factors), "bonds": bonds, "dtype": None,
                    "bias_dtype": _dtype_name(module.bias), "quantized": quantized}
        return {"type": "lowrank", **base, "rank": int(module.rank), "up_dtype": None,
                "down_dtype": None, "bias_dtype": _dtype_name(module.bias),
                "quantized": quantized}
    if isinstance(module, MPOLinear):
        dts = {name(f"cores.{k}", g) for k, g in enumerate(module.cores)}
        if len(dts) != 1:  # MPOLinear casts every core to one dtype: a mix is a bug upstream
            raise ValueError(f"MPOLinear cores must share one dtype to be saved, got "
                             f"{sorted(dts)}")
        bonds = [int(module.cores[0].shape[0])] + [int(g.shape[3]) for g in module.cores]
        return {"type": "mpo", **base, "out_factors": list(module.out_factors),
                "in_factors": list(module.in_factors), "bonds": bonds, "dtype": dts.pop(),
                "bias_dtype": _dtype_name(module.bias)}
    if isinstance(module, LowRankLinear):
        return {"type": "lowrank", **base, "rank": int(module.rank),
                "up_dtype": name("up", module.up), "down_dtype": name("down", module.down),
                "bias_dtype": _dtype_name(module.bias)}
    raise ValueError(f"factorized_layer_meta: expected an MPOLinear or LowRankLinear, got "
                     f"{type(module).__name__}")


def _quantized_factor_layouts(module: nn.Module) -> Optional[dict]:
    """{factor name ("cores.<k>" / "up" / "down"): QuantizedFactor.layout()} when the module's
    factors are quantized (physkern.research.quantized_factors), None when they are float; a
    mix is refused (the quantizing code never makes one)."""
    from .research.quantized_factors import QuantizedFactor
    MPOLinear, _ = factorized_classes()
    facs = {f"cores.{k}": g for k, g in enumerate(module.cores)} if isinstance(module, MPOLinear) \
        else {"up": module.up, "down": module.down}
    kinds = {isinstance(f, QuantizedFactor) for f in facs.values()}
    if kinds == {False}:
        return None
    if len(kinds) != 1:
        raise ValueError(f"{type(module).__name__}: factors must be all quantized or all float "
                         "to be saved")
    return {n: q.layout() for n, q in facs.items()}


def _pos_int(where: str, field: str, v) -> int:
    if type(v) is not int or v < 1:
        raise ValueError(f"{where}: {field} must be a positive integer, got {v!r}")
    return v


def _int_list(where: str, field: str, v, n: Optional[int] = None) -> list[int]:
    """v checked as a list of positive ints: n entries, or 1 to MAX_CORES when n is None."""
    if not isinstance(v, list) or (len(v) != n if n is not None else
                                   not 1 <= len(v) <= MAX_CORES):
        want = f"{n} entries" if n is not None else f"1 to {MAX_CORES} entries"
        raise ValueError(f"{where}: {field} must be a list of {want}, got {str(v)[:200]}")
    for x in v:
        _pos_int(where, f"{field} entry", x)
    return v


def _float_dtype(where: str, field: str, v, nullable: bool = False) -> None:
    if (v is None and nullable) or v in FLOAT_DTYPES:
        return
    raise ValueError(f"{where}: {field} must be one of {FLOAT_DTYPES}"
                     f"{' or null' if nullable else ''}, got {v!r}")


def check_factorized_meta(where: str, fm) -> dict:
    """Types, ranges and shape relations of one factorized layout (see factorized_layer_meta);
    touches no tensor. mpo: as many out as in factors (1 to MAX_CORES), their products =
    out_features / in_features, bonds = one more entry than cores, starting and ending at 1
    (core k's right bond is core k+1's left one by construction: factorized_tensors).
    ValueError starting with `where` and naming the field."""
    if not isinstance(fm, dict):
        raise ValueError(f"{where}: layout must be an object, got {type(fm).__name__}")
    if fm.get("type") not in FACTORIZED_TYPES:
        raise ValueError(f"{where}: type must be one of {FACTORIZED_TYPES}, got "
                         f"{fm.get('type')!r}")
    out, inf = (_pos_int(where, f, fm.get(f)) for f in ("out_features", "in_features"))
    _float_dtype(where, "bias_dtype", fm.get("bias_dtype"), nullable=True)
    quantized = "quantized" in fm  # factors stored as QuantizedFactors: no float dtype
    if quantized and not isinstance(fm["quantized"], dict):
        raise ValueError(f"{where}: quantized must be an object of factor name -> layout, got "
                         f"{type(fm['quantized']).__name__}")
    if fm["type"] == "lowrank":
        _pos_int(where, "rank", fm.get("rank"))
        for f in ("up_dtype", "down_dtype"):
            _null_or_float_dtype(where, f, fm.get(f), quantized)
        if quantized:
            r = fm["rank"]
            _check_quantized_factors(where, fm["quantized"],
                                     {"up": (out, r), "down": (r, inf)})
        return fm
    of = _int_list(where, "out_factors", fm.get("out_factors"))
    n = len(of)
    inf_ = _int_list(where, "in_factors", fm.get("in_factors"), n)
    bonds = _int_list(where, "bonds", fm.get("bonds"), n + 1)
    if math.prod(of) != out:
        raise ValueError(f"{where}: out_factors {of} multiply to {math.prod(of)}, not "
                         f"out_features {out}")
    if math.prod(inf_) != inf:
        raise ValueError(f"{where}: in_factors {inf_} multiply to {math.prod(inf_)}, not "
                         f"in_features {inf}")
    if bonds[0] != 1 or bonds[-1] != 1:
        raise ValueError(f"{where}: bonds must start and end with 1 (the MPO's open ends), "
                         f"got {bonds}")
    _null_or_float_dtype(where, "dtype", fm.get("dtype"), quantized)
    if quantized:
        _check_quantized_factors(where, fm["quantized"], {
            f"cores.{k}": (bonds[k] * o, i * bonds[k + 1])
            for k, (o, i) in enumerate(zip(of, inf_))})
    return fm


def _null_or_float_dtype(where: str, field: str, v, quantized: bool) -> None:
    """A float factor's dtype, or null when the factors are quantized (their layouts say)."""
    if quantized:
        if v is not None:
            raise ValueError(f"{where}: {field} must be null when the factors are quantized, "
                             f"got {v!r}")
        return
    _float_dtype(where, field, v)


def _check_quantized_factors(where: str, q, views: dict) -> None:
    """"quantized": one layout per factor (exactly the names of `views`: factor name -> its
    2-D view [rows, cols], physkern.research.quantized_factors.matrix_shape), each with the
    fields of QuantizedFactor.layout() only, in range for that view."""
    from .research.quantized_factors import LAYOUT_DTYPES, LAYOUT_INTS
    if not isinstance(q, dict) or set(q) != set(views):
        got = sorted(q) if isinstance(q, dict) else type(q).__name__
        raise ValueError(f"{where}: quantized must be an object with one layout per factor "
                         f"{sorted(views)}, got {str(got)[:200]}")
    for fname, (rows, cols) in views.items():
        lay, at = q[fname], f"{where}: quantized {fname}"
        if not isinstance(lay, dict):
            raise ValueError(f"{at}: layout must be an object, got {type(lay).__name__}")
        unknown = set(lay) - set(LAYOUT_INTS) - set(LAYOUT_DTYPES)
        if unknown:
            raise ValueError(f"{at}: unknown fields {sorted(unknown)[:5]}")
        for f in LAYOUT_INTS:
            _pos_int(at, f, lay.get(f))
        if lay["k"] > MAX_K:
            raise ValueError(f"{at}: k must be in [1, {MAX_K}], got {lay['k']}")
        for f, n, side in (("block_dim", cols, "columns"), ("scale_group", cols, "columns"),
                           ("codebook_rows", rows, "rows")):
            if n % lay[f]:
                raise ValueError(f"{at}: {f} ({lay[f]}) must divide the factor's {n} {side} "
                                 f"(2-D view [{rows}, {cols}])")
        _float_dtype(at, "codebook_dtype", lay.get("codebook_dtype"))
        for f in ("scales_dtype", "offsets_dtype"):
            _float_dtype(at, f, lay.get(f), nullable=True)
        if lay.get("offsets_dtype") is not None and lay.get("scales_dtype") is None:
            raise ValueError(f"{at}: offsets_dtype is set but scales_dtype is null (offsets "
                             "need scales)")


def factorized_tensors(fm: dict) -> dict[str, tuple[torch.dtype, tuple]]:
    """{buffer name under the layer: (dtype, shape)} a checked layout stores: core k
    [bonds[k], o_k, i_k, bonds[k+1]] / up [out, rank], down [rank, in] (quantized factors:
    their QuantizedWeight buffers, "cores.<k>.packed", ...); bias [out] if any."""
    dt = lambda n: getattr(torch, n)
    shapes = factorized_shapes(fm)
    if "quantized" in fm:  # each factor's QuantizedWeight buffers under "<factor>."
        want = {f"{fname}.{buf}": v for fname, shape in shapes.items()
                for buf, v in _layer_tensors(quantized_factor_meta(fm["quantized"][fname],
                                                                   shape)).items()}
    elif fm["type"] == "mpo":
        want = {n: (dt(fm["dtype"]), shape) for n, shape in shapes.items()}
    else:
        want = {n: (dt(fm[f"{n}_dtype"]), shape) for n, shape in shapes.items()}
    if fm.get("bias_dtype"):
        want["bias"] = (dt(fm["bias_dtype"]), (fm["out_features"],))
    return want


def quantized_factor_meta(layout: dict, shape) -> dict:
    """A checked QuantizedFactor layout of a factor of `shape` as a QuantizedLinear layout
    (its 2-D view as [out_features, in_features]), for _layer_tensors / check_indices."""
    from .research.quantized_factors import matrix_shape
    rows, cols = matrix_shape(shape)
    return {"kind": "linear", "in_features": cols, "out_features": rows, **layout,
            "bias_dtype": None}


def factorized_shapes(fm: dict) -> dict[str, tuple]:
    """{factor name: shape} of a checked layout ("cores.<k>" or "up" / "down")."""
    if fm["type"] == "mpo":
        r = fm["bonds"]
        return {f"cores.{k}": (r[k], o, i, r[k + 1])
                for k, (o, i) in enumerate(zip(fm["out_factors"], fm["in_factors"]))}
    return {"up": (fm["out_features"], fm["rank"]), "down": (fm["rank"], fm["in_features"])}


def check_factor_indices(file, name: str, module: nn.Module) -> None:
    """check_indices on every quantized factor of a loaded factorized layer (nothing for float
    factors)."""
    from .research.quantized_factors import QuantizedFactor
    for sub_name, sub in module.named_modules():
        if isinstance(sub, QuantizedFactor):
            check_indices(file, f"{name}.{sub_name}", sub)


def empty_factorized(fm: dict) -> nn.Module:
    """A zero-filled MPOLinear / LowRankLinear with the tensors of a checked layout (for
    loading: build it under `torch.device("meta")`, after the sizes were checked against the
    file, and fill it from the file)."""
    MPOLinear, LowRankLinear = factorized_classes()
    if "quantized" in fm:
        from .research.quantized_factors import (QuantizedFactor, QuantizedLowRankLinear,
                                           QuantizedMPOLinear)
        qs = {n: QuantizedFactor.empty(fm["quantized"][n], shape)
              for n, shape in factorized_shapes(fm).items()}
        bias = torch.zeros(fm["out_features"], dtype=getattr(torch, fm["bias_dtype"])) \
            if fm.get("bias_dtype") else None
        if fm["type"] == "mpo":
            return QuantizedMPOLinear([qs[f"cores.{k}"] for k in range(len(qs))], bias)
        return QuantizedLowRankLinear(qs["up"], qs["down"], bias)
    t = {k: torch.zeros(shape, dtype=dt) for k, (dt, shape) in factorized_tensors(fm).items()}
    if fm["type"] == "mpo":
        cores = [t[f"cores.{k}"] for k in range(len(fm["out_factors"]))]
        return MPOLinear(cores, t.get("bias"), dtype=cores[0].dtype)
    return LowRankLinear(t["up"], t["down"], t.get("bias"))


def check_embedding_meta(file, name, em, layers: dict) -> dict:
    """Types and ranges of one quantized embedding's entry, and its source layer's layout."""
    if not isinstance(name, str) or not name or any(not p for p in name.split(".")):
        raise ValueError(f"{file}: quantized embedding name {name!r} is not a module path")
    where = f"{file}: embedding {name}"
    if not isinstance(em, dict):
        raise ValueError(f"{where}: entry must be an object, got {type(em).__name__}")
    if type(em.get("tied")) is not bool:
        raise ValueError(f"{where}: tied must be true or false, got {em.get('tied')!r}")
    for f in ("num_embeddings", "embedding_dim"):
        if type(em.get(f)) is not int or em[f] < 1:
            raise ValueError(f"{where}: {f} must be a positive integer, got {em.get(f)!r}")
    if em.get("dtype") not in FLOAT_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {FLOAT_DTYPES}, got {em.get('dtype')!r}")
    pad = em.get("padding_idx")
    if pad is not None and (type(pad) is not int or not -em["num_embeddings"] <= pad
                            < em["num_embeddings"]):
        raise ValueError(f"{where}: padding_idx must be null or a token id, got {pad!r}")
    src = em.get("source")
    own_table = f"{name}.table"
    if src not in layers or (src == own_table) == em["tied"]:
        raise ValueError(f"{where}: source must name "
                         f"{'the quantized output head' if em['tied'] else repr(own_table)} "
                         f"among the quantized layers, got {src!r}")
    lm = layers[src]
    if (lm["out_features"], lm["in_features"]) != (em["num_embeddings"], em["embedding_dim"]):
        raise ValueError(f"{where}: source {src} is [{lm['out_features']}, {lm['in_features']}], "
                         f"the embedding [{em['num_embeddings']}, {em['embedding_dim']}]")
    return em


def check_quantized_modules(model: nn.Module, layers: dict, embeddings: dict,
                            file) -> tuple[dict, dict]:
    """Check stored layouts (types, ranges) and that each names a module of `model` (built from
    its config) of the right kind and shape; allocates nothing. Returns (layers, embeddings).
    Raises ValueError naming `file`, the layer and the field."""
    from .linear import linear_layers
    if not isinstance(embeddings, dict):
        raise ValueError(f"{file}: quantized_embeddings must be an object, got "
                         f"{type(embeddings).__name__}")
    layers = {n: check_layer_meta(file, n, lm) for n, lm in layers.items()}
    embeddings = {n: check_embedding_meta(file, n, em, layers) for n, em in embeddings.items()}
    tables = {em["source"]: n for n, em in embeddings.items() if not em["tied"]}
    originals = {l.name: l for l in linear_layers(model)}
    for name, lm in layers.items():
        if name in tables:  # an untied embedding's own table: checked against the embedding
            emb = model.get_submodule(tables[name])
            shape = tuple(getattr(getattr(emb, "weight", None), "shape", ()))
            if not isinstance(emb, torch.nn.Embedding) or lm["kind"] != "linear" or \
                    shape != (lm["out_features"], lm["in_features"]):
                raise ValueError(f"{file}: layer {name}: the model's {tables[name]} is not an "
                                 f"embedding of shape [{lm['out_features']}, {lm['in_features']}]")
            continue
        orig = originals.get(name)
        if orig is None:
            raise ValueError(f"{file}: layer {name}: the model has no linear layer of that name")
        if (orig.kind, orig.in_features, orig.out_features) != \
                (lm["kind"], lm["in_features"], lm["out_features"]):
            raise ValueError(f"{file}: layer {name}: kind {lm['kind']}, in_features "
                             f"{lm['in_features']}, out_features {lm['out_features']} do not "
                             f"match the model's {orig.kind}, {orig.in_features}, "
                             f"{orig.out_features}")
    for name, em in embeddings.items():
        try:
            emb = model.get_submodule(name)
        except AttributeError:
            emb = None
        if not isinstance(emb, torch.nn.Embedding) or \
                tuple(emb.weight.shape) != (em["num_embeddings"], em["embedding_dim"]):
            raise ValueError(f"{file}: embedding {name}: the model has no embedding of shape "
                             f"[{em['num_embeddings']}, {em['embedding_dim']}] there")
    return layers, embeddings


def check_factorized_modules(model: nn.Module, factorized, layers: dict, embeddings: dict,
                             file) -> dict:
    """Check stored factorized layouts (check_factorized_meta: types,
    ranges, factor products, bond chain) and that each names a linear layer of `model` (built
    from its config) with the same in/out features, neither quantized nor an embedding's table;
    allocates nothing. Returns them. Raises ValueError naming `file`, the layer and the field."""
    from .linear import linear_layers
    if factorized is None:
        return {}
    if not isinstance(factorized, dict):
        raise ValueError(f"{file}: factorized_layers must be an object, got "
                         f"{type(factorized).__name__}")
    originals = {l.name: l for l in linear_layers(model)}
    sources = {em["source"] for em in embeddings.values()}
    for name, fm in factorized.items():
        if not isinstance(name, str) or not name or any(not p for p in name.split(".")):
            raise ValueError(f"{file}: factorized layer name {name!r} is not a module path")
        where = f"{file}: layer {name}"
        check_factorized_meta(where, fm)
        if name in layers or name in sources:
            raise ValueError(f"{where}: listed as factorized and as quantized")
        orig = originals.get(name)
        if orig is None:
            raise ValueError(f"{where}: the model has no linear layer of that name")
        if (orig.in_features, orig.out_features) != (fm["in_features"], fm["out_features"]):
            raise ValueError(f"{where}: in_features {fm['in_features']}, out_features "
                             f"{fm['out_features']} do not match the model's "
                             f"{orig.in_features}, {orig.out_features}")
    return factorized


def install_quantized_modules(model: nn.Module, layers: dict, embeddings: dict, file,
                              factorized: Optional[dict] = None,
                              shared: Optional[dict] = None) -> None:
    """Replace, in a model built from its config, each named linear layer by an empty
    QuantizedLinear with the stored layout (or, for `factorized` layouts, an empty MPOLinear /
    LowRankLinear) and each named embedding by a QuantizedEmbedding reading its source layer,
    after check_quantized_modules / check_factorized_modules / check_shared_codebooks; the
    layers of each `shared` codebook group hold one codebook parameter. Run it under
    `torch.device("meta")` to allocate nothing. Layouts naming a shared codebook need `shared`
    (physkern.load_quantized passes it; the transformers integration does not read them)."""
    from .embedding import QuantizedEmbedding
    from .layers import QuantizedLinear
    layers, embeddings = check_quantized_modules(model, layers, embeddings, file)
    factorized = check_factorized_modules(model, factorized, layers, embeddings, file)
    if shared is None and any("shared_codebook" in lm for lm in layers.values()):
        raise ValueError(f"{file}: this model has codebooks shared across layers (format "
                         f"version {SHARED_FORMAT_VERSION}); load it with "
                         "physkern.load_quantized (the transformers integration does not read "
                         "them)")
    shared = check_shared_codebooks(file, shared, layers)
    tables = {em["source"]: n for n, em in embeddings.items() if not em["tied"]}
    built = {name: QuantizedLinear.empty(lm) for name, lm in layers.items()}
    for g in shared.values():   # one parameter per group, held by each of its layers
        one = built[g["layers"][0]].codebooks
        for name in g["layers"]:
            built[name]._parameters["codebooks"] = one
    for name, em in embeddings.items():
        model.set_submodule(name, QuantizedEmbedding(
            built[em["source"]], tied=em["tied"], dtype=getattr(torch, em["dtype"]),
            padding_idx=em.get("padding_idx")))
    for name, layer in built.items():
        if name not in tables:
            model.set_submodule(name, layer)
    for name, fm in factorized.items():
        model.set_submodule(name, empty_factorized(fm))


def _fmt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_indices(file: Path, name: str, layer) -> None:
    """Every stored index < K, so no kernel reads past a codebook. Skipped when K = 2**bits
    (then every bit pattern is a valid index); the packed shape was checked before."""
    from .quant.packing import index_bits, unpack_indices
    outliers = layer.outliers() if hasattr(layer, "outliers") else None
    if outliers is not None:   # columns in range and distinct per row, values finite
        try:
            outliers.validate()
        except ValueError as e:
            raise ValueError(f"{file}: layer {name}: {e}: corrupt or crafted file") from None
    k = layer.codebooks.shape[2]
    bits = index_bits(k)
    if (1 << bits) == k:
        return
    nb = layer.in_features // layer.codebooks.shape[3]
    packed = layer.packed
    for r0 in range(0, packed.shape[1], _INDEX_CHECK_ROWS):
        idx = unpack_indices(packed[:, r0:r0 + _INDEX_CHECK_ROWS], bits, nb)
        bad = (idx >= k).nonzero()
        if bad.numel():
            s, r, b = (int(v) for v in bad[0])
            raise ValueError(f"{file}: layer {name}: packed holds index {int(idx[s, r, b])} "
                             f"(stage {s}, row {r0 + r}, block {b}) >= k = {k}: corrupt or "
                             f"crafted file")


def _read_config(cfg_file: Path):
    """The base architecture's config from config.json (physkern.hf_config), without importing
    physkern.hf_quantizer: physkern's own loader needs no transformers registration."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from .hf_config import base_config_dict
    try:
        with open(cfg_file, "rb") as f:
            d = json.loads(f.read())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        d = base_config_dict(d, str(cfg_file))
        d.pop("quantization_config", None)
        return CONFIG_MAPPING[d["model_type"]].from_dict(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{cfg_file}: cannot build a model from it: {_one_line(exc)}") from None


def load_quantized(path, device: str | torch.device = "cpu"):
    """Load a model saved by save_quantized: returns (model, tokenizer or None).

    Defensive against a corrupt or crafted directory: physkern.json's layer layouts (types,
    ranges; for factorized layers also factor products = features and the bond chain) and
    every tensor's dtype and shape in model.safetensors' header (read alone, byte ranges
    checked against the file size) are checked against the model that config.json and
    physkern.json describe BEFORE any tensor is allocated; missing and unexpected tensors are
    errors; after loading, every packed index is checked < K once (when K is not a power of
    two), so the kernels never read outside a codebook. Every failure is a ValueError naming
    the file (and the layer and field); a missing directory is FileNotFoundError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {str(path)!r} is not a directory")
    if not is_quantized_dir(path):
        raise ValueError(f"path: {str(path)!r} is not a physkern quantized model (no {MARKER})")
    marker, st_file, cfg_file = path / MARKER, path / MODEL_FILE, path / "config.json"
    meta = _read_marker(marker)
    layers = meta["quantized_layers"]
    embeddings = meta.get("quantized_embeddings", {})
    factorized = meta.get("factorized_layers")
    shared = meta.get("shared_codebooks")
    if not st_file.is_file() and not (path / INDEX_FILE).is_file():
        raise ValueError(f"{st_file}: missing (and no {INDEX_FILE})")
    ckpt = Checkpoint(path)  # headers only (one file or the shards its index names)
    st_file = ckpt.where
    header = ckpt.header
    config = _read_config(cfg_file)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{cfg_file}: cannot build a model from it: {_one_line(exc)}") from None
    layers, embeddings = check_quantized_modules(skeleton, layers, embeddings, marker)
    factorized = check_factorized_modules(skeleton, factorized, layers, embeddings, marker)
    shared = check_shared_codebooks(marker, shared, layers)
    # Quantized buffers and factors against the header from the layouts alone, before even the
    # meta-device build of those layers asks for their sizes.
    wanted = {name: _layer_tensors(lm) for name, lm in layers.items()}
    wanted.update({name: factorized_tensors(fm) for name, fm in factorized.items()})
    for name, want in wanted.items():
        _check_layer_header(st_file, header, name, want)
    for group, g in shared.items():
        _check_layer_header(st_file, header, f"{SHARED_PREFIX}{group}", {"codebooks": (
            getattr(torch, g["codebook_dtype"]), (g["stages"], 1, g["k"], g["block_dim"]))})
    # factors are read as stored (exact dtype); a factorized layer's bias is dense, like others
    factor_keys = {f"{name}.{buf}": name for name, fm in factorized.items()
                   for buf in factorized_tensors(fm)}
    with torch.device("meta"):
        install_quantized_modules(skeleton, layers, embeddings, marker, factorized, shared)
    # Every tensor the loaded model will hold, checked against the file's header.
    expected: dict = {}  # state-dict key -> (dtype, shape, layer name or None)
    groups: dict = {}    # id of a (possibly tied) tensor -> its state-dict keys
    quantized_keys = set()
    persistent_ids = set()
    for key, t in skeleton.state_dict(keep_vars=True).items():
        persistent_ids.add(id(t))
        owner = key.rpartition(".")[0]
        layer = owner if owner in layers else factor_keys.get(key)
        expected[key] = (t.dtype, tuple(t.shape), layer)
        groups.setdefault(id(t), []).append(key)
        if layer is not None:
            quantized_keys.add(key)
    # a shared codebook: read under its group's key into the one tensor its layers hold
    targets = {}
    for group, g in shared.items():
        first = f"{g['layers'][0]}.codebooks"
        targets[shared_key(group)] = [f"{n}.codebooks" for n in g["layers"]]
        expected[shared_key(group)] = expected[first][:2] + (g["layers"][0],)
        for k in targets[shared_key(group)]:
            expected.pop(k)
        groups[id(skeleton.get_submodule(g["layers"][0]).codebooks)] = [shared_key(group)]
    unexpected = sorted(set(header) - set(expected))
    if unexpected:
        raise ValueError(f"{st_file}: unexpected tensors the model does not have: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    missing = [keys[0] for keys in groups.values()
               if not any(k in header for k in keys) and not keys[0].endswith("inv_freq")]
    if missing:
        for key in missing:
            if key in quantized_keys:
                raise ValueError(f"{st_file}: layer {expected[key][2]}: tensor "
                                 f"{key.rsplit('.', 1)[1]} is missing")
        raise ValueError(f"{st_file}: missing tensors: {sorted(missing)[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for key, (st_dtype, st_shape) in header.items():
        dt, shape, layer = expected[key]
        what = (f"{st_file}: layer {layer}: {key.rsplit('.', 1)[1]}" if layer
                else f"{st_file}: tensor {key}")
        if st_shape != shape:
            raise ValueError(f"{what} has shape {list(st_shape)}, "
                             f"{MARKER if layer else cfg_file.name} implies {list(shape)}")
        # Quantized buffers are read as stored; dense float tensors (norms, biases) may be
        # stored at 16 bits (physkern.dense) and are cast to the model's dtype on loading.
        dense = dt.is_floating_point and key.rpartition(".")[2] not in QUANTIZED_BUFFERS and \
            (key not in factor_keys or key.endswith(".bias"))
        dtype_ok = st_dtype.is_floating_point if dense else st_dtype == dt
        if not dtype_ok:
            raise ValueError(f"{what} has dtype {_TORCH_TO_ST[st_dtype]} ({_fmt(st_dtype)}), "
                             f"{MARKER if layer else cfg_file.name} implies {_fmt(dt)}")
    # Buffers that are not saved (rotary tables, masks) are sized by config.json alone: bound
    # them by the weights file so a crafted config cannot make the real build allocate wildly.
    unsaved = sum(b.numel() * b.element_size() for b in skeleton.buffers()
                  if id(b) not in persistent_ids)
    limit = max(256 * 2**20, os.path.getsize(st_file))
    if unsaved > limit:
        raise ValueError(f"{cfg_file}: the model's unsaved buffers need {unsaved} bytes, more "
                         f"than {limit}: corrupt or crafted config")
    del skeleton
    # Everything agrees: build the skeleton again with its parameters on the meta device (only
    # the unsaved buffers, bounded above, are real), then materialise exactly the stored
    # tensors, one at a time: peak memory is about the file size, never an fp32 copy first.
    try:
        with init_empty_params():
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{cfg_file}: cannot build a model from it: {_one_line(exc)}") from None
    with torch.device("meta"):
        install_quantized_modules(model, layers, embeddings, marker, factorized, shared)
    with ckpt:
        fill_from_checkpoint(model, ckpt, expected, targets)
    for name in layers:
        check_indices(st_file, name, model.get_submodule(name))
    for name in factorized:
        check_factor_indices(st_file, name, model.get_submodule(name))
    model.tie_weights()
    left = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ValueError(f"{st_file}: missing tensors: {sorted(left)[:5]}")
    tok = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # tokenizers' Rust errors are plain Exceptions
            raise ValueError(f"{path / 'tokenizer.json'} (or tokenizer_config.json): cannot be "
                             f"loaded: {_one_line(exc)}") from None
    return model.to(device).eval(), tok


def fill_from_checkpoint(model: nn.Module, ckpt: Checkpoint, expected: dict,
                         targets: Optional[dict] = None) -> None:
    """Materialise every tensor of `ckpt` (checked against `expected`: key -> (dtype, shape,
    layer) beforehand) into `model`, whose parameters may be on the meta device: one tensor read
    at a time, dense floats cast to the model's dtype, tied names given the same tensor.
    targets: {file key: [state-dict keys]} for file keys that are not state-dict keys (a shared
    codebook group's tensor -> its layers' "codebooks")."""
    groups = tensor_groups(model)
    alias = {k: keys for keys in groups.values() for k in keys}
    alias.update(targets or {})
    for key in ckpt.keys():
        dt = expected[key][0]
        t = ckpt.get(key)
        if t.dtype != dt:
            t = t.to(dt)
        keys = alias.get(key, [key])
        owner, _, name = keys[0].rpartition(".")
        old = (model.get_submodule(owner) if owner else model)._parameters.get(name)
        if old is not None:  # one Parameter object for every tied name (`a.weight is b.weight`)
            t = nn.Parameter(t, requires_grad=old.requires_grad)
        for k in keys:
            assign_tensor(model, k, t)
