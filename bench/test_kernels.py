"""Kernel microbenchmarks as pytest-benchmark cases (see conftest.py).

1. test_benchmark_script: one case per benchmark script; it runs the script's main() with the
   arguments below and checks the JSON it wrote; that JSON also goes into the benchmark's
   extra_info, so `--benchmark-json` holds every result.
2. Per-kernel cases (CPU): each physkern kernel and its baseline timed by pytest-benchmark itself,
   at the scripts' shapes; `-k "not benchmark_script"` runs only these (about a minute).
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


# ----------------------------------------------------------------------------------------------
# Per-kernel cases with pytest-benchmark's own statistics (calibrated rounds; compare two runs
# with --benchmark-compare), each physkern path beside its baseline in one group, at the
# scripts' shapes and recipes, built by the scripts' own helpers. CPU only: a CUDA call returns
# before its kernel ends, so GPU timings come from the scripts above (CUDA graphs, do_bench).
# The thread count is torch's (set OMP_NUM_THREADS); each case records it.


def _script(module: str):
    return importlib.import_module(module)


MATMUL_SHAPE = (1536, 576)  # the packaged model's MLP gate/up projection (out x in)
MATMUL_RECIPES = list(_script("bench_kernels").RECIPES)


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("recipe", MATMUL_RECIPES)
@pytest.mark.parametrize("path", ["dense_fp32", "codebook"])
def test_codebook_matmul(benchmark, path, recipe, m):
    from physkern import ops
    bk = _script("bench_kernels")
    out_f, in_f = MATMUL_SHAPE
    d, k, scope, rows, stages, group = bk.RECIPES[recipe]
    qw = bk.make_weight(out_f, in_f, d, k, rows, stages, group)
    g = torch.Generator().manual_seed(1)
    x, bias = torch.randn(m, in_f, generator=g), torch.randn(out_f, generator=g)
    w = qw.dequantize()                       # the same weight, dense fp32
    benchmark.group = f"codebook_matmul {out_f}x{in_f} M={m} {recipe}"
    benchmark.extra_info.update({"threads": torch.get_num_threads(), "m": m, "recipe": recipe,
                                 "out_features": out_f, "in_features": in_f})
    if path == "dense_fp32":
        y = benchmark(torch.addmm, bias, x, w.T)
    else:
        y = benchmark(ops.codebook_matmul, x, qw, bias)
    torch.testing.assert_close(y, torch.addmm(bias, x, w.T), rtol=1e-4,
                               atol=1e-4 * float((x.abs() @ w.abs().T).max()))


@pytest.mark.parametrize("importance", [False, True], ids=["no_importance", "importance_per_dim"])
@pytest.mark.parametrize("path", ["cpu_path", "torch_fallback"])
def test_kmeans_assign(benchmark, path, importance):
    """bench_kernels.py's layer: 3072 x 768, d = 8, K = 64, row scope (3072 scopes of 96 blocks)."""
    from physkern import ops
    from physkern.kernels.kmeans_assign import kmeans_assign_torch
    torch.manual_seed(0)
    out_f, in_f, d, k = 3072, 768, 8, 64
    blocks = (torch.randn(out_f, in_f) * 0.02).view(out_f, in_f // d, d)
    nb = blocks.shape[1]
    pick = torch.stack([torch.randperm(nb)[:k] for _ in range(out_f)])
    centroids = torch.gather(blocks, 1, pick[:, :, None].expand(out_f, k, d)).clone()
    imp = (torch.rand(in_f) + 0.1).view(1, nb, d) if importance else None
    benchmark.group = ("kmeans_assign 3072x768 d=8 K=64 row"
                       + (" importance per dim" if importance else ""))
    benchmark.extra_info.update({"threads": torch.get_num_threads(),
                                 "pairs": out_f * nb * k, "block_dim": d})
    fn = ((lambda: ops.kmeans_assign(blocks, centroids, imp, backend="cpu"))
          if path == "cpu_path" else (lambda: kmeans_assign_torch(blocks, centroids, imp)))
    idx, _ = benchmark(fn)
    ref, _ = ops.kmeans_assign(blocks, centroids, imp, backend="reference")
    assert float((idx == ref).float().mean()) > 0.999


HISTOGRAM_N = 10_000_000  # bench_histogram.py's default is 1e8; the same per-value work


@pytest.mark.parametrize("bins", [256, 4096])
@pytest.mark.parametrize("method", ["physkern.histogram_update", "torch.histc",
                                    "numpy.histogram"])
def test_histogram(benchmark, method, bins):
    bh = _script("bench_histogram")
    x = torch.randn(HISTOGRAM_N, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"histogram n=1e7 bins={bins}"
    benchmark.extra_info.update({"threads": torch.get_num_threads(), "n": HISTOGRAM_N,
                                 "bins": bins})
    benchmark(bh.methods(x, bins, "cpu")[method])


@pytest.mark.parametrize("method", ["full_causal_sdpa", "lattice_eps"])
def test_lattice_attention(benchmark, method):
    """bench_lattice_attention.py's layout (9 query / 3 key-value heads of dim 64), n = 1024,
    xi = 64, eps = 1e-3, float32."""
    from physkern.research.attention import lattice_attention
    bl = _script("bench_lattice_attention")
    n, xi, eps = 1024, 64.0, 1e-3
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, bl.HEADS, n, bl.HEAD_DIM, generator=g)
    k = torch.randn(1, bl.KV_HEADS, n, bl.HEAD_DIM, generator=g)
    v = torch.randn(1, bl.KV_HEADS, n, bl.HEAD_DIM, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fn = ((lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)) if method == "full_causal_sdpa"
          else (lambda: lattice_attention(q, k, v, xi, eps=eps)))
    benchmark.group = f"attention n={n} xi={xi:g}"
    benchmark.extra_info.update({"threads": torch.get_num_threads(), "n": n, "xi": xi,
                                 "eps": eps})
    with torch.no_grad():
        benchmark(fn)
