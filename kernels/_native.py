"""Whether the C++ extension physkern._C provides a given op's CPU kernel."""
from __future__ import annotations

import torch


def native_op_available(op: str) -> bool:
    """True when physkern._C imports and registers a CPU kernel for `op` ("physkern::name");
    False without the extension, or with a stale build from before the op existed."""
    try:
        import physkern._C  # noqa: F401  (registers the physkern ops)
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"))
    except (ImportError, RuntimeError):
        return False
