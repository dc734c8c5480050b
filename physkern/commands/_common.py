"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
DEFAULT_WINDOW = 1024
DEFAULT_EVAL_TOKENS = 16384  # 16 windows of 1024: 16,368 scored tokens, the issues' protocol
# Where analyze / prune write by default: outside the checkout's committed results (the commands
# that produced bench/results/analysis pass --out-dir bench/results/analysis explicitly).
ANALYSIS_OUT_DIR = "physkern-analysis"


def int_in(lo: int, hi: int | None = None, note: str = ""):
    """argparse type: an integer in [lo, hi]; the error names the range (argparse adds the
    argument's name)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {rng}{note}, got {text!r}")
        return value
    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (NaN and Inf rejected)."""
    import math
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


positive_float.__name__ = "float"


def seed_arg(text: str) -> int:
    """argparse type for --seed: an integer in [0, 2**63 - 1]."""
    return int_in(0, MAX_SEED)(text)


def check_device_arg(args: argparse.Namespace) -> None:
    """Validate `args.device` (when the command has one) before any work: a torch device string
    of a backend available here. Raises ValueError naming --device."""
    device = getattr(args, "device", None)
    if device is None:
        return
    check_device(device)


def check_device(device: str) -> str:
    """A torch device string that can be used on this machine, or ValueError naming device."""
    import torch
    allowed = "cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: {device!r} is not a torch device; use {allowed}") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} is not available here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device: {device} does not exist here ({n} CUDA device(s): "
                             f"cuda:0..cuda:{n - 1})")
        return device
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device: {device} is not available here "
                             "(torch.backends.mps.is_available() is False); use --device cpu")
        return device
    raise ValueError(f"device: {device!r} is not supported; use {allowed}")


def check_calib_window(model, window: int, arg: str = "--calib-window") -> None:
    """Calibration windows must fit the model's context (GPT-2 would index past its position
    table, RoPE models would run silently beyond their trained length)."""
    from ..models import model_context_length
    ctx = model_context_length(model)
    if window > ctx:
        raise ValueError(f"{arg}: {window} tokens exceed the model context ({ctx} tokens); "
                         f"use at most {ctx}")


def check_output_file(path, arg: str) -> None:
    """Before any work: `path` (a file to be written, parents created) must not be a directory
    and its nearest existing parent must be a writable directory. Raises ValueError naming arg."""
    import os
    from pathlib import Path
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{arg} {str(p)!r} is a directory; give a file path")
    _check_writable_parent(p.absolute().parent, p, arg)


def check_output_dir(path, arg: str) -> None:
    """Before any work: `path` (a folder to write files into, created if missing) must be a
    directory or creatable in a writable parent. Raises ValueError naming arg."""
    import os
    from pathlib import Path
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"{arg} {str(p)!r} exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"{arg} {str(p)!r} is not writable")
        return
    _check_writable_parent(p.absolute().parent, p, arg)


def _check_writable_parent(parent, p, arg: str) -> None:
    import os
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{arg} {str(p)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {str(p)!r}: {str(parent)!r} is not writable")


def add_model_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub name, local directory (transformers or physkern-quantized) or .gguf "
                        "path; default: the packaged SmolLM2-135M-Instruct")
    p.add_argument("--corpus", default=None,
                   help="packaged corpus name (wiki, c4, code, ...), 'wikitext2', or a .txt path; "
                        "default: packaged Wikipedia (evaluation = second half of the articles)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_eval_args(p: argparse.ArgumentParser, tokens_default: int | None = DEFAULT_EVAL_TOKENS):
    p.add_argument("--tokens", type=int_in(0, note=" (0 = all)"), default=tokens_default,
                   help=f"evaluation tokens taken from the start of the evaluation text "
                        f"(default {tokens_default}; 0 = all)")
    p.add_argument("--window", type=int_in(2), default=None,
                   help=f"window length (default min(model context, {DEFAULT_WINDOW}))")
    p.add_argument("--stride", type=int_in(1), default=None,
                   help="sliding-window stride; default = window (non-overlapping windows)")
    p.add_argument("--batch-size", type=int_in(1), default=1, help="windows per forward pass")


def resolve_window(model, window: int | None) -> int:
    from ..models import model_context_length
    ctx = model_context_length(model)
    if window is None:
        return min(ctx, DEFAULT_WINDOW)
    if window > ctx:
        raise ValueError(f"window: {window} exceeds the model context ({ctx} tokens)")
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    return window
