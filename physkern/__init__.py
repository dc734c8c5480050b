"""physkern: codebook quantization engine for language models.

Public API (imported lazily so that `import physkern` stays fast):
  load_model, linear_layers, replace_layer        physkern.models
  load_corpus, evaluation_tokens                  physkern.data
  perplexity                                      physkern.eval
  quantize, CodebookConfig, ScalarConfig, GPTQConfig, bits_report,
  save_quantized, load_quantized, QuantizedLinear, StreamingHistogram,
  enable_lattice, disable_lattice
  finetune_quantized                              physkern.finetune
  QuantizedEmbedding                              physkern.embedding
  set_dense_storage_dtype                         physkern.dense
  set_prefill_dtype                               physkern.ops (bf16 GEMMs for many-row x)
  set_decode_tables                               physkern.kernels.codebook_gemv_lut (int16 / fp32)
  Recipe, load_recipe, load_preset, apply_recipe  physkern.recipe

Importing physkern also registers it with transformers (physkern.hf_quantizer): afterwards
`AutoModelForCausalLM.from_pretrained(dir)` loads a directory written by save_quantized.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "physkern.models",
    "linear_layers": "physkern.models",
    "decoder_linear_layers": "physkern.models",
    "replace_layer": "physkern.models",
    "load_corpus": "physkern.data",
    "evaluation_tokens": "physkern.data",
    "calibration_windows": "physkern.data",
    "perplexity": "physkern.eval",
    "QuantizedLinear": "physkern.layers",
    "quantize": "physkern.api",
    "CodebookConfig": "physkern.config",
    "ScalarConfig": "physkern.config",
    "GPTQConfig": "physkern.config",
    "bits_report": "physkern.quant.accounting",
    "save_quantized": "physkern.serialization",
    "load_quantized": "physkern.serialization",
    "StreamingHistogram": "physkern.research.histogram",
    "enable_lattice": "physkern.research.attention",
    "disable_lattice": "physkern.research.attention",
    "finetune_quantized": "physkern.finetune",
    "QuantizedEmbedding": "physkern.embedding",
    "Recipe": "physkern.recipe",
    "load_recipe": "physkern.recipe",
    "load_preset": "physkern.recipe",
    "apply_recipe": "physkern.recipe",
    "set_dense_storage_dtype": "physkern.dense",
    "set_prefill_dtype": "physkern.ops",
    "set_decode_tables": "physkern.kernels.codebook_gemv_lut",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'physkern' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


def _register_with_transformers() -> None:
    """Make transformers' Auto classes load physkern directories (see physkern.hf_quantizer).
    Skipped, with nothing else affected, where transformers is missing or too old to take
    custom quantizers."""
    try:
        from .hf_quantizer import register
    except ImportError:
        return
    register()


_register_with_transformers()
