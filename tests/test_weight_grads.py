"""physkern.weight_grads: dLoss/dQ from hooks against autograd on an explicit weight parameter."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from physkern.rotation import Rotation
from physkern.weight_grads import stored_weight_grads


class _Layer(nn.Module):
    """y = (x R) Q^T + b with Q a parameter: autograd's Q.grad is the reference."""

    def __init__(self, out, inf, rotation=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.q = nn.Parameter(torch.randn(out, inf, generator=g))
        self.b = nn.Parameter(torch.randn(out, generator=g))
        self.rotation = rotation
        self.out_features, self.in_features = out, inf

    def forward(self, x):
        if self.rotation is not None:
            x = self.rotation.apply(x)
        return F.linear(x, self.q, self.b)


@pytest.mark.parametrize("rotated", [False, True])
def test_matches_autograd_on_the_stored_weight(rotated):
    rot = Rotation.make("hadamard", 64, seed=3) if rotated else None
    a, b = _Layer(64, 64, rot, 0), _Layer(32, 64, rot, 1)
    c = _Layer(5, 32, None, 2)         # never called: zeros
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(4))

    def loss():
        h = torch.tanh(a(x))
        return (b(h) ** 2).mean() + b(x).sum() * 0.1      # b called twice: grads add up

    got = stored_weight_grads({"a": a, "b": b, "c": c}, loss)
    for p in (a.q, b.q):
        p.grad = None
    loss().backward()
    torch.testing.assert_close(got["a"], a.q.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["b"], b.q.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(got["c"], torch.zeros(5, 32))
    if rotated:   # really the stored basis: the effective weight's gradient differs
        assert not torch.allclose(got["b"], got["b"] @ rot.matrix(torch.float32).T, atol=1e-3)


def test_bad_loss_is_refused():
    a = _Layer(4, 64)
    with pytest.raises(ValueError, match="scalar loss"):
        stored_weight_grads({"a": a}, lambda: a(torch.randn(2, 64)))
