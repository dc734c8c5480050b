"""Lazy, validated reading and sharded writing of safetensors checkpoints (one file or HF shards).

A checkpoint directory holds either `model.safetensors` or `model.safetensors.index.json`
(Hugging Face's convention: {"metadata": {"total_size": N}, "weight_map": {tensor: shard file}})
plus the shards it names. `Checkpoint(path)` reads only the headers (each checked against its
file's size) and hands out one tensor at a time (`get`), so a model larger than memory can be
read block by block. `write_sharded` writes tensors back under a max shard size, one shard in
memory at a time, with the same file names; `init_empty_params` builds a model skeleton whose
parameters live on the meta device (nothing allocated) while its buffers (rotary tables, masks)
are computed for real; `assign_tensor` puts a loaded tensor in place.

This module imports nothing of physkern (serialization and streaming both build on it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
# safetensors dtype names -> (torch dtype, bytes per element)
ST_DTYPES = {"BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1),
             "I16": (torch.int16, 2), "U16": (torch.uint16, 2), "F16": (torch.float16, 2),
             "BF16": (torch.bfloat16, 2), "I32": (torch.int32, 4), "U32": (torch.uint32, 4),
             "F32": (torch.float32, 4), "I64": (torch.int64, 8), "U64": (torch.uint64, 8),
             "F64": (torch.float64, 8), "F8_E4M3": (torch.float8_e4m3fn, 1),
             "F8_E5M2": (torch.float8_e5m2, 1)}
TORCH_TO_ST = {v[0]: k for k, v in ST_DTYPES.items()}


def one_line(exc: BaseException) -> str:
    """An exception as one short line (its type and message, whitespace collapsed)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def read_safetensors_header(file: Path) -> dict:
    """{tensor name: (torch dtype, shape tuple)} from a safetensors file's header, reading only
    the header (8-byte little-endian length + JSON) and checking every tensor's byte range
    against the file size. Raises ValueError naming the file."""
    return read_safetensors_layout(file)[0]


def read_safetensors_layout(file: Path) -> tuple[dict, dict]:
    """({tensor name: (torch dtype, shape)}, {tensor name: (first byte, end byte) in the file})
    from the header alone, validated as read_safetensors_header says."""
    file = Path(file)
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{file}: truncated ({size} bytes, no safetensors header)")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > MAX_HEADER:
                raise ValueError(f"{file}: header length {n} exceeds the file ({size} bytes) or "
                                 f"{MAX_HEADER} bytes: truncated or not a safetensors file")
            raw = f.read(n)
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read: {one_line(exc)}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{file}: the safetensors header is not JSON: {one_line(exc)}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header is not a JSON object")
    data = size - 8 - n
    out, where = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in ST_DTYPES
              and isinstance(info.get("shape"), list)
              and all(type(x) is int and x >= 0 for x in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(type(x) is int for x in info["data_offsets"]))
        if not ok:
            raise ValueError(f"{file}: tensor {name!r} has a malformed header entry: "
                             f"{str(info)[:200]}")
        dtype, size_of = ST_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        b, e = info["data_offsets"]
        if not 0 <= b <= e <= data:
            raise ValueError(f"{file}: tensor {name!r} lies at bytes [{b}, {e}) beyond the "
                             f"{data} data bytes of the file: truncated or corrupt")
        if e - b != math.prod(shape) * size_of:
            raise ValueError(f"{file}: tensor {name!r} has {e - b} bytes for shape "
                             f"{list(shape)} of {info['dtype']}")
        out[name] = (dtype, shape)
        where[name] = (8 + n + b, 8 + n + e)
    return out, where


