"""Streaming quantization: a checkpoint larger than memory, one transformer block at a time.

    quantize_streaming(source, out, config, calibration, ...)

1. The model skeleton is built with its parameters on the meta device (physkern.checkpoint):
   nothing of the weights is in memory. The tensors outside the blocks (embedding, final norm,
   head) are read from the checkpoint; block i's tensors are read only while it is processed.
2. The calibration windows run through the embedding once; the hidden states entering block 0
   (and the keyword arguments the model passes its blocks: rotary tables, masks) are kept, on
   CPU, at the compute dtype (exact: they are what the block computes with).
3. Block i: its tensors are read (cast to --dtype) onto the compute device; its layers'
   input statistics are gathered (Grams / E[x^2] accumulated in fp32/fp64, physkern.calib),
   its layers quantized (physkern.api: the same code as the in-memory path), its outputs
   computed (the next block's inputs), its dense tensors rounded to the dense dtype, and its
   stored tensors written to the state folder; then it goes back to the meta device.
4. After the last block: the head (and embedding) when a config is given, calibrated on the
   final hidden states replayed through the model's own final norm; the output directory is
   written atomically (physkern.serialization.write_model_dir), sharded under max_shard_size,
   and the state folder removed.

Resume: the state folder `.<out name>.stream-<fingerprint>` beside `out` holds, per finished
block, its tensors (block-NNNNN.safetensors), the next block's inputs (hidden-NNNNN/) and
state.json (written last, atomically: the number of finished blocks, their layer layouts and
reports). A run with the same source, recipe, calibration and dtype finds it and continues after
the last finished block; the result is the same file as an uninterrupted run.

Distributed (physkern.distributed): with torch.distributed initialised, every rank runs the
calibration forward of each block, the block's layers are split across ranks (balanced by
weight count), each rank quantizes its share and broadcasts the results; rank 0 alone writes.
Every layer is quantized by the same deterministic code on the same statistics, so the file is
the one a single process writes.

On CPU the result is bit for bit the in-memory path's (physkern.api.quantize +
save_quantized) for the same recipe, seed and calibration windows (tests/test_streaming.py):
the same block code runs on the same inputs in the same order. GPU execution (device="cuda")
runs the same loop with the block on the GPU; it is untested here (no GPU on this machine).
Fine-tuning, smoothing, pruning and factorization (a recipe's "factorize": MPO / low-rank
layers) need the whole model: not streamed (physkern.commands.quantize takes the in-memory path
for them and says so, with what memory fine-tuning needs).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import (LayerReport, QuantizationReport, _check_calibration_length, _quantize_head,
                  _quantize_one, block_of_layers, block_statistics, select_layers)
from .checkpoint import (Checkpoint, assign_tensor, init_empty_params, parse_size,
                         tensor_groups, write_sharded)
from .config import AnyConfig
from .distributed import Dist
from .sequential import _block_output, capture_block_inputs, transformer_blocks

STATE_FILE = "state.json"
STATE_VERSION = 1
COMPUTE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
ACTIVATIONS = ("memory", "disk")


def parse_dtype(dtype) -> torch.dtype:
    """fp32|bf16|fp16 (or their torch names, or a torch dtype) -> torch dtype; else ValueError."""
    if isinstance(dtype, torch.dtype) and dtype in COMPUTE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype]
    raise ValueError(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}")


@dataclass
class StreamReport:
    """What quantize_streaming did: the quantization report, blocks processed in this run vs
    resumed from the state folder, seconds per block (this run), the bytes of the calibration
    activations of one block's inputs, and where the model was written."""
    quantization: QuantizationReport
    blocks: int
    blocks_resumed: int
    block_seconds: list
    activation_bytes: int
    out: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantization"] = self.quantization.to_dict()
        return d


# ---- activations -----------------------------------------------------------------------------


class Activations:
    """The calibration hidden states entering one block: batches [b, seq, hidden] at the compute
    dtype, in memory ("memory") or read one batch at a time from the state folder ("disk")."""

    def __init__(self, folder: Path, mode: str, batches: Optional[list] = None):
        self.folder, self.mode = Path(folder), mode
        self.batches = batches
        if batches is None:
            self.n = len(list(self.folder.glob("b*.safetensors")))
        else:
            self.n = len(batches)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> torch.Tensor:
        if self.batches is not None:
            return self.batches[j]
        from safetensors.torch import load_file
        return load_file(str(self.folder / f"b{j:06d}.safetensors"))["h"]

    @property
    def nbytes(self) -> int:
        if self.batches is not None:
            return sum(t.numel() * t.element_size() for t in self.batches)
        return sum(p.stat().st_size for p in self.folder.glob("b*.safetensors"))


