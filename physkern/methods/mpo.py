"""MPO (tensor-train) factorization of chosen layers: MPOConfig and its registered factorizer.

The decomposition (TT-SVD, DMRG-style ALS sweeps, MPOLinear) lives in physkern.research.mpo;
this file is the config a recipe's "factorize" key names ({"method": "mpo", ...}) and the glue
physkern.methods.factorized calls. The layer is replaced by an MPOLinear (cores stored at
`dtype`, counted by the accounting), never quantized as a layer; with `quantize` its cores are
(physkern.methods.factor_quant: a QuantizedMPOLinear).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import nn

from ._base import _check_bool, _check_float, _check_int, _check_selection, _Selectable
from .factor_quant import check_factor_config, nominal_value_bits, with_quantize
from .factorized import DTYPES, register_factorization

# The activation-weighted local solve is a dense system of r_{k-1} * i_k * r_k unknowns: above
# this it is refused (cubic cost; use cores=2 or smaller bonds).
MAX_WEIGHTED_SYSTEM = 4096


@dataclass
class MPOConfig(_Selectable):
    """MPO / tensor train of each selected layer's weight at a bond dimension or a bits target.

    chi:     bond dimension (give chi or bits, not both)
    bits:    stored bits per weight of the cores: the largest chi that fits
             (physkern.research.mpo.chi_for_bits at `dtype`'s width)
    cores:   number of cores (2-6); out/in factorised by physkern.research.mpo.factorize
    sweeps:  DMRG-style ALS sweeps after TT-SVD (0 = TT-SVD only)
    weighted: sweeps minimise tr((W - W_mpo) H (W - W_mpo)^T), H the layer input's X^T X from
             calibration text (refused where a local system exceeds MAX_WEIGHTED_SYSTEM unknowns)
    dtype:   storage dtype of the cores: float16, bfloat16 or float32
    quantize: None, or a quantizer config (object or recipe dict {"method": "codebook", ...})
             the cores are then quantized with (physkern.methods.factor_quant; no calibration);
             a bits target then counts the quantizer's index bits per core value
             (factor_quant.nominal_value_bits) instead of `dtype`'s width
    layers:  glob patterns of the decoder linear layers to factorize (None = all)
    """
    chi: Optional[int] = None
    bits: Optional[float] = None
    cores: int = 3
    sweeps: int = 2
    weighted: bool = False
    dtype: str = "float16"
    layers: Optional[Sequence[str]] = None
    overrides: dict = field(default_factory=dict)
    quantize: Optional[object] = None

    method = "mpo"

    def __post_init__(self):
        _check_selection(self)
        if self.overrides:
            raise ValueError("mpo: overrides are not supported")
        if (self.chi is None) == (self.bits is None):
            raise ValueError(f"mpo: give exactly one of chi (bond dimension) or bits (stored "
                             f"bits per weight), got chi={self.chi!r}, bits={self.bits!r}")
        if self.chi is not None:
            _check_int("chi", self.chi, 1)
        if self.bits is not None:
            _check_float("bits", self.bits, 0)
        _check_int("cores", self.cores, 2, 6)
        _check_int("sweeps", self.sweeps, 0, 50)
        _check_bool("weighted", self.weighted)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize is not None:
            self.quantize = check_factor_config(self.quantize)

    @property
    def needs_calibration(self) -> bool:
        return self.weighted

    def to_dict(self) -> dict:
        return with_quantize(super().to_dict(), self.quantize)

    def chi_for(self, out_features: int, in_features: int) -> tuple[int, tuple, tuple]:
        """(chi, out_factors, in_factors) for an [out, in] weight."""
        from ..research.mpo import chi_for_bits, factorize
        of, inf = factorize(out_features, self.cores), factorize(in_features, self.cores)
        if self.chi is not None:
            return self.chi, of, inf
        width = DTYPES[self.dtype].itemsize * 8 if self.quantize is None else \
            nominal_value_bits(self.quantize)
        return chi_for_bits(of, inf, self.bits, width), of, inf


@register_factorization(MPOConfig)
def factorize_mpo(weight, bias, cfg: MPOConfig, gram=None):
    """TT-SVD at the config's bond dimension, then cfg.sweeps ALS sweeps (H-weighted with
    cfg.weighted); returns an MPOLinear storing the cores at cfg.dtype."""
    from ..research.mpo import MPOLinear, bond_dims
    chi, of, inf = cfg.chi_for(*weight.shape)
    if cfg.weighted:
        r = bond_dims(of, inf, chi)
        widest = max(r[k] * inf[k] * r[k + 1] for k in range(len(of)))
        if widest > MAX_WEIGHTED_SYSTEM:
            raise ValueError(f"mpo weighted: a local system of {widest} unknowns (bond {chi}, "
                             f"in factors {inf}) exceeds {MAX_WEIGHTED_SYSTEM}; use fewer cores, "
                             "a smaller chi or weighted=false")
        if gram is None:
            raise ValueError("mpo weighted: needs the layer input's X^T X (calibration)")
    mod = MPOLinear.from_linear(weight, chi, cores=cfg.cores, sweeps=cfg.sweeps,
                                H=gram if cfg.weighted else None, out_factors=of, in_factors=inf,
                                dtype=DTYPES[cfg.dtype])
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    mod.factorization_info = {"chi": chi, "out_factors": list(of), "in_factors": list(inf),
                              "cores": cfg.cores, "sweeps": cfg.sweeps}
    return mod
