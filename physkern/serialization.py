"""Save and load quantized models: safetensors + JSON, written atomically.

A saved model is a directory:
  physkern.json       format version, quantized layers and their buffer layout, recipe, bits
  model.safetensors   every tensor of the model (tied tensors once)
  config.json, tokenizer files   as transformers writes them
The directory is written under a temporary name beside the target and renamed into place, so a
crash never leaves a half-written model; an existing physkern model at the target is replaced
only after the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

MARKER = "physkern.json"
FORMAT_VERSION = 1


def is_quantized_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_quantized(model: nn.Module, path, tokenizer=None, extra: Optional[dict] = None) -> Path:
    """Write `model` (with QuantizedLinear layers) to directory `path`; returns the path."""
    from safetensors.torch import save_model
    from .layers import QuantizedLinear
    from .quant.accounting import bits_report
    path = Path(path)
    if path.exists() and not is_quantized_dir(path):
        if not path.is_dir() or any(path.iterdir()):
            raise ValueError(f"path: {str(path)!r} exists and is not a physkern model; refusing "
                             "to overwrite it")
    layers = {name: m.layer_meta() for name, m in model.named_modules()
              if isinstance(m, QuantizedLinear)}
    other = [name for name, m in model.named_modules()
             if hasattr(m, "weight_numel") and hasattr(m, "storage_bits")
             and not isinstance(m, QuantizedLinear)]
    if other:
        raise ValueError(f"save_quantized supports QuantizedLinear layers only; found other "
                         f"compressed modules: {other[:3]}")
    report = bits_report(model)
    meta = {"format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "quantized_layers": layers, "bits": {
                "quantized_bits_per_weight": report.quantized_bits_per_weight,
                "model_bits_per_weight": report.model_bits_per_weight,
                "total_bytes": report.total_bytes}, **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        with open(tmp / MARKER, "w") as f:
            json.dump(meta, f, indent=2)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "model")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_quantized(path, device: str | torch.device = "cpu"):
    """Load a model saved by save_quantized: returns (model, tokenizer or None)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from .layers import QuantizedLinear
    from .models import replace_layer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"path: {str(path)!r} is not a directory")
    if not is_quantized_dir(path):
        raise ValueError(f"path: {str(path)!r} is not a physkern quantized model (no {MARKER})")
    with open(path / MARKER) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{MARKER}: format_version {meta.get('format_version')!r} is not "
                         f"supported (this physkern reads {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    for name, layer_meta in meta["quantized_layers"].items():
        replace_layer(model, name, QuantizedLinear.empty(layer_meta))
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected:
        raise ValueError(f"model.safetensors has tensors the model does not: {unexpected[:5]}")
    real_missing = [m for m in missing if not m.endswith("inv_freq")]
    if real_missing:
        raise ValueError(f"model.safetensors lacks tensors: {real_missing[:5]}")
    model.tie_weights()
    tok = None
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tok
