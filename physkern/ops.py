"""physkern's kernels as torch.library ops, dispatching per device.

    physkern::kmeans_assign(blocks, centroids, importance?) -> (indices, distances)
    physkern::codebook_matmul(x, packed, codebooks, scales?, offsets?, bias?,
                              in_features, codebook_rows, scale_group) -> y

kmeans_assign is a Python custom op: CUDA tensors run the Triton kernel
(kernels/kmeans_assign.py), CPU tensors the fused C++ op physkern::kmeans_assign_cpu from
physkern._C, or its pure-torch fallback without the extension.

codebook_matmul is one op, defined once: its schema and CPU kernel are C++ (physkern._C,
csrc/codebook_matmul.cpp: the fused decode-and-dot kernel for x with at most NATIVE_MAX_M rows,
dequantize + one GEMM above); this module registers its CUDA kernel (the Triton launcher of
kernels/codebook_matmul.py), its fake (shape function, for torch.compile and opcheck) and its
autograd formula for x and bias (grad_x = grad_y @ W, so calibration passes can backpropagate
through quantized layers; indices, codebooks and scales get no gradient). Without physkern._C
this module defines the same schema itself, with the pure-torch CPU path as its CPU kernel.
Both ops pass torch.library.opcheck.

The selector: `codebook_linear` (QuantizedLinear's forward, and codebook_matmul(backend="auto"))
sends CPU tensors with few rows, outside torch.compile and with no gradient to track, to
kernels/codebook_matmul.codebook_matmul_small_m, which picks the lookup-table GEMV
physkern::codebook_gemv_lut or the op's own C++ CPU kernel (called below autograd): that skips
the op's Python autograd kernel, whose dispatch costs ~5-7 us a call, a tenth of a small layer's
GEMV. Everything else goes through the op.

The Python wrappers `kmeans_assign` and `codebook_matmul` take `backend=`:
"auto" (the op, per device), "triton" (the Triton launcher directly: CUDA, or CPU tensors under
TRITON_INTERPRET=1, which tests use), "cpu" (the fast CPU path: C++ on CPU tensors, the
vectorised torch path on other devices) or
"reference" (the plain torch references).
"""
from __future__ import annotations

import os
from typing import Optional, TYPE_CHECKING

import torch

from physkern.kernels.codebook_gemv_lut import clear_gemv_lut_caches
from physkern.kernels.codebook_matmul import (INDEX_CACHE, NATIVE_MAX_M,
                                              codebook_matmul_cpu, codebook_matmul_reference,
                                              codebook_matmul_small_m, codebook_matmul_triton,
                                              native_matmul_available)
from physkern.kernels.codebook_matmul import OP_NAME as CODEBOOK_MATMUL_OP
from physkern.kernels.kmeans_assign import (SUPPORTED_BLOCK_DIMS, kmeans_assign_cpu,
                                            kmeans_assign_reference, kmeans_assign_triton)

if TYPE_CHECKING:
    from physkern.quant.format import QuantizedWeight

BACKENDS = ("auto", "triton", "cpu", "reference")


# ---- physkern::kmeans_assign -------------------------------------------------------------

