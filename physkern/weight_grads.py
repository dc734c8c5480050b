"""Gradients of a loss with respect to linear layers' weights, read off their inputs and outputs.

A layer y = x' Q^T (+ b), x' = x R with an input rotation R (physkern.rotation) or x' = x, has

    dLoss/dQ = sum over tokens of (dLoss/dy)^T x'        [out, in]

in the basis Q is stored in. Reading it from forward hooks (x) and a gradient hook on y works
whatever computes y (a QuantizedLinear, its differentiable fine-tuning copy, an nn.Linear) and
needs no parameter for Q: what the linearised code update (physkern.quant.code_update.
linearized_target) needs from the end-to-end loss during fine-tuning.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def stored_weight_grads(modules: dict[str, nn.Module],
                        run: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: dLoss/dQ [out, in] float32} for each module of `modules` ({name: module}; a
    module with a non-None `.rotation` is taken to compute (x R) Q^T).

    run: builds and returns the scalar loss with autograd on (the modules' outputs must require
    grad); it is backpropagated here (loss.backward(): parameters' .grad accumulate as usual, so
    zero them before the next optimiser step). A module called several times sums its calls; a
    module never called, or whose output does not reach the loss, gets zeros.
    """
    acc: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}

    def make_hook(name: str):
        def hook(mod, inputs, output):
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = inputs[0].detach()
            rot = getattr(mod, "rotation", None)
            if rot is not None:
                x = rot.apply(x)
            x = x.reshape(-1, x.shape[-1]).double()
            shapes[name] = (output.shape[-1], x.shape[-1])

            def grad_hook(gy: torch.Tensor) -> None:
                g = gy.detach().reshape(-1, gy.shape[-1]).double().T @ x
                acc[name] = acc[name] + g if name in acc else g
            output.register_hook(grad_hook)
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        loss = run()
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
            raise ValueError("run must return a scalar loss tensor that requires grad")
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, mod in modules.items():
        if name in acc:
            out[name] = acc[name].float()
        else:
            w = _weight_shape(mod, shapes.get(name))
            out[name] = torch.zeros(w, dtype=torch.float32)
    return out


def _weight_shape(mod: nn.Module, seen) -> tuple[int, int]:
    if seen is not None:
        return seen
    for attr in ("out_features", "in_features"):
        if not hasattr(mod, attr):
            raise ValueError(f"module {type(mod).__name__} was not called and has no "
                             "out_features / in_features to size its zero gradient")
    return mod.out_features, mod.in_features
