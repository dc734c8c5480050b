"""Kernel microbenchmarks as pytest-benchmark cases: one per benchmark script (see conftest.py).

Each case runs the script's main() with the arguments below and checks the JSON it wrote; the
script's JSON goes into the benchmark's extra_info, so `--benchmark-json` holds every result.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# id: (script module in bench/, result file it writes, its arguments ({out} = the results
#      folder), extra arguments under --bench-quick, top-level keys its JSON must hold)
SCRIPTS = {
    "kernels_cpu": ("bench_kernels", "kernels_cpu.json", ["--out", "{out}/kernels_cpu.json"],
                    ["--quick", "--threads", "1"],
                    ("kmeans_assign", "codebook_matmul", "codebook_matmul_goals", "provenance")),
    "histogram_cpu": ("bench_histogram", "histogram_cpu.json", ["--out", "{out}"],
                      ["--n", "1e6", "--repeats", "2"],
                      ("results", "speedups", "agreement", "provenance")),
    "lattice_attention_cpu": ("bench_lattice_attention", "lattice_attention_cpu.json",
                              ["--out", "{out}/lattice_attention_cpu.json"],
                              ["--n", "1024", "--xi", "16", "--repeats", "1"],
                              ("results", "threads")),
    "kernels_gpu": ("bench_kernels_gpu", "kernels_gpu.json", ["--out", "{out}/kernels_gpu.json"],
                    ["--quick"], ("kmeans_assign", "codebook_matmul", "ceilings", "provenance")),
    "matmul_variants_gpu": ("bench_matmul_variants_gpu", "matmul_variants_gpu.json",
                            ["--out", "{out}/matmul_variants_gpu.json"], [], ("provenance",)),
    "histogram_cuda": ("bench_histogram", "histogram_cuda.json", ["--device", "cuda", "--out",
                                                                  "{out}"],
                       ["--n", "1e7", "--repeats", "2"], ("results", "speedups", "provenance")),
    "lattice_attention_cuda": ("bench_lattice_attention", "lattice_attention_cuda.json",
                               ["--device", "cuda", "--out",
                                "{out}/lattice_attention_cuda.json"],
                               ["--n", "4096", "--repeats", "1"], ("results",)),
}
GPU = {"kernels_gpu", "matmul_variants_gpu", "histogram_cuda", "lattice_attention_cuda"}


def run_script(module: str, argv: list[str]):
    """`python bench/<module>.py ARGV` in this process: sys.argv is the script's own (the
    provenance block records it as the command), the torch thread count is restored after."""
    script = importlib.import_module(module)
    saved_argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(BENCH / f"{module}.py")] + argv
    try:
        return script.main(argv)
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_cuda) if c in GPU else c
                                  for c in SCRIPTS])
def test_benchmark_script(case, benchmark, bench_out, bench_quick):
    module, filename, argv, quick, keys = SCRIPTS[case]
    argv = [a.format(out=bench_out) for a in argv] + (quick if bench_quick else [])
    path = bench_out / filename
    before = path.stat().st_mtime_ns if path.exists() else None
    benchmark.group = "benchmark scripts (one round each; their timings: extra_info.results)"
    rc = benchmark.pedantic(run_script, args=(module, argv), rounds=1, iterations=1)
    assert rc in (None, 0), f"{module}.main returned {rc}"
    assert path.exists() and path.stat().st_mtime_ns != before, f"{module} did not write {path}"
    results = json.loads(path.read_text())
    missing = [k for k in keys if k not in results]
    assert not missing, f"{path} lacks {missing}"
    benchmark.extra_info.update({"script": f"bench/{module}.py", "argv": argv,
                                 "results_file": str(path), "results": results})