@torch.library.custom_op("physkern::kmeans_assign", mutates_args=())
def _kmeans_assign_op(blocks: torch.Tensor, centroids: torch.Tensor,
                      importance: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if blocks.device.type == "cuda" and blocks.shape[-1] in SUPPORTED_BLOCK_DIMS:
        return kmeans_assign_triton(blocks, centroids, importance)
    # CPU tensors (the C++ op), or a block dim the Triton kernel does not specialise (the
    # vectorised torch path, valid on any device).
    return kmeans_assign_cpu(blocks, centroids, importance)


@_kmeans_assign_op.register_fake
def _(blocks, centroids, importance):
    s, n = blocks.shape[0], blocks.shape[1]
    return (blocks.new_empty(s, n, dtype=torch.int64), blocks.new_empty(s, n, dtype=torch.float32))


def kmeans_assign(blocks: torch.Tensor, centroids: torch.Tensor,
                  importance: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every block within its scope's codebook, all scopes in one call.

    blocks     [n_scopes, n_blocks, d]  (the Triton kernel takes d in {1, 2, 4, 8, 16}; other d
               run the vectorised torch path on any device)
    centroids  [n_scopes, K, d]         (K >= 1)
    importance broadcastable to [n_scopes, n_blocks, d] or None; distance is
               sum_j importance_j * (w_j - c_j)^2 (None: plain squared distance)
    returns    (indices int64 [n_scopes, n_blocks], distances float32 [n_scopes, n_blocks]);
               ties go to the lowest index.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return _kmeans_assign_op(blocks, centroids, importance)
    fn = {"triton": kmeans_assign_triton, "cpu": kmeans_assign_cpu,
          "reference": kmeans_assign_reference}[backend]
    return fn(blocks, centroids, importance)


# ---- physkern::codebook_matmul -----------------------------------------------------------

# The op's schema. physkern._C defines it (csrc/codebook_matmul.cpp, with the C++ CPU kernel);
# only without the extension is it defined here, from this same string, with the pure-torch CPU
# path as its CPU kernel, so the package and its callers see one op either way.
CODEBOOK_MATMUL_SCHEMA = ("(Tensor x, Tensor packed, Tensor codebooks, Tensor? scales, "
                          "Tensor? offsets, Tensor? bias, int in_features, int codebook_rows, "
                          "int scale_group) -> Tensor")

if not native_matmul_available():
    torch.library.define(CODEBOOK_MATMUL_OP, CODEBOOK_MATMUL_SCHEMA)

    @torch.library.register_kernel(CODEBOOK_MATMUL_OP, "cpu")
    def _codebook_matmul_torch_cpu(x, packed, codebooks, scales, offsets, bias, in_features,
                                   codebook_rows, scale_group):
        # No C++: the vectorised torch path (codebook_matmul_cpu without physkern._C).
        return codebook_matmul_cpu(x, packed, codebooks, scales, offsets, bias, in_features,
                                   codebook_rows, scale_group)


@torch.library.register_kernel(CODEBOOK_MATMUL_OP, "cuda")
def _codebook_matmul_cuda(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                          scale_group):
    return codebook_matmul_triton(x, packed, codebooks, scales, offsets, bias, in_features,
                                  codebook_rows, scale_group)


@torch.library.register_fake(CODEBOOK_MATMUL_OP)
def _codebook_matmul_fake(x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows,
                          scale_group):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty(*x.shape[:-1], packed.shape[1])


def _cbmm_setup_context(ctx, inputs, output):
    x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows, scale_group = inputs
    ctx.save_for_backward(packed, codebooks, scales, offsets)
    ctx.meta = (in_features, codebook_rows, scale_group, x.dtype, bias is not None)


def _cbmm_backward(ctx, grad_y):
    # grad_x = grad_y @ W (fp32, cast to x's dtype), grad_bias = grad_y summed over rows;
    # indices, codebooks and scales get no gradient (fine-tuning differentiates through
    # quant.reconstruct instead).
    from physkern.quant.format import QuantizedWeight

    packed, codebooks, scales, offsets = ctx.saved_tensors
    in_features, codebook_rows, scale_group, x_dtype, has_bias = ctx.meta
    qw = QuantizedWeight(packed, codebooks, scales, offsets, in_features, packed.shape[1],
                         codebook_rows, scale_group)
    w = qw.dequantize(torch.float32)
    grad_x = (grad_y.float() @ w).to(x_dtype)
    grad_bias = grad_y.float().reshape(-1, grad_y.shape[-1]).sum(0).to(grad_y.dtype) if has_bias else None
    return grad_x, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd(CODEBOOK_MATMUL_OP, _cbmm_backward,
                                setup_context=_cbmm_setup_context)

# The op (an OpOverload): what codebook_linear calls off the decode fast path, and what
# torch.library.opcheck is pointed at.
_codebook_matmul_op = torch.ops.physkern.codebook_matmul.default


def codebook_matmul(x: torch.Tensor, qw: "QuantizedWeight", bias: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias with W = qw.dequantize() rebuilt on the fly from packed indices.

    x    [..., in_features] float32/float16/bfloat16
    qw   QuantizedWeight (packed [S, out, words], codebooks [S, n_cb, K, d], scales/offsets;
         with a rotation R the stored weight is Q(W R), so x is rotated first: y = (x R) Q^T)
    bias [out_features] or None
    returns y [..., out_features] in x.dtype (fp32 accumulation)
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(qw, "rotation", None) is not None:
        x = qw.rotation.apply(x)
    if qw.packed.shape[1] != qw.out_features:
        raise ValueError(f"qw.packed has {qw.packed.shape[1]} rows, qw.out_features is "
                         f"{qw.out_features}")
    args = (x, qw.packed, qw.codebooks, qw.scales, qw.offsets, bias, qw.in_features,
            qw.codebook_rows, qw.scale_group)
    if backend == "auto":
        return codebook_linear(*args)
    fn = {"triton": codebook_matmul_triton, "cpu": codebook_matmul_cpu,
          "reference": codebook_matmul_reference}[backend]
    return fn(*args)


def codebook_linear(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                    scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                    scale_group: int) -> torch.Tensor:
    """codebook_matmul(backend="auto") on plain tensors (QuantizedLinear's forward): the one
    selector of the path. x [..., in] -> y [..., out] in x.dtype.

    Small-M CPU calls with nothing to trace or differentiate (_eager_native_ok) go straight to
    codebook_matmul_small_m, which picks the LUT GEMV or the op's C++ CPU kernel and skips the
    ~5-7 us of custom-op dispatch (Python autograd kernel) that the decode loop would pay on
    every layer; everything else calls physkern::codebook_matmul (its device dispatch: C++ on
    CPU, Triton on CUDA; its fake and autograd formula). Layouts are the caller's to have
    validated (QuantizedLinear validates on construction, load_quantized before loading)."""
    args = (x, packed, codebooks, scales, offsets, bias, in_features, codebook_rows, scale_group)
    if _eager_native_ok(x, bias, in_features):
        return codebook_matmul_small_m(*args)
    dt = _prefill_dtype
    if (dt is not None and x.dtype == torch.float32 and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)):
        return _codebook_matmul_op(x.to(dt), *args[1:]).to(x.dtype)
    return _codebook_matmul_op(*args)


_prefill_dtype: Optional[torch.dtype] = None
PREFILL_DTYPES = (None, torch.bfloat16)


def set_prefill_dtype(dtype: Optional[torch.dtype]) -> None:
    """Compute dtype of the quantized layers' many-row products on CPU (more than NATIVE_MAX_M
    rows of fp32 x: prefill, evaluation windows). None (the default): fp32 throughout.
    torch.bfloat16: x and the dequantized W rounded to bfloat16, one bf16 GEMM with fp32
    accumulation, y back in fp32 (about twice the fp32 GEMM's rate with AVX-512 BF16; relative
    output change ~3e-3). Decode (few rows) and everything outside the quantized layers are
    unchanged."""
    global _prefill_dtype
    if dtype not in PREFILL_DTYPES:
        raise ValueError(f"prefill dtype must be one of {PREFILL_DTYPES}, got {dtype!r}")
    _prefill_dtype = dtype


def prefill_dtype() -> Optional[torch.dtype]:
    """The current setting of set_prefill_dtype."""
    return _prefill_dtype


def _eager_native_ok(x: torch.Tensor, bias: Optional[torch.Tensor], in_features: int) -> bool:
    """Whether the op would run C++ on CPU for x and nothing needs the op around it: CPU tensor,
    at most NATIVE_MAX_M rows, not tracing, no gradient to record."""
    if x.device.type != "cpu" or x.numel() > NATIVE_MAX_M * in_features:
        return False
    if torch.compiler.is_compiling() or not native_matmul_available():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return True


def clear_index_cache() -> None:
    """Drop the CPU paths' cached index layouts (they are also freed with their tensors)."""
    INDEX_CACHE.clear()
    clear_gemv_lut_caches()


def triton_interpreter_active() -> bool:
    """True when TRITON_INTERPRET=1 (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