def read_index(path: Path) -> dict[str, str]:
    """{tensor name: shard file name} from `path`/model.safetensors.index.json, validated: a JSON
    object whose "weight_map" maps strings to plain file names (no directories, ending in
    .safetensors) that exist in `path`. Raises ValueError naming the file."""
    file = Path(path) / INDEX_FILE
    try:
        with open(file, "rb") as f:
            d = json.loads(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{file}: cannot be read as JSON: {one_line(exc)}") from None
    wm = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f"{file}: must hold an object with a non-empty \"weight_map\" "
                         "(tensor name -> shard file)")
    for key, shard in wm.items():
        if not isinstance(shard, str) or not _SHARD_RE.match(shard) or shard.startswith("."):
            raise ValueError(f"{file}: tensor {key!r} maps to {str(shard)[:100]!r}, not a plain "
                             "*.safetensors file name in the same directory")
        if not (Path(path) / shard).is_file():
            raise ValueError(f"{file}: shard {shard} (of tensor {key!r}) is missing")
    return wm


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of checkpoint directory `path`: [model.safetensors] or the shards
    its index names (sorted). Raises ValueError when it has neither."""
    path = Path(path)
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if (path / INDEX_FILE).is_file():
        return [path / s for s in sorted(set(read_index(path).values()))]
    raise ValueError(f"{path / SINGLE_FILE}: missing (and no {INDEX_FILE})")


class Checkpoint:
    """A safetensors checkpoint read lazily: headers at construction, tensors one at a time.

    header:  {tensor name: (torch dtype, shape)} over every file (validated, see
             read_safetensors_header); a name in two shards, or a shard holding a tensor the
             index maps elsewhere (or missing one it maps there), is a ValueError.
    file_of: {tensor name: Path of the file holding it}
    """

    def __init__(self, path):
        self.path = Path(path)
        self.files = checkpoint_files(self.path)
        wm = read_index(self.path) if self.files[0].name != SINGLE_FILE else None
        self.header: dict = {}
        self.file_of: dict = {}
        self.span: dict = {}
        for file in self.files:
            header, spans = read_safetensors_layout(file)
            self.span.update(spans)
            for key, info in header.items():
                if key in self.header:
                    raise ValueError(f"{file}: tensor {key!r} is also in {self.file_of[key]}")
                if wm is not None and wm.get(key) != file.name:
                    raise ValueError(f"{file}: holds tensor {key!r}, which {INDEX_FILE} maps to "
                                     f"{wm.get(key)!r}")
                self.header[key] = info
                self.file_of[key] = file
        if wm is not None:
            lost = sorted(set(wm) - set(self.header))
            if lost:
                raise ValueError(f"{self.path / INDEX_FILE}: tensors {lost[:5]} are not in the "
                                 "shards it names")
        self._open: dict = {}

    @property
    def where(self) -> Path:
        """What error messages name: the single file or the index."""
        return self.files[0] if self.files[0].name == SINGLE_FILE else self.path / INDEX_FILE

    def keys(self) -> list[str]:
        return list(self.header)

    def nbytes(self, key: str) -> int:
        dtype, shape = self.header[key]
        return math.prod(shape) * ST_DTYPES[TORCH_TO_ST[dtype]][1]

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` as stored: a fresh CPU tensor of the header's dtype and shape, read
        with plain file reads into its own memory (no memory map stays resident)."""
        dtype, shape = self.header[key]
        b, e = self.span[key]
        file = self.file_of[key]
        t = torch.empty(shape, dtype=dtype)
        if e == b:
            return t
        try:
            if file not in self._open:
                self._open.clear()  # one file handle at a time
                self._open[file] = open(file, "rb")
            f = self._open[file]
            f.seek(b)
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            got = 0
            while got < e - b:
                k = f.readinto(view[got:])
                if not k:
                    raise OSError(f"unexpected end of file at byte {b + got}")
                got += k
        except OSError as exc:
            raise ValueError(f"{file}: cannot be read: {one_line(exc)}") from None
        return t

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- building skeletons and filling them -----------------------------------------------------


@contextlib.contextmanager
def init_empty_params() -> Iterator[None]:
    """Within the block, modules register their parameters on the meta device (no memory),
    while buffers (rotary frequencies, masks: not always saved) are built for real on CPU."""
    real = nn.Module.register_parameter

    def on_meta(self, name, param):
        real(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def assign_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Put `t` in place of the parameter or buffer `key` of `model` (replacing, not copying: a
    meta tensor becomes real). Parameters keep their requires_grad."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(
            t, requires_grad=bool(old.requires_grad) if old is not None else False)
    elif name in module._buffers:
        module._buffers[name] = t
    else:
        raise KeyError(f"{key}: not a parameter or buffer of the model")


def tensor_groups(model: nn.Module) -> dict[str, list[str]]:
    """{first state-dict key: every key naming the same tensor (tied weights)}, in state-dict
    order; works on meta tensors (identity by object, not by storage)."""
    by_id: dict = {}
    for key, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(key)
    return {keys[0]: keys for keys in by_id.values()}


# ---- writing ---------------------------------------------------------------------------------


def parse_size(value) -> int:
    """A byte count from an int or a string such as "500MB", "2GB", "1GiB" (>= 1)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", value, re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size: expected bytes or a size like 500MB / 2GB / 1GiB, "
                             f"got {value!r}")
        unit = (m.group(2) or "").upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
        n = int(float(m.group(1)) * base ** power)
    else:
        raise ValueError(f"max_shard_size: expected bytes or a size string, got {value!r}")
    if n < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {value!r}")
    return n


def plan_shards(entries: list[tuple[str, int]], max_bytes: Optional[int]) -> list[list[str]]:
    """Split (key, nbytes) entries, in order, into shards of at most `max_bytes` each (a tensor
    larger than that gets a shard of its own); None = one shard."""
    if max_bytes is None:
        return [[k for k, _ in entries]]
    shards, cur, size = [], [], 0
    for key, n in entries:
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def shard_file_name(i: int, n: int) -> str:
    """Hugging Face's shard names: model-00001-of-00003.safetensors."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(folder: Path, entries: list[tuple[str, int]],
                  get: Callable[[str], torch.Tensor], max_shard_size: Optional[int],
                  metadata: Optional[dict] = None,
                  progress: bool = False) -> list[str]:
    """Write tensors to `folder`: model.safetensors when they fit one shard, else HF shards +
    model.safetensors.index.json. entries: (key, stored bytes) in order; get(key) returns the
    tensor as it is to be stored (called once per key, while its shard is written, so only one
    shard is in memory). Returns the file names written."""
    import safetensors.torch as st
    from tqdm.auto import tqdm
    plan = plan_shards(entries, max_shard_size)
    md = {"format": "pt", **(metadata or {})}
    if len(plan) == 1:
        st.save_file({k: get(k) for k in plan[0]}, str(folder / SINGLE_FILE), metadata=md)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    sizes = dict(entries)
    for i, keys in enumerate(tqdm(plan, desc="write shards", unit="shard", disable=not progress)):
        name = shard_file_name(i, len(plan))
        st.save_file({k: get(k) for k in keys}, str(folder / name), metadata=md)
        names.append(name)
        weight_map.update({k: name for k in keys})
    with open(folder / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
                  f, indent=2, sort_keys=True)
    return names + [INDEX_FILE]