def _write_batches(folder: Path, batches) -> None:
    """Write hidden-state batches to `folder` (created; replaced atomically if it exists)."""
    from safetensors.torch import save_file
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for j, h in enumerate(batches):
        save_file({"h": h.contiguous().cpu()}, str(tmp / f"b{j:06d}.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ---- the state folder ------------------------------------------------------------------------


def _fingerprint(ckpt: Checkpoint, config: AnyConfig, embedding, dense_dtype, dtype,
                 calibration: Optional[torch.Tensor], batch_size: int) -> str:
    h = hashlib.sha256()
    files = [(f.name, os.path.getsize(f), int(os.path.getmtime(f))) for f in ckpt.files]
    h.update(json.dumps({"source": str(ckpt.path.resolve()), "files": files,
                         "config": config.to_dict(),
                         "embedding": None if embedding is None else embedding.to_dict(),
                         "dense_dtype": dense_dtype, "dtype": str(dtype),
                         "batch_size": batch_size, "version": STATE_VERSION},
                        sort_keys=True).encode())
    if calibration is not None:
        h.update(calibration.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def state_dir_for(out, fingerprint: str) -> Path:
    out = Path(out)
    return out.absolute().parent / f".{out.name}.stream-{fingerprint}"


def _write_json_atomic(file: Path, obj) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _read_state(folder: Path, fingerprint: str, n_blocks: int) -> Optional[dict]:
    """The state of an interrupted run (validated), or None when there is none to resume."""
    try:
        with open(folder / STATE_FILE) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return None
    ok = (isinstance(st, dict) and st.get("fingerprint") == fingerprint
          and type(st.get("done")) is int and 0 <= st["done"] <= n_blocks
          and isinstance(st.get("layers"), dict) and isinstance(st.get("reports"), list))
    if not ok:
        raise ValueError(f"{folder / STATE_FILE}: not a state this run wrote; remove the "
                         "folder (or pass resume=False / --fresh)")
    for i in range(st["done"]):
        if not (folder / f"block-{i:05d}.safetensors").is_file():
            raise ValueError(f"{folder}: block-{i:05d}.safetensors is missing; pass "
                             "resume=False / --fresh")
    return st


# ---- the model skeleton ----------------------------------------------------------------------


def _build_skeleton(source: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(source)
    with init_empty_params():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _expected(model: nn.Module, ckpt: Checkpoint) -> dict[str, list[str]]:
    """{checkpoint key: model keys it fills}; every tensor group of the model must be in the
    checkpoint (non-persistent buffers are not in the state dict), with the right shape."""
    groups = tensor_groups(model)
    sd = model.state_dict(keep_vars=True)
    out = {}
    for first, keys in groups.items():
        present = [k for k in keys if k in ckpt.header]
        if not present:
            if first.endswith("inv_freq"):
                continue
            raise ValueError(f"{ckpt.where}: tensor {first} is missing")
        key = present[0]
        dt, shape = ckpt.header[key]
        if tuple(sd[first].shape) != shape:
            raise ValueError(f"{ckpt.where}: tensor {key} has shape {list(shape)}, config.json "
                             f"implies {list(sd[first].shape)}")
        if not dt.is_floating_point and sd[first].is_floating_point():
            raise ValueError(f"{ckpt.where}: tensor {key} has dtype {dt}, expected a float")
        out[key] = keys
    unexpected = sorted(set(ckpt.header) - {k for ks in groups.values() for k in ks})
    if unexpected:
        raise ValueError(f"{ckpt.where}: tensors the model does not have: {unexpected[:5]}")
    return out


def _materialise(model: nn.Module, ckpt: Checkpoint, fills: dict, keys, device,
                 dtype: torch.dtype) -> None:
    """Read checkpoint `keys` into `model` (floats cast to `dtype`) on `device`."""
    sd = model.state_dict(keep_vars=True)
    for key in keys:
        t = ckpt.get(key)
        target = sd[fills[key][0]]
        if t.is_floating_point():
            t = t.to(dtype if target.is_floating_point() else target.dtype)
        t = t.to(device)
        if isinstance(target, nn.Parameter):
            t = nn.Parameter(t, requires_grad=False)
        for k in fills[key]:
            assign_tensor(model, k, t)


def _to_meta(model: nn.Module, fills: dict, keys) -> None:
    """Replace the tensors of checkpoint `keys` in `model` by meta tensors (ties kept)."""
    sd = model.state_dict(keep_vars=True)
    for key in keys:
        t = sd[fills[key][0]]
        m = t.to("meta")
        if isinstance(t, nn.Parameter):
            m = nn.Parameter(m, requires_grad=False)
        for k in fills[key]:
            assign_tensor(model, k, m)


def _round_dense(module: nn.Module, dense_dtype: Optional[str]) -> None:
    """physkern.dense.set_dense_storage_dtype on one block (no config of its own)."""
    if dense_dtype is None:
        return
    from .dense import set_dense_storage_dtype
    holder = nn.Module()
    holder.block = module
    holder.config = SimpleNamespace()
    set_dense_storage_dtype(holder, dense_dtype)


class _Replay(nn.Module):
    """Stands in for a transformer block after the last one ran: the first returns the saved
    final hidden states of the current batch, the others pass their input on (same output
    type as the real blocks)."""

    def __init__(self, feed, as_tuple: bool):
        super().__init__()
        self.feed, self.as_tuple = feed, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        h = next(self.feed) if self.feed is not None else hidden_states
        return (h,) if self.as_tuple else h


# ---- the loop --------------------------------------------------------------------------------


def quantize_streaming(source, out, config: AnyConfig, calibration: Optional[torch.Tensor],
                       embedding: Optional[AnyConfig] = None, dense_dtype: Optional[str] = None,
                       dtype="fp32", device: str | torch.device = "cpu", tokenizer=None,
                       extra: Optional[dict] = None, overwrite: bool = False,
                       max_shard_size=None, resume: bool = True, activations: str = "memory",
                       batch_size: int = 1, progress: bool = True,
                       stop_after: Optional[int] = None) -> Optional[StreamReport]:
    """Quantize the checkpoint directory `source` (config.json + model.safetensors or HF
    shards) block by block and save the quantized model to `out` (physkern.save_quantized's
    format and guarantees).

    config / embedding / dense_dtype: as in physkern.api.quantize and physkern.recipe (seeded
        configs: the caller sets the k-means seed, as apply_recipe does)
    calibration: [n_windows, seq] int64 token ids (None when no config needs calibration)
    dtype:       fp32 | bf16 | fp16: the weights are read and the blocks run at this dtype;
                 statistics are accumulated in fp32/fp64 whatever it is
    device:      where each block runs (cpu, cuda, cuda:N); activations stay on CPU
    max_shard_size: None = one model.safetensors; else bytes or "2GB": HF shards
    resume:      continue an interrupted run of the same inputs (False: start afresh)
    activations: "memory" (the inputs of the current block in RAM) or "disk" (read one batch at
                 a time from the state folder: memory stays at one batch)
    stop_after:  process at most this many blocks in this call, then return None with the state
                 saved (tests and benchmarks of resume; None = run to the end)
    Returns a StreamReport (None on rank != 0 of a distributed run, or with stop_after).
    """
    from .quant.accounting import bits_report
    from .serialization import (_write_config, model_marker, quantized_module_layouts,
                                stored_tensor, validate_output_dir, write_model_dir)
    from .serialization import install_quantized_modules
    t_start = time.perf_counter()
    dist = Dist.current()
    dtype = parse_dtype(dtype)
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{activations!r}")
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"source: {str(source)!r} holds no config.json (a transformers "
                                "checkpoint directory is needed for streaming)")
    validate_output_dir(out, overwrite)
    ckpt = Checkpoint(source)
    model = _build_skeleton(source, dtype)
    fills = _expected(model, ckpt)
    prefix, blocks = transformer_blocks(model)
    n_blocks = len(blocks)
    block_keys = {i: [k for k in fills if k.startswith(f"{prefix}.{i}.")] for i in range(n_blocks)}
    outer_keys = [k for k in fills if not k.startswith(prefix + ".")]
    chosen = select_layers(model, config)
    if embedding is not None and (embedding.layers is not None or embedding.overrides):
        raise ValueError("embedding: the head/embedding config takes no `layers` or "
                         "`overrides` (it applies to the output head and input embedding)")
    needs_calib = (any(c.needs_calibration for _, c in chosen)
                   or (embedding is not None and embedding.needs_calibration))
    if needs_calib:
        if calibration is None or calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError("calibration: this config needs calibration windows [n, seq] of "
                             "int64 token ids")
        _check_calibration_length(model, calibration)
    block_of = block_of_layers(model, chosen)
    fingerprint = _fingerprint(ckpt, config, embedding, dense_dtype, dtype,
                               calibration if needs_calib else None, batch_size)
    state_dir = state_dir_for(out, fingerprint)
    state = None
    if dist.rank == 0:
        if not resume and (state_dir / STATE_FILE).is_file():
            shutil.rmtree(state_dir)
        state = _read_state(state_dir, fingerprint, n_blocks) if resume else None
        state_dir.mkdir(parents=True, exist_ok=True)
    state = dist.broadcast(state)
    done = state["done"] if state else 0
    layouts: dict = dict(state["layers"]) if state else {}
    reports = [LayerReport(**r) for r in state["reports"]] if state else []

    # outside the blocks: embedding, final norm, head (and rotary buffers, built real)
    _materialise(model, ckpt, fills, outer_keys, device, dtype)
    for mod in model.modules():  # unsaved buffers (rotary tables) were built real, on CPU
        for n, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != torch.device(device):
                mod._buffers[n] = b.to(device)
    if done:  # finished blocks: their quantized layers as empty meta modules (for the layout)
        with torch.device("meta"):
            install_quantized_modules(model, layouts, {}, state_dir / STATE_FILE)

    hidden = kwargs_list = None
    if needs_calib:
        hidden, kwargs_list = capture_block_inputs(model, calibration, batch_size)
        hidden = [h.cpu() for h in hidden]
        if done:
            hidden = Activations(state_dir / f"hidden-{done:05d}", activations)
            if activations == "memory":
                hidden = Activations(hidden.folder, "memory", [hidden[j] for j in range(len(hidden))])
        else:
            if activations == "disk" and dist.rank == 0:
                _write_batches(state_dir / f"hidden-{0:05d}", hidden)
            dist.barrier()
            hidden = Activations(state_dir / f"hidden-{0:05d}", activations,
                                 hidden if activations == "memory" else None)
    # the embedding (and head) are not needed again before the end: off to the meta device
    _to_meta(model, fills, outer_keys)
    _release_memory()
    as_tuple = state.get("as_tuple") if state else None
    block_seconds = []
    bar = tqdm(total=n_blocks, initial=done, desc="stream blocks", unit="block",
               disable=not progress or dist.rank != 0)
    processed = 0
    try:
        for i in range(done, n_blocks):
            if stop_after is not None and processed >= stop_after:
                return None
            t0 = time.perf_counter()
            block = blocks[i]
            _materialise(model, ckpt, fills, block_keys[i], device, dtype)
            here = [(l, c) for l, c in chosen if block_of[l.name] == i]
            stats = None
            if any(c.needs_calibration for _, c in here):
                def run(block=block):
                    for j in range(len(hidden)):
                        block(hidden[j].to(device), **kwargs_list[j])
                stats = block_statistics(here, block, run)
            reports += dist.quantize_layers(model, here, stats, _quantize_one)
            del stats  # the Grams of layers other ranks quantized
            _release_memory()
            new_hidden = []
            if hidden is not None:
                for j in range(len(hidden)):
                    out_j = block(hidden[j].to(device), **kwargs_list[j])
                    as_tuple = isinstance(out_j, (tuple, list))
                    new_hidden.append(_block_output(out_j).cpu())
            _round_dense(block, dense_dtype)
            for layer, _ in here:
                layouts[layer.name] = model.get_submodule(layer.name).layer_meta()
            if dist.rank == 0:
                dense = None if dense_dtype is None else getattr(torch, dense_dtype)
                from safetensors.torch import save_file
                tensors = {f"{prefix}.{i}.{k}": stored_tensor(f"{prefix}.{i}.{k}", t, dense)
                           for k, t in block.state_dict().items()}
                f = state_dir / f"block-{i:05d}.safetensors"
                save_file(tensors, str(f.with_name(f.name + ".tmp")))
                os.replace(f.with_name(f.name + ".tmp"), f)
                if hidden is not None:
                    _write_batches(state_dir / f"hidden-{i + 1:05d}", new_hidden)
                _write_json_atomic(state_dir / STATE_FILE, {
                    "fingerprint": fingerprint, "done": i + 1, "layers": layouts,
                    "as_tuple": as_tuple,
                    "block_seconds": (state or {}).get("block_seconds", [])[:done]
                    + block_seconds + [time.perf_counter() - t0],
                    "reports": [asdict(r) for r in reports]})
            dist.barrier()  # every rank has read block i's inputs (disk activations) ...
            if dist.rank == 0:  # ... so they may go
                shutil.rmtree(state_dir / f"hidden-{i:05d}", ignore_errors=True)
            if hidden is not None:
                hidden = Activations(state_dir / f"hidden-{i + 1:05d}", activations,
                                     new_hidden if activations == "memory" else None)
            del new_hidden
            for layer, _ in here:  # the replaced fp32 modules (`chosen` still refers to them)
                layer.module.to("meta")
            blocks[i] = block.to("meta")  # free it
            _release_memory()
            block_seconds.append(time.perf_counter() - t0)
            processed += 1
            bar.update()
    finally:
        bar.close()
    activation_bytes = hidden.nbytes if hidden is not None else 0

    # the head (and embedding), calibrated on the final hidden states through the final norm
    _materialise(model, ckpt, fills, outer_keys, device, dtype)
    if embedding is not None:
        real_blocks = [blocks[j] for j in range(n_blocks)]
        if embedding.needs_calibration:
            feed = iter([hidden[j].to(device) for j in range(len(hidden))])
            for j in range(n_blocks):
                blocks[j] = _Replay(feed if j == 0 else None, bool(as_tuple))
        try:
            reports.append(_quantize_head(model, embedding, calibration))
        finally:
            for j in range(n_blocks):
                blocks[j] = real_blocks[j]
    if dense_dtype is not None:  # outside the blocks (theirs were rounded as they went)
        from .dense import set_dense_storage_dtype
        parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
        setattr(parent, prefix.rpartition(".")[2], nn.ModuleList())
        try:
            set_dense_storage_dtype(model, dense_dtype)
        finally:
            setattr(parent, prefix.rpartition(".")[2], blocks)
    _placeholders(blocks)  # finished blocks live in the state folder; only shapes are needed
    rep = bits_report(model)
    n_calib = calibration.numel() if needs_calib else 0
    report = QuantizationReport(reports, rep.quantized_bits_per_weight, rep.model_bits_per_weight,
                                rep.total_bytes, time.perf_counter() - t_start, n_calib)
    dist.barrier()  # every rank is done with the state folder (head calibration reads it)
    if dist.rank != 0:
        dist.barrier()  # returns once rank 0 has written the model
        return None
    layers, embeddings = quantized_module_layouts(model)
    meta = model_marker(model, layers, embeddings, rep,
                        {**(extra or {}), "report": report.to_dict()}
                        if extra is not None else extra)
    dense = None if dense_dtype is None else getattr(torch, dense_dtype)
    entries, sources = _final_entries(model, prefix, dense, state_dir)

    def write(tmp: Path) -> None:
        _write_config(model, layers, embeddings, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sharded(tmp, entries, sources, max_bytes, progress=progress)
    write_model_dir(out, meta, write)
    shutil.rmtree(state_dir, ignore_errors=True)
    dist.barrier()
    ckpt.close()
    return StreamReport(report, n_blocks, done, block_seconds, activation_bytes, str(out))


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed chunks below its mmap threshold
    in the heap, so without this a block's temporaries stay in the resident set)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _placeholders(module: nn.Module) -> None:
    """Replace every meta tensor under `module` by a one-element tensor expanded to its shape:
    shape, dtype and a storage of its own (what the bit accounting, which tells tensors apart by
    storage, and the layouts need), no memory."""
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for n, t in store.items():
                if t is not None and t.is_meta:
                    p = torch.zeros((), dtype=t.dtype).expand(t.shape)
                    store[n] = nn.Parameter(p, requires_grad=False) \
                        if isinstance(t, nn.Parameter) else p


def _final_entries(model: nn.Module, prefix: str, dense, state_dir: Path):
    """(entries [(key, stored bytes)] in state-dict order, each tensor once, and get(key)):
    block tensors from the state folder's block files, the rest from the model."""
    from safetensors import safe_open

    from .serialization import stored_tensor
    from .dense import is_dense
    sd = model.state_dict(keep_vars=True)
    seen, entries, where = set(), [], {}
    for key, t in sd.items():
        if id(t) in seen and t.numel():
            continue
        seen.add(id(t))
        if key.startswith(prefix + "."):
            i = int(key[len(prefix) + 1:].split(".", 1)[0])
            where[key] = state_dir / f"block-{i:05d}.safetensors"
        size = t.element_size()
        if dense is not None and is_dense(key, t) and size > dense.itemsize:
            size = dense.itemsize
        entries.append((key, t.numel() * size))
    handles: dict = {}

    def get(key: str) -> torch.Tensor:
        if key in where:
            f = where[key]
            if f not in handles:
                handles.clear()  # one block file open at a time
                handles[f] = safe_open(str(f), "pt")
            return handles[f].get_tensor(key)
        return stored_tensor(key, sd[key], dense)
    return entries, get
