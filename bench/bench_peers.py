"""Peer quantizers on the same model, text and protocol as `physkern sweep quant`: HQQ and
torchao weight-only int8 / int4, with their TRUE stored bits. Not a test dependency.

    .venv/bin/pip install -c requirements.lock hqq        # optional (extra "peers"), locked version
    .venv/bin/pip install -c requirements.lock --no-deps --target /tmp/physkern_peers torchao   # kept out of .venv:
        # once installed, transformers imports torchao on every model load (slow, noisy)
    PHYSKERN_PEERS_PATH=/tmp/physkern_peers .venv/bin/python bench/bench_peers.py [--tokens N]

Bits: each peer's quantized layer gets `weight_numel()` / `storage_bits()` (every tensor the peer
stores for that weight: packed ints, scales, zeros, at their dtypes; tensor subclasses are
flattened to their inner tensors), so physkern.quant.accounting.bits_report counts them like
QuantizedLinear. Whole-model bits: the FP model's stored bits with each replaced layer's weight
swapped for the peer's stored bits. A peer that cannot run on this CPU is recorded with the error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PHYSKERN_PEERS_PATH"):
    sys.path.append(os.environ["PHYSKERN_PEERS_PATH"])

import torch  # noqa: E402
from torch import nn  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "peers.json"


def inner_tensors(t) -> list[torch.Tensor]:
    """The plain tensors that store `t` (recursing into tensor subclasses)."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    out = []
    for n in names:
        out += inner_tensors(getattr(t, n))
    return out


def bits_of(tensors) -> int:
    return sum(x.numel() * x.element_size() * 8 for x in tensors if x is not None)


def mark_compressed(module: nn.Module, n_weights: int, parts: dict) -> None:
    """Give a peer's module the accounting hooks (weight_numel, storage_bits)."""
    module.weight_numel = lambda: n_weights
    module.storage_bits = lambda: dict(parts)


def apply_hqq(model, bits: int, group: int):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from physkern.models import decoder_linear_layers, replace_layer
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
    for l in decoder_linear_layers(model):
        if l.kind != "linear":
            raise ValueError("HQQ path expects nn.Linear layers")
        n = l.out_features * l.in_features
        q = HQQLinear(l.module, cfg, compute_dtype=torch.float32, device="cpu")
        parts = {"W_q": bits_of([q.W_q])}
        for k in ("scale", "zero"):
            v = q.meta.get(k)
            if isinstance(v, torch.Tensor):
                parts[k] = bits_of([v])
        mark_compressed(q, n, parts)
        replace_layer(model, l.name, q)


def apply_torchao(model, kind: str):
    from torchao.quantization import quantize_
    from physkern.models import decoder_linear_layers
    layers = decoder_linear_layers(model)
    names = {l.name for l in layers}
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        cfg = Int8WeightOnlyConfig()
    else:
        from torchao.quantization import Int4WeightOnlyConfig
        cfg = Int4WeightOnlyConfig(group_size=64)
    quantize_(model, cfg, filter_fn=lambda m, fqn: fqn in names)
    for l in layers:
        m = model.get_submodule(l.name)
        parts = {"weight": bits_of(inner_tensors(m.weight))}
        mark_compressed(m, l.out_features * l.in_features, parts)


PEERS = {
    "hqq4_g64": ("HQQ 4-bit group 64 (asym, fp scale/zero)", lambda m: apply_hqq(m, 4, 64)),
    "hqq3_g64": ("HQQ 3-bit group 64", lambda m: apply_hqq(m, 3, 64)),
    "torchao_int8_wo": ("torchao Int8WeightOnlyConfig (per-channel)",
                        lambda m: apply_torchao(m, "int8")),
    "torchao_int4_wo_g64": ("torchao Int4WeightOnlyConfig(group_size=64)",
                            lambda m: apply_torchao(m, "int4")),
}


