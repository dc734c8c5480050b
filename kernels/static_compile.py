"""Compile the production kernel configurations for a GPU that is not present, and read what
ptxas says about them (registers, spills, shared memory, mma/wgmma use).

The Triton interpreter accepts kernels the GPU compiler rejects and says nothing about register
pressure; this module closes that gap without a GPU (Triton 3.x compiles to a cubin for any
target). Used by tests/test_kernel_compile.py (fail on spills) and bench/gpu_static_report.py.
Static compile information only: nothing here is a GPU measurement.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import triton

from .codebook_matmul import (GEMV_VEC_CONFIGS, MATMUL_CONFIGS, REDUCE_BLOCK, _codebook_gemv_kernel,
                              _codebook_matmul_kernel, _split_reduce_kernel,
                              codebook_alignment, wordwise_decode)
from .kmeans_assign import KMEANS_CONFIGS, SUPPORTED_BLOCK_DIMS, _kmeans_assign_kernel

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")

# Codebook-matmul format variants worth compiling: (bits, d, stages, scales, offsets).
# The first is the heaviest (straddling 3-bit indices, two residual stages, affine scales).
MATMUL_VARIANTS = (
    (3, 8, 2, True, True),
    (8, 8, 1, False, False),
    (4, 1, 1, True, True),     # scalar RTN grid: d = 1, per-group scale and offset
    (16, 16, 1, True, False),  # K = 65536, d = 16
    (8, 4, 2, True, True),     # word-wise decoding with two stages (a constexpr bug hid here)
)
MATMUL_INT_ARGS = ("M", "N", "K_IN", "n_words", "codebook_rows", "scale_group", "k_per_split", "n_entries",
                   "stride_xm", "stride_xk", "stride_ps", "stride_pn", "stride_pw",
                   "stride_cs", "stride_cc", "stride_ck", "stride_cd", "stride_sn", "stride_sg",
                   "stride_on", "stride_og", "stride_ysplit", "stride_ym", "stride_yn")
KMEANS_INT_ARGS = ("n_blocks", "n_centroids", "stride_bs", "stride_bn", "stride_bd",
                   "stride_cs", "stride_ck", "stride_cd", "stride_is", "stride_in", "stride_id")


@dataclass
class CompiledInfo:
    kernel: str
    config: str
    arch: int
    dtype: str
    constexprs: dict
    num_warps: int
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_frame: Optional[int] = None
    shared_bytes: Optional[int] = None
    mma_instructions: int = 0
    wgmma_instructions: int = 0
    ptxas_log: str = field(default="", repr=False)

    def as_json(self) -> dict:
        d = asdict(self)
        d.pop("ptxas_log")
        return d


def ptxas_path() -> Optional[str]:
    """Triton's bundled ptxas, or None when this Triton has no NVIDIA backend tooling."""
    try:
        from triton import knobs
        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure means: tooling unavailable
        pass
    return shutil.which("ptxas")


