"""`physkern generate`: greedy text generation, batch 1, with prefill and decode tok/s."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text greedily and report prefill/decode tok/s",
                       description="Greedy generation (batch 1) from a physkern-quantized model "
                                   "directory, a transformers directory, or the packaged model "
                                   "(no --model). Prints the text, then prefill and decode "
                                   "tokens/s (physkern.generate.generate_timed).")
    p.add_argument("--model", default=None,
                   help="local directory (transformers or physkern-quantized), .gguf path or hub "
                        "name; default: the packaged SmolLM2-135M-Instruct")
    p.add_argument("--prompt", default=None, help="text to continue (required)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-stop", action="store_true",
                   help="do not stop at the end-of-sequence token (always max-new-tokens)")
    p.add_argument("--prefill-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the quantized layers' prompt (many-row) products on CPU: "
                        "float32 (default, exact) or bfloat16 (one bf16 GEMM per layer, about "
                        "twice as fast; physkern.set_prefill_dtype)")
    p.add_argument("--decode-tables", choices=["int16", "fp32"], default=None,
                   help="tables of the decode lookup-table GEMV: int16 (default where the CPU "
                        "has AVX-512 VBMI) or fp32 (exact; physkern.set_decode_tables)")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the very first run too (one-off setup costs included)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.prompt is None or not args.prompt.strip():
        raise ValueError("prompt: give some text with --prompt")
    if args.max_new_tokens <= 0:
        raise ValueError(f"max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"threads must be a positive integer, got {args.threads}")
    import torch

    from ..kernels import codebook_gemv_lut as lut
    from .. import ops
    # Process-wide settings: restored afterwards, so an in-process caller (tests) keeps its own.
    old = ops.prefill_dtype(), lut.decode_tables()
    ops.set_prefill_dtype(torch.bfloat16 if args.prefill_dtype == "bfloat16" else None)
    if args.decode_tables is not None:
        lut.set_decode_tables(args.decode_tables)
    try:
        return _generate(args)
    finally:
        ops.set_prefill_dtype(old[0])
        lut.set_decode_tables(old[1])


def _generate(args: argparse.Namespace) -> int:
    from ..generate import generate_timed
    from ..models import load_model
    model, tokenizer = load_model(args.model, device=args.device)
    if tokenizer is None:
        raise ValueError(f"model: {args.model!r} has no tokenizer files; generate needs one")
    res = generate_timed(model, tokenizer, args.prompt, args.max_new_tokens,
                         stop_at_eos=not args.no_stop, threads=args.threads,
                         warmup=not args.no_warmup)
    print(args.prompt + res.text)
    print(f"prefill {res.prompt_tokens} tokens in {res.prefill_seconds * 1e3:.1f} ms: "
          f"{res.prefill_tokens_per_second:.1f} tok/s")
    print(f"decode {res.decode_steps} tokens in {res.decode_seconds * 1e3:.1f} ms: "
          f"{res.decode_tokens_per_second:.1f} tok/s ({res.decode_ms_per_token:.2f} ms/token)"
          f"  [{res.new_tokens} new tokens, {res.threads} threads, {res.device}]")
    return 0
