"""RG-guided pruning by truncated SVD, and a fair comparison of pruning rules.

A layer's weight W [out, in] is replaced by its rank-r truncated SVD stored as two factors,
up [out, r] and down [r, in] (`LowRankLinear`). The factors hold r * (out + in) numbers against
out * in for the dense weight, so a layer is factorised only where r * (out + in) < out * in;
elsewhere it stays dense and removes nothing.

Ranks are chosen per weight type (one relative rank for every layer of a type). Rules say which
types are compressed:

- "seeds":    the seeds' RG rule (000_*.txt, Direction 2): compress the input projections
              (GPT-2 attn.c_attn, mlp.c_fc; LLaMA q, k, v, gate, up), keep the output projections
              (those that write into the residual stream: attn/mlp c_proj; o_proj, down_proj).
- "opposite": compress the output projections, keep the input projections.
- "uniform":  compress every type at the same relative rank.

`ranks_for_target` finds, for one rule, the relative rank that removes a requested number of
parameters, so rules are compared at (nearly) equal parameters removed; the exact counts are
reported because ranks are integers.

Counting: `factor_parameters` / `dense_parameters` / `storage_bytes` below count what the factors
store (both factors, plus the bias once, at the model's element width). `LowRankLinear` also
exposes `weight_numel()` / `storage_bits()`, the interface through which
physkern.quant.accounting (the project's one bit counter) sees compressed modules; the small
helpers here exist so pruning can be planned without building modules.
"""
from __future__ import annotations

import argparse
import copy
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..linear import LinearLayer, replace_layer

RULES = ("seeds", "opposite", "uniform")
# Last name parts of projections that write into the residual stream (output projections).
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "c_proj", "out_proj", "dense_4h_to_h", "fc2",
                      "wo", "w2")


# ----------------------------------------------------------------------------------------------
# counting (planning helpers; see module docstring)


def dense_parameters(out_features: int, in_features: int) -> int:
    """Numbers a dense [out, in] weight stores."""
    return out_features * in_features


def factor_parameters(out_features: int, in_features: int, rank: int) -> int:
    """Numbers the two factors up [out, rank] and down [rank, in] store together."""
    return rank * (out_features + in_features)


def saves_bytes(out_features: int, in_features: int, rank: int) -> bool:
    """True when the two factors store fewer numbers than the dense weight (same dtype)."""
    return factor_parameters(out_features, in_features, rank) < \
        dense_parameters(out_features, in_features)


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factors are smaller than the dense weight."""
    return (out_features * in_features - 1) // (out_features + in_features)


def storage_bytes(out_features: int, in_features: int, rank: Optional[int],
                  element_bytes: int = 4, bias: bool = False) -> int:
    """Bytes a layer stores: dense (rank None) or as factors; bias counted once."""
    n = dense_parameters(out_features, in_features) if rank is None else \
        factor_parameters(out_features, in_features, rank)
    return (n + (out_features if bias else 0)) * element_bytes


# ----------------------------------------------------------------------------------------------
# the module


def truncated_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of weight [out, in] as (up [out, rank], down [rank, in]).

    up @ down is the best rank-`rank` approximation in Frobenius norm; sqrt(S) goes into each
    factor so both have comparable scale. Computed in float64, returned in weight's dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}] for a {tuple(weight.shape)} weight, "
                         f"got {rank}")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(weight.dtype)
    down = (root[:, None] * vh[:rank]).to(weight.dtype)
    return up.contiguous(), down.contiguous()


class LowRankLinear(nn.Module):
    """y = (x @ down^T) @ up^T + bias: a drop-in for nn.Linear and GPT-2 Conv1D.

    up: [out_features, rank]; down: [rank, in_features]; bias: [out_features] or None.
    """

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"factors must be up [out, r] and down [r, in], got "
                             f"{tuple(up.shape)} and {tuple(down.shape)}")
        self.up = nn.Parameter(up, requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.out_features, self.rank = up.shape
        self.in_features = down.shape[1]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rank: int,
                    bias: Optional[torch.Tensor] = None) -> "LowRankLinear":
        """Factorise weight [out, in] at `rank` (truncated SVD)."""
        up, down = truncated_svd_factors(weight, rank)
        return cls(up, down, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # factors stored at 16 bits are computed in the input's dtype (fp32 for the model)
        down = self.down if self.down.dtype == x.dtype else self.down.to(x.dtype)
        up = self.up if self.up.dtype == x.dtype else self.up.to(x.dtype)
        y = (x @ down.t()) @ up.t()
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def weight(self) -> torch.Tensor:
        """The [out, in] weight this layer computes with (materialised; float32 for 16-bit
        factors)."""
        if self.up.dtype in (torch.float16, torch.bfloat16):
            return self.up.float() @ self.down.float()
        return self.up @ self.down

    # the accounting interface (physkern.quant.accounting)
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def storage_bits(self) -> dict:
        return {"up": self.up.numel() * self.up.element_size() * 8,
                "down": self.down.numel() * self.down.element_size() * 8}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"rank={self.rank}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------
# rules and ranks


def is_output_projection(weight_type: str) -> bool:
    """True for projections that write into the residual stream (see OUTPUT_PROJECTIONS)."""
    return weight_type.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS


def compressed_types(types: Sequence[str], rule: str) -> list[str]:
    """The weight types a rule compresses."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "uniform":
        return list(types)
    outputs = [t for t in types if is_output_projection(t)]
    inputs = [t for t in types if not is_output_projection(t)]
    if not outputs or not inputs:
        raise ValueError(f"cannot tell input from output projections among {list(types)}")
    return inputs if rule == "seeds" else outputs


