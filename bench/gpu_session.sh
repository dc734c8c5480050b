#!/usr/bin/env bash
# Every GPU check of physkern in one command, for a lent GPU machine (bench/results/*_gpu*.json).
#   OUT=/tmp/gpu bash bench/gpu_session.sh
# Runs under the machine's own python3/torch/triton. Steps (each capped by `timeout`, the next
# runs whatever happened): build physkern._C with CUDA in a copy of the tree (background, while
# the correctness checks run), Triton kernels vs references on the GPU (bench/gpu_check.py),
# kernel benchmarks vs cuBLAS (bench/bench_kernels_gpu.py), the CUDA-only pytest cases, lattice
# attention vs sdpa, and the CUDA histogram op vs torch.histc.
set -u
OUT=${OUT:-/tmp/physkern_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
ROOT=$(pwd)
# physkern.kernels is the folder kernels/ (setup.py's package_dir); a link makes it importable
# straight from the tree.
[ -e physkern/kernels ] || ln -s ../kernels physkern/kernels
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.version.cuda)"
HBM=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print(4800 if 'H200' in n else 3350 if 'H100' in n else 2039)")

( rm -rf /tmp/pkbuild && cp -r "$ROOT" /tmp/pkbuild && cd /tmp/pkbuild && rm -rf build physkern/_C*.so \
  && MAX_JOBS=12 timeout 240 python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1
  echo "build_ext exit $?" >>"$OUT/build_ext.log" ) &
BUILD=$!

echo "== gpu_check"; timeout 170 python3 bench/gpu_check.py --out "$OUT/gpu_check_cuda.json" | tail -n 30
echo "== waiting for the extension build"; wait $BUILD; tail -n 2 "$OUT/build_ext.log"
echo "== bench_kernels_gpu"; timeout 220 python3 bench/bench_kernels_gpu.py --out "$OUT/kernels_gpu.json"
echo "== pytest (CUDA cases)"; timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_lattice_attention.py -k cuda 2>&1 | tail -n 5
echo "== lattice attention"; timeout 70 python3 bench/bench_lattice_attention.py --device cuda --n 4096 16384 --xi 16 64 --repeats 5 --out "$OUT/lattice_attention_cuda.json" | tail -n 12
echo "== histogram (CUDA op from the build)"; (cd /tmp/pkbuild && timeout 45 python3 bench/bench_histogram.py --device cuda --repeats 3 --hbm-peak-gbs "$HBM" --out "$OUT") | tail -n 8
echo "== done"
