"""csrc/*.cu compiles with nvcc (compile only: no GPU needed).

The CPU build of torch ships c10/cuda headers but not the CMake-generated
c10/cuda/impl/cuda_cmake_macros.h; a stub of it in a temporary include dir is enough for
c10/cuda/CUDAStream.h, c10/cuda/CUDAGuard.h and torch/library.h (ATen/cuda/CUDAContext.h would
need more, so csrc/ does not use it).
"""
import glob
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
CU_FILES = sorted(glob.glob(str(ROOT / "csrc" / "*.cu")))

STUB = """#pragma once
// Stub of the header CMake generates for a CUDA build of torch (test-only).
#define C10_CUDA_BUILD_SHARED_LIBS
"""


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_compiles(cu, tmp_path):
    from torch.utils import cpp_extension

    stub = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB)
    includes = [str(tmp_path / "include")] + cpp_extension.include_paths() + \
        [sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    cmd = [NVCC, "-c", cu, "-o", str(tmp_path / "out.o"), "-std=c++20", "-O3",
           "-Xcompiler", "-fPIC", "-DPHYSKERN_WITH_CUDA", "-D_GLIBCXX_USE_CXX11_ABI=1",
           "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v",
           *cpp_extension.COMMON_NVCC_FLAGS, *[f"-I{p}" for p in includes]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0
    # ptxas -v: no kernel may spill registers to local memory.
    spills = [line for line in out.stderr.splitlines()
              if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)]
    assert not spills, "\n".join(spills)
    assert "Compiling entry function" in out.stderr  # kernels were actually generated
