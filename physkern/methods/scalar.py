"""Round-to-nearest scalar quantization: ScalarConfig and its registered quantizer
(the algorithm: physkern.quant.scalar)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ._base import _check_bool, _check_scalar_grid, _Selectable
from .registry import register_method


@dataclass
class ScalarConfig(_Selectable):
    """Round-to-nearest on a uniform grid (2-8 bits).

    group_size: input columns per scale (None = one scale per output channel)
    symmetric:  zero at the grid's mid-point (no offsets stored) instead of min/max affine
    per_tensor: one scale for the whole tensor (the seeds' "uniform 4-bit" strawman)
    """
    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    per_tensor: bool = False
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "rtn"
    needs_calibration = False
    needs_hessian = False

    def __post_init__(self):
        _check_scalar_grid(self)
        _check_bool("per_tensor", self.per_tensor)
        if self.per_tensor and self.group_size is not None:
            raise ValueError("per_tensor=True and group_size are exclusive")


@register_method(ScalarConfig)
def quantize_scalar_weight(weight, cfg: ScalarConfig, m2=None, gram=None):
    """RTN on a uniform grid (no calibration: m2 and gram are ignored)."""
    from ..quant.scalar import rtn_quantize
    return rtn_quantize(weight, cfg.bits, cfg.group_size, cfg.symmetric, cfg.per_tensor)
