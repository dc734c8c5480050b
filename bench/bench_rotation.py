"""Benchmark: a rotated layer's input rotation x R, the C++ op against the torch forms, CPU.

    .venv/bin/python bench/bench_rotation.py            # n = 576, 1536; 1, 8, 32, 512 rows

Paths timed on the same float32 x (physkern/rotation.py):
- op:     physkern::hadamard_rotate (gather + signs + fast Walsh-Hadamard, one dispatch)
- bmm:    index_select, then one [n/b, 1, b] x [n/b, b, b] product with the signs folded in
          (the torch one-row path; timed for one row only)
- matmul: index_select, * signs, [rows, n/b, b] @ H_b (the torch path for many rows)
Each call is timed over `--calls` back-to-back calls per round, interleaved rounds, min and
median per call reported. Writes bench/results/rotation_cpu.json (device, versions, threads,
load average: the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import physkern._C  # noqa: F401  (registers physkern::hadamard_rotate)
from physkern.provenance import provenance, write_json
from physkern.rotation import Rotation, _signed_blocks

ROOT = Path(__file__).resolve().parents[1]


def paths(rot: Rotation, x: torch.Tensor) -> dict:
    """name -> zero-argument callable computing x R."""
    inv, _, signs, h = rot._parts(x.device, x.dtype)
    n, b = rot.n, rot.block
    op = torch.ops.physkern.hadamard_rotate.default
    out = {"op": lambda: op(x, inv, signs, b)}
    if x.shape[0] == 1:
        inv1, signed = _signed_blocks(n, rot.seed, b, x.device, x.dtype)
        out["bmm"] = lambda: torch.bmm(x.index_select(1, inv1).view(n // b, 1, b), signed)
    out["matmul"] = lambda: ((x.index_select(-1, inv) * signs).view(x.shape[0], n // b, b) @ h)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[576, 1536])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 512])
    p.add_argument("--calls", type=int, default=200, help="calls per timed round")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rotation_cpu.json"))
    args = p.parse_args(argv)
    if min(args.n + args.rows) < 1 or args.calls < 1 or args.repeats < 1:
        raise ValueError("n, rows, calls and repeats must be positive")
    results = []
    load_before = list(os.getloadavg())
    for n in args.n:
        rot = Rotation.make("hadamard", n, seed=0)
        for rows in args.rows:
            x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
            fns = paths(rot, x)
            ref = (x.double() @ rot.matrix()).float()
            times = {k: [] for k in fns}
            calls = max(1, args.calls // rows)
            with torch.inference_mode():
                for f in fns.values():
                    f()
                for _ in range(args.repeats):
                    for name, f in fns.items():
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            f()
                        times[name].append((time.perf_counter() - t0) / calls)
                for name, f in fns.items():
                    err = float((f().reshape(rows, n) - ref).abs().max())
                    row = {"n": n, "block": rot.block, "rows": rows, "path": name,
                           "us_min": min(times[name]) * 1e6,
                           "us_median": statistics.median(times[name]) * 1e6,
                           "calls_per_round": calls, "max_abs_err_vs_dense_fp64": err}
                    results.append(row)
                    print(f"n={n:5d} rows={rows:4d} {name:7s} min {row['us_min']:9.1f} us  "
                          f"median {row['us_median']:9.1f} us  err {err:.1e}", flush=True)
    payload = {
        "benchmark": "input rotation x R (physkern.rotation), CPU",
        "provenance": provenance("cpu"),
        "protocol": {"dtype": "float32", "x": "torch.randn, generator seeded with rows",
                     "rotation": "hadamard, seed 0, default block", "calls": args.calls,
                     "repeats": args.repeats, "threads": torch.get_num_threads(),
                     "timing": "per call: back-to-back calls per round, interleaved rounds, "
                               "min and median over rounds; inference_mode"},
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "note": "measured on a shared 2-core machine; see loadavg",
        "results": results,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
