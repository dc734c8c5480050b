"""The kernel microbenchmarks through pytest-benchmark (issue 17 item 7).

    .venv/bin/python -P -m pytest bench/ --benchmark-json out.json            # as the scripts
    .venv/bin/python -P -m pytest bench/ --benchmark-json out.json --bench-quick   # smoke sizes

Each test_benchmark_script case (bench/test_kernels.py) runs one benchmark script's main()
(bench/bench_kernels.py, bench_histogram.py, bench_lattice_attention.py, and on a CUDA machine
bench_kernels_gpu.py, bench_matmul_variants_gpu.py and the --device cuda runs) with the
arguments its docstring documents, so it writes exactly the JSON the script writes: into
--bench-out (default bench/results/, where the scripts write; with --bench-quick, pytest's
temporary folder unless --bench-out is given, so smoke numbers never replace the committed
ones). The recorded command (provenance) is the script's own command line. pytest-benchmark
times each script once (one round: the script's own interleaved timings are in its JSON), and
each benchmark entry carries the script's JSON under extra_info["results"], so
--benchmark-json gathers every result in one file. Beside them, per-kernel CPU cases (codebook
matmul vs dense, k-means assignment, histogram, lattice attention) are timed by
pytest-benchmark itself (`-k "not benchmark_script"`). Without CUDA the GPU cases are
skipped. `make test` runs `pytest tests`, which never collects bench/ (pyproject's testpaths
is tests/ too).
"""
from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("physkern benchmarks")
    group.addoption("--bench-quick", action="store_true",
                    help="the scripts' smoke sizes (fewer repeats, smaller n); results go to "
                         "pytest's temporary folder unless --bench-out is given")
    group.addoption("--bench-out", default=None,
                    help="folder for the scripts' result JSON files (default bench/results, or "
                         "a temporary folder with --bench-quick)")


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    return bool(request.config.getoption("--bench-quick"))


@pytest.fixture(scope="session")
def bench_out(request, tmp_path_factory, bench_quick) -> Path:
    out = request.config.getoption("--bench-out")
    if out is not None:
        path = Path(out)
    elif bench_quick:
        path = tmp_path_factory.mktemp("bench-results")
    else:
        path = BENCH / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path
