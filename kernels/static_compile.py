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
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

import triton

from .codebook_matmul import (GEMV_VEC_CONFIGS, MATMUL_CONFIGS, REDUCE_BLOCK, _codebook_gemv_kernel,
                              _codebook_matmul_kernel, _split_reduce_kernel,
                              codebook_alignment, wordwise_decode)
from .hadamard_rotate import ROTATE_CONFIG, _hadamard_rotate_kernel
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
    """Triton's bundled ptxas (else one on PATH), or None when there is no NVIDIA tooling."""
    from .sass_model import nvidia_tool_path
    return nvidia_tool_path("ptxas")


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
                   num_stages: int = 2, divisible: tuple = ()):
    """triton.compile for GPUTarget('cuda', arch, 32); returns (compiled kernel, ptxas -v log).

    divisible: argument names to treat as multiples of 16 (bytes for pointers), as Triton's JIT
    specializes them at a launch where they are (aligned tensors, sizes such as 4096): the
    compiled code then vectorizes loads the unspecialized compile cannot."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = _jit_function(fn)
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(jit.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs)
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


# psum GEMV format variants: (K, d, stages, per-chunk scales, offsets). Per-row scales are
# applied by the finishing kernel (HAS_SCALES False in the main kernel).
PSUM_VARIANTS = (
    (256, 4, 1, False, False),   # layer K=256 d=4, one scale per row: the 2-bit decode format
    (512, 4, 1, False, False),   # 9-bit indices: 8-bit + 1-bit planes
    (64, 2, 2, True, True),      # two stages, scale groups with offsets
    (16, 1, 2, True, True),      # scalar-grid-like d = 1
)
PSUM_INT_ARGS = ("N", "n_slices", "n_entries", "rows_per_prog", "group_slices", "stride_xm",
                 "stride_ls", "stride_lc", "stride_hs", "stride_hc", "stride_cs", "stride_sn",
                 "stride_sg", "stride_on", "stride_og", "stride_ym")


def psum_jobs(full: bool = True):
    """(dtype, arch, variant) for the psum GEMV's production config (its largest BLOCK_N for
    the variant's chunk: the most registers)."""
    for dtype in DTYPES:
        for arch in ARCHS:
            for variant in (PSUM_VARIANTS if full else PSUM_VARIANTS[:2]):
                yield dtype, arch, variant


def compile_psum(dtype: str, arch: int, variant) -> CompiledInfo:
    from .codebook_gemv_psum import (PSUM_CONFIG, _pow2_ceil, _psum_gemv_kernel, chunk_slices,
                                     max_block_n, plane_bits)
    from .packing import index_bits
    k, d, stages, has_scales, has_offsets = variant
    sl = chunk_slices(k, 4096, 4096)
    sig = {"x_ptr": f"*{dtype}", "lo_ptr": "*i32", "hi_ptr": "*i32", "cb_ptr": "*fp16",
           "scales_ptr": "*fp16", "offsets_ptr": "*fp16", "y_ptr": "*fp32"}
    sig.update({a: "i32" for a in PSUM_INT_ARGS})
    lo_w, hi_w = plane_bits(index_bits(k))
    consts = dict(D=d, KP=_pow2_ceil(k), SL=sl, STAGES=stages, LO_W=lo_w, HI_W=hi_w,
                  HAS_SCALES=has_scales, HAS_OFFSETS=has_offsets,
                  BLOCK_N=max_block_n(sl, stages))
    kernel, log = compile_kernel(_psum_gemv_kernel, sig, consts, arch, PSUM_CONFIG["num_warps"])
    return _info("psum_gemv", "psum", arch, dtype, consts, PSUM_CONFIG["num_warps"], kernel, log)


def compile_psum_finish(dtype: str, arch: int) -> CompiledInfo:
    from .codebook_gemv_psum import REDUCE_BLOCK as FINISH_BLOCK
    from .codebook_gemv_psum import _finish_kernel
    sig = {"acc_ptr": "*fp32", "scales_ptr": "*fp16", "bias_ptr": f"*{dtype}",
           "y_ptr": f"*{dtype}", "total": "i32", "N": "i32", "stride_sn": "i32"}
    consts = dict(ROW_SCALE=True, HAS_BIAS=True, BLOCK=FINISH_BLOCK)
    kernel, log = compile_kernel(_finish_kernel, sig, consts, arch, 4)
    return _info("psum_finish", "finish", arch, dtype, consts, 4, kernel, log)


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


ROTATE_BLOCKS = (64,)        # every LLaMA / GPT-2 width gets b = 64 (physkern.rotation)