def main(argv=None) -> int:
    from physkern.data import evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import decoder_linear_layers, load_model, resolve_model_name
    from physkern.provenance import provenance, write_json
    from physkern.quant.accounting import bits_report, tensor_bits
    ap = argparse.ArgumentParser(description="HQQ / torchao peers with true bits")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--only", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--json", default=str(OUT))
    args = ap.parse_args(argv)
    corpus = load_corpus(None)
    model, tok = load_model(None)
    tokens = evaluation_tokens(tok, corpus, args.tokens)
    fp_bits = bits_report(model)
    fp_layer_bits = {l.name: tensor_bits(l.module.weight) for l in decoder_linear_layers(model)}
    results = []
    for name in args.only:
        desc, apply = PEERS[name]
        m, _ = load_model(None)
        t0 = time.perf_counter()
        try:
            apply(m)
            try:
                rep = bits_report(m)
                layers_bits = rep.layers
                how = "physkern.quant.accounting.bits_report over the peer's storage_bits hooks"
            except RuntimeError:
                # bits_report's whole-model pass cannot read tensor-subclass storages (torchao):
                # sum the same per-layer hooks it would have summed.
                layers_bits = {}
                for n, mod in m.named_modules():
                    if hasattr(mod, "storage_bits"):
                        parts = mod.storage_bits()
                        layers_bits[n] = {**parts, "weights": mod.weight_numel(),
                                          "total_bits": sum(parts.values())}
                how = "sum of the peer's storage_bits hooks (bits_report cannot read " \
                      "tensor-subclass storages)"
            res = perplexity(m, tokens, 1024, progress=False, model_name=resolve_model_name(None))
            q_bits = sum(v["total_bits"] for v in layers_bits.values())
            q_weights = sum(v["weights"] for v in layers_bits.values())
            model_bits = fp_bits.model_bits - sum(fp_layer_bits[n] for n in layers_bits) + q_bits
            r = {"peer": name, "description": desc, "ran": True, "perplexity": res.perplexity,
                 "tokens_scored": res.tokens_scored, "bits_counted_by": how,
                 "true_bits_quantized": q_bits / q_weights,
                 "true_bits_model": model_bits / fp_bits.model_parameters,
                 "quantized_layers": len(layers_bits),
                 "bits_parts_first_layer": next(iter(layers_bits.values())),
                 "seconds": time.perf_counter() - t0}
            print(f"{name}: ppl {res.perplexity:.3f}, {r['true_bits_quantized']:.3f} bits/w "
                  f"(quantized), {r['true_bits_model']:.3f} (model)", flush=True)
        except Exception as exc:  # record why a peer cannot run here
            r = {"peer": name, "description": desc, "ran": False,
                 "error": f"{type(exc).__name__}: {exc}"[:2000],
                 "traceback_tail": traceback.format_exc()[-1500:]}
            print(f"{name}: could not run: {r['error'][:300]}", flush=True)
        results.append(r)
    if Path(args.json).exists():  # keep other peers' earlier results (same protocol only)
        import json
        old = json.loads(Path(args.json).read_text())
        if old.get("protocol", {}).get("tokens_input") == int(tokens.numel()):
            ran = {r["peer"] for r in results}
            results = [r for r in old["results"] if r["peer"] not in ran] + results
    import importlib.metadata as md
    vers = {}
    for p in ("hqq", "torchao"):
        try:
            vers[p] = md.version(p)
        except md.PackageNotFoundError:
            vers[p] = "not installed"
    write_json(args.json, {"experiment": "peer quantizers", "model": resolve_model_name(None),
                           "corpus": corpus.describe(),
                           "protocol": {"kind": "non-overlapping", "window": 1024,
                                        "tokens_input": int(tokens.numel()), "dtype": "float32",
                                        "text": "evaluation half"},
                           "seeds": "none (deterministic)", "peer_versions": vers,
                           "fp_perplexity_note": "see the FP point of bench/results/pareto*.json",
                           "results": results, **provenance("cpu")})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
