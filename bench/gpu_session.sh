#!/usr/bin/env bash
# Every GPU check of physkern in one command of at most BUDGET seconds (default 470, under the
# 8 minutes a lent GPU call may take), for a lent GPU machine (bench/results/*_gpu*.json).
#   OUT=/tmp/gpu bash bench/gpu_session.sh
# Runs under the machine's own python3/torch/triton. Steps (each capped by `timeout` and by
# what is left of the budget; the next runs whatever happened; a step with under 10 s left is
# skipped and says so): build physkern._C with CUDA in a copy of the tree (background, while
# the correctness checks run), Triton kernels vs references on the GPU (bench/gpu_check.py),
# the psum GEMV vs its reference (bench_kernels_gpu.py --only psum), the GEMVs (dequantizing and
# psum) vs cuBLAS fp16 at M in {1, 16} on 4096x4096 and 11008x4096 (CUDA graphs, weights
# rotated past L2), an Nsight Compute summary of both GEMVs when `ncu` exists, the CUDA-only
# pytest cases, lattice attention vs sdpa, and the CUDA histogram op vs torch.histc.
set -u
OUT=${OUT:-/tmp/physkern_gpu}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
ROOT=$(pwd)
START=$(date +%s)
# step CAP CMD...: run CMD under `timeout` of CAP seconds or what is left of the budget.
step() {
  local cap=$1; shift
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 10 ]; then echo "(skipped: ${left}s of the budget left) $*"; return 124; fi
  if [ "$left" -lt "$cap" ]; then cap=$left; fi
  timeout "$cap" "$@"
}
# physkern.kernels is the folder kernels/ (setup.py's package_dir); a link makes it importable
# straight from the tree.
[ -e physkern/kernels ] || ln -s ../kernels physkern/kernels
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.version.cuda)"
HBM=$(python3 -c "import torch; n=torch.cuda.get_device_name(); print(4800 if 'H200' in n else 3350 if 'H100' in n else 2039)")

( rm -rf /tmp/pkbuild && cp -r "$ROOT" /tmp/pkbuild && cd /tmp/pkbuild && rm -rf build physkern/_C*.so \
  && MAX_JOBS=12 timeout 200 python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1
  echo "build_ext exit $?" >>"$OUT/build_ext.log" ) &
BUILD=$!

echo "== gpu_check"; step 120 python3 bench/gpu_check.py --out "$OUT/gpu_check_cuda.json" | tail -n 20
echo "== psum GEMV correctness"; step 40 python3 bench/bench_kernels_gpu.py --only psum --out "$OUT/psum_check_cuda.json" | tail -n 12
echo "== GEMVs vs cuBLAS fp16 (M 1, 16)"; step 150 python3 bench/bench_kernels_gpu.py --only matmul --ms 1 16 \
  --recipes layer_K256_d4_rowscale layer_K512_d4_rowscale layer_K64_d2_rowscale --out "$OUT/kernels_gpu.json"
echo "== Nsight Compute (GEMVs, 4096x4096 K=256 d=4, M=1)"
if command -v ncu >/dev/null 2>&1; then
  step 60 ncu --target-processes all -k 'regex:_psum_gemv_kernel|_codebook_gemv_kernel' --launch-skip 2 -c 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    --section WarpStateStats python3 bench/bench_kernels_gpu.py --profile-once >"$OUT/ncu_gemv.txt" 2>&1
  echo "ncu exit $? -> $OUT/ncu_gemv.txt"; grep -E "^  _|Duration|Throughput|Registers|Achieved Occupancy|ERR" "$OUT/ncu_gemv.txt" | head -n 30
else
  echo "(skipped: no ncu on this machine)"
fi
echo "== waiting for the extension build"; wait $BUILD; tail -n 2 "$OUT/build_ext.log"
echo "== pytest (CUDA cases)"; step 40 python3 -m pytest -q -p no:cacheprovider tests/test_lattice_attention.py tests/test_hadamard_rotate_triton.py -k cuda 2>&1 | tail -n 5
echo "== lattice attention"; step 50 python3 bench/bench_lattice_attention.py --device cuda --n 4096 16384 --xi 16 64 --repeats 3 --out "$OUT/lattice_attention_cuda.json" | tail -n 12
echo "== histogram (CUDA op from the build)"; (cd /tmp/pkbuild && step 30 python3 bench/bench_histogram.py --device cuda --repeats 3 --hbm-peak-gbs "$HBM" --out "$OUT") | tail -n 8
echo "== done in $(( $(date +%s) - START )) s (budget ${BUDGET} s)"
