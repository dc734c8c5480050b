"""Which CPU k-means assignment path is faster, by problem size -> bench/results/kmeans_paths_cpu.json.

    python bench/bench_kmeans_paths.py [--threads 1] [--quick]

Times the fused C++ op physkern::kmeans_assign_cpu against the batched-matmul path
kmeans_assign_torch on a grid of [scopes S, blocks N, centroids K, block dim d] problems, with no
importance and with per-block importance (the error-feedback case), interleaved call by call
(minimum of several repeats), and records which path physkern's selector
(physkern.kernels.kmeans_assign.prefer_native_kmeans) picks for each, and the time that choice
costs against the faster of the two. The grid covers the shapes quantization meets: per-row
scopes (3072 x 96), per-layer codebooks (192-16384 blocks), and a model-wide K = 65536, d = 8
codebook against one error-feedback column step of an MLP layer (1536 blocks).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

import physkern.ops  # noqa: F401  (loads physkern._C, which registers the C++ op)
from physkern.kernels.kmeans_assign import (NATIVE_MAX_WORK_WITHOUT_AVX512, kmeans_assign_torch,
                                            native_kmeans_available, prefer_native_kmeans)
from physkern.provenance import provenance, write_json

from bench_kernels import timeit_pair  # bench/ is this script's directory, first on sys.path

RESULTS = Path(__file__).resolve().parent / "results" / "kmeans_paths_cpu.json"

GRID = [(3072, 96, k, d) for d in (2, 4, 8) for k in (16, 64, 256, 1024)] + \
       [(1, n, k, d) for n in (192, 1536, 16384) for d in (2, 4, 8) for k in (16, 64, 256, 1024)
        if k <= n] + \
       [(1, 1536, 65536, 8), (1, 576, 65536, 8)]
QUICK = [(3072, 96, 64, 8), (1, 192, 64, 8), (1, 1536, 1024, 4), (1, 1536, 65536, 8)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="four shapes only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not native_kmeans_available():
        print("physkern._C without physkern::kmeans_assign_cpu: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    op = torch.ops.physkern.kmeans_assign_cpu
    gen = torch.Generator().manual_seed(0)
    rows = []
    for s, n, k, d in (QUICK if args.quick else GRID):
        blocks = torch.randn(s, n, d, generator=gen)
        cents = torch.randn(s, k, d, generator=gen)
        for kind, imp in (("none", None), ("per_block", torch.rand(s, n, d, generator=gen))):
            work = s * n * k * d
            repeats = 1 if work > 2e8 else 5
            t_native, t_torch = timeit_pair([lambda: op(blocks, cents, imp),
                                             lambda: kmeans_assign_torch(blocks, cents, imp)],
                                            repeats)
            native = prefer_native_kmeans(s, n, k, d)
            chosen = t_native if native else t_torch
            rows.append({"scopes": s, "blocks": n, "k": k, "d": d, "importance": kind,
                         "work_multiply_adds": work, "native_seconds": t_native,
                         "torch_seconds": t_torch, "native_over_torch": t_native / t_torch,
                         "selector_picks": "native" if native else "torch",
                         "chosen_over_fastest": chosen / min(t_native, t_torch)})
            print(f"S{s:5d} N{n:6d} K{k:6d} d{d} {kind:9s} C++ {t_native * 1e3:10.2f} ms  "
                  f"torch {t_torch * 1e3:10.2f} ms  picks {rows[-1]['selector_picks']}", flush=True)
    worst = max(r["chosen_over_fastest"] for r in rows)
    payload = {"benchmark": "kmeans_assign CPU paths: fused C++ op vs batched matmul",
               "command": "python bench/bench_kmeans_paths.py" + (" --quick" if args.quick else "")
               + f" --threads {args.threads}",
               "provenance": provenance("cpu"),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": args.threads,
               "load_average_before_after": [load_before, os.getloadavg()],
               "native_max_work_without_avx512": NATIVE_MAX_WORK_WITHOUT_AVX512,
               "timing": "minimum over repeats (1 above 2e8 multiply-adds, else 5), the two paths "
                         "interleaved call by call; seconds per call",
               "worst_chosen_over_fastest": worst,
               "rows": rows}
    write_json(args.out, payload)
    print(f"selector's choice at most {worst:.2f}x the faster path; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
