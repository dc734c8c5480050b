"""GPTQ: GPTQConfig and its registered quantizer (the algorithm: physkern.quant.gptq)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from ..rotation import check_config_rotation, config_dict_without_default_rotation
from ._base import (MAX_SEED, _check_bool, _check_float, _check_int, _check_scalar_grid,
                    _Selectable)
from .registry import register_method


@dataclass
class GPTQConfig(_Selectable):
    """GPTQ on a scalar grid (Frantar et al. 2022): Hessian error feedback, lazy batches.

    act_order: quantize columns in order of decreasing Hessian diagonal (groups stay static)
    rotation:  "none" or "hadamard": GPTQ on W R under R^T H R, R the input rotation of
               physkern.rotation seeded by `rotation_seed` (stored as that seed, no bits; the
               layer computes (x R) Q^T). Not named `seed`: the CLI's --seed and the sweeps'
               seeds set every config's `seed`
    """
    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    rotation: str = "none"
    rotation_seed: int = 0
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)

    method = "gptq"
    needs_calibration = True
    needs_hessian = True

    def storage_probe(self):
        """GPTQ stores exactly the RTN grid format (same bits, groups, symmetry)."""
        from .scalar import ScalarConfig
        return ScalarConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                            rotation=self.rotation,
                            rotation_seed=self.rotation_seed)

    def __post_init__(self):
        _check_scalar_grid(self)
        _check_bool("act_order", self.act_order)
        _check_float("percdamp", self.percdamp, 0, 1)
        _check_int("blocksize", self.blocksize, 1)
        check_config_rotation(self)
        _check_int("rotation_seed", self.rotation_seed, 0, MAX_SEED)

    def to_dict(self) -> dict:
        """Without rotation/rotation_seed when unrotated (dicts as before the fields existed)."""
        return config_dict_without_default_rotation(super().to_dict())


@register_method(GPTQConfig)
def quantize_gptq_weight(weight, cfg: GPTQConfig, m2=None, gram=None):
    """GPTQ on a scalar grid with Hessian (gram = X^T X) error feedback; with a rotation R,
    GPTQ of W R under R^T H R with R attached (dequantize() = Q R^T)."""
    from ..quant.gptq import gptq_quantize_scalar
    from ..rotation import config_rotation, rotate_problem
    rotation = config_rotation(cfg, weight.shape[1])
    if rotation is not None:
        weight, _, gram = rotate_problem(weight, None, gram, rotation)
    qw = gptq_quantize_scalar(weight, gram, cfg.bits, cfg.group_size, cfg.symmetric,
                              act_order=cfg.act_order, percdamp=cfg.percdamp,
                              blocksize=cfg.blocksize)
    return qw if rotation is None else replace(qw, rotation=rotation)
