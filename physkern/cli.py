"""The `physkern` command line. Each subcommand lives in physkern/commands/<name>.py and exposes
`register(subparsers)`; this file only discovers and dispatches them.

Bad input never shows a traceback: argparse errors, ValueError/FileNotFoundError/KeyError from
the commands, and unreadable files (OSError, json.JSONDecodeError, safetensors' SafetensorError,
UnicodeDecodeError) each print ONE line `physkern COMMAND: error: ...` naming the argument or
file, and main returns 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import struct
import sys
from typing import Optional, Sequence

from . import commands


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the full usage of `quantize` is 40 lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="physkern",
        description="Codebook quantization, kernels and physics-inspired analyses for LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def _file_error_types() -> tuple:
    """Exception classes the loaders raise for unreadable or malformed files."""
    types = [OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError,
             struct.error]  # struct.error: a truncated binary file (GGUF header)
    try:
        from safetensors import SafetensorError
        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(types)


def _error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """The one line printed for a bad-input exception; names the file behind loader errors."""
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename:
        what = exc.strerror or " ".join(str(exc).split())
        return f"{str(filename)!r}: {what}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    kind = {"JSONDecodeError": "invalid JSON", "SafetensorError": "invalid safetensors file",
            "UnicodeDecodeError": "not UTF-8 text", "error": "truncated or malformed file",
            "EOFError": "truncated file"}.get(type(exc).__name__)
    if kind is None:
        return text  # our own messages name the argument; transformers' OSErrors the file
    # JSON/safetensors/decoding errors carry no path: name the model argument (the loaders
    # that read other files, corpus and recipe files, wrap their errors with the file name).
    model = getattr(args, "model", None)
    where = f" while loading --model {model!r}" if model else ""
    return f"{kind}{where}: {text}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0 (kept), bad arguments return 2
        if exc.code in (0, None):
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .commands._common import check_device_arg
        check_device_arg(args)
        return int(args.func(args) or 0)
    except (ValueError, KeyError) + _file_error_types() as exc:
        # Bad input or an unreadable file: one clear line, no traceback.
        print(f"physkern {args.command}: error: {_error_line(exc, args)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
