"""A guard for loader tests: fail if loading allocates a large tensor (a crafted file must be
refused against its header before anything it describes is allocated)."""
import torch

_FACTORIES = ("zeros", "empty", "ones", "full")


def guard_allocations(monkeypatch, max_numel: int = 10**7) -> None:
    """Patch torch's tensor factories so that any tensor of max_numel elements or more fails."""
    real = {n: getattr(torch, n) for n in _FACTORIES}

    def guarded(n):
        def f(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            numel = 1
            for s in shape:
                numel *= int(s)
            assert numel < max_numel, f"torch.{n}{tuple(shape)} allocated while loading"
            return real[n](*size, **kw)
        return f
    for n in real:
        monkeypatch.setattr(torch, n, guarded(n))
