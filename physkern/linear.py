"""The linear layers of a model, seen uniformly, and swapping one module for another.

GPT-2 stores its projections as transformers' `Conv1D` with weight [in, out]; LLaMA-family models
use `nn.Linear` with weight [out, in]. Everything downstream works on the canonical [out, in]
view returned by `LinearLayer.weight()`, so quantizers never care which kind they got.
(physkern.models loads models and re-exports these names; this module imports nothing of
physkern, so the loaders and savers can use it without importing each other.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None


@dataclass
class LinearLayer:
    """One linear layer of a model, whatever its storage convention.

    name:   dotted module name (model.get_submodule(name) gives `module`)
    kind:   "linear" (nn.Linear, weight [out, in]) or "conv1d" (GPT-2 Conv1D, weight [in, out])
    tied_to: name of the parameter this weight is shared with (e.g. the input embedding), or None
    """
    name: str
    kind: str
    module: nn.Module
    in_features: int
    out_features: int
    tied_to: Optional[str] = None

    @property
    def tied(self) -> bool:
        return self.tied_to is not None

    def weight(self) -> torch.Tensor:
        """Canonical [out_features, in_features] view of the weight (no copy)."""
        w = self.module.weight
        return w.t() if self.kind == "conv1d" else w

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.module, "bias", None)


def linear_layers(model: nn.Module, include_tied: bool = True) -> list[LinearLayer]:
    """Every nn.Linear / GPT-2 Conv1D in `model`, in module order.

    A layer whose weight is the same tensor as another parameter (the tied lm_head /
    embedding pair) is reported with `tied_to` naming that parameter.
    """
    conv1d = _conv1d_class()
    first_owner: dict[int, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        first_owner.setdefault(id(p), pname)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kind, fin, fout = "linear", module.in_features, module.out_features
        elif conv1d is not None and isinstance(module, conv1d):
            kind, (fin, fout) = "conv1d", module.weight.shape
        else:
            continue
        own = f"{name}.weight"
        owner = first_owner.get(id(module.weight), own)
        tied_to = owner if owner != own else None
        if tied_to is None:
            # Also tied if another parameter registered later shares the tensor.
            for pname, p in model.named_parameters(remove_duplicate=False):
                if p is module.weight and pname != own:
                    tied_to = pname
                    break
        if tied_to is not None and not include_tied:
            continue
        layers.append(LinearLayer(name, kind, module, int(fin), int(fout), tied_to))
    return layers


def decoder_linear_layers(model: nn.Module) -> list[LinearLayer]:
    """The linear layers inside the transformer blocks: the default quantization targets.

    Excludes the output head and anything tied to the embedding.
    """
    return [l for l in linear_layers(model) if not l.tied and "lm_head" not in l.name]


def replace_layer(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put `new_module` where `name` was; returns the module that was replaced."""
    if not name:
        raise ValueError("name must name a submodule, not the model itself")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
    except AttributeError as exc:
        raise KeyError(f"model has no submodule named {name!r}") from exc
    setattr(parent, child, new_module)
    return old
