"""Run each codebook-matmul kernel a few times on one 4096x4096 layer-scope K=256 d=4 weight
(M=1, fp16 x), for Nsight Compute to profile (the script itself measures nothing):

    ncu --clock-control none --kernel-name regex:codebook_gemv --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python bench/profile_matmul_gpu.py
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_kernels_gpu import make_storage  # noqa: E402
from physkern.kernels.codebook_matmul import MATMUL_CONFIGS, codebook_matmul_triton, pick_config  # noqa: E402

gen = torch.Generator().manual_seed(0)
packed, cb, sc, of, rows, sg = make_storage(4096, 4096, (4, 256, None, None, False), gen)
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
for cfg in (pick_config(1), MATMUL_CONFIGS["gemv"]):
    for _ in range(5):
        codebook_matmul_triton(x, packed, cb, sc, of, None, 4096, rows, sg, config=cfg)
torch.cuda.synchronize()
print("done")
