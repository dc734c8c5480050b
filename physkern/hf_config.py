"""config.json of a saved physkern model, and the base model's config read back from it.

save_quantized writes the model's own config with two changes:

    "model_type": "physkern", "physkern_base_model_type": "<the real model type, e.g. llama>",
    "quantization_config": {"quant_method": "physkern", "format_version": 1,
                            "quantized_layers": {...}, "quantized_embeddings": {...}}

(format_version is 2, and a "factorized_layers" entry describes MPO / low-rank layers, when the
model has any: physkern.serialization writes and checks that part, and older readers refuse it.)

The model type is what makes transformers refuse the directory without physkern (an unknown
model type is an error, an unknown quant_method only a warning that loads random weights); with
physkern imported, physkern.hf_quantizer registers both. This module holds only the dict
transforms, so the saver, the loader and the transformers integration share them without
importing each other.
"""
from __future__ import annotations

QUANT_METHOD = "physkern"
MODEL_TYPE = "physkern"
BASE_MODEL_TYPE_KEY = "physkern_base_model_type"
FORMAT_VERSION = 1


def quantization_config(layers: dict, embeddings: dict) -> dict:
    """config.json's quantization_config: the layouts physkern.json holds too."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "quantized_layers": layers, "quantized_embeddings": embeddings}


def physkern_config_dict(config_dict: dict, layers: dict, embeddings: dict) -> dict:
    """The model's config dict (config.to_dict()) as a physkern model's config.json."""
    d = dict(config_dict)
    d.pop("quantization_config", None)
    base = d.get("model_type")
    if base == MODEL_TYPE:
        base = d[BASE_MODEL_TYPE_KEY]
    if not isinstance(base, str) or not base:
        raise ValueError(f"config: model_type {base!r} is not a transformers model type")
    d[BASE_MODEL_TYPE_KEY] = base
    d["model_type"] = MODEL_TYPE
    d["quantization_config"] = quantization_config(layers, embeddings)
    return d


def base_config_dict(config_dict: dict, file: str = "config.json") -> dict:
    """A physkern config.json dict -> the base architecture's config dict (model_type restored,
    the physkern keys removed). Dicts of other model types come back unchanged (models saved
    before this format)."""
    d = dict(config_dict)
    if d.get("model_type") != MODEL_TYPE:
        return d
    base = d.pop(BASE_MODEL_TYPE_KEY, None)
    if not isinstance(base, str) or not base or base == MODEL_TYPE:
        raise ValueError(f"{file}: {BASE_MODEL_TYPE_KEY} must name a transformers model type "
                         f"(e.g. 'llama', 'gpt2'), got {base!r}")
    d["model_type"] = base
    d.pop("quantization_config", None)
    return d
