"""The input rotation of a rotated quantized layer, x R, as one Triton kernel (CUDA path).

R = P D blockdiag(H_b) (physkern/rotation.py): for every row r and block c of b columns,

    y[r, c*b : (c+1)*b] = (x[r, inv_perm[c*b : (c+1)*b]] * signs[c*b : (c+1)*b]) @ H_b

H_b the Sylvester Hadamard matrix / sqrt(b). Implementations, one contract:
- `hadamard_rotate_triton`: one launch, grid (row tiles, column blocks). A program gathers a
  [BLOCK_M, b] tile of x through inv_perm, multiplies by the signs and by H_b [b, b] with one
  fp32 tl.dot (input_precision "ieee": no TF32 rounding), and stores in x's dtype. The torch form
  is three kernels (gather, scale, batched matmul); on the decode path of a GPU their launches
  cost more than the arithmetic. tl.dot needs b >= 16 (SUPPORTED_MIN_BLOCK): every LLaMA / GPT-2
  width has b = 64; smaller blocks keep the torch form.
- `hadamard_rotate_reference`: the gather, scale and block product in torch (float32).
Both are tested against the dense float64 R in tests/test_hadamard_rotate_triton.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_MIN_BLOCK = 16
# Production launch configuration (compiled for sm_80 / sm_90 by tests/test_kernel_compile.py):
# a [16, 64] fp32 tile times a [64, 64] H_b; 16 rows is tl.dot's smallest M.
ROTATE_CONFIG = {"BLOCK_M": 16, "num_warps": 4}


@triton.jit
def _hadamard_rotate_kernel(x_ptr, inv_ptr, signs_ptr, h_ptr, y_ptr, M, N,
                            stride_xm, stride_ym,
                            BLOCK_M: tl.constexpr, B: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * B + tl.arange(0, B)
    row_ok = rows < M
    src = tl.load(inv_ptr + cols)                                  # int64 [B]
    sg = tl.load(signs_ptr + cols).to(tl.float32)                  # [B]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + src[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    kk = tl.arange(0, B)
    h = tl.load(h_ptr + kk[:, None] * B + kk[None, :])             # fp32 [B, B]
    y = tl.dot(x * sg[None, :], h, input_precision="ieee")
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])


def _check(x: torch.Tensor, inv_perm: torch.Tensor, signs: torch.Tensor,
           h: torch.Tensor) -> tuple[int, int]:
    """Validate the arguments; return (n, block)."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    n = x.shape[-1]
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if inv_perm.dtype != torch.int64 or inv_perm.shape != (n,):
        raise ValueError(f"inv_perm must be int64 [{n}], got {inv_perm.dtype} "
                         f"{list(inv_perm.shape)}")
    if not signs.is_floating_point() or signs.shape != (n,):
        raise ValueError(f"signs must be a floating [{n}] tensor, got {signs.dtype} "
                         f"{list(signs.shape)}")
    block = h.shape[0] if h.dim() == 2 else 0
    if (h.dim() != 2 or h.shape[1] != block or block < 1 or block & (block - 1) or n % block
            or h.dtype != torch.float32):
        raise ValueError(f"h must be float32 [b, b] with b a power of two dividing n ({n}), got "
                         f"{h.dtype} {list(h.shape)}")
    if not (inv_perm.device == signs.device == h.device == x.device):
        raise ValueError(f"x, inv_perm, signs and h must share a device, got {x.device}, "
                         f"{inv_perm.device}, {signs.device}, {h.device}")
    return n, block


def hadamard_rotate_reference(x: torch.Tensor, inv_perm: torch.Tensor, signs: torch.Tensor,
                              h: torch.Tensor) -> torch.Tensor:
    """x [..., n], inv_perm int64 [n], signs [n], h = H_b float32 [b, b] -> y [..., n] in
    x.dtype (float32 arithmetic); see the module docstring."""
    n, block = _check(x, inv_perm, signs, h)
    xs = x.float().index_select(-1, inv_perm) * signs.float()
    y = xs.reshape(*x.shape[:-1], n // block, block) @ h
    return y.reshape(x.shape).to(x.dtype)


def hadamard_rotate_triton(x: torch.Tensor, inv_perm: torch.Tensor, signs: torch.Tensor,
                           h: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: x [..., n] (float32 / float16 / bfloat16, CUDA or the interpreter),
    inv_perm int64 [n], signs [n], h = H_b float32 [b, b] -> y [..., n] in x.dtype. b must be
    >= SUPPORTED_MIN_BLOCK. inv_perm is trusted to be
    a permutation of range(n) (Rotation builds it from its seed; the kernel does not bounds-check
    the gather)."""
    n, block = _check(x, inv_perm, signs, h)
    if block < SUPPORTED_MIN_BLOCK:
        raise ValueError(f"block must be >= {SUPPORTED_MIN_BLOCK} for the Triton kernel (tl.dot), "
                         f"got {block}; use hadamard_rotate_reference")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(x.shape)
    bm = ROTATE_CONFIG["BLOCK_M"]
    grid = (triton.cdiv(m, bm), n // block)
    _hadamard_rotate_kernel[grid](x2, inv_perm, signs.float().contiguous(),
                                  h.contiguous(), y, m, n, x2.stride(0), y.stride(0),
                                  BLOCK_M=bm, B=block, num_warps=ROTATE_CONFIG["num_warps"])
    return y.reshape(x.shape)
