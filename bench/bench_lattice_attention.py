"""Benchmark: lattice attention (block skipping) vs full causal attention, measured in one run.

    .venv/bin/python bench/bench_lattice_attention.py                  # CPU: banded path
    .venv/bin/python bench/bench_lattice_attention.py --device cuda    # GPU: the Triton kernel

Shapes: batch 1, 9 query heads / 3 key-value heads of dim 64 (the packaged SmolLM2's layout),
q, k, v standard normal float32 on CPU (fp16 on CUDA), seed 0. For each n and xi:
  full causal sdpa      F.scaled_dot_product_attention(is_causal=True): the fastest O(n^2)
                        baseline (no bias at all)
  sdpa + bias mask      the seeds' formulation (additive -(i-j)/xi mask); n <= --mask-max-n
                        only, as the mask alone is heads * n^2 floats
  lattice exact         eps = None: every causal key (band = all keys)
  lattice eps           skipping with the provable bound at --eps
Work ratio: (query, key) scores the lattice path computed / causal pairs n(n+1)/2, and the fraction
of the Triton tiling's key tiles visited; time ratio: lattice time / full causal sdpa time. The goal
is time falling in proportion to the work. Each method: one warm-up, then the minimum and median
over --repeats timed calls, methods interleaved. Writes
bench/results/lattice_attention_<device>.json with provenance (device, threads, versions, command).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from physkern.research.attention import lattice_attention, record_work  # noqa: E402
from physkern.kernels.lattice_attention import lattice_attention_reference  # noqa: E402
from physkern.provenance import provenance, write_json  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fns: dict, repeats: int, device) -> dict:
    """Interleaved timing: {name: {"min_s", "median_s"}}."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
        _sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {n: {"min_s": min(t), "median_s": statistics.median(t)} for n, t in times.items()}


def bench_case(n: int, xis: list[float], eps: float, repeats: int, device, dtype,
               mask_max_n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for xi in xis:
        fns = {"full_causal_sdpa": lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
               "lattice_exact": lambda: lattice_attention(q, k, v, xi),
               "lattice_eps": lambda: lattice_attention(q, k, v, xi, eps=eps)}
        if n <= mask_max_n:
            fns["sdpa_bias_mask"] = lambda: lattice_attention_reference(q, k, v, xi)
        with torch.no_grad():
            with record_work() as work:
                approx = lattice_attention(q, k, v, xi, eps=eps)
            exact = lattice_attention(q, k, v, xi)
            err = float((approx.float() - exact.float()).abs().max())
            bound = float(2 * eps * v.float().abs().max())
            timing = time_calls(fns, repeats, device)
        base = timing["full_causal_sdpa"]["min_s"]
        row = {"n": n, "xi": xi, "eps": eps, "timing": timing,
               "time_ratio_eps_vs_full": timing["lattice_eps"]["min_s"] / base,
               "time_ratio_exact_vs_full": timing["lattice_exact"]["min_s"] / base,
               "work_ratio_pairs": work.fraction_pairs_computed,
               "fraction_tiles_visited": work.fraction_blocks_visited,
               "tiles": sorted(work.tiles), "path": sorted(work.paths),
               "max_truncation_distance": work.max_distance,
               "max_abs_error_vs_exact": err, "error_bound": bound}
        rows.append(row)
        print(f"n {n:6d} xi {xi:5.0f}: full sdpa {base * 1e3:9.1f} ms | lattice eps "
              f"{timing['lattice_eps']['min_s'] * 1e3:9.1f} ms "
              f"(x{row['time_ratio_eps_vs_full']:.3f}, work x{row['work_ratio_pairs']:.3f}, tiles {row['fraction_tiles_visited']:.3f})"
              f" | exact {timing['lattice_exact']['min_s'] * 1e3:9.1f} ms"
              + (f" | sdpa+mask {timing['sdpa_bias_mask']['min_s'] * 1e3:9.1f} ms"
                 if "sdpa_bias_mask" in timing else "")
              + f" | err {err:.2e} <= {bound:.2e}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="sequence lengths (default: 1024 4096 16384 on CPU, 4096 16384 on CUDA)")
    p.add_argument("--xi", type=float, nargs="+", default=None,
                   help="correlation lengths (default: 16 64 256 on CPU, 64 on CUDA)")
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mask-max-n", type=int, default=4096,
                   help="largest n for the sdpa + bias mask baseline (memory: heads * n^2)")
    p.add_argument("--out", default=None, help="default bench/results/lattice_attention_<dev>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    ns = args.n or ([4096, 16384] if cuda else [1024, 4096, 16384])
    xis = args.xi or ([64.0] if cuda else [16.0, 64.0, 256.0])
    dtype = torch.float16 if cuda else torch.float32
    rows = []
    start = time.perf_counter()
    for n in ns:
        rows += bench_case(n, xis, args.eps, args.repeats, device, dtype, args.mask_max_n)
    out = Path(args.out or ROOT / "bench" / "results" / f"lattice_attention_{device.type}.json")
    write_json(out, {
        "benchmark": "lattice attention vs full causal attention",
        "shapes": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
        "dtype": str(dtype).replace("torch.", ""), "inputs": "standard normal q, k, v, seed 0",
        "timing": f"min and median of {args.repeats} interleaved calls after one warm-up",
        "threads": torch.get_num_threads(), "results": rows,
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),
        "seconds_total": time.perf_counter() - start, **provenance(device)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
