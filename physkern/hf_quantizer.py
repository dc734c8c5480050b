"""transformers-native loading of physkern models: a registered quantization config and HfQuantizer.

A model saved by physkern.save_quantized carries, in config.json,

    "model_type": "physkern", "physkern_base_model_type": "llama",   (the real model type)
    "quantization_config": {"quant_method": "physkern", "format_version": 1,
                            "quantized_layers": {name: layer meta, ...}}

(the same layer metadata as physkern.json; a model with MPO / low-rank layers has format
version 2 and their layouts under "factorized_layers" too). After `import physkern` (which
calls `register()`):
- AutoConfig knows model type "physkern": `PhyskernDispatchConfig.from_dict` returns the base
  architecture's own config (LlamaConfig, GPT2Config, ...), so AutoModelForCausalLM builds the
  usual model class;
- transformers finds quant_method "physkern" in its quantizer registry, and this quantizer
  replaces each named linear layer of the empty (meta-device) skeleton by an empty
  QuantizedLinear (or MPOLinear / LowRankLinear) with the stored tensor shapes and dtypes;
  transformers then loads model.safetensors into those tensors by name.
Why the model type and not only the quantization config: transformers meets an unknown
quant_method with a warning and loads the checkpoint into plain Linear layers, leaving them at
random initialisation. An unknown model type is an error, so without physkern transformers
refuses the directory. (A directory written by `save_pretrained` of a loaded model keeps the base
model type and the quantization config: it loads with physkern; without physkern transformers
warns instead of refusing.)

The layouts are checked (physkern.serialization.install_quantized_modules: types, ranges, and
against the modules they replace) before any buffer is built, and the loaded indices are checked
against K after loading, as physkern.load_quantized does.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .hf_config import FORMAT_VERSION, MODEL_TYPE, QUANT_METHOD, base_config_dict

# 1: quantized layers only; 2: + factorized_layers (physkern.serialization.FORMAT_VERSIONS)
FORMAT_VERSIONS = (FORMAT_VERSION, 2)


class PhyskernDispatchConfig(PreTrainedConfig):
    """Model type "physkern": loads as the base architecture's own config class."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any):
        d = base_config_dict(config_dict)
        d["quantization_config"] = config_dict.get("quantization_config")
        if d["model_type"] not in CONFIG_MAPPING:
            raise ValueError(f"config.json: base model type {d['model_type']!r} is not known "
                             "to this transformers")
        return CONFIG_MAPPING[d["model_type"]].from_dict(d, **kwargs)


class PhyskernQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a physkern model in config.json.

    quantized_layers:     {dotted module name: QuantizedLinear.layer_meta()}
    quantized_embeddings: {dotted module name: QuantizedEmbedding meta + "source" layer}
    factorized_layers:    {dotted module name: serialization.factorized_layer_meta()}
                          (format version 2 only)
    """

    def __init__(self, quantized_layers: dict[str, dict] | None = None,
                 quantized_embeddings: dict[str, dict] | None = None,
                 format_version: int = FORMAT_VERSION,
                 factorized_layers: dict[str, dict] | None = None, **kwargs: Any):
        from .serialization import check_factorized_version
        self.quant_method = QUANT_METHOD
        if type(format_version) is not int or format_version not in FORMAT_VERSIONS:
            # 3 (shared codebooks) and 4 (sparse outliers) are physkern.load_quantized's only
            later = format_version in (3, 4)
            raise ValueError(f"quantization_config.format_version: {format_version!r} is not "
                             f"supported by the transformers loader (it reads "
                             f"{', '.join(map(str, FORMAT_VERSIONS))})"
                             + ("; a model with shared codebooks or sparse outliers loads with "
                                "physkern.load_quantized" if later else ""))
        check_factorized_version("quantization_config", format_version, factorized_layers)
        if not isinstance(quantized_layers, dict) or not (quantized_layers or factorized_layers):
            raise ValueError("quantization_config.quantized_layers must be a mapping of layer "
                             "name -> layer metadata, non-empty unless factorized_layers is")
        if quantized_embeddings is not None and not isinstance(quantized_embeddings, dict):
            raise ValueError("quantization_config.quantized_embeddings must be a mapping of "
                             "embedding name -> metadata")
        self.format_version = format_version
        self.quantized_layers = quantized_layers
        self.quantized_embeddings = quantized_embeddings or {}
        if factorized_layers:  # absent otherwise: version-1 configs serialise as before
            self.factorized_layers = factorized_layers
        self.extra = kwargs  # kept as written (e.g. a newer writer's fields), never interpreted


class PhyskernHfQuantizer(HfQuantizer):
    """Loads physkern's pre-quantized layers; physkern does not quantize inside from_pretrained
    (quantizing needs calibration text: use `physkern quantize`)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .serialization import install_quantized_modules
        qc = self.quantization_config
        factorized = getattr(qc, "factorized_layers", None) or {}
        with torch.device("meta"):  # shapes only; transformers fills the buffers by name
            install_quantized_modules(model, qc.quantized_layers, qc.quantized_embeddings,
                                      "config.json", factorized)
        # Quantized modules and their parents come from the checkpoint: transformers' weight
        # init (run when any key is missing, e.g. a tied head) must skip them, and some
        # architectures' init (GPT-2 attention/MLP) reaches into a child's `.weight`.
        for name in [*qc.quantized_layers, *qc.quantized_embeddings, *factorized]:
            parent = name.rpartition(".")[0]
            for module in (model.get_submodule(name), model.get_submodule(parent)):
                module._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from .serialization import check_factor_indices, check_indices
        for name in self.quantization_config.quantized_layers:
            check_indices("model.safetensors", name, model.get_submodule(name))
        for name in getattr(self.quantization_config, "factorized_layers", None) or {}:
            check_factor_indices("model.safetensors", name, model.get_submodule(name))
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (once; later calls do nothing)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, PhyskernDispatchConfig)
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(PhyskernQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(PhyskernHfQuantizer)
