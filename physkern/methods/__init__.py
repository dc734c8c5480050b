"""Quantization methods, one file each (config dataclass + registered quantizer):

    codebook.py   CodebookConfig -> quantize_codebook_weight (k-means vectors, error feedback)
    scalar.py     ScalarConfig   -> quantize_scalar_weight   (RTN grids)
    gptq.py       GPTQConfig     -> quantize_gptq_weight     (GPTQ)

    mpo.py        MPOConfig      -> factorize_mpo   (MPO / tensor train, replaces the layer)
    lowrank.py    SVDConfig      -> factorize_svd   (truncated SVD, replaces the layer)

factorized.py holds the factorization registry (recipe key "factorize"), apply_factorization
and heal_factorized. registry.py maps a config class to its quantizer (`register_method`,
`quantizer_for`); a new method is a new file here with `@register_method(ItsConfig)` and an
import below.
"""
from .registry import CONFIG_CLASSES, QUANTIZERS, config_class, quantizer_for, register_method
from .codebook import CodebookConfig, quantize_codebook_weight
from .scalar import ScalarConfig, quantize_scalar_weight
from .gptq import GPTQConfig, quantize_gptq_weight
# factorization methods (layers replaced by factorized modules; their own registry)
from .factorized import FACTORIZATION_CLASSES, factorization_from_dict, register_factorization
from .mpo import MPOConfig
from .lowrank import SVDConfig

__all__ = ["CONFIG_CLASSES", "QUANTIZERS", "config_class", "quantizer_for", "register_method",
           "CodebookConfig", "ScalarConfig", "GPTQConfig", "quantize_codebook_weight",
           "quantize_scalar_weight", "quantize_gptq_weight", "FACTORIZATION_CLASSES",
           "factorization_from_dict", "register_factorization", "MPOConfig", "SVDConfig"]
