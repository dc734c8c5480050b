"""Where a number came from: versions, device, command line. Every result JSON carries this."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .cache import umask_file_mode


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("physkern", "torch", "triton", "transformers", "numpy", "datasets", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str | torch.device = "cpu") -> str:
    """Human-readable description of the device a number was measured on."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    interp = " (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
    # The vector ISA torch found: the same CPU name ("AMD EPYC") covers AVX2-only and AVX-512
    # parts, and CPU kernel timings differ between them several-fold.
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {_cpu_name()} ({isa}), {torch.get_num_threads()} threads{interp}"


def provenance(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The block every results JSON embeds: device, versions, command line."""
    return {"device": device_description(device), "versions": versions(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])}


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write JSON atomically (temp file + rename), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".json")
    os.fchmod(fd, umask_file_mode())  # mkstemp's 0600 would become the result file's mode
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