def ranks_at_fraction(groups: dict, types: Sequence[str], fraction: float) -> dict[str, int]:
    """Rank floor(fraction * min(out, in)) (at least 1) for each type in `types`."""
    out = {}
    for t in types:
        o, i = groups[t][0].out_features, groups[t][0].in_features
        out[t] = max(1, min(min(o, i), int(math.floor(fraction * min(o, i)))))
    return out


def parameters_removed(groups: dict, ranks: dict[str, int]) -> int:
    """Parameters removed by factorising every layer of each type at its rank, where that
    saves bytes (other layers stay dense and remove nothing)."""
    total = 0
    for t, r in ranks.items():
        for layer in groups[t]:
            o, i = layer.out_features, layer.in_features
            if saves_bytes(o, i, r):
                total += dense_parameters(o, i) - factor_parameters(o, i, r)
    return total


def total_parameters(groups: dict) -> int:
    """Dense parameters of every layer in the groups."""
    return sum(dense_parameters(l.out_features, l.in_features) for ls in groups.values()
               for l in ls)


def ranks_for_target(groups: dict, types: Sequence[str], target_removed: int) -> dict:
    """One relative rank for the given types that removes about `target_removed` parameters.

    Removed parameters fall as the relative rank grows; bisection finds the largest relative rank
    that still removes at least the target, then the neighbouring candidate closer to the target
    is taken. Returns {"fraction", "ranks", "removed"}. Raises ValueError if even rank 1 cannot
    remove the target.
    """
    if target_removed <= 0:
        raise ValueError(f"target parameters removed must be positive, got {target_removed}")
    most = parameters_removed(groups, ranks_at_fraction(groups, types, 0.0))
    if most < target_removed:
        raise ValueError(f"compressing {list(types)} removes at most {most:,} parameters "
                         f"(rank 1), less than the requested {target_removed:,}")
    lo, hi = 0.0, 1.0  # removed(lo) >= target > removed(hi) (at full rank nothing is removed)
    for _ in range(60):
        mid = (lo + hi) / 2
        if parameters_removed(groups, ranks_at_fraction(groups, types, mid)) >= target_removed:
            lo = mid
        else:
            hi = mid
    cands = []
    for f in (lo, hi):
        ranks = ranks_at_fraction(groups, types, f)
        cands.append({"fraction": f, "ranks": ranks,
                      "removed": parameters_removed(groups, ranks)})
    return min(cands, key=lambda c: abs(c["removed"] - target_removed))


def top_singular_triplets(weight: torch.Tensor, rank: int):
    """The `rank` leading singular triplets (u [out, rank], s [rank], vh [rank, in]), float64,
    from an eigendecomposition of the smaller Gram matrix (much faster than an SVD on
    CPU). Accurate for singular values well above sqrt(1e-16) * sigma_max, which holds for every
    rank that saves bytes on real weights; `truncated_svd_factors` uses a full SVD instead."""
    w = weight.detach().double()
    tall = w.shape[0] >= w.shape[1]
    import numpy as np  # numpy's LAPACK eigh is ~10x cheaper than torch's on this CPU build
    evals, evecs = (torch.from_numpy(a) for a in np.linalg.eigh((w.T @ w if tall else w @ w.T)
                                                                .cpu().numpy()))
    order = torch.argsort(evals, descending=True)[:rank]
    s = evals[order].clamp(min=0).sqrt()
    vecs = evecs[:, order]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if tall:   # vecs are right singular vectors
        return (w @ vecs) / safe, s, vecs.T
    return vecs, s, (vecs.T @ w) / safe[:, None]


