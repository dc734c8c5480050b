"""physkern::hadamard_rotate (csrc/hadamard_rotate.cpp): x R of a Rotation in one CPU op.

physkern.rotation.Rotation.apply calls it for float32 CPU inputs that need no gradient (decode,
evaluation, prefill under no_grad); everything else (autograd, other dtypes, CUDA, a build of
the extension from before the op existed) takes the torch form in rotation.py, which the op
matches up to float32 summation order (tests/test_hadamard_rotate.py, both against the dense
float64 R).
"""
from __future__ import annotations

import functools

import torch

OP = "physkern::hadamard_rotate"


@functools.lru_cache(maxsize=1)
def native_rotate_available() -> bool:
    """True when physkern._C registers a CPU kernel for physkern::hadamard_rotate (and then its
    fake, for torch.compile / meta tensors, is registered here once)."""
    from physkern.kernels._native import native_op_available

    if not native_op_available(OP):
        return False
    torch.library.register_fake(OP)(_fake)
    return True


def _fake(x: torch.Tensor, inv_perm: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def hadamard_rotate(x: torch.Tensor, inv_perm: torch.Tensor, signs: torch.Tensor,
                    block: int) -> torch.Tensor:
    """y [..., n] = ((x[..., inv_perm] * signs) in blocks of `block`) @ H_block / sqrt(block).

    x         [..., n] float32 CPU
    inv_perm  int64 [n], a permutation of range(n) (entries outside [0, n) raise)
    signs     float32 [n] (+-1 for a rotation)
    block     a power of two dividing n
    Raises RuntimeError when the extension lacks the op (see native_rotate_available)."""
    if not native_rotate_available():
        raise RuntimeError(f"{OP} is not available: physkern._C is missing or was built "
                           "before the op existed (reinstall: make install)")
    return torch.ops.physkern.hadamard_rotate(x, inv_perm, signs, block)
