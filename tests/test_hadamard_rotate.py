"""physkern::hadamard_rotate (csrc/hadamard_rotate.cpp) against the dense float64 rotation.

The independent reference is Rotation.matrix(): R = P D blockdiag(H_b) formed densely from the
seed in float64 (its own orthogonality and the Sylvester construction are tested in
test_rotation.py); the op never forms R (fast Walsh-Hadamard butterflies).
"""
import pytest
import torch

from physkern.hadamard_op import hadamard_rotate, native_rotate_available
from physkern.rotation import Rotation

pytestmark = pytest.mark.skipif(not native_rotate_available(),
                                reason="physkern._C built without physkern::hadamard_rotate")

SHAPES = [  # (n, block, leading shape of x)
    (1, 1, (1,)),
    (2, 2, (3,)),
    (6, 2, (1, 4)),
    (12, 4, (5,)),
    (64, 64, (1,)),
    (64, 64, (4,)),
    (96, 32, (2, 3)),
    (576, 64, (1,)),
    (576, 64, (7,)),
    (1536, 64, (1, 1)),
    (40, 8, (0,)),
    (128, 16, (300,)),   # enough rows for the parallel split
]


def _parts(rot: Rotation):
    inv, _, signs, _ = rot._parts(torch.device("cpu"), torch.float32)
    return inv, signs


@pytest.mark.parametrize("n,block,lead", SHAPES)
def test_matches_dense_rotation(n, block, lead):
    rot = Rotation.make("hadamard", n, seed=n * 7 + block, block=block)
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(n))
    inv, signs = _parts(rot)
    y = hadamard_rotate(x, inv, signs, block)
    ref = (x.double() @ rot.matrix(torch.float64)).float()
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_noncontiguous_input():
    rot = Rotation.make("hadamard", 64, seed=3)
    x = torch.randn(64, 5).t()          # [5, 64], stride (1, 5)
    inv, signs = _parts(rot)
    torch.testing.assert_close(hadamard_rotate(x, inv, signs, 64),
                               (x.double() @ rot.matrix()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_apply_takes_the_op_and_matches_the_torch_form(rows, monkeypatch):
    """Rotation.apply on float32 CPU without gradient goes through the op; with a gradient to
    record it takes the torch form; both equal x R."""
    import physkern.rotation as rotation

    calls = []
    real = rotation.hadamard_rotate
    monkeypatch.setattr(rotation, "hadamard_rotate", lambda *a: calls.append(1) or real(*a))
    rot = Rotation.make("hadamard", 576, seed=11)
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        fast = rot.apply(x)
    assert calls == [1]
    slow = rot.apply(x.clone().requires_grad_(True)).detach()
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, (x.double() @ rot.matrix()).float(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    inv = torch.arange(8)
    signs = torch.ones(8)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x must be float32"):
        hadamard_rotate(x.double(), inv, signs, 8)
    with pytest.raises(ValueError, match="inv_perm must be int64 \\[8\\]"):
        hadamard_rotate(x, inv[:7], signs, 8)
    with pytest.raises(ValueError, match="inv_perm must be int64"):
        hadamard_rotate(x, inv.int(), signs, 8)
    with pytest.raises(ValueError, match="signs must be float32 \\[8\\]"):
        hadamard_rotate(x, inv, signs.double(), 8)
    with pytest.raises(ValueError, match="block must be a power of two dividing n"):
        hadamard_rotate(x, inv, signs, 3)
    with pytest.raises(ValueError, match="block must be a power of two dividing n"):
        hadamard_rotate(x, inv, signs, 16)
    bad = inv.clone()
    bad[5] = 8
    with pytest.raises(ValueError, match=r"inv_perm\[5\] = 8 is outside \[0, 8\)"):
        hadamard_rotate(x, bad, signs, 8)
    bad[5] = -1
    with pytest.raises(ValueError, match="outside"):
        hadamard_rotate(x, bad, signs, 8)


def test_opcheck():
    rot = Rotation.make("hadamard", 96, seed=1)
    inv, signs = _parts(rot)
    for x in (torch.randn(3, 96), torch.randn(1, 2, 96)):
        torch.library.opcheck(torch.ops.physkern.hadamard_rotate.default, (x, inv, signs, 32))
