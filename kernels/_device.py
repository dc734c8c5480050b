"""Device facts the Triton launchers size their grids by (one place, imported by each kernel
module; kernels/static_compile.py patches sm_count to model an H100's launches without a GPU)."""
from __future__ import annotations

import torch


def sm_count(device: torch.device) -> int:
    """SMs the launchers size their grids for: the device's, or 4 off CUDA (the interpreter:
    a little split-K so tests exercise the partial-sum path)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
