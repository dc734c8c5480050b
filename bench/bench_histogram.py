"""Benchmark: physkern::histogram_update vs torch.histc and numpy.histogram, measured in one run.

    .venv/bin/python bench/bench_histogram.py                 # 1e8 float32, 256 and 4096 bins, CPU
    .venv/bin/python bench/bench_histogram.py --device cuda   # when a GPU is present

Values: standard normal float32 (seed 0) binned over [-4, 4]. Every method sees the same tensor;
the methods are timed in interleaved rounds after one warm-up call each, and the minimum (and
median) over the rounds is reported. The op and torch.histc also run with one thread, to show the
threading. Writes bench/results/histogram_<device>.json with provenance (device, versions).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from physkern.research.histogram import extension_available, histogram_update  # noqa: E402
from physkern.provenance import provenance, write_json  # noqa: E402

LO, HI = -4.0, 4.0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def methods(x: torch.Tensor, bins: int, device: str) -> dict:
    """name -> zero-argument callable running one full histogram of x."""
    counts = torch.zeros(bins + 3, dtype=torch.int64, device=x.device)

    def op():
        counts.zero_()
        histogram_update(x, counts, LO, HI)

    out = {"physkern.histogram_update": op,
           "torch.histc": lambda: torch.histc(x, bins=bins, min=LO, max=HI)}
    if device == "cpu":
        xn = x.numpy()
        out["numpy.histogram"] = lambda: np.histogram(xn, bins=bins, range=(LO, HI))
    return out


def time_methods(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    times = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    _sync(device)
    for _ in range(repeats):
        for name, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def check_agreement(x: torch.Tensor, bins: int) -> dict:
    """The op's bin counts vs torch.histc's (both count [lo, hi]; histc rounds in float32)."""
    counts = torch.zeros(bins + 3, dtype=torch.int64, device=x.device)
    histogram_update(x, counts, LO, HI)
    histc = torch.histc(x, bins=bins, min=LO, max=HI).to(torch.int64)
    diff = (counts[:bins] - histc).abs()
    return {"values_in_range": int(counts[:bins].sum()),
            "max_abs_diff_vs_histc": int(diff.max()), "sum_abs_diff_vs_histc": int(diff.sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=float, default=1e8, help="number of float32 values (default 1e8)")
    p.add_argument("--bins", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hbm-peak-gbs", type=float, default=3350.0,
                   help="GPU memory peak for the GB/s ratio (default 3350: H100 SXM HBM3)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"),
                   help="folder for histogram_<device>.json")
    args = p.parse_args(argv)
    n = int(args.n)
    if n < 1 or args.repeats < 1 or any(b < 1 for b in args.bins):
        raise ValueError("n, repeats and bins must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch sees no GPU")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float32).to(args.device)
    threads = torch.get_num_threads()
    rows, speedups, agreement = [], {}, {}
    for bins in args.bins:
        fns = methods(x, bins, args.device)
        thread_settings = [threads] + ([1] if args.device == "cpu" and threads > 1 else [])
        best = {}
        for th in thread_settings:
            torch.set_num_threads(th)
            sel = fns if th == threads else {k: v for k, v in fns.items() if k != "numpy.histogram"}
            for name, ts in time_methods(sel, args.repeats, args.device).items():
                row = {"bins": bins, "method": name, "threads": th if name != "numpy.histogram"
                       else 1, "seconds_min": min(ts), "seconds_median": statistics.median(ts),
                       "seconds_all": ts, "gvalues_per_s": n / min(ts) / 1e9,
                       "gb_per_s": 4 * n / min(ts) / 1e9}
                if args.device == "cuda":
                    row["fraction_of_hbm_peak"] = row["gb_per_s"] / args.hbm_peak_gbs
                rows.append(row)
                best[(name, th)] = min(ts)
                print(f"bins={bins:5d} threads={row['threads']} {name:28s} "
                      f"min {min(ts) * 1e3:9.1f} ms  median {statistics.median(ts) * 1e3:9.1f} ms"
                      f"  {row['gb_per_s']:6.2f} GB/s", flush=True)
        torch.set_num_threads(threads)
        op = best[("physkern.histogram_update", threads)]
        sp = {"vs_torch_histc": best[("torch.histc", threads)] / op}
        if ("numpy.histogram", threads) in best:
            sp["vs_numpy_histogram"] = best[("numpy.histogram", threads)] / op
        if ("physkern.histogram_update", 1) in best:
            sp["single_thread_vs_torch_histc_single_thread"] = (
                best[("torch.histc", 1)] / best[("physkern.histogram_update", 1)])
        speedups[str(bins)] = sp
        agreement[str(bins)] = check_agreement(x, bins)
        print(f"bins={bins}: speedup {sp}", flush=True)

    payload = {
        "benchmark": "histogram",
        "provenance": provenance(args.device),
        "extension": {"cpu": extension_available("cpu"), "cuda": extension_available("cuda")},
        "protocol": {"n": n, "dtype": "float32", "values": "torch.randn, generator seed 0",
                     "lo": LO, "hi": HI, "bins": args.bins, "repeats": args.repeats,
                     "timing": "interleaved rounds after one warm-up call per method; "
                               "min and median of wall time (synchronized on cuda)",
                     "threads": threads,
                     "numpy": "np.histogram on the same float32 array (single-threaded)"},
        "load_average_1_5_15min": list(__import__("os").getloadavg()),  # other jobs on the box
        "results": rows,
        "speedups": speedups,
        "agreement": agreement,
    }
    path = write_json(Path(args.out) / f"histogram_{args.device}.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
