"""kernels/hadamard_rotate.py: the Triton rotation kernel (interpreter on CPU) and its torch
reference, both against the dense float64 R = Rotation.matrix() (an independent construction)."""
import pytest
import torch

from physkern.kernels.hadamard_rotate import (hadamard_rotate_reference, hadamard_rotate_triton,
                                              SUPPORTED_MIN_BLOCK)
from physkern.rotation import Rotation

SHAPES = [  # (n, block, leading shape of x)
    (16, 16, (1,)),
    (64, 64, (1,)),
    (64, 64, (17,)),       # rows not a multiple of BLOCK_M
    (96, 32, (3, 2)),
    (576, 64, (1,)),
    (48, 16, (0,)),
]


def _args(n, block, seed=5):
    rot = Rotation.make("hadamard", n, seed=seed, block=block)
    inv, _, signs, h = rot._parts(torch.device("cpu"), torch.float32)
    return rot, inv, signs, h


@pytest.mark.parametrize("n,block,lead", SHAPES)
@pytest.mark.parametrize("impl", [hadamard_rotate_triton, hadamard_rotate_reference])
def test_matches_dense_rotation(impl, n, block, lead):
    rot, inv, signs, h = _args(n, block)
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(n + len(lead)))
    y = impl(x, inv, signs, h)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, (x.double() @ rot.matrix()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_their_dtype(dtype):
    rot, inv, signs, h = _args(64, 64)
    x = torch.randn(5, 64).to(dtype)
    y = hadamard_rotate_triton(x, inv, signs, h)
    assert y.dtype == dtype
    ref = (x.double() @ rot.matrix()).to(dtype)
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, hadamard_rotate_reference(x, inv, signs, h))


def test_noncontiguous_rows():
    rot, inv, signs, h = _args(64, 64)
    x = torch.randn(64, 3).t()
    torch.testing.assert_close(hadamard_rotate_triton(x, inv, signs, h),
                               (x.double() @ rot.matrix()).float(), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_themselves():
    _, inv, signs, h = _args(64, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"inv_perm must be int64 \[64\]"):
        hadamard_rotate_triton(x, inv[:63], signs, h)
    with pytest.raises(ValueError, match=r"signs must be a floating \[64\]"):
        hadamard_rotate_triton(x, inv, signs[:5], h)
    with pytest.raises(ValueError, match="h must be float32"):
        hadamard_rotate_triton(x, inv, signs, h[:, :32])
    with pytest.raises(ValueError, match="h must be float32"):
        hadamard_rotate_triton(x, inv, signs, h.double())
    with pytest.raises(ValueError, match="x must be a floating"):
        hadamard_rotate_triton(x.int(), inv, signs, h)
    _, inv8, signs8, h8 = _args(8, 8)
    with pytest.raises(ValueError, match=f"block must be >= {SUPPORTED_MIN_BLOCK}"):
        hadamard_rotate_triton(torch.randn(1, 8), inv8, signs8, h8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_on_cuda_takes_the_kernel(dtype, monkeypatch):
    """On CUDA without a gradient Rotation.apply launches the Triton kernel; its result equals
    the dense R (and the torch form that autograd inputs take)."""
    import physkern.kernels.hadamard_rotate as kernel_module

    calls = []
    real = kernel_module.hadamard_rotate_triton
    monkeypatch.setattr(kernel_module, "hadamard_rotate_triton",
                        lambda *a: calls.append(1) or real(*a))
    rot = Rotation.make("hadamard", 576, seed=2)
    x = torch.randn(3, 576, device="cuda").to(dtype)
    with torch.inference_mode():
        y = rot.apply(x)
    assert calls == [1] and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float().cpu(), (x.double().cpu() @ rot.matrix()).float(),
                               rtol=tol, atol=tol)
    slow = rot.apply(x.float().requires_grad_(True)).detach()
    torch.testing.assert_close(y.float(), slow, rtol=tol, atol=tol)
