"""Save and load quantized models: safetensors + JSON, written atomically, loaded defensively.

A saved model is a directory:
  physkern.json       format version, quantized layers and their buffer layout, recipe, bits,
                      and "files": every other file this save wrote (relative paths)
  model.safetensors   every tensor of the model (tied tensors once)
  config.json, tokenizer files   as transformers writes them
Saving never deletes what it did not write: a new directory is written under a temporary name
beside the target and renamed into place; an existing physkern model is replaced (only with
overwrite=True) file by file, the marker physkern.json removed first and written last, so a
crash never leaves something that is taken for a valid model. Other files in the directory stay.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Optional

import torch
from torch import nn

MARKER = "physkern.json"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
# Temporary folders of a save: `.<name>.partial-*` beside a new target, `.physkern.partial-*`
# inside an existing one; `.<name>.old-*` beside it (left by physkern versions that swapped whole
# directories). Only these, for that target, are ever removed as leftovers of a killed save.
_INNER_PARTIAL = ".physkern.partial-"


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
        raise ValueError(f"--out {str(path)!r} is a dangling symbolic link")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--out {str(path)!r} exists and is not a directory")
        if is_quantized_dir(path):
            if not overwrite:
                raise ValueError(f"--out {str(path)!r} already holds a physkern model; pass "
                                 "overwrite=True (--overwrite) to replace it")
        else:
            try:
                non_empty = any(path.iterdir())
            except OSError as exc:
                raise ValueError(f"--out {str(path)!r} cannot be listed: {exc}") from None
            if non_empty:
                raise ValueError(f"--out {str(path)!r} is a non-empty directory that is not a "
                                 "physkern model; refusing to write into it (use a new or empty "
                                 "directory)")
        if not _writable(path):
            raise ValueError(f"--out {str(path)!r} is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            raise ValueError(f"--out {str(path)!r}: {str(parent)!r} is a dangling symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {str(path)!r}: {str(parent)!r} is not a directory")
    if not _writable(parent):
        raise ValueError(f"--out {str(path)!r}: parent directory {str(parent)!r} is not writable")
    return path


def _umask_mode() -> int:
    """The mode a plain mkdir gives a directory (0o777 less the process umask)."""
    old = os.umask(0o022)
    os.umask(old)
    return 0o777 & ~old


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


def _old_files(path: Path) -> list:
    try:
        with open(path / MARKER, "rb") as f:
            files = json.loads(f.read()).get("files", [])
        return files if isinstance(files, list) else []
    except (OSError, ValueError, AttributeError):
        return []


def save_quantized(model: nn.Module, path, tokenizer=None, extra: Optional[dict] = None,
                   overwrite: bool = False) -> Path:
    """Write `model` (with QuantizedLinear layers) to directory `path`; returns the path.

    path        a new directory (created, with the usual umask-derived mode), an empty one, or
                one holding a physkern model, which is replaced only with overwrite=True.
                Everything else in an existing directory (the user's files and folders) and
                the directory's own mode are kept; of the previous model only the files its
                physkern.json lists ("files") and this save does not write again are removed.
    tokenizer   saved beside the model when given.
    extra       extra JSON-serialisable keys for physkern.json.

    Atomic: the files are written to a temporary folder first (beside a new target, inside an
    existing one). A new target is renamed into place; into an existing one, the old marker
    physkern.json is removed first (a half-swapped directory is never taken for a model), each
    new file is moved in with os.replace, and the marker is written last.
    """
    from safetensors.torch import save_model
    from .layers import QuantizedLinear
    from .quant.accounting import bits_report
    path = Path(path)
    validate_output_dir(path, overwrite)
    layers = {name: m.layer_meta() for name, m in model.named_modules()
              if isinstance(m, QuantizedLinear)}
    other = [name for name, m in model.named_modules()
             if hasattr(m, "weight_numel") and hasattr(m, "storage_bits")
             and not isinstance(m, QuantizedLinear)]
    if other:
        raise ValueError(f"save_quantized supports QuantizedLinear layers only; found other "
                         f"compressed modules: {other[:3]}")
    report = bits_report(model)
    meta = {"format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "quantized_layers": layers, "bits": {
                "quantized_bits_per_weight": report.quantized_bits_per_weight,
                "model_bits_per_weight": report.model_bits_per_weight,
                "total_bytes": report.total_bytes}, **(extra or {})}
    existing = path.is_dir()
    if not existing:
        path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = _make_temp_dir(path, _INNER_PARTIAL) if existing else \
        _make_temp_dir(path.parent, f".{path.name}.partial-")
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / MODEL_FILE))
        if (tmp / MARKER).exists():
            raise ValueError(f"the tokenizer or config wrote a file named {MARKER}")
        files = _files_under(tmp)
        meta["files"] = files
        marker_text = json.dumps(meta, indent=2)
        if not existing:
            with open(tmp / MARKER, "w") as f:
                f.write(marker_text)
            os.replace(tmp, path)
            return path
        old_files = _old_files(path)
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


def load_quantized(path, device: str | torch.device = "cpu"):
    """Load a model saved by save_quantized: returns (model, tokenizer or None)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from .layers import QuantizedLinear
    from .models import replace_layer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {str(path)!r} is not a directory")
    if not is_quantized_dir(path):
        raise ValueError(f"path: {str(path)!r} is not a physkern quantized model (no {MARKER})")
    with open(path / MARKER) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{MARKER}: format_version {meta.get('format_version')!r} is not "
                         f"supported (this physkern reads {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    for name, layer_meta in meta["quantized_layers"].items():
        replace_layer(model, name, QuantizedLinear.empty(layer_meta))
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected:
        raise ValueError(f"model.safetensors has tensors the model does not: {unexpected[:5]}")
    real_missing = [m for m in missing if not m.endswith("inv_freq")]
    if real_missing:
        raise ValueError(f"model.safetensors lacks tensors: {real_missing[:5]}")
    model.tie_weights()
    tok = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tok