def compile_rotate(dtype: str, arch: int, block: int) -> CompiledInfo:
    sig = {"x_ptr": f"*{dtype}", "inv_ptr": "*i64", "signs_ptr": "*fp32", "h_ptr": "*fp32",
           "y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    consts = dict(BLOCK_M=ROTATE_CONFIG["BLOCK_M"], B=block)
    kernel, log = compile_kernel(_hadamard_rotate_kernel, sig, consts, arch,
                                 ROTATE_CONFIG["num_warps"])
    return _info("hadamard_rotate", f"b{block}", arch, dtype, consts, ROTATE_CONFIG["num_warps"],
                 kernel, log)


def compile_all(full: bool = True) -> list[dict]:
    """Compile every job in this process (TRITON_INTERPRET must be unset); JSON-able records."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset; use compile_all_subprocess")
    out = [compile_matmul(*job).as_json() for job in matmul_jobs(full)]
    out += [compile_gemv_vec(*job).as_json() for job in gemv_vec_jobs(full)]
    out += [compile_split_reduce(t, a).as_json() for t in DTYPES for a in ARCHS]
    out += [compile_psum(*job).as_json() for job in psum_jobs(full)]
    out += [compile_psum_finish(t, a).as_json() for t in DTYPES for a in ARCHS]
    out += [compile_kmeans(*job).as_json() for job in kmeans_jobs(full)]
    out += [compile_rotate(t, a, b).as_json() for t in DTYPES + ("fp32",) for a in ARCHS
            for b in ROTATE_BLOCKS]
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


# ---------------------------------------------------------------------------------------------
# SASS model of production launches (kernels/sass_model.py reads the SASS)
# ---------------------------------------------------------------------------------------------

SASS_ARCH = 90
SASS_SMS = 132            # H100 SXM / H200: grids sized as the launchers size them there
SASS_SHAPE = (4096, 4096)  # out, in
# name: (d, K) of a layer-scope codebook with one fp16 scale per row (bench_kernels_gpu.py's
# recipes of the same names)
SASS_FORMATS = {"layer_K256_d4_rowscale": (4, 256), "layer_K512_d4_rowscale": (4, 512),
                "layer_K64_d2_rowscale": (2, 64)}
SASS_MS = (1, 16, 128, 2048)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records the launch."""

    def __init__(self, fn, log: list):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **meta: self.log.append((self.fn, grid, args, meta))


def record_launches(call, patches: dict) -> list:
    """Run call() with module attributes replaced: patches {(module, name): value}, where a
    value of None means "record this kernel's launches". Returns [(fn, grid, args, meta)]."""
    log: list = []
    saved = {(mod, name): getattr(mod, name) for mod, name in patches}
    try:
        for (mod, name), value in patches.items():
            setattr(mod, name, _Recorder(saved[(mod, name)], log) if value is None else value)
        call()
    finally:
        for (mod, name), value in saved.items():
            setattr(mod, name, value)
    return log


def specialize_launch(fn, args, meta) -> tuple[dict, dict, tuple]:
    """(signature, constexprs, divisible) as Triton's JIT specializes this launch: ints equal to
    1 become constants, ints and tensor addresses that are multiples of 16 are marked so."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    jit = _jit_function(fn)
    sig, consts, div = {}, {}, []
    for name, a in zip(jit.arg_names, args):
        ty, key = native_specialize_impl(BaseBackend, a, False, True, True)
        if ty == "constexpr":
            consts[name] = key
        else:
            sig[name] = ty
            if key == "D":
                div.append(name)
    consts.update({k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")})
    return sig, consts, tuple(div)


def _model_launch(fn, grid, args, meta, arch: int = SASS_ARCH) -> tuple[dict, object]:
    """Compile one recorded launch as the JIT would and read its SASS."""
    from . import sass_model

    sig, consts, div = specialize_launch(fn, args, meta)
    kernel, log = compile_kernel(fn, sig, consts, arch, meta.get("num_warps", 4),
                                 meta.get("num_stages", 2), divisible=div)
    stats = _parse_ptxas(log)
    instrs = sass_model.disassemble(kernel.asm["cubin"])
    return {"registers": stats.get("registers"), "spill_stores": stats.get("spill_stores"),
            "spill_loads": stats.get("spill_loads"), "shared_bytes": int(kernel.metadata.shared),
            "grid": list(grid), "programs": int(grid[0] * (grid[1] if len(grid) > 1 else 1)
                                                * (grid[2] if len(grid) > 2 else 1)),
            "num_warps": meta.get("num_warps", 4),
            "constexprs": {k: v for k, v in consts.items() if not k.startswith("stride")}}, instrs


def _launch_inputs(out: int, inf: int, d: int, k: int, m: int):
    """CPU tensors of one launch (x fp16 [m, in], one layer codebook, one fp16 scale per row):
    the launchers only read their shapes, strides and alignment here."""
    import torch

    from .packing import index_bits, pack_indices
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, k, (1, out, inf // d), generator=g)
    packed = pack_indices(idx, index_bits(k))
    cb = torch.randn(1, 1, k, d, generator=g).half()
    sc = torch.rand(out, 1, generator=g).half()
    x = torch.randn(m, inf, generator=g).half()
    return x, packed, cb, sc


def sass_jobs():
    """(format name, M, kernel family) for every modelled production launch: the dequantizing
    path (codebook_matmul_triton's pick at each M) and the psum GEMV (M <= 16)."""
    for fmt in SASS_FORMATS:
        for m in SASS_MS:
            yield fmt, m, "dequant"
            if m <= 16:  # beyond codebook_matmul.PSUM_MAX_M too: where it stops paying
                yield fmt, m, "psum"


def model_launch_family(fmt: str, m: int, family: str) -> list[dict]:
    """Record the launches of one production call at SASS_SHAPE (as on SASS_SMS SMs), compile
    each for sm_90 and read its SASS. The main kernel's record carries per-weight figures."""
    from . import _device
    from . import codebook_gemv_psum as psum
    from . import codebook_matmul as cm
    from . import sass_model

    out, inf = SASS_SHAPE
    d, k = SASS_FORMATS[fmt]
    x, packed, cb, sc = _launch_inputs(out, inf, d, k, m)
    sms = {(_device, "sm_count"): lambda device: SASS_SMS}
    if family == "psum":
        patches = {**sms, (psum, "_psum_gemv_kernel"): None, (psum, "_finish_kernel"): None}
        log = record_launches(lambda: psum.codebook_matmul_psum(
            x, packed, cb, sc, None, None, inf, out, inf), patches)
    else:
        patches = {**sms, (cm, "_codebook_gemv_kernel"): None,
                   (cm, "_codebook_matmul_kernel"): None, (cm, "_split_reduce_kernel"): None}
        log = record_launches(lambda: cm.codebook_matmul_triton(
            x, packed, cb, sc, None, None, inf, out, inf), patches)
    records = []
    for i, (fn, grid, args, meta) in enumerate(log):
        rec, instrs = _model_launch(fn, grid, args, meta)
        rec.update(kernel=_jit_function(fn).__name__, family=family, format=fmt, m=m, shape=list(SASS_SHAPE), arch=SASS_ARCH,
                   main=i == 0)
        if i == 0:  # the weight-reading kernel
            names = _jit_function(fn).arg_names
            a = dict(zip(names, args))
            if family == "psum":
                per_iter = meta["BLOCK_N"] * meta["SL"] * meta["D"]
                iters = a["rows_per_prog"] // meta["BLOCK_N"]
            else:
                per_iter = meta["BLOCK_N"] * meta["BLOCK_K"]
                iters = a["k_per_split"] // meta["BLOCK_K"]
            rec["sass"] = sass_model.summarize(instrs, 32 * meta.get("num_warps", 4),
                                               per_iter, iters)
            # The per-weight figures are per weight a program reads, for the rows of x it
            # serves: one for psum (a program per row of x), BLOCK_M for the dequantizing
            # kernels. Per weight of the matrix for the whole call, scale by M / that.
            rows_x = 1 if family == "psum" else min(m, meta["BLOCK_M"])
            scale = triton.cdiv(m, rows_x)
            rec["x_rows_per_program"] = rows_x
            rec["call_per_matrix_weight"] = {
                "warp_instructions": rec["sass"]["program_warp_instructions_per_weight"] * scale,
                "global_load_bytes": rec["sass"]["program_global_load_bytes_per_weight"] * scale,
                "shared_load_bytes": rec["sass"]["program_shared_load_bytes_per_weight"] * scale}
        else:
            rec["sass"] = sass_model.summarize(instrs, 32 * meta.get("num_warps", 4), 1)
            rec["sass"] = {"instructions": len(instrs), "loop": rec["sass"]["loop"]}
        records.append(rec)
    return records


def model_all(jobs=None) -> list[dict]:
    """Every sass_jobs() launch (or `jobs`: (format, M, family) triples), modelled
    (TRITON_INTERPRET must be unset)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("model_all needs TRITON_INTERPRET unset; use model_all_subprocess")
    return [r for job in (jobs or sass_jobs()) for r in model_launch_family(*job)]


def model_all_subprocess(jobs=None, timeout: float = 1800) -> list[dict]:
    """model_all in a child process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "physkern.kernels.static_compile", "--sass"]
    cmd += [f"{f}:{m}:{fam}" for f, m, fam in (jobs or ())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"SASS model failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
                           f"\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if "--sass" in sys.argv:
        picked = [a.split(":") for a in sys.argv[sys.argv.index("--sass") + 1:]]
        print(json.dumps(model_all([(f, int(m), fam) for f, m, fam in picked] or None)))
    else:
        print(json.dumps(compile_all(full="--full" in sys.argv)))
