"""GPTQ: GPTQConfig and its registered quantizer (the algorithm: physkern.quant.gptq)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ._base import _check_bool, _check_float, _check_int, _check_scalar_grid, _Selectable
from .registry import register_method


@dataclass
class GPTQConfig(_Selectable):
    """GPTQ on a scalar grid (Frantar et al. 2022): Hessian error feedback, lazy batches.

    act_order: quantize columns in order of decreasing Hessian diagonal (groups stay static)
    """
    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "gptq"
    needs_calibration = True
    needs_hessian = True

    def storage_probe(self):
        """GPTQ stores exactly the RTN grid format (same bits, groups, symmetry)."""
        from .scalar import ScalarConfig
        return ScalarConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric)

    def __post_init__(self):
        _check_scalar_grid(self)
        _check_bool("act_order", self.act_order)
        _check_float("percdamp", self.percdamp, 0, 1)
        _check_int("blocksize", self.blocksize, 1)


@register_method(GPTQConfig)
def quantize_gptq_weight(weight, cfg: GPTQConfig, m2=None, gram=None):
    """GPTQ on a scalar grid with Hessian (gram = X^T X) error feedback."""
    from ..quant.gptq import gptq_quantize_scalar
    return gptq_quantize_scalar(weight, gram, cfg.bits, cfg.group_size, cfg.symmetric,
                                act_order=cfg.act_order, percdamp=cfg.percdamp,
                                blocksize=cfg.blocksize)
