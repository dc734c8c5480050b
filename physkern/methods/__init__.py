"""Quantization methods, one file each (config dataclass + registered quantizer):

    codebook.py   CodebookConfig -> quantize_codebook_weight (k-means vectors, error feedback)
    scalar.py     ScalarConfig   -> quantize_scalar_weight   (RTN grids)
    gptq.py       GPTQConfig     -> quantize_gptq_weight     (GPTQ)

registry.py maps a config class to its quantizer (`register_method`, `quantizer_for`); a new
method is a new file here with `@register_method(ItsConfig)` and an import below.
"""
from .registry import CONFIG_CLASSES, QUANTIZERS, config_class, quantizer_for, register_method
from .codebook import CodebookConfig, quantize_codebook_weight
from .scalar import ScalarConfig, quantize_scalar_weight
from .gptq import GPTQConfig, quantize_gptq_weight

__all__ = ["CONFIG_CLASSES", "QUANTIZERS", "config_class", "quantizer_for", "register_method",
           "CodebookConfig", "ScalarConfig", "GPTQConfig", "quantize_codebook_weight",
           "quantize_scalar_weight", "quantize_gptq_weight"]