class SVDCache:
    """Singular triplets of each layer, truncated to its break-even rank (the largest rank that
    can ever be used), so that trying several rank plans costs one SVD per layer."""

    def __init__(self):
        self._store: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def factors(self, layer: LinearLayer, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, rank], down [rank, in]) as truncated_svd_factors gives them."""
        w = layer.weight()
        if layer.name not in self._store:
            keep = max(1, break_even_rank(layer.out_features, layer.in_features))
            u, s, vh = top_singular_triplets(w, keep)
            self._store[layer.name] = (u.float(), s, vh.float())
        u, s, vh = self._store[layer.name]
        if rank > s.numel():
            return truncated_svd_factors(w, rank)
        root = s[:rank].sqrt()
        up = (u[:, :rank].double() * root).to(w.dtype).contiguous()
        down = (root[:, None] * vh[:rank].double()).to(w.dtype).contiguous()
        return up, down


def prune_model(model: nn.Module, groups: dict, ranks: dict[str, int],
                svd_cache: Optional[SVDCache] = None) -> list[dict]:
    """Factorise, in place, every layer of each type in `ranks` where that saves bytes.

    groups: weight type -> [LinearLayer] (physkern.research.analysis._common.weight_groups).
    svd_cache: reuse SVDs across calls (keyed by layer name, so only for copies of one model).
    Returns one record per layer considered: name, shape, rank, factorised, parameters before and
    after.
    """
    records = []
    for t, r in ranks.items():
        for layer in groups[t]:
            o, i = layer.out_features, layer.in_features
            rec = {"name": layer.name, "type": t, "shape": [o, i], "rank": r,
                   "dense_parameters": dense_parameters(o, i)}
            if saves_bytes(o, i, r):
                if svd_cache is None:
                    new = LowRankLinear.from_weight(layer.weight(), r, layer.bias)
                else:
                    new = LowRankLinear(*svd_cache.factors(layer, r), layer.bias)
                replace_layer(model, layer.name, new)
                rec.update(factorised=True, parameters=factor_parameters(o, i, r))
            else:
                rec.update(factorised=False, parameters=dense_parameters(o, i))
            records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------
# comparison


def compare_rules(model: nn.Module, tokens: torch.Tensor, window: int,
                  removed_fractions: Sequence[float], rules: Sequence[str] = RULES,
                  batch_size: int = 1, progress: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> dict:
    """Perplexity of each rule at each fraction of decoder linear parameters removed.

    model is not modified (each configuration prunes a deep copy). tokens: 1-D evaluation
    stream; non-overlapping windows of `window`. log: called with a line after each run.
    Returns {"baseline": ppl, "total_parameters",
    "runs": [{rule, target_fraction, removed, removed_fraction, fraction, ranks, perplexity,
    layers_factorised}]}.
    """
    from .analysis._common import weight_groups
    from ..eval import perplexity
    groups = weight_groups(model)
    total = total_parameters(groups)
    base = perplexity(model, tokens, window, batch_size=batch_size, progress=progress)
    if log:
        log(f"unpruned: perplexity {base.perplexity:.3f}")
    cache = SVDCache()
    runs = []
    for frac in removed_fractions:
        if not 0 < frac < 1:
            raise ValueError(f"removed fractions must be in (0, 1), got {frac}")
        target = int(round(frac * total))
        for rule in rules:
            plan = ranks_for_target(groups, compressed_types(list(groups), rule), target)
            pruned = copy.deepcopy(model)
            records = prune_model(pruned, weight_groups(pruned), plan["ranks"], cache)
            res = perplexity(pruned, tokens, window, batch_size=batch_size, progress=progress)
            runs.append({"rule": rule, "target_fraction": frac, "target_removed": target,
                         "removed": plan["removed"], "removed_fraction": plan["removed"] / total,
                         "relative_rank": plan["fraction"], "ranks": plan["ranks"],
                         "layers_factorised": sum(r["factorised"] for r in records),
                         "perplexity": res.perplexity})
            if log:
                log(f"{rule} at {frac:g}: removed {plan['removed']:,}, perplexity "
                    f"{res.perplexity:.3f}")
            del pruned
    return {"baseline_perplexity": base.perplexity, "total_parameters": total,
            "tokens_scored": base.tokens_scored, "window": window, "runs": runs}


def plot_comparison(result: dict, path) -> None:
    """Perplexity vs fraction of parameters removed, one line per rule."""
    from .analysis._common import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule in dict.fromkeys(r["rule"] for r in result["runs"]):
        pts = sorted((r["removed_fraction"], r["perplexity"]) for r in result["runs"]
                     if r["rule"] == rule)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=rule)
    ax.axhline(result["baseline_perplexity"], color="k", ls="--", lw=0.8, label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("decoder linear parameters removed (%)")
    ax.set_ylabel("perplexity")
    ax.set_title("Truncated-SVD pruning: which types to compress")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
