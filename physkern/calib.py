"""Calibration: statistics of every linear layer's input, gathered with forward hooks.

A statistic is any object with `update(x)` where x is the layer input flattened to
[tokens, in_features] (float32). `collect_statistics` runs calibration windows through the model
once and feeds each hooked layer's input to its statistics. Built-in statistics:

- `SecondMoment`: E[x_j^2] per input dimension (the importance s of weighted k-means).
- `Gram`: X^T X summed over tokens (the GPTQ Hessian, up to a factor 2/N).

Entropy histograms (physkern.research.histogram) plug in the same way.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import LinearLayer, decoder_linear_layers


class SecondMoment:
    """Running E[x_j^2] over tokens, per input dimension j. `value` is [in_features] float32."""

    def __init__(self, in_features: int):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        self.sum_sq += x.double().pow(2).sum(0).cpu()
        self.count += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("SecondMoment saw no tokens")
        return (self.sum_sq / self.count).float()


class Gram:
    """Running X^T X over tokens. `value` is [in, in] float32; `count` tokens seen."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu"):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        # fp32 product per batch (fast), accumulated across batches in fp64.
        xf = x.to(self.xtx.device, torch.float32)
        self.xtx += (xf.t() @ xf).double()
        self.count += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.xtx.float()

    @property
    def mean(self) -> torch.Tensor:
        """E[x x^T] = X^T X / N."""
        return (self.xtx / max(self.count, 1)).float()


StatFactory = Callable[[LinearLayer], object]


@torch.no_grad()
def collect_statistics(model: nn.Module, windows: torch.Tensor,
                       factories: dict[str, StatFactory],
                       layers: Optional[Iterable[LinearLayer]] = None,
                       batch_size: int = 1, progress: bool = True) -> dict[str, dict[str, object]]:
    """Run `windows` ([n, seq] token ids) through `model`, feeding each layer's input to stats.

    factories: statistic name -> callable(layer) making a fresh statistic for that layer.
    layers: which layers to hook (default: decoder linear layers).
    Returns {layer name: {statistic name: statistic}}.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be [n, seq] token ids, got shape {tuple(windows.shape)}")
    layers = list(layers) if layers is not None else decoder_linear_layers(model)
    stats = {l.name: {k: f(l) for k, f in factories.items()} for l in layers}
    hooks = []

    def make_hook(name):
        def hook(_module, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            for s in stats[name].values():
                s.update(x)
        return hook

    for l in layers:
        hooks.append(l.module.register_forward_pre_hook(make_hook(l.name)))
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, windows.shape[0], batch_size), desc="calibration",
                      disable=not progress, leave=False):
            model(input_ids=windows[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def input_second_moments(model: nn.Module, windows: torch.Tensor,
                         layers: Optional[Iterable[LinearLayer]] = None,
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """E[x^2] per input dimension for each layer: {name: [in_features]}."""
    stats = collect_statistics(model, windows, {"m2": lambda l: SecondMoment(l.in_features)},
                               layers, progress=progress)
    return {name: s["m2"].value for name, s in stats.items()}