def tooling_available() -> tuple[bool, str]:
    """(available, reason): whether static GPU compilation can run on this machine."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return False, f"triton lacks ASTSource/GPUTarget: {e}"
    if ptxas_path() is None:
        return False, "no ptxas found (Triton NVIDIA backend not installed)"
    return True, ""


def _parse_ptxas(log: str) -> dict:
    out = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack_frame"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


def _run_ptxas(ptx: str, arch: int) -> str:
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{res.stderr}")
    return res.stderr + res.stdout


def _jit_function(fn):
    """The compilable JITFunction: under TRITON_INTERPRET=1 @triton.jit gives an
    InterpretedFunction, which triton.compile cannot take; rebuild one from the Python function."""
    from triton.runtime.jit import JITFunction
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int,
                   num_stages: int = 2):
    """triton.compile for GPUTarget('cuda', arch, 32); returns (compiled kernel, ptxas -v log)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    src = ASTSource(fn=_jit_function(fn), signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel, _run_ptxas(kernel.asm["ptx"], arch)


def _info(kernel_name, config, arch, dtype, constexprs, num_warps, kernel, log) -> CompiledInfo:
    ptx = kernel.asm["ptx"]
    info = CompiledInfo(kernel=kernel_name, config=config, arch=arch, dtype=dtype,
                        constexprs=dict(constexprs), num_warps=num_warps,
                        shared_bytes=int(kernel.metadata.shared), ptxas_log=log,
                        mma_instructions=len(re.findall(r"\bmma\.sync", ptx)),
                        wgmma_instructions=len(re.findall(r"\bwgmma\.mma_async", ptx)))
    for k, v in _parse_ptxas(log).items():
        setattr(info, k, v)
    return info


def _variants_for(cfg: dict, full: bool) -> tuple:
    """Format variants a config serves: all, or (wordwise_only) those decoded word by word;
    full=False keeps the heaviest, the scalar d = 1 grid and the two-stage word-wise one."""
    variants = MATMUL_VARIANTS if full else (MATMUL_VARIANTS[0], MATMUL_VARIANTS[2],
                                             MATMUL_VARIANTS[4])
    if cfg.get("wordwise_only"):
        variants = tuple(v for v in MATMUL_VARIANTS
                         if wordwise_decode(v[0], cfg["BLOCK_K"] // v[1]))
    return tuple(v for v in variants if v[1] >= cfg.get("min_block_dim", 1)
                 and v[2] <= cfg.get("max_stages", 8))


def matmul_jobs(full: bool = True):
    """(config name, cfg, dtype, arch, variant) for every codebook-matmul production config.

    full=False keeps the heaviest codebook variant and the scalar d = 1 grid (the test's set)."""
    for name, cfg in MATMUL_CONFIGS.items():
        for dtype in DTYPES:
            for arch in ARCHS:
                for variant in _variants_for(cfg, full):
                    yield name, cfg, dtype, arch, variant


def _matmul_signature(dtype: str, variant, cfg: dict, split_output: bool) -> tuple[dict, dict]:
    """(signature, constexprs) shared by both codebook-matmul kernels for one format variant."""
    bits, d, stages, has_scales, has_offsets = variant
    sig = {"x_ptr": f"*{dtype}", "packed_ptr": "*i32", "codebooks_ptr": "*fp16",
           "scales_ptr": "*fp16", "offsets_ptr": "*fp16", "bias_ptr": f"*{dtype}",
           # split-K writes fp32 partial sums
           "y_ptr": "*fp32" if split_output else f"*{dtype}"}
    sig.update({a: "i32" for a in MATMUL_INT_ARGS})
    consts = dict(BITS=bits, D=d, STAGES=stages, HAS_SCALES=has_scales, HAS_OFFSETS=has_offsets,
                  HAS_BIAS=True, SCALE_PER_BLOCK=True, ROW_SCALE=False,
                  WORDWISE=wordwise_decode(bits, cfg["BLOCK_K"] // d),
                  CB_ALIGN=codebook_alignment(d, 2), CB_GATHER=False,
                  KP=1 << max(0, (2 ** bits - 1).bit_length()), SPLIT_OUTPUT=split_output,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    return sig, consts


def compile_matmul(config_name: str, cfg: dict, dtype: str, arch: int, variant) -> CompiledInfo:
    sig, consts = _matmul_signature(dtype, variant, cfg, split_output=config_name == "gemv")
    consts["FP32_IEEE"] = False
    kernel, log = compile_kernel(_codebook_matmul_kernel, sig, consts, arch, cfg["num_warps"],
                                 cfg.get("num_stages", 2))
    return _info("codebook_matmul", config_name, arch, dtype, consts, cfg["num_warps"], kernel, log)


def gemv_vec_jobs(full: bool = True, configs: Optional[dict] = None):
    """(config name, cfg, dtype, arch, variant) for every tensor-core-free GEMV config
    (configs: {name: cfg}, default the production GEMV_VEC_CONFIGS)."""
    configs = configs or {f"gemv_vec_{name}": cfg for name, cfg in GEMV_VEC_CONFIGS.items()}
    for name, cfg in configs.items():
        for dtype in DTYPES:
            for arch in ARCHS:
                for variant in _variants_for(cfg, full):
                    yield name, cfg, dtype, arch, variant


def compile_gemv_vec(config_name: str, cfg: dict, dtype: str, arch: int, variant) -> CompiledInfo:
    sig, consts = _matmul_signature(dtype, variant, cfg, split_output=True)
    kernel, log = compile_kernel(_codebook_gemv_kernel, sig, consts, arch, cfg["num_warps"],
                                 cfg.get("num_stages", 2))
    return _info("codebook_gemv", config_name, arch, dtype, consts, cfg["num_warps"], kernel, log)


def compile_split_reduce(dtype: str, arch: int) -> CompiledInfo:
    sig = {"part_ptr": "*fp32", "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "total": "i32",
           "N": "i32", "n_split": "i32"}
    consts = dict(HAS_BIAS=True, BLOCK=REDUCE_BLOCK)
    kernel, log = compile_kernel(_split_reduce_kernel, sig, consts, arch, 4)
    return _info("split_reduce", "reduce", arch, dtype, consts, 4, kernel, log)


def kmeans_jobs(full: bool = True):
    """(dtype, arch, d, has_importance) for every k-means assignment production config."""
    for dtype in DTYPES + (("fp32",) if full else ()):
        for arch in ARCHS:
            for d in SUPPORTED_BLOCK_DIMS:
                for has_imp in ((False, True) if full else (True,)):
                    yield dtype, arch, d, has_imp


def compile_kmeans(dtype: str, arch: int, d: int, has_importance: bool) -> CompiledInfo:
    sig = {"blocks_ptr": f"*{dtype}", "centroids_ptr": f"*{dtype}", "importance_ptr": f"*{dtype}",
           "idx_ptr": "*i64", "dist_ptr": "*fp32"}
    sig.update({a: "i32" for a in KMEANS_INT_ARGS})
    cfg = KMEANS_CONFIGS[d]
    consts = dict(D=d, HAS_IMPORTANCE=has_importance, BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"])
    kernel, log = compile_kernel(_kmeans_assign_kernel, sig, consts, arch, cfg["num_warps"])
    return _info("kmeans_assign", f"d{d}", arch, dtype, consts, cfg["num_warps"], kernel, log)


def compile_all(full: bool = True) -> list[dict]:
    """Compile every job in this process (TRITON_INTERPRET must be unset); JSON-able records."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset; use compile_all_subprocess")
    out = [compile_matmul(*job).as_json() for job in matmul_jobs(full)]
    out += [compile_gemv_vec(*job).as_json() for job in gemv_vec_jobs(full)]
    out += [compile_split_reduce(t, a).as_json() for t in DTYPES for a in ARCHS]
    out += [compile_kmeans(*job).as_json() for job in kmeans_jobs(full)]
    return out


def compile_all_subprocess(full: bool = True, timeout: float = 1800) -> list[dict]:
    """compile_all in a child process without TRITON_INTERPRET (under the interpreter @triton.jit
    kernels cannot be compiled for a GPU). Raises RuntimeError with the child's output on failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "physkern.kernels.static_compile"] + (["--full"] if full else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"static compile failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
                           f"\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(compile_all(full="--full" in sys.argv)))
