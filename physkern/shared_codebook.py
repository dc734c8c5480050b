"""Codebooks shared across layers (issue 19 item 2): CodebookConfig(scope="shared", share=...).

A per-layer K = 65536, d = 8 fp16 codebook costs 8.4 Mbit, more than most layers hold; one
codebook for every layer of a type (share="type") or of the model (share="model") costs that
once. Each layer keeps its own indices and per-row scales; its QuantizedWeight has layer scope
and holds the group's ONE codebook tensor [S, 1, K, d] (an nn.Parameter without gradient, so
model.to(), deepcopy and fine-tuning keep it one tensor), `shared` = the group's name. It is
stored once in a saved file (physkern.serialization) and counted once in bits
(physkern.quant.accounting splits it evenly over the group's layers).

Groups (plan_shared_groups): share="type" groups the layers with the same name after their
block prefix ("model.layers.3.mlp.gate_proj" -> "mlp.gate_proj"); share="model" puts every layer
of the config in one group, "model". Layers governed by different configs (overrides) never
share: a second config whose group name is taken gets "<name>#2", then "#3", ...

Fit (fit_shared_codebooks), before any layer is quantized. For each layer of a group, in model
order: W R (R the layer's input rotation when the config asks for one), per-row scales s_r from
compute_scales (the same function on the same weight as the layer's own quantization, so the
same scales), blocks of (W R) / s, each element weighted by importance_j x s_r^2 with importance
= E[(x R)_j^2] / its mean over j: gram_importance of the rotated X^T X, the weighting the
error-feedback loop's own codebook fit uses (no importance without `calibrate`). What it uses:
the FULL-PRECISION model's calibration statistics, gathered by one forward pass of the
calibration windows through the unquantized model up front, not the sequential statistics
(inputs of quantized earlier blocks) each layer's error-feedback loop then sees: the pooled fit
needs every layer's statistics before the first layer is quantized. From each layer a seeded
sample of ceil(max_fit_blocks x n_layer / n_group) blocks (physkern.quant.codebook.fit_subset:
the top-energy quarter plus uniform draws; all blocks with max_fit_blocks None) joins the pool;
weighted k-means (fit_pooled_codebooks) runs once per group on the pool. Then each layer is
quantized as usual (sequential calibration, error feedback when configured) with the codebook
fixed: only its indices and scales are chosen.

The pool holds about max_fit_blocks blocks: K = 65536 wants several times that many (e.g.
max_fit_blocks = 262144); k larger than the pool is a ValueError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass
class SharedGroup:
    """The layers (LinearLayer, in model order) that share one codebook under `config`."""
    name: str
    config: object
    layers: list = field(default_factory=list)


@dataclass
class SharedCodebook:
    """A fitted group: codebooks [S, 1, K, d] (the one tensor every layer of it holds), the
    k-means objective after each assignment per stage (non-increasing), blocks pooled."""
    name: str
    layers: list
    codebooks: nn.Parameter
    objective: list
    fit_blocks: int


def is_shared(cfg) -> bool:
    return getattr(cfg, "method", None) == "codebook" and cfg.scope == "shared"


def layer_type(model: nn.Module, name: str) -> str:
    """A decoder layer's name after its block prefix ("model.layers.3.mlp.gate_proj" ->
    "mlp.gate_proj"); ValueError for a layer outside the transformer blocks."""
    from .sequential import iter_block_names
    for _, prefix in iter_block_names(model):
        if name.startswith(prefix + "."):
            return name[len(prefix) + 1:]
    raise ValueError(f"layers: {name!r} is outside the transformer blocks; share='type' groups "
                     "decoder layers by their name inside a block")


def plan_shared_groups(model: nn.Module, chosen) -> dict[str, SharedGroup]:
    """{group name: SharedGroup} over the chosen (LinearLayer, config) pairs whose config has
    scope "shared" (see the module docstring for the names)."""
    by_key: dict = {}
    names: dict[str, object] = {}
    for layer, cfg in chosen:
        if not is_shared(cfg):
            continue
        base = layer_type(model, layer.name) if cfg.share == "type" else "model"
        key = (base, repr(sorted(cfg.to_dict().items())))
        group = by_key.get(key)
        if group is None:
            name, i = base, 1
            while name in names:
                i += 1
                name = f"{base}#{i}"
            group = by_key[key] = SharedGroup(name, cfg)
            names[name] = group
        group.layers.append(layer)
    return {g.name: g for g in by_key.values()}


def rotated_importance(model: nn.Module, groups: dict[str, SharedGroup],
                       calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer name: [in] E[(x R)_j^2] / its mean} for every layer of a calibrated group, from one
    forward pass of the calibration windows [n, seq] through `model` as it is (unquantized);
    R = the layer's config rotation (none: x itself)."""
    from .rotation import config_rotation
    layers = [(l, g.config) for g in groups.values() if g.config.calibrate for l in g.layers]
    if not layers:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str, rotation):
        def hook(_m, inputs):
            x = inputs[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            if rotation is not None:
                x = rotation.apply(x)
            sums[name] = sums.get(name, 0) + x.double().pow(2).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = [l.module.register_forward_pre_hook(
        make_hook(l.name, config_rotation(cfg, l.in_features))) for l, cfg in layers]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(calibration.shape[0]):
                model(input_ids=calibration[i:i + 1].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for l, _ in layers:
        if l.name not in sums:
            raise ValueError(f"layer {l.name}: saw no input in the calibration pass")
        m2 = (sums[l.name] / counts[l.name]).float()
        out[l.name] = m2 / m2.mean().clamp_min(1e-30)
    return out


def _layer_blocks(layer, cfg, importance: Optional[torch.Tensor]):
    """(blocks [n, d], weights [n, d] or None) of one layer as its quantization sees them:
    rotated, divided by its per-row scales, each element weighted by importance_j x s_r^2."""
    from .quant.codebook import compute_scales
    from .rotation import config_rotation
    w = layer.weight().detach().float().cpu()
    rotation = config_rotation(cfg, w.shape[1])
    if rotation is not None:   # as physkern.rotation.rotate_problem rotates it
        w = rotation.apply(w.double()).float()
    sc, group = compute_scales(w, cfg.effective_scales(), cfg.scale_group)
    sc_full = None if sc is None else sc.float().repeat_interleave(group, 1)
    normed = w if sc_full is None else w / sc_full
    weights = None
    if importance is not None or sc_full is not None:
        weights = torch.ones_like(w)
        if importance is not None:
            weights = weights * importance[None, :]
        if sc_full is not None:
            weights = weights * sc_full.pow(2)
        weights = weights.reshape(-1, cfg.block_dim)
    return normed.reshape(-1, cfg.block_dim), weights


def pooled_blocks(group: SharedGroup, importance: dict[str, torch.Tensor]):
    """The group's pool: (blocks [M, d], weights [M, d] or None), a seeded sample of each
    layer's blocks in proportion to its size (module docstring)."""
    from .quant.codebook import fit_subset
    cfg = group.config
    d = cfg.block_dim
    for l in group.layers:
        if l.in_features % d:
            raise ValueError(f"layer {l.name}: in_features ({l.in_features}) is not divisible by "
                             f"block_dim ({d}); choose a block_dim that divides it")
    sizes = [l.out_features * l.in_features // d for l in group.layers]
    total = sum(sizes)
    m = cfg.max_fit_blocks
    gen = torch.Generator().manual_seed(cfg.seed)
    blocks, weights = [], []
    for l, n in zip(group.layers, sizes):
        b, w = _layer_blocks(l, cfg, importance.get(l.name))
        if m is not None and m < total:
            pick = fit_subset(b[None], None if w is None else w[None],
                              math.ceil(m * n / total), gen)
            b, w = b[pick], None if w is None else w[pick]
        blocks.append(b)
        weights.append(w)
    pool = torch.cat(blocks)
    return pool, (None if weights[0] is None else torch.cat(weights))


def fit_shared_codebooks(model: nn.Module, groups: dict[str, SharedGroup],
                         calibration: Optional[torch.Tensor]) -> dict[str, SharedCodebook]:
    """Fit every group's codebook (module docstring); {layer name: its group's SharedCodebook}.
    Call it before any layer of the groups is quantized (it reads their float weights, and the
    calibration pass runs the model as it is). The codebook is put on the device of the group's
    first layer's weight, once."""
    from .quant.codebook import fit_pooled_codebooks
    needs = any(g.config.calibrate for g in groups.values())
    if needs and calibration is None:
        raise ValueError("calibration: scope='shared' with calibrate needs calibration windows")
    importance = rotated_importance(model, groups, calibration) if needs else {}
    out = {}
    for name, g in groups.items():
        cfg = g.config
        pool, weights = pooled_blocks(g, importance)
        if cfg.k > pool.shape[0]:
            raise ValueError(
                f"k={cfg.k} exceeds the {pool.shape[0]} blocks pooled for shared codebook group "
                f"{name!r} ({len(g.layers)} layers, max_fit_blocks={cfg.max_fit_blocks}); "
                f"choose k <= {pool.shape[0]}, or a larger max_fit_blocks (several times k)")
        cbs, history = fit_pooled_codebooks(pool, weights, cfg.k, cfg.stages, cfg.iters,
                                            cfg.tol, cfg.seed, cfg.init, cfg.codebook_dtype)
        device = g.layers[0].weight().device
        param = nn.Parameter(cbs.to(device), requires_grad=False)
        fitted = SharedCodebook(name, [l.name for l in g.layers], param, history,
                                int(pool.shape[0]))
        out.update({l.name: fitted for l in g.layers})
    return out
