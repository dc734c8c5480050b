"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse

DEFAULT_WINDOW = 1024
DEFAULT_EVAL_TOKENS = 16384  # 16 windows of 1024: 16,368 scored tokens, the issues' protocol


def add_model_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub name, local directory (transformers or physkern-quantized) or .gguf "
                        "path; default: the packaged SmolLM2-135M-Instruct")
    p.add_argument("--corpus", default=None,
                   help="packaged corpus name (wiki, c4, code, ...), 'wikitext2', or a .txt path; "
                        "default: packaged Wikipedia (evaluation = second half of the articles)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def add_eval_args(p: argparse.ArgumentParser, tokens_default: int | None = DEFAULT_EVAL_TOKENS):
    p.add_argument("--tokens", type=int, default=tokens_default,
                   help=f"evaluation tokens taken from the start of the evaluation text "
                        f"(default {tokens_default}; 0 = all)")
    p.add_argument("--window", type=int, default=None,
                   help=f"window length (default min(model context, {DEFAULT_WINDOW}))")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride; default = window (non-overlapping windows)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")


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
