"""Lattice attention for users and for transformers models.

`lattice_attention(q, k, v, xi)` is causal attention with the decay bias -(i - j)/xi added to the
scores (see physkern/kernels/lattice_attention.py for the truncation bound). It dispatches on the
device: CUDA tensors run the Triton kernel, CPU tensors the banded torch implementation, whose cost
is O(n * D) rather than O(n^2).

Models: importing this module registers "lattice" with transformers' AttentionInterface (the
attention function) and AttentionMaskInterface (the same mask preparation as "sdpa", which passes
no mask at all for unpadded causal input). `enable_lattice(model, xi, eps)` stores xi/eps on the
model config and switches the model with `model.set_attn_implementation("lattice")`;
`disable_lattice(model)` switches back. No class is patched: every model whose attention goes
through `ALL_ATTENTION_FUNCTIONS` (GPT-2, LLaMA and most decoder models in transformers 5.x) works.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..kernels.lattice_attention import (
    DEFAULT_BLOCK, XiLike, band_limits, check_inputs, kernel_config, lattice_attention_banded,
    lattice_attention_reference, lattice_attention_triton, lattice_bias, lattice_plan,
    xi_per_head)

ATTN_NAME = "lattice"
CPU_CHUNK = 128  # queries per chunk of the banded CPU path
_CONFIG_KEYS = ("lattice_xi", "lattice_eps", "lattice_score_range")
_PREVIOUS_KEY = "_lattice_previous_attn_implementation"


# ----------------------------------------------------------------------------------------------
# work accounting
# ----------------------------------------------------------------------------------------------

@dataclass
class LatticeWork:
    """Attention work done inside a `record_work()` block, summed over calls.

    blocks_visited / blocks_causal: key tiles that the Triton kernel's tiling (block_m x block_n;
    None = the production config for the call's head dim) loads with skipping / for plain
    causal attention. The same count whether the call ran on CUDA or on the CPU path.
    oracle_blocks_visited (with oracle=True): tiles visited if the skip decision used the exact
    attention weights (skip the far key tiles that hold <= eps of every row's mass): what a
    perfect bound would do, for comparison; O(n^2) to compute, diagnostics only.
    pairs_computed / pairs_causal: (query, key) scores the path that actually ran computed
    (banded CPU path: whole chunk x band rectangles; Triton: whole visited tiles) / the causal
    count n(n+1)/2 (so exact mode reads a little above 1).
    query_blocks_skipping / query_blocks: (batch, head, query block)s that skip at least one key
    tile; max_distance: the largest truncation distance among them.
    """
    block_m: Optional[int] = None
    block_n: Optional[int] = None
    oracle: bool = False
    calls: int = 0
    blocks_visited: int = 0
    blocks_causal: int = 0
    oracle_blocks_visited: int = 0
    pairs_computed: int = 0
    pairs_causal: int = 0
    max_distance: float = 0.0
    query_blocks: int = 0
    query_blocks_skipping: int = 0
    tiles: set = field(default_factory=set)
    paths: dict = field(default_factory=dict)

    @property
    def fraction_blocks_visited(self) -> float:
        return self.blocks_visited / self.blocks_causal if self.blocks_causal else float("nan")

    @property
    def fraction_oracle_blocks_visited(self) -> float:
        if not self.oracle or not self.blocks_causal:
            return float("nan")
        return self.oracle_blocks_visited / self.blocks_causal

    @property
    def fraction_pairs_computed(self) -> float:
        return self.pairs_computed / self.pairs_causal if self.pairs_causal else float("nan")

    def to_dict(self) -> dict:
        return {"tiles": sorted(self.tiles), "calls": self.calls,
                "blocks_visited": self.blocks_visited, "blocks_causal": self.blocks_causal,
                "fraction_blocks_visited": self.fraction_blocks_visited,
                "oracle_blocks_visited": self.oracle_blocks_visited if self.oracle else None,
                "fraction_oracle_blocks_visited": self.fraction_oracle_blocks_visited,
                "pairs_computed": self.pairs_computed, "pairs_causal": self.pairs_causal,
                "fraction_pairs_computed": self.fraction_pairs_computed,
                "query_blocks": self.query_blocks,
                "query_blocks_skipping": self.query_blocks_skipping,
                "max_truncation_distance": self.max_distance, "paths": dict(self.paths)}


_RECORDERS: list[LatticeWork] = []


@contextlib.contextmanager
def record_work(block_m: Optional[int] = None, block_n: Optional[int] = None,
                oracle: bool = False) -> Iterator[LatticeWork]:
    """Collect the attention work of every lattice_attention call inside the block.

    block_m / block_n: the tiling to count key tiles in (None: the Triton production config for
    each call's head dim). oracle: also count the tiles exact attention weights would need.
    """
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    work = LatticeWork(block_m=block_m, block_n=block_n, oracle=oracle)
    _RECORDERS.append(work)
    try:
        yield work
    finally:
        _RECORDERS.remove(work)


def _causal_pairs(n_q: int, n_kv: int) -> int:
    off = n_kv - n_q
    return n_q * (off + 1) + n_q * (n_q - 1) // 2


def oracle_start_blocks(q, k, xi, eps: Optional[float], scale: float, block_m: int,
                        block_n: int) -> torch.Tensor:
    """First key tile per (batch, head, query block) if skipping used the exact attention
    weights: the longest prefix of key tiles holding <= eps of every row's mass (the diagonal
    tile never skipped). O(n^2): diagnostics only. Returns int64 [B, Hq, n_q_blocks]."""
    plan = lattice_plan(q, k, xi, None, scale, block_m, block_n)
    if eps is None:
        return plan.start_block.long()
    p = lattice_attention_probs(q, k, xi, scale)                      # [B, Hq, n_q, n_kv]
    bsz, hq, n_q, n_kv = p.shape
    n_kb = -(-n_kv // block_n)
    pad = n_kb * block_n - n_kv
    mass = torch.nn.functional.pad(p, (0, pad)).view(bsz, hq, n_q, n_kb, block_n).sum(-1)
    before = torch.cumsum(mass, dim=-1)                               # mass of tiles <= kb
    n_qb = plan.start_block.shape[-1]
    rows_pad = n_qb * block_m - n_q
    before = torch.nn.functional.pad(before, (0, 0, 0, rows_pad), value=0.0)
    worst = before.view(bsz, hq, n_qb, block_m, n_kb).amax(dim=3)     # [B, Hq, n_qb, n_kb]
    allowed = torch.arange(n_kb)[None, :] < (plan.end_block - 1)[:, None]   # not the last tile
    ok = (worst <= eps) & allowed[None, None].to(worst.device)
    return torch.cumprod(ok.long(), dim=-1).sum(dim=-1).cpu()


def lattice_attention_probs(q, k, xi, scale: float) -> torch.Tensor:
    """Exact attention weights with the lattice bias, float32 [B, Hq, n_q, n_kv]."""
    hq = q.shape[1]
    kk = k.float().repeat_interleave(hq // k.shape[1], dim=1)
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    s = s + lattice_bias(q.shape[2], k.shape[2], xi, hq, q.device, torch.float32)[None]
    return torch.softmax(s, dim=-1)


def _record(q, k, xi, eps, scale, score_range, path: str, plan_run) -> None:
    bsz, hq, n_q, d = q.shape
    n_kv = k.shape[2]
    for work in _RECORDERS:
        cfg_m, cfg_n, _, _ = kernel_config(d)
        bm, bn = work.block_m or cfg_m, work.block_n or cfg_n
        work.tiles.add((bm, bn))
        plan = plan_run if (plan_run.block_m == bm and plan_run.block_n == bn) \
            else lattice_plan(q, k, xi, eps, scale, bm, bn, score_range)
        work.calls += 1
        work.blocks_visited += plan.blocks_visited
        work.blocks_causal += plan.blocks_causal
        if work.oracle:
            start = oracle_start_blocks(q, k, xi, eps, scale, bm, bn)
            work.oracle_blocks_visited += int((plan.end_block[None, None, :] - start).sum())
        finite = plan.distance[torch.isfinite(plan.distance)]
        if finite.numel():
            work.max_distance = max(work.max_distance, float(finite.max()))
        work.query_blocks += plan.distance.numel()
        work.query_blocks_skipping += finite.numel()
        work.pairs_causal += _causal_pairs(n_q, n_kv) * bsz * hq
        work.pairs_computed += _pairs_computed(plan_run, path)
        work.paths[path] = work.paths.get(path, 0) + 1


def _pairs_computed(plan, path: str) -> int:
    """(query, key) scores computed by the path that ran, summed over batch and heads: whole
    visited tiles for Triton; for the banded path every batch row and head computes its chunk's
    band (the union of the per-head bands)."""
    n_q, n_kv = plan.n_q, plan.n_kv
    bm, bn = plan.block_m, plan.block_n
    start = plan.start_block.long()
    rows = torch.clamp(n_q - torch.arange(start.shape[-1]) * bm, max=bm)
    key_end = torch.clamp(plan.end_block * bn, max=n_kv)
    if path == "triton":
        return int((rows[None, None, :] * (key_end[None, None, :] - start * bn)).sum())
    band = sum((min(bm, n_q - c * bm)) * (k1 - k0) for c, (k0, k1) in enumerate(band_limits(plan)))
    return band * start.shape[0] * start.shape[1]


# ----------------------------------------------------------------------------------------------
# the function
# ----------------------------------------------------------------------------------------------

def lattice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xi: XiLike,
                      causal: bool = True, eps: Optional[float] = None,
                      scale: Optional[float] = None,
                      score_range: Optional[float] = None) -> torch.Tensor:
    """Causal attention with the lattice bias -(i - j)/xi.

    q: [batch, heads, n_q, head_dim]; k, v: [batch, kv_heads, n_kv, head_dim] with kv_heads
    dividing heads (GQA) and n_q <= n_kv (queries are the last n_q positions).
    xi: scalar or one value per query head, > 0; inf = plain causal attention.
    eps: None = exact (every causal key visited); in (0, 1): skip keys farther than the derived
    truncation distance, dropping < eps of each row's softmax mass (output error
    <= 2 eps max|v| per coordinate). score_range: assert a bound on each row's score range
    instead of the provable data-derived one. scale: default head_dim ** -0.5.
    Returns [batch, heads, n_q, head_dim] in q's dtype.

    CUDA tensors run the Triton kernel (forward only; with autograd enabled on a tensor that needs
    grad the banded torch path runs instead); CPU tensors run the banded torch path.
    """
    check_inputs(q, k, v, causal, eps)
    xi_per_head(xi, q.shape[1])
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    if q.is_cuda and not needs_grad:
        bm, bn, _, _ = kernel_config(d)
        plan = lattice_plan(q, k, xi, eps, scale, bm, bn, score_range)
        out = lattice_attention_triton(q, k, v, xi, eps, scale, plan=plan, block_m=bm,
                                       block_n=bn)
        path = "triton"
    else:
        plan = lattice_plan(q, k, xi, eps, scale, CPU_CHUNK, DEFAULT_BLOCK, score_range)
        out = lattice_attention_banded(q, k, v, xi, eps, scale, chunk=CPU_CHUNK, plan=plan)
        path = "banded"
    if _RECORDERS:
        _record(q, k, xi, eps, scale, score_range, path, plan)
    return out


# ----------------------------------------------------------------------------------------------
# transformers integration
# ----------------------------------------------------------------------------------------------

def lattice_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                              dropout: float = 0.0, scaling: Optional[float] = None,
                              is_causal: Optional[bool] = None, **kwargs):
    """transformers attention function ("lattice"): query [B, Hq, n_q, d], key/value
    [B, Hkv, n_kv, d] -> (output [B, n_q, Hq, d], None).

    xi/eps come from module.config (set by enable_lattice). Without a mask (unpadded causal input)
    the fast paths run; with a padding or custom mask the bias is added to that mask and sdpa runs
    (O(n^2), correct).
    """
    cfg = module.config
    xi = getattr(cfg, "lattice_xi", None)
    if xi is None:
        raise ValueError("lattice attention: the model config has no lattice_xi; use "
                         "physkern.enable_lattice(model, xi) to switch a model to it")
    eps = getattr(cfg, "lattice_eps", None)
    score_range = getattr(cfg, "lattice_score_range", None)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError("lattice attention supports causal (decoder) self-attention only; this "
                         f"{type(module).__name__} is not causal")
    if dropout and dropout > 0.0:
        raise ValueError(f"lattice attention has no attention dropout (got dropout={dropout}); "
                         "call model.eval() or set the attention dropout to 0")
    for unsupported in ("softcap", "sliding_window", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"lattice attention does not support {unsupported}")
    if attention_mask is None:
        out = lattice_attention(query, key, value, xi, True, eps, scaling, score_range)
    else:
        out = _masked_reference(query, key, value, xi, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _masked_reference(q, k, v, xi, mask, scale):
    """Padding / custom masks: bias + mask through sdpa, float32 softmax."""
    hq, n_q, n_kv = q.shape[1], q.shape[2], k.shape[2]
    bias = lattice_bias(n_q, n_kv, xi, hq, q.device, torch.float32).clamp(min=-1e30)
    mask = mask[..., :n_kv]
    if mask.dtype == torch.bool:
        full = bias[None].masked_fill(~mask, float("-inf"))
    else:
        full = bias[None] + mask.float()
    rep = hq // k.shape[1]
    kk = k.float().repeat_interleave(rep, dim=1) if rep > 1 else k.float()
    vv = v.float().repeat_interleave(rep, dim=1) if rep > 1 else v.float()
    # Fully masked rows (left padding) would give NaN; they are ignored downstream, return 0.
    dead = torch.isinf(full).all(dim=-1, keepdim=True) & (full < 0).all(dim=-1, keepdim=True)
    full = full.masked_fill(dead, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=full,
                                                           scale=scale)
    return out.masked_fill(dead, 0.0).to(q.dtype)


def register() -> None:
    """Register "lattice" with transformers (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_NAME, lattice_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


register()


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def enable_lattice(model: nn.Module, xi: XiLike, eps: Optional[float] = None,
                   score_range: Optional[float] = None) -> nn.Module:
    """Switch a transformers model to lattice attention; returns the model.

    xi: > 0, scalar or one value per attention head (inf = plain causal); eps: None = exact, or
    in (0, 1) to skip keys beyond the derived truncation distance. Calling it again updates
    xi/eps; disable_lattice restores the previous implementation.
    """
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise ValueError("model: expected a transformers PreTrainedModel, got "
                         f"{type(model).__name__}")
    heads = getattr(model.config, "num_attention_heads", None)
    if heads is None:
        raise ValueError("model: its config has no num_attention_heads")
    xi_h = xi_per_head(xi, heads)
    if eps is not None and not (0.0 < float(eps) < 1.0):
        raise ValueError(f"eps must lie in (0, 1) (or be None for exact attention), got {eps}")
    if score_range is not None and not score_range >= 0:
        raise ValueError(f"score_range must be >= 0, got {score_range}")
    if not model._can_set_attn_implementation():
        raise ValueError(f"model: {type(model).__name__} does not dispatch attention through "
                         "transformers' AttentionInterface, so lattice attention cannot be set")
    xi_value = float(xi_h[0]) if bool((xi_h == xi_h[0]).all()) else xi_h.tolist()
    for cfg in _configs(model):
        if cfg._attn_implementation != ATTN_NAME:
            setattr(cfg, _PREVIOUS_KEY, cfg._attn_implementation)
        cfg.lattice_xi = xi_value
        cfg.lattice_eps = None if eps is None else float(eps)
        cfg.lattice_score_range = None if score_range is None else float(score_range)
    model.set_attn_implementation(ATTN_NAME)
    return model


def disable_lattice(model: nn.Module) -> nn.Module:
    """Undo enable_lattice: restore the previous attention implementation and drop xi/eps."""
    previous = getattr(model.config, _PREVIOUS_KEY, None)
    if model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation(previous or "sdpa")
    for cfg in _configs(model):
        for key in _CONFIG_KEYS + (_PREVIOUS_KEY,):
            if hasattr(cfg, key):
                delattr(cfg, key)
    return model


__all__ = ["lattice_attention", "lattice_attention_forward", "lattice_attention_reference",
           "enable_lattice", "disable_lattice", "record_work", "LatticeWork", "register"]
