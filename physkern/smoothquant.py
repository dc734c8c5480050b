"""SmoothQuant-style scale migration (Xiao et al. 2023), used here for weight-only quantization.

For a group of linear layers that read the same normalised input x (LLaMA: input_layernorm ->
q/k/v_proj, post_attention_layernorm -> gate/up_proj; GPT-2: ln_1 -> attn.c_attn,
ln_2 -> mlp.c_fc), pick per-input-channel scales

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)      (max over tokens / over the group's rows)

and rewrite x W^T = (x / s) (W diag(s))^T: the norm's weight (and bias) is divided by s, so it
emits x / s, and every column j of every weight in the group is multiplied by s_j. Before
quantization the model computes the same function (up to float rounding). alpha = 0 flattens the
weight columns' ranges, alpha = 1 the activations'; for weight-only codebooks the point is to move
large-activation channels' importance into the weights the quantizer sees.

Layers without a preceding norm (o_proj, down_proj, GPT-2 attn.c_proj / mlp.c_proj) are left
alone. Norms whose output is not `weight * normalised(x) (+ bias)` (e.g. Gemma's 1 + weight) are
detected by a numerical check and refused.
"""
from __future__ import annotations

import torch
from torch import nn

from .calib import collect_statistics
from .models import LinearLayer, linear_layers

# (norm attribute, linear layers reading its output) relative to a transformer block.
SMOOTH_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
)
_EPS = 1e-5   # floor on maxima, as SmoothQuant's clamp(min=1e-5)


class AbsMax:
    """Running max |x_j| over tokens per input dimension; `value` is [in_features] float32."""

    def __init__(self, in_features: int):
        self.max = torch.zeros(in_features, dtype=torch.float32)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        self.max = torch.maximum(self.max, x.detach().abs().amax(0).float().cpu())
        self.count += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("AbsMax saw no tokens")
        return self.max.clone()


def smoothing_groups(model: nn.Module) -> list[tuple[str, list[LinearLayer]]]:
    """[(norm module name, [LinearLayer reading its output])] for LLaMA-style and GPT-2 blocks."""
    by_name = {l.name: l for l in linear_layers(model)}
    groups = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for norm_attr, lin_names in SMOOTH_PATTERNS:
            if not isinstance(getattr(module, norm_attr, None), nn.Module):
                continue
            full = [prefix + n for n in lin_names]
            if all(f in by_name for f in full):
                groups.append((prefix + norm_attr, [by_name[f] for f in full]))
    return groups


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor],
                     alpha: float) -> torch.Tensor:
    """s [in] = max|X_j|^alpha / max|W_j|^(1-alpha) for weights [out_i, in] sharing an input.

    act_max: [in] max |x_j| over calibration tokens. Maxima are floored at 1e-5.
    """
    check_alpha(alpha)
    w_max = torch.cat([w.detach().float().abs() for w in weights], dim=0).amax(0).cpu()
    a = act_max.float().cpu().clamp_min(_EPS)
    return a.pow(alpha) / w_max.clamp_min(_EPS).pow(1 - alpha)


def check_alpha(alpha: float) -> float:
    """Validate the migration strength alpha (a number in [0, 1])."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


@torch.no_grad()
def collect_activation_max(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                           progress: bool = False) -> dict[str, torch.Tensor]:
    """max |x_j| [in] of the input of each smoothing group: {norm name: tensor}.

    windows: [n, seq] calibration token ids (from the calibration half of the corpus).
    """
    groups = smoothing_groups(model)
    if not groups:
        raise ValueError("model has no norm -> linear groups to smooth (supported: LLaMA-style "
                         f"and GPT-2 blocks: {[p for p, _ in SMOOTH_PATTERNS]})")
    first = [lins[0] for _, lins in groups]
    stats = collect_statistics(model, windows, {"absmax": lambda l: AbsMax(l.in_features)},
                               layers=first, batch_size=batch_size, progress=progress)
    return {norm: stats[lins[0].name]["absmax"].value for norm, lins in groups}


def _scale_columns(layer: LinearLayer, s: torch.Tensor) -> None:
    w = layer.module.weight
    s = s.to(w.device, w.dtype)
    if layer.kind == "conv1d":          # stored [in, out]
        w.mul_(s[:, None])
    else:                               # stored [out, in]
        w.mul_(s[None, :])


@torch.no_grad()
def apply_smoothing(model: nn.Module, act_max: dict[str, torch.Tensor],
                    alpha: float) -> dict[str, torch.Tensor]:
    """Migrate scales into the model in place; returns {norm name: s [in]}.

    act_max: {norm name: [in] max |x_j|} as from `collect_activation_max` (every group of
    `smoothing_groups(model)` must be present). The norm's weight/bias are divided by s and the
    group's weight columns multiplied by s; the model's outputs do not change.
    """
    check_alpha(alpha)
    groups = smoothing_groups(model)
    if not groups:
        raise ValueError("model has no norm -> linear groups to smooth (supported: LLaMA-style "
                         f"and GPT-2 blocks: {[p for p, _ in SMOOTH_PATTERNS]})")
    missing = [n for n, _ in groups if n not in act_max]
    if missing:
        raise ValueError(f"act_max lacks the smoothing groups {missing}")
    result = {}
    # Check every group before changing anything, so a refusal leaves the model untouched.
    for norm_name, lins in groups:
        norm = model.get_submodule(norm_name)
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise ValueError(f"{norm_name}: norm without a 1-d weight cannot absorb scales")
        s = smoothing_scales(act_max[norm_name], [l.weight() for l in lins], alpha)
        if s.shape != weight.shape:
            raise ValueError(f"{norm_name}: scales {tuple(s.shape)} do not match the norm weight "
                             f"{tuple(weight.shape)}")
        _check_absorbable(norm, norm_name, s)
        result[norm_name] = s
    for norm_name, lins in groups:
        norm = model.get_submodule(norm_name)
        weight, s = norm.weight, result[norm_name]
        sd = s.to(weight.device, weight.dtype)
        weight.div_(sd)
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(sd)
        for l in lins:
            _scale_columns(l, s)
    return result


def _check_absorbable(norm: nn.Module, name: str, s: torch.Tensor) -> None:
    """Refuse a norm whose output does not scale with its weight (and bias)."""
    weight = norm.weight
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0))
    x = x.to(weight.device, weight.dtype)
    bias = getattr(norm, "bias", None)
    saved = weight.detach().clone(), None if bias is None else bias.detach().clone()
    y0 = norm(x)
    sd = s.to(weight.device, weight.dtype)
    try:
        weight.div_(sd)
        if isinstance(bias, torch.Tensor):
            bias.div_(sd)
        y1 = norm(x) * sd
    finally:
        weight.copy_(saved[0])
        if isinstance(bias, torch.Tensor):
            bias.copy_(saved[1])
    if not torch.allclose(y1, y0, rtol=1e-4, atol=1e-5 * float(y0.abs().max()) + 1e-6):
        raise ValueError(f"{name} ({type(norm).__name__}) does not compute weight * f(x) + bias: "
                         "scales cannot be absorbed into it exactly")


def smooth_model(model: nn.Module, windows: torch.Tensor, alpha: float = 0.5,
                 batch_size: int = 1, progress: bool = False) -> dict[str, torch.Tensor]:
    """Collect max |x_j| on `windows` ([n, seq] calibration ids) and migrate (in place).

    Returns {norm name: s [in]}. Call before quantizing; outputs are unchanged by this call.
    """
    check_alpha(alpha)
    return apply_smoothing(model, collect_activation_max(model, windows, batch_size, progress),
                           alpha)
