"""Helpers for loader tests that tamper with a saved model: a fresh copy to edit, an edit of its
physkern.json, the bytes of its tensor data, and a guard that fails if loading allocates a large
tensor (a crafted file must be refused against its header before anything it describes is
allocated)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from physkern.serialization import MARKER, load_quantized


def fresh_copy(saved: Path, tmp_path: Path) -> Path:
    """A copy of the saved model directory `saved` under tmp_path, to tamper with."""
    d = tmp_path / "crafted"
    shutil.copytree(saved, d)
    return d


def edit_meta(d: Path, fn, key=None) -> None:
    """Apply fn to physkern.json of directory d (to its `key` entry if given) and write it back."""
    meta = json.loads((d / MARKER).read_text())
    fn(meta if key is None else meta[key])
    (d / MARKER).write_text(json.dumps(meta))

_FACTORIES = ("zeros", "empty", "ones", "full")


def load_fails(d: Path, *patterns: str) -> str:
    """load_quantized(d) raises one ValueError whose one-line message holds every pattern;
    returns the message."""
    with pytest.raises(ValueError) as exc:
        load_quantized(d)
    msg = str(exc.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


def guard_allocations(monkeypatch, max_numel: int = 10**7) -> None:
    """Patch torch's tensor factories so that any tensor of max_numel elements or more fails."""
    real = {n: getattr(torch, n) for n in _FACTORIES}

    def guarded(n):
        def f(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            numel = 1
            for s in shape:
                numel *= int(s)
            assert numel < max_numel, f"torch.{n}{tuple(shape)} allocated while loading"
            return real[n](*size, **kw)
        return f
    for n in real:
        monkeypatch.setattr(torch, n, guarded(n))


def tensor_bytes(d: Path, name: str = "model.safetensors") -> int:
    """Bytes of the tensor data in a safetensors file of directory d (the JSON header apart)."""
    with open(d / name, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(d / name) - 8 - header
