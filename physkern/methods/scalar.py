"""Round-to-nearest scalar quantization: ScalarConfig and its registered quantizer
(the algorithm: physkern.quant.scalar)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from ..rotation import check_config_rotation, config_dict_without_default_rotation
from ._base import MAX_SEED, _check_bool, _check_int, _check_scalar_grid, _Selectable
from .registry import register_method


@dataclass
class ScalarConfig(_Selectable):
    """Round-to-nearest on a uniform grid (2-8 bits).

    group_size: input columns per scale (None = one scale per output channel)
    symmetric:  zero at the grid's mid-point (no offsets stored) instead of min/max affine
    per_tensor: one scale for the whole tensor (the seeds' "uniform 4-bit" strawman)
    rotation:   "none" or "hadamard": round W R instead of W, R the input rotation of
                physkern.rotation seeded by `rotation_seed` (stored as that seed, no bits; the
                layer computes (x R) Q^T). Not named `seed`: the CLI's --seed and the sweeps'
                seeds set every config's `seed`, and RTN draws nothing else
    """
    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    per_tensor: bool = False
    rotation: str = "none"
    rotation_seed: int = 0
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
        check_config_rotation(self)
        _check_int("rotation_seed", self.rotation_seed, 0, MAX_SEED)

    def to_dict(self) -> dict:
        """Without rotation/rotation_seed when unrotated (dicts as before the fields existed)."""
        return config_dict_without_default_rotation(super().to_dict())


@register_method(ScalarConfig)
def quantize_scalar_weight(weight, cfg: ScalarConfig, m2=None, gram=None):
    """RTN on a uniform grid (no calibration: m2 and gram are ignored); with a rotation R,
    RTN of W R with R attached (dequantize() = Q R^T)."""
    from ..quant.scalar import rtn_quantize
    from ..rotation import config_rotation
    rotation = config_rotation(cfg, weight.shape[1])
    if rotation is not None:
        weight = rotation.apply(weight.double()).to(weight.dtype)
    qw = rtn_quantize(weight, cfg.bits, cfg.group_size, cfg.symmetric, cfg.per_tensor)
    return qw if rotation is None else replace(qw, rotation=rotation)
