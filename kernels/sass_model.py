"""Read a compiled kernel's SASS (no GPU) and count what one weight costs: instructions, global
loads (LDG, with width), shared loads (LDS/LDSM) and stores, shuffles, barriers, atomics, and
from them bytes requested per weight from global memory and from shared memory.

The input is the cubin Triton produces for a GPUTarget (kernels/static_compile.py compiles it);
`cuobjdump -sass` (bundled with Triton's NVIDIA backend) turns it into text. The main loop is the
largest backward branch's body; a kernel without one is all "prologue".

What the counts mean, and what they do not:
- Bytes are *requested* per thread, lanes x width: a load every lane of a warp issues to the
  same address (x, a row's scale) counts 32 times, and predicated-off lanes count too. So they
  are an upper bound on distinct bytes and a measure of L1/shared-memory request traffic (what
  bound the dequantizing GEMV on the H200: bench/GPU_NOTES.md), not DRAM traffic.
- Instruction counts are static: every instruction of the loop body once per iteration,
  whichever branch runs. Nothing here is a GPU measurement.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

# cuobjdump lines: "        /*0250*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x... */"
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")

# Per-thread bytes of a memory instruction, from its type modifier (32-bit by default).
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}

CLASSES = ("global_load", "global_store", "global_atomic", "shared_load", "shared_store",
           "shuffle", "barrier", "fp32_fma", "fp32_add", "fp32_mul", "tensor_core", "other")


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str
    op: str          # opcode with modifiers, e.g. "LDG.E.128"
    operands: str


def nvidia_tool_path(name: str) -> Optional[str]:
    """Triton's bundled NVIDIA tool `name` ("cuobjdump", "ptxas"), else one on PATH, else None."""
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure means: use PATH
        pass
    return shutil.which(name)


def cuobjdump_path() -> Optional[str]:
    """Triton's bundled cuobjdump, else one on PATH, else None."""
    return nvidia_tool_path("cuobjdump")


def disassemble(cubin: bytes) -> list[Instr]:
    """The cubin's SASS instructions (one kernel per cubin, as Triton emits)."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's NVIDIA backend ships one)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr}")
    return parse_sass(res.stdout)


def parse_sass(text: str) -> list[Instr]:
    """Instructions from cuobjdump -sass / nvdisasm text (encoding comments ignored)."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                             m.group(4).strip()))
    return out


def main_loop(instrs: list[Instr]) -> Optional[tuple[int, int]]:
    """[start, end] instruction indices of the largest loop (a branch back to an earlier
    address; `BRA self` after EXIT is not a loop), or None."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    best = None
    for i, ins in enumerate(instrs):
        if not ins.op.startswith("BRA"):
            continue
        m = _BRANCH_TARGET.search(ins.operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < ins.addr and target in index:
            span = (index[target], i)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    return best


def mem_width(op: str) -> int:
    """Bytes per thread of a load/store: LDSM.x4 = 16 (four 8x8 b16 tiles), else the type
    modifier (.U8 .. .128), 4 by default."""
    parts = op.split(".")
    if parts[0] in ("LDSM", "STSM"):  # LDSM.16.M88.4: four tiles, 4 bytes of each per thread
        return 4 * (int(parts[-1]) if parts[-1] in ("2", "4") else 1)
    for p in reversed(parts[1:]):
        if p in _WIDTH:
            return _WIDTH[p]
    return 4


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base in ("LDG", "LD") or base == "LDGSTS":
        return "global_load"
    if base in ("STG", "ST"):
        return "global_store"
    if base in ("RED", "REDG", "ATOM", "ATOMG"):
        return "global_atomic"
    if base in ("LDS", "LDSM"):
        return "shared_load"
    if base in ("STS", "STSM"):
        return "shared_store"
    if base == "SHFL":
        return "shuffle"
    if base in ("BAR", "SYNCS"):
        return "barrier"
    if base == "FFMA":
        return "fp32_fma"
    if base == "FADD":
        return "fp32_add"
    if base == "FMUL":
        return "fp32_mul"
    if base in ("HMMA", "HGMMA", "IMMA", "QGMMA", "WGMMA"):
        return "tensor_core"
    return "other"


def _count(instrs: list[Instr]) -> dict:
    counts = {c: 0 for c in CLASSES}
    widths: dict = {}
    bytes_ = {"global_load": 0, "shared_load": 0, "shared_store": 0, "global_atomic": 0}
    for ins in instrs:
        c = classify(ins.op)
        counts[c] += 1
        if c in bytes_:
            w = mem_width(ins.op)
            bytes_[c] += w
            key = f"{ins.op.split('.')[0]}.{8 * w}"
            widths[key] = widths.get(key, 0) + 1
    return {"instructions": len(instrs), "by_class": counts, "by_width": widths,
            "bytes_per_thread": bytes_}


def summarize(instrs: list[Instr], threads: int, weights_per_iteration: int,
              iterations: int = 1) -> dict:
    """Counts of the loop body and of the rest, and per weight (a program runs the loop
    `iterations` times over weights_per_iteration weights each):
    - loop_*: steady state, per weight of one iteration;
    - program_*: the whole program (the rest once + the loop `iterations` times).
    Instructions per weight are warp instructions (threads / 32 warps issue each once)."""
    span = main_loop(instrs)
    body = instrs[span[0]:span[1] + 1] if span else []
    rest = [ins for i, ins in enumerate(instrs) if not span or not span[0] <= i <= span[1]]
    loop, other = _count(body), _count(rest)
    warps = threads / 32
    weights = weights_per_iteration * iterations

    def per_weight(lb: int, ob: int, n: int) -> float:
        return (lb * iterations + ob) * threads / weights if n else 0.0

    res = {"threads": threads, "weights_per_iteration": weights_per_iteration,
           "iterations": iterations, "has_loop": span is not None,
           "loop": loop, "outside_loop": other,
           "loop_warp_instructions_per_weight": loop["instructions"] * warps
           / weights_per_iteration,
           "program_warp_instructions_per_weight":
               (loop["instructions"] * iterations + other["instructions"]) * warps / weights}
    for c in ("global_load", "shared_load", "shared_store", "global_atomic"):
        lb, ob = loop["bytes_per_thread"][c], other["bytes_per_thread"][c]
        res[f"loop_{c}_bytes_per_weight"] = lb * threads / weights_per_iteration
        res[f"program_{c}_bytes_per_weight"] = per_weight(lb, ob, weights)
    return res
