"""Correctness of physkern's Triton kernels on a real GPU (not the interpreter) -> JSON.

    python bench/gpu_check.py --out bench/results/gpu_check_<gpu>.json

The pytest suite runs the kernels under TRITON_INTERPRET=1 on CPU tensors; this script runs the
same contracts compiled for the GPU, against the independent torch references (fp32, TF32 off),
over many shapes including odd ones:
- kmeans_assign_triton vs kmeans_assign_reference: d in {1, 2, 4, 8, 16}, K in {1, 7, 256,
  4096, 65536}, odd block counts, with and without importance. Distances must match; an index may
  differ only where the two centroids are equally near (fp32 rounding), checked by distance.
- codebook_matmul_triton vs codebook_matmul_reference: row/group/layer scopes, 1-2 stages, d in
  {1, 2, 4, 8, 16}, K in {1, 16, 256, 4096}, M in {1, 5, 16, 17, 300}, odd out/in, fp32, fp16 and
  bf16 x, per-row and per-column-group scales, offsets, bias; every output element written (the
  output is poisoned with NaN first by filling the caching allocator's block).
- lattice_attention_triton vs lattice_attention_reference (causal, GQA, odd lengths).
- physkern.ops custom ops: torch.library.opcheck on CUDA tensors; a quantized tiny GPT-2 and
  LLaMA on CUDA vs the same model's CPU logits; torch.compile of the CUDA model.
Exit status 1 if any case fails. Each record holds the case, the error and the tolerance.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from physkern.kernels.codebook_matmul import (codebook_matmul_reference,  # noqa: E402
                                              codebook_matmul_triton)
from physkern.kernels.kmeans_assign import kmeans_assign_reference, kmeans_assign_triton  # noqa: E402
from physkern.provenance import provenance, write_json  # noqa: E402
from physkern.quant.packing import index_bits, pack_indices  # noqa: E402

SMOKE = False  # --smoke: a few small cases on CPU under TRITON_INTERPRET=1 (checks the script)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def poison_allocator(device, nbytes: int = 256 << 20) -> None:
    """Fill a large freed block with NaN so that a later torch.empty likely reuses NaN memory:
    an output element the kernel forgot to write then shows up as NaN."""
    t = torch.full((nbytes // 4,), float("nan"), device=device)
    del t


def check_kmeans(device, records: list) -> None:
    cases = [(1, 1, 7, 1), (3, 33, 1, 2), (2, 97, 256, 4), (5, 61, 7, 8), (1, 1000, 4096, 8),
             (1, 333, 65536, 4), (4, 50, 64, 16), (1, 2048, 256, 1), (3072, 96, 64, 8)]
    for s, n, k, d in (cases[:3] if SMOKE else cases):
        for with_imp in (False, True):
            g = torch.Generator(device="cpu").manual_seed(s * 7 + n + k + d)
            blocks = torch.randn(s, n, d, generator=g).to(device)
            cents = torch.randn(s, k, d, generator=g).to(device)
            imp = (torch.rand(1, n, d, generator=g) + 0.1).to(device) if with_imp else None
            poison_allocator(device)
            idx, dist = kmeans_assign_triton(blocks, cents, imp)
            ridx, rdist = kmeans_assign_reference(blocks, cents, imp)
            # Distance of the kernel's choice, recomputed exactly in float64.
            chosen = torch.gather(cents.double(), 1, idx[..., None].expand(-1, -1, d).clamp(0, k - 1))
            sq = (blocks.double() - chosen) ** 2
            if imp is not None:
                sq = sq * imp.double()
            d_chosen = sq.sum(-1)
            scale = rdist.double().abs().max().clamp_min(1e-6)
            err = float(((d_chosen - rdist.double()).abs() / scale).max())
            derr = float(((dist.double() - rdist.double()).abs() / scale).max())
            mism = int((idx != ridx).sum())
            ok = (err <= 1e-5 and derr <= 1e-5 and bool((idx >= 0).all() and (idx < k).all()))
            records.append({"kernel": "kmeans_assign", "scopes": s, "blocks": n, "k": k, "d": d,
                            "importance": with_imp, "chosen_dist_rel_err": err,
                            "returned_dist_rel_err": derr, "index_mismatches_on_ties": mism,
                            "tol": 1e-5, "ok": ok})


def make_qw(out_f, in_f, d, k, rows, stages, scale_group, offsets, g, device):
    idx = torch.randint(0, k, (stages, out_f, in_f // d), generator=g)
    cb = torch.randn(stages, out_f // rows, k, d, generator=g).half()
    sc = of = None
    if scale_group:
        sc = (torch.rand(out_f, in_f // scale_group, generator=g) + 0.5).half()
        if offsets:
            of = torch.randn(out_f, in_f // scale_group, generator=g).half() * 0.1
    return (pack_indices(idx, index_bits(k)).to(device), cb.to(device),
            None if sc is None else sc.to(device), None if of is None else of.to(device),
            in_f, rows, scale_group or in_f)


def check_matmul(device, records: list) -> None:
    # (out, in, d, k, codebook_rows (None = layer), stages, scale_group, offsets, bias)
    layouts = [
        (37, 40, 8, 16, 1, 1, None, False, True),        # row scope, the seeds' layout
        (64, 96, 4, 256, None, 1, 96, False, False),     # layer scope, per-row scale
        (96, 64, 2, 64, None, 1, 64, False, True),       # layer K64 d2 (our 3-bit recipe)
        (48, 128, 1, 16, None, 1, 32, True, True),       # RTN-style affine d=1
        (50, 80, 16, 4096, None, 1, 16, False, False),   # d=16, K=4096, per-block scale
        (33, 72, 8, 1, 11, 1, None, False, True),        # group scope, K=1
        (40, 48, 4, 256, 8, 2, 12, True, False),         # 2 stages, group scope, offsets
        (130, 200, 8, 512, None, 1, 200, False, True),   # 9-bit indices straddle words
    ]
    ms = (1, 17) if SMOKE else (1, 5, 16, 17, 300)
    layouts = layouts[:3] if SMOKE else layouts
    g = torch.Generator().manual_seed(0)
    for (out_f, in_f, d, k, rows, stages, sg, offs, has_bias) in layouts:
        packed, cb, sc, of, inf, rows_, sg_ = make_qw(out_f, in_f, d, k, rows or out_f, stages, sg,
                                                      offs, g, device)
        bias = torch.randn(out_f, generator=g).to(device) if has_bias else None
        for m in ms:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = torch.randn(m, in_f, generator=g).to(device, dtype)
                b = bias.to(dtype) if bias is not None else None
                poison_allocator(device)
                y = codebook_matmul_triton(x, packed, cb, sc, of, b, inf, rows_, sg_)
                ref = codebook_matmul_reference(x.float(), packed, cb, sc, of,
                                                None if b is None else b.float(), inf, rows_, sg_)
                err = rel_err(y.float(), ref)
                records.append({"kernel": "codebook_matmul", "out": out_f, "in": in_f, "d": d,
                                "k": k, "codebook_rows": rows_, "stages": stages,
                                "scale_group": sg_, "offsets": offs, "bias": has_bias, "m": m,
                                "dtype": str(dtype).replace("torch.", ""), "rel_err": err,
                                "tol": TOL[dtype], "ok": err <= TOL[dtype] and y.dtype == dtype})


def check_lattice(device, records: list) -> None:
    from physkern.kernels.lattice_attention import (lattice_attention_reference,
                                                    lattice_attention_triton)
    cases = [(1, 2, 1, 16, 4.0, None), (77, 4, 2, 32, 8.0, None), (300, 9, 3, 64, 16.0, 1e-3),
             (1000, 4, 4, 64, 32.0, 1e-3)]
    for n, heads, kv, hd, xi, eps in (cases[:2] if SMOKE else cases):
        for dtype in (torch.float32, torch.float16):
            g = torch.Generator().manual_seed(n)
            q = torch.randn(1, heads, n, hd, generator=g).to(device, dtype)
            k = torch.randn(1, kv, n, hd, generator=g).to(device, dtype)
            v = torch.randn(1, kv, n, hd, generator=g).to(device, dtype)
            y = lattice_attention_triton(q, k, v, xi, eps=eps)
            ref = lattice_attention_reference(q.float(), k.float(), v.float(), xi)
            err = rel_err(y.float(), ref)
            tol = TOL[dtype] if eps is None else max(TOL[dtype], 5e-3)
            records.append({"kernel": "lattice_attention", "n": n, "heads": heads, "kv_heads": kv,
                            "head_dim": hd, "xi": xi, "eps": eps,
                            "dtype": str(dtype).replace("torch.", ""), "rel_err": err, "tol": tol,
                            "ok": err <= tol})


def check_ops_and_models(device, records: list) -> None:
    import physkern
    from physkern import ops
    from physkern.quant.format import QuantizedWeight

    g = torch.Generator().manual_seed(1)
    packed, cb, sc, of, inf, rows, sg = make_qw(64, 96, 4, 256, 64, 1, 96, False, g, device)
    x = torch.randn(3, 96, generator=g).to(device, torch.float16)
    torch.library.opcheck(torch.ops.physkern.codebook_matmul.default,
                          (x, packed, cb, sc, of, None, inf, rows, sg))
    blocks = torch.randn(2, 50, 8, generator=g).to(device)
    cents = torch.randn(2, 16, 8, generator=g).to(device)
    torch.library.opcheck(torch.ops.physkern.kmeans_assign.default, (blocks, cents, None))
    records.append({"kernel": "opcheck", "ok": True})
    qw = QuantizedWeight(packed, cb, sc, of, inf, 64, rows, sg)
    y = ops.codebook_matmul(x, qw)
    records.append({"kernel": "ops.codebook_matmul(auto, cuda)", "ok": bool(torch.isfinite(y).all()),
                    "rel_err": rel_err(y.float(), codebook_matmul_reference(
                        x.float(), packed, cb, sc, of, None, inf, rows, sg)), "tol": 5e-3})

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2,
                                           n_head=2)).eval(),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, max_position_embeddings=64,
                                              tie_word_embeddings=True)).eval(),
    }
    ids = torch.randint(0, 96, (2, 24), generator=g)
    for name, model in models.items():
        physkern.quantize(model, physkern.CodebookConfig(k=16, block_dim=4, scope="layer",
                                                         calibrate=False), progress=False)
        with torch.no_grad():
            cpu_logits = model(ids).logits
            model.to(device)
            gpu_logits = model(ids.to(device)).logits
            err = rel_err(gpu_logits.float().cpu(), cpu_logits)
            records.append({"kernel": f"quantized tiny {name}, cuda vs cpu logits", "rel_err": err,
                            "tol": 1e-4, "ok": err <= 1e-4})
            t0 = time.perf_counter()
            try:
                compiled = torch.compile(model)
                c_logits = compiled(ids.to(device)).logits
                cerr = rel_err(c_logits.float().cpu(), cpu_logits)
                records.append({"kernel": f"torch.compile quantized tiny {name} (cuda)",
                                "rel_err": cerr, "tol": 1e-4, "ok": cerr <= 1e-4,
                                "compile_s": time.perf_counter() - t0})
            except Exception as exc:  # recorded, counted as a failure
                records.append({"kernel": f"torch.compile quantized tiny {name} (cuda)",
                                "ok": False, "error": repr(exc)[:500]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--only", nargs="+", default=["kmeans", "matmul", "lattice", "ops"],
                   choices=["kmeans", "matmul", "lattice", "ops"])
    p.add_argument("--smoke", action="store_true",
                   help="a few small cases on CPU (needs TRITON_INTERPRET=1): checks this script")
    args = p.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    if not torch.cuda.is_available() and not SMOKE:
        print("gpu_check: no CUDA device; nothing to check (the interpreter tests cover CPU)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cpu" if SMOKE else "cuda")
    records: list = []
    steps = {"kmeans": check_kmeans, "matmul": check_matmul, "lattice": check_lattice,
             "ops": check_ops_and_models}
    for name in args.only:
        t0 = time.perf_counter()
        try:
            steps[name](device, records)
        except Exception:
            records.append({"kernel": name, "ok": False, "error": traceback.format_exc()[-2000:]})
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    bad = [r for r in records if not r["ok"]]
    summary = {"cases": len(records), "failed": len(bad)}
    for r in bad[:20]:
        print("FAIL", r)
    for kern in sorted({r["kernel"] for r in records}):
        rs = [r for r in records if r["kernel"] == kern]
        worst = max((r.get("rel_err", r.get("chosen_dist_rel_err", 0.0)) for r in rs), default=0)
        print(f"{kern:55s} {len(rs):4d} cases, {sum(not r['ok'] for r in rs)} failed, "
              f"worst err {worst:.2e}")
    out = args.out or ROOT / "bench" / "results" / "gpu_check.json"
    write_json(out, {"provenance": provenance(device), "command": " ".join(sys.argv),
                     "summary": summary, "records": records})
    print(f"gpu_check: {summary}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
