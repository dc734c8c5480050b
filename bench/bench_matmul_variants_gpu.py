"""Codebook-matmul launch configurations on a GPU, each timed through the public
codebook_matmul_triton(config=...) path beside cuBLAS fp16 -> bench/results/matmul_variants_gpu.json.

    python bench/bench_matmul_variants_gpu.py [--out FILE]

Every candidate is checked against the fp32 reference before it is timed (a wrong config is
recorded as such, never as fast). Same protocol as bench/bench_kernels_gpu.py (CUDA-graph replay
over weight copies rotated past the L2, median of 20 replays, fp16 x), fewer copies (256 MB per
method). The production configurations in physkern/kernels/codebook_matmul.py are chosen from
this file's winners; the JSON is written after every cell, so a run cut short keeps what it did.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_kernels_gpu import graph_time, make_storage, storage_bytes  # noqa: E402
from physkern.kernels.codebook_matmul import (codebook_matmul_reference,  # noqa: E402
                                              codebook_matmul_triton)
from physkern.provenance import provenance, write_json  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]
RECIPES = {"layer_K256_d4_rowscale": (4, 256, None, None, False),
           "layer_K512_d4_rowscale": (4, 512, None, None, False)}
ROTATE_BYTES = 256 << 20


def vec(bm, bn, bk, nw, ns, waves, gather=False):
    return {"kernel": "gemv_vec", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw,
            "num_stages": ns, "waves": waves, "cb_gather": gather}


def dot(bm, bn, bk, nw, ns, waves=2, gather=False):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns,
            "waves": waves, "cb_gather": gather}


# Candidates per M (compiled locally for sm_90 first: none of these spills; the on-chip codebook
# gather (cb_gather) only with 4 warps, as Triton's compiler asserts on some 8-warp layouts).
CANDIDATES = {
    1: [vec(1, 32, 128, 4, 3, 4), vec(1, 32, 128, 4, 3, 4, True), vec(1, 16, 128, 4, 3, 8),
        vec(1, 16, 128, 4, 3, 8, True), vec(1, 16, 64, 4, 3, 8), vec(1, 16, 64, 4, 3, 8, True),
        vec(1, 32, 256, 4, 3, 4)],
    4: [vec(4, 16, 64, 4, 3, 4), vec(4, 16, 64, 4, 3, 4, True), dot(16, 32, 64, 4, 3, 4),
        dot(16, 32, 64, 4, 3, 4, True)],
    16: [dot(16, 64, 32, 4, 2), dot(16, 32, 64, 4, 3, 4), dot(16, 32, 64, 4, 3, 4, True),
         dot(16, 64, 32, 4, 2, 8, True)],
    128: [dot(64, 32, 32, 4, 2), dot(64, 32, 32, 4, 2, 2, True), dot(128, 64, 32, 8, 3)],
    2048: [dot(128, 64, 32, 8, 2), dot(128, 128, 32, 8, 3), dot(64, 32, 32, 4, 2, 2, True)],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "matmul_variants_gpu.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    gen = torch.Generator().manual_seed(0)
    payload = {"provenance": provenance("cuda"), "device_name": torch.cuda.get_device_name(),
               "protocol": __doc__, "cells": []}
    t_start = time.perf_counter()
    for out_f, in_f in SHAPES:
        dense_bytes = out_f * in_f * 2
        dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.float16) * 0.02
                 for _ in range(max(2, math.ceil(ROTATE_BYTES / dense_bytes)))]
        for rname, recipe in RECIPES.items():
            packed, cb, sc, of, rows, sg = make_storage(out_f, in_f, recipe, gen)
            q_bytes = storage_bytes(packed, cb, sc, of)
            n_q = max(2, min(256, math.ceil(ROTATE_BYTES / q_bytes)))
            copies = [(packed.clone(), cb.clone(), sc.clone(), None) for _ in range(n_q)]
            for m, cands in CANDIDATES.items():
                x = torch.randn(m, in_f, device="cuda", dtype=torch.float16)
                ref = codebook_matmul_reference(x.float(), packed, cb, sc, of, None, in_f, rows, sg)
                td = graph_time([lambda w=w: F.linear(x, w) for w in dense])
                cell = {"shape": f"{out_f}x{in_f}", "recipe": rname, "m": m,
                        "true_bits_per_weight": q_bytes * 8 / (out_f * in_f),
                        "cublas_fp16_s": td, "candidates": []}
                for cfg in cands:
                    rec = {"config": cfg}
                    try:
                        y = codebook_matmul_triton(x, packed, cb, sc, of, None, in_f, rows, sg,
                                                   config=cfg)
                        rec["rel_err"] = float((y.float() - ref).norm() / ref.norm())
                        if not rec["rel_err"] <= 5e-3:
                            rec["ok"] = False
                        else:
                            rec["ok"] = True
                            rec["s"] = graph_time([lambda c=c, cfg=cfg: codebook_matmul_triton(
                                x, c[0], c[1], c[2], c[3], None, in_f, rows, sg, config=cfg)
                                for c in copies])
                            rec["speedup_vs_cublas"] = td / rec["s"]
                            rec["gbs"] = (q_bytes + (m * in_f + m * out_f) * 2) / rec["s"] / 1e9
                    except Exception as exc:  # recorded: a config that fails is data too
                        rec.update(ok=False, error=repr(exc)[:300])
                    cell["candidates"].append(rec)
                    print(f"{cell['shape']:>10s} {rname:24s} M={m:<5d} "
                          f"{str({k: v for k, v in cfg.items() if k != 'kernel'}):90s} "
                          + (f"{rec['s'] * 1e6:8.1f} us ({rec['speedup_vs_cublas']:.2f}x cuBLAS "
                             f"{td * 1e6:.1f} us)" if rec.get("s") else f"FAILED {rec}"),
                          flush=True)
                payload["cells"].append(cell)
                payload["seconds"] = time.perf_counter() - t_start
                write_json(args.out, payload)
            del copies
        del dense
        torch.cuda.empty_cache()
    print(f"wrote {args.out} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
