"""Per-layer sensitivity and bit allocation across layers.

Sensitivities (one number per decoder linear layer; all computed on CALIBRATION text only):

- `isolation_sensitivity`: quantize ONE layer with a config (the rest stays full precision),
  measure the perplexity on calibration windows, restore the layer: dPPL = PPL_q - PPL_fp.
  (The seeds' Exp 18, but on calibration text instead of the evaluation split.)
- `fisher_diagonal` / `fisher_sensitivity`: the empirical diagonal Fisher of every weight,
      F_ij = sum over calibration windows b of (dL_b / dW_ij)^2,
  where L_b is the summed next-token NLL of window b (window-level gradients: one backward per
  window, the usual cheap estimator; per-token gradients would need one backward per token).
  A layer's sensitivity is trace(F) = sum_ij F_ij (`fisher_sensitivity(..., reduce="sum")`) or
  its mean per weight (reduce="mean"). `fisher_quant_cost` gives the second-order estimate of the
  loss increase of a concrete quantization, 0.5 * sum_ij F_ij (Q_ij - W_ij)^2 / n_windows.
- `entropy_sensitivity`: Shannon entropy (bits, Miller-Madow) of each layer's input activations,
  from physkern.research.histogram.activation_entropy (the project's streaming-histogram op).

Allocators (each returns per-layer choices and an `overrides` dict {layer name: config} usable
as `config.overrides`; layer names contain no glob characters, so each matches exactly itself):

- `entropy_linear`: the seeds' rule, fixed: bits linear in entropy over [lo, hi], offset solved so
  the (optionally weight-count-weighted) mean equals the budget, integers by largest remainder.
- `top_n`: the N most sensitive layers get the big option, the rest the small one.
- `greedy_allocation`: start every layer at its cheapest option, repeatedly take the upgrade with
  the largest cost decrease per extra stored bit that still fits the budget.
- `knapsack_allocation`: exact multiple-choice knapsack. Each option has its TRUE stored bits for
  that layer's shape (`option_bits`, counted by physkern.quant.accounting on the format the
  quantizer produces) and a cost; minimise the summed cost subject to summed stored bits <= budget.
  Dynamic programming over total stored bits in units of g = gcd of all option bit counts' offsets
  from each layer's cheapest option, so every state is an exact integer bit count: the result is
  the exact optimum on true stored bits. Where that state space is too large (> max_states), a
  coarser `unit` can be given: each option's extra bits are rounded UP to a multiple of it, so the
  budget still holds on true bits and the result is optimal for the rounded bit counts (reported).

- `combined_allocation` (issue 21.4): both criteria at once. `combined_sensitivity` scores
  each layer by a weighted geometric mean of its normalised entropy and normalised per-weight
  Fisher, s = e^w f^(1-w) (w = 1: entropy alone, w = 0: Fisher alone); `sensitivity_allocation`
  then solves the knapsack with cost s_i * n_i * 4^(-bits_i / n_i) per option (the high-rate
  distortion model) on true stored bits, so every criterion is allocated by the same solver and
  compared at the same budget.

`correlation` gives Pearson and Spearman coefficients between two sensitivity dicts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..config import AnyConfig, CodebookConfig, GPTQConfig, ScalarConfig  # noqa: F401
from ..models import LinearLayer, decoder_linear_layers, replace_layer


# ----------------------------------------------------------------------------------------------
# true bits of a config on a layer shape


_BITS_CACHE: dict = {}


def _storage_probe_config(cfg: AnyConfig) -> AnyConfig:
    """A config with the same storage format as `cfg` but data-independent and cheap to run
    (each method's config says how: its `storage_probe()`, physkern/methods/)."""
    return cfg.storage_probe()


def option_bits(cfg: AnyConfig, out_features: int, in_features: int) -> int:
    """True stored bits of the QuantizedLinear `cfg` produces for an [out, in] weight (bias
    excluded): the quantizer runs on a seeded random weight of that shape with a storage-equivalent
    probe config and physkern.quant.accounting counts the result. Cached per (config, shape).

    Raises ValueError when `cfg` cannot quantize that shape (e.g. K larger than a scope's blocks).
    """
    from ..api import quantize_weight
    from ..layers import QuantizedLinear
    from ..quant.accounting import layer_bits
    probe = _storage_probe_config(cfg)
    key = (repr(sorted(probe.to_dict().items(), key=lambda kv: kv[0])), out_features, in_features)
    if key not in _BITS_CACHE:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(out_features, in_features, generator=gen)
        qw = quantize_weight(w, probe)
        _BITS_CACHE[key] = int(layer_bits(QuantizedLinear(qw))["total_bits"])
    return _BITS_CACHE[key]


# ----------------------------------------------------------------------------------------------
# sensitivities


def _windows_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> tuple[float, int]:
    """Summed NLL (every position but the first of each window) and the number of tokens scored."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size].to(device)
            logits = model(input_ids=ids).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1)
            total += float(-lp.gather(-1, ids[:, 1:, None]).sum())
            n += ids[:, 1:].numel()
    return total, n


def windows_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp(mean NLL) over token windows [n, seq] (each window's first token is context only)."""
    total, n = _windows_nll(model, windows, batch_size)
    return math.exp(total / n)


def _check_windows(name: str, windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError(f"{name} must be an int64 tensor [n_windows, seq] of token ids from "
                         f"CALIBRATION text (physkern.calibration_windows)")


def _select(model: nn.Module, layers: Optional[Iterable[str]]) -> list[LinearLayer]:
    all_layers = decoder_linear_layers(model)
    if layers is None:
        return all_layers
    wanted = list(layers)
    by_name = {l.name: l for l in all_layers}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(f"layers: {missing} are not decoder linear layers (e.g. "
                         f"{[l.name for l in all_layers[:3]]})")
    return [by_name[n] for n in wanted]


def isolation_sensitivity(model: nn.Module, config: AnyConfig, calibration: torch.Tensor,
                          score_windows: Optional[torch.Tensor] = None,
                          layers: Optional[Iterable[str]] = None, batch_size: int = 1,
                          progress: bool = False) -> dict[str, float]:
    """dPPL of quantizing each layer alone: {layer name: PPL_q - PPL_fp}.

    config: the config applied to the one layer (its `for_layer(name)` override is used).
    calibration: [n, seq] calibration windows; they feed the layer's statistics (E[x^2], X^T X,
      measured on the full-precision model) and, unless `score_windows` is given, are also the
      text the perplexity is measured on. Both must come from calibration text, never evaluation
      text. The model is restored after each layer.
    """
    from ..api import quantize_weight
    from ..calib import Gram, SecondMoment, collect_statistics
    from ..layers import QuantizedLinear
    _check_windows("calibration", calibration)
    score = calibration if score_windows is None else score_windows
    _check_windows("score_windows", score)
    chosen = _select(model, layers)
    base = windows_perplexity(model, score, batch_size)
    need_h = any(config.for_layer(l.name).needs_hessian for l in chosen)
    need_m2 = any(config.for_layer(l.name).needs_calibration for l in chosen)
    factories = {}
    if need_h:
        factories["gram"] = lambda l: Gram(l.in_features)
    elif need_m2:
        factories["m2"] = lambda l: SecondMoment(l.in_features)
    stats = collect_statistics(model, calibration, factories, chosen, progress=progress) \
        if factories else {}
    out = {}
    for l in chosen:
        cfg = config.for_layer(l.name)
        st = stats.get(l.name, {})
        gram = st["gram"].value if "gram" in st else None
        m2 = st["m2"].value if "m2" in st else (
            torch.diagonal(gram) / st["gram"].count if gram is not None else None)
        w = l.weight().detach().float()
        qw = quantize_weight(w, cfg, m2, gram)
        old = replace_layer(model, l.name, QuantizedLinear(qw.to(w.device), l.bias, l.kind))
        try:
            out[l.name] = windows_perplexity(model, score, batch_size) - base
        finally:
            replace_layer(model, l.name, old)
    return out


def _window_gradients(model: nn.Module, calibration: torch.Tensor, chosen: list):
    """Yield, per calibration window b, the gradients of L_b (summed next-token NLL of window b)
    w.r.t. the chosen layers' weights, as stored (GPT-2 Conv1D: [in, out]). Only those weights
    track gradients meanwhile; every parameter's requires_grad flag is restored afterwards."""
    params = [l.module.weight for l in chosen]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        for b in range(calibration.shape[0]):
            ids = calibration[b:b + 1].to(params[0].device)
            lp = torch.log_softmax(model(input_ids=ids).logits.float()[:, :-1], -1)
            loss = -lp.gather(-1, ids[:, 1:, None]).sum()
            yield torch.autograd.grad(loss, params)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def fisher_diagonal(model: nn.Module, calibration: torch.Tensor,
                    layers: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of each layer's weight: {name: F [out, in] float64}.

    F_ij = sum_b (dL_b/dW_ij)^2 over calibration windows b, L_b = summed next-token NLL of
    window b (canonical [out, in] orientation, also for GPT-2 Conv1D). Parameters' requires_grad
    flags are restored afterwards; the model's weights are not changed.
    """
    _check_windows("calibration", calibration)
    chosen = _select(model, layers)
    acc = {l.name: torch.zeros(l.out_features, l.in_features, dtype=torch.float64) for l in chosen}
    for grads in _window_gradients(model, calibration, chosen):
        for l, g in zip(chosen, grads):
            g = g.t() if l.kind == "conv1d" else g
            acc[l.name] += g.detach().double().cpu().pow(2)
    return acc


def fisher_trace(model: nn.Module, calibration: torch.Tensor,
                 layers: Optional[Iterable[str]] = None) -> dict[str, dict[str, float]]:
    """trace and mean of each layer's empirical diagonal Fisher without storing F: equal to
    fisher_sensitivity(fisher_diagonal(...), "sum" / "mean"), memory O(1) per layer.
    Returns {name: {"sum": trace(F), "mean": trace(F) / (out * in)}}."""
    _check_windows("calibration", calibration)
    chosen = _select(model, layers)
    acc = {l.name: 0.0 for l in chosen}
    for grads in _window_gradients(model, calibration, chosen):
        for l, g in zip(chosen, grads):
            acc[l.name] += float(g.double().pow(2).sum())
    return {l.name: {"sum": acc[l.name], "mean": acc[l.name] / (l.out_features * l.in_features)}
            for l in chosen}


def fisher_sensitivity(fisher: Mapping[str, torch.Tensor], reduce: str = "sum") -> dict[str, float]:
    """One number per layer from `fisher_diagonal`: trace (reduce="sum") or mean per weight."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return {n: float(f.sum() if reduce == "sum" else f.mean()) for n, f in fisher.items()}


def fisher_quant_cost(fisher: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor,
                      n_windows: int) -> float:
    """0.5 * sum F_ij (Q_ij - W_ij)^2 / n_windows: second-order loss increase per window."""
    e = (quantized.double().cpu() - weight.double().cpu())
    return float(0.5 * (fisher * e.pow(2)).sum() / max(n_windows, 1))


def entropy_sensitivity(model: nn.Module, calibration: torch.Tensor, bins: int = 256,
                        layers: Optional[Iterable[str]] = None) -> dict[str, float]:
    """Input-activation entropy (bits, Miller-Madow) per layer, physkern.research.histogram's statistic."""
    _check_windows("calibration", calibration)
    from .histogram import activation_entropy
    chosen = _select(model, layers)
    ent = activation_entropy(model, calibration, bins=bins, per_channel=False, layers=chosen)
    return {n: e.entropy for n, e in ent.items()}


def correlation(a: Mapping[str, float], b: Mapping[str, float]) -> dict:
    """Pearson and Spearman coefficients (and p-values) over the layers both dicts share."""
    from scipy import stats
    names = [n for n in a if n in b]
    if len(names) < 3:
        raise ValueError(f"correlation needs at least 3 common layers, got {len(names)}")
    x = [float(a[n]) for n in names]
    y = [float(b[n]) for n in names]
    p = stats.pearsonr(x, y)
    s = stats.spearmanr(x, y)
    return {"n": len(names), "pearson": float(p[0]), "pearson_p": float(p[1]),
            "spearman": float(s[0]), "spearman_p": float(s[1])}


# ----------------------------------------------------------------------------------------------
# allocators


@dataclass
class Option:
    """One per-layer choice: a config, its true stored bits for that layer, and a cost."""
    config: Optional[AnyConfig]
    bits: int
    cost: float
    label: str = ""


@dataclass
class Allocation:
    """Chosen option per layer, with totals. `overrides` plugs into config.overrides."""
    choice: dict                       # layer name -> index into its options
    options: dict                      # layer name -> [Option]
    total_bits: int
    total_cost: float
    budget_bits: Optional[float] = None
    weights: int = 0
    method: str = ""
    notes: str = ""

    @property
    def overrides(self) -> dict:
        return {n: self.options[n][i].config for n, i in self.choice.items()
                if self.options[n][i].config is not None}

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights if self.weights else float("nan")

    def to_dict(self) -> dict:
        return {"method": self.method, "total_bits": self.total_bits,
                "total_cost": self.total_cost, "budget_bits": self.budget_bits,
                "bits_per_weight": self.bits_per_weight, "notes": self.notes,
                "choice": {n: self.options[n][i].label or i for n, i in self.choice.items()}}


def build_options(layers: Sequence[LinearLayer] | Mapping[str, tuple[int, int]],
                  configs: Sequence[AnyConfig], cost: Callable[[str, int, AnyConfig], float],
                  labels: Optional[Sequence[str]] = None) -> dict[str, list[Option]]:
    """Options per layer: each config with its true bits (`option_bits`) and cost(name, i, cfg).

    layers: LinearLayers, or {name: (out_features, in_features)}. A config that cannot quantize a
    layer's shape is left out for that layer.
    """
    shapes = layers if isinstance(layers, Mapping) else \
        {l.name: (l.out_features, l.in_features) for l in layers}
    out = {}
    for name, (o, i) in shapes.items():
        opts = []
        for j, cfg in enumerate(configs):
            try:
                b = option_bits(cfg, o, i)
            except ValueError:
                continue
            opts.append(Option(cfg, b, float(cost(name, j, cfg)),
                               labels[j] if labels else str(j)))
        if not opts:
            raise ValueError(f"layer {name}: none of the configs can quantize a [{o}, {i}] weight")
        out[name] = opts
    return out


def _check_options(options: Mapping[str, Sequence[Option]]) -> None:
    if not options:
        raise ValueError("options: need at least one layer")
    for n, opts in options.items():
        if not opts:
            raise ValueError(f"options[{n!r}] is empty")
        for o in opts:
            if not isinstance(o.bits, int) or o.bits < 0:
                raise ValueError(f"options[{n!r}]: bits must be non-negative integers (true stored "
                                 f"bits), got {o.bits!r}")
            if not math.isfinite(o.cost):
                raise ValueError(f"options[{n!r}]: cost must be finite, got {o.cost}")


def _min_bits(options) -> int:
    return sum(min(o.bits for o in opts) for opts in options.values())


def _check_budget(options, budget_bits: float) -> None:
    lo = _min_bits(options)
    if budget_bits < lo:
        raise ValueError(f"budget_bits ({budget_bits:,.0f}) is below the smallest possible total "
                         f"({lo:,} bits: every layer at its cheapest option)")


def _allocation(options, choice, budget, weights, method, notes="") -> Allocation:
    tb = sum(options[n][i].bits for n, i in choice.items())
    tc = sum(options[n][i].cost for n, i in choice.items())
    return Allocation(dict(choice), dict(options), tb, tc, budget, weights, method, notes)


def knapsack_allocation(options: Mapping[str, Sequence[Option]], budget_bits: float,
                        weights: int = 0, unit: Optional[int] = None,
                        max_states: int = 1_000_000) -> Allocation:
    """Exact multiple-choice knapsack: one option per layer, sum(cost) minimal, sum(bits) <= budget.

    DP over the extra stored bits above every layer's cheapest option, in units of g = gcd of all
    those extras (exact: every reachable total is a multiple of g). With `unit` given, each
    option's extra bits are rounded up to a multiple of `unit` (budget still met on true bits;
    optimal for the rounded counts; Allocation.notes says so). Raises ValueError when the budget
    is below the cheapest total or the state space exceeds max_states.
    weights: number of weights the layers replace (only for bits_per_weight).
    """
    _check_options(options)
    _check_budget(options, budget_bits)
    if max(len(o) for o in options.values()) > 255:
        raise ValueError("knapsack: at most 255 options per layer")
    names = list(options)
    base = {n: min(o.bits for o in options[n]) for n in names}
    extras = {n: [o.bits - base[n] for o in options[n]] for n in names}
    slack = int(math.floor(budget_bits)) - sum(base.values())
    if unit is None:
        g = reduce(math.gcd, [e for n in names for e in extras[n]], 0) or 1
        units = {n: [e // g for e in extras[n]] for n in names}
        notes = f"exact on true stored bits (DP unit gcd = {g} bits)"
    else:
        if not isinstance(unit, int) or unit < 1:
            raise ValueError(f"unit must be a positive integer number of bits, got {unit!r}")
        g = unit
        units = {n: [-(-e // g) for e in extras[n]] for n in names}
        notes = (f"extra bits rounded up to multiples of {g} bits: budget holds on true bits, "
                 "optimal for the rounded bit counts")
    cap = min(slack // g, sum(max(u) for u in units.values()))
    if cap + 1 > max_states:
        raise ValueError(f"knapsack: {cap + 1:,} states exceed max_states={max_states:,}; pass a "
                         f"coarser unit (bits) or raise max_states")
    inf = float("inf")
    dp = torch.full((cap + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    back = []
    for n in names:
        new = torch.full_like(dp, inf)
        arg = torch.full((cap + 1,), 255, dtype=torch.uint8)
        for j, (u, o) in enumerate(zip(units[n], options[n])):
            if u > cap:
                continue
            cand = torch.full_like(dp, inf)
            cand[u:] = dp[:cap + 1 - u] + o.cost
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(j, dtype=torch.uint8), arg)
        dp = new
        back.append(arg)
    s = int(torch.argmin(dp))
    if not math.isfinite(float(dp[s])):  # pragma: no cover - cheapest options always fit
        raise ValueError("knapsack: no feasible assignment")
    choice = {}
    for n, arg in zip(reversed(names), reversed(back)):
        j = int(arg[s])
        choice[n] = j
        s -= units[n][j]
    choice = {n: choice[n] for n in names}
    alloc = _allocation(options, choice, budget_bits, weights, "knapsack", notes)
    assert alloc.total_bits <= budget_bits
    return alloc


def greedy_allocation(options: Mapping[str, Sequence[Option]], budget_bits: float,
                      weights: int = 0) -> Allocation:
    """Greedy marginal gain: from the cheapest option of every layer, repeatedly move one layer to
    the option with the largest (cost decrease) / (extra bits) that fits the budget; stop when no
    move lowers the cost within budget."""
    _check_options(options)
    _check_budget(options, budget_bits)
    choice = {n: min(range(len(o)), key=lambda j: (o[j].bits, o[j].cost))
              for n, o in options.items()}
    used = sum(options[n][j].bits for n, j in choice.items())
    while True:
        best = None
        for n, opts in options.items():
            cur = opts[choice[n]]
            for j, o in enumerate(opts):
                db, dc = o.bits - cur.bits, cur.cost - o.cost
                if dc <= 0 or used + db > budget_bits:
                    continue
                ratio = dc / db if db > 0 else math.inf
                if best is None or ratio > best[0]:
                    best = (ratio, n, j, db)
        if best is None:
            break
        _, n, j, db = best
        choice[n] = j
        used += db
    return _allocation(options, choice, budget_bits, weights, "greedy")


def top_n(sensitivity: Mapping[str, float], n: int, big: AnyConfig, small: AnyConfig
          ) -> tuple[dict, list[str]]:
    """The N most sensitive layers get `big`, the rest `small`.

    Returns (overrides {layer: config} for every layer in `sensitivity`, the N chosen names in
    decreasing sensitivity).
    """
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(sensitivity):
        raise ValueError(f"n must be an integer in [0, {len(sensitivity)}], got {n!r}")
    ranked = sorted(sensitivity, key=lambda k: (-sensitivity[k], k))
    top = ranked[:n]
    return {name: (big if name in top else small) for name in sensitivity}, top


def entropy_linear(entropy: Mapping[str, float], mean_bits: float, lo: int, hi: int,
                   weights: Optional[Mapping[str, int]] = None) -> dict[str, int]:
    """Integer bits per layer, linear in entropy, with an exact mean.

    The seeds' rule (bits grow linearly with the layer's input entropy, range [lo, hi], 'mean 4')
    fixed: continuous b_i = clip(a + s * z_i, lo, hi) with z_i the entropy min-max normalised to
    [-1/2, 1/2] and s = hi - lo, the offset a solved by bisection so that the mean equals
    `mean_bits`; then integers by largest remainder so that the mean is met exactly.
    weights: optional weights per layer (e.g. weight counts) for a weighted mean; with them the
      integer mean is the closest reachable value not above the budget (exact when reachable).
    Unweighted, the mean equals mean_bits exactly whenever mean_bits * n_layers is an integer;
    otherwise ValueError.
    """
    names = list(entropy)
    if not names:
        raise ValueError("entropy: need at least one layer")
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"lo, hi must be integers with 1 <= lo <= hi, got {lo}, {hi}")
    if not lo <= mean_bits <= hi:
        raise ValueError(f"mean_bits must lie in [lo, hi] = [{lo}, {hi}], got {mean_bits}")
    w = {n: float(weights[n]) if weights else 1.0 for n in names}
    wsum = sum(w.values())
    target = mean_bits * wsum
    if not weights and abs(target - round(target)) > 1e-9:
        raise ValueError(f"mean_bits * n_layers = {target} is not an integer: no integer "
                         "allocation has that mean exactly")
    h = torch.tensor([float(entropy[n]) for n in names], dtype=torch.float64)
    span = float(h.max() - h.min())
    z = (h - h.min()) / span - 0.5 if span > 0 else torch.zeros_like(h)
    wt = torch.tensor([w[n] for n in names], dtype=torch.float64)

    def cont(a):
        return (a + (hi - lo) * z).clamp(lo, hi)
    a_lo, a_hi = lo - (hi - lo), hi + (hi - lo)
    for _ in range(200):
        mid = 0.5 * (a_lo + a_hi)
        if float((cont(mid) * wt).sum()) < target:
            a_lo = mid
        else:
            a_hi = mid
    x = cont(0.5 * (a_lo + a_hi))
    b = x.floor().clamp(lo, hi)
    rem = x - b
    used = float((b * wt).sum())
    for i in sorted(range(len(names)), key=lambda i: (-float(rem[i]), -float(z[i]))):
        if b[i] < hi and used + wt[i] <= target + 1e-9:
            b[i] += 1
            used += float(wt[i])
    # Still short (weighted case, or remainders exhausted): raise the highest-entropy layers.
    for i in sorted(range(len(names)), key=lambda i: -float(z[i])):
        while b[i] < hi and used + wt[i] <= target + 1e-9:
            b[i] += 1
            used += float(wt[i])
    return {n: int(b[i]) for i, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# the combined entropy + Fisher allocator (issue 21.4)


def normalized_sensitivity(sensitivity: Mapping[str, float]) -> dict[str, float]:
    """Each value divided by the geometric mean over the layers (scale-free, mean log 0).

    ValueError for an empty dict or a value that is not finite and > 0 (the combination is taken
    in log space)."""
    if not sensitivity:
        raise ValueError("sensitivity: need at least one layer")
    for n, v in sensitivity.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"sensitivity[{n!r}] must be a finite number > 0, got {v!r}")
    g = math.exp(sum(math.log(v) for v in sensitivity.values()) / len(sensitivity))
    return {n: float(v) / g for n, v in sensitivity.items()}


def combined_sensitivity(entropy: Mapping[str, float], fisher: Mapping[str, float],
                         weight: float) -> dict[str, float]:
    """Per-layer score from both criteria: a weighted geometric mean of the normalised values,

        s_i = e_i^w * f_i^(1 - w),   e = entropy / geomean(entropy), f = fisher / geomean(fisher)

    (a weighted sum of the log-sensitivities: entropy is a few bits everywhere while the Fisher
    trace spans decades, so a sum of raw values would be the Fisher alone). weight = 1 gives the
    entropy alone, weight = 0 the Fisher alone (exactly: the normalised values themselves).
    Both dicts must name the same layers. Fisher: per-weight sensitivity (fisher_trace's "mean").
    """
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool)
            and 0.0 <= weight <= 1.0):
        raise ValueError(f"weight must be a number in [0, 1] (1 = entropy alone, 0 = Fisher "
                         f"alone), got {weight!r}")
    if set(entropy) != set(fisher):
        diff = sorted(set(entropy) ^ set(fisher))
        raise ValueError(f"entropy and fisher must name the same layers; differ in {diff[:4]}")
    e, f = normalized_sensitivity(entropy), normalized_sensitivity(fisher)
    if weight == 1.0:
        return e
    if weight == 0.0:
        return f
    return {n: math.exp(weight * math.log(e[n]) + (1.0 - weight) * math.log(f[n]))
            for n in entropy}


def distortion_cost(score: float, weights: int, bits: int) -> float:
    """The allocation's cost model of one option: score x weights x 4^(-bits per weight)
    (the high-rate distortion of a quantizer storing bits/weights bits per weight, weighted by
    the layer's per-weight sensitivity)."""
    return score * weights * 4.0 ** (-bits / weights)


def sensitivity_allocation(shapes: Mapping[str, tuple[int, int]], configs: Sequence[AnyConfig],
                           score: Mapping[str, float], budget_bits: float,
                           labels: Optional[Sequence[str]] = None,
                           max_states: int = 200_000) -> Allocation:
    """Per-layer config minimising sum_i distortion_cost(score_i, n_i, bits_i(config)) subject to
    sum_i bits_i <= budget_bits, with TRUE stored bits per option (option_bits) and the exact
    multiple-choice knapsack (knapsack_allocation). When the exact state space exceeds
    max_states, the extra bits are rounded UP to the smallest unit that fits (the budget still
    holds on true bits; Allocation.notes says so).

    shapes: {layer name: (out, in)}; score: {layer name: per-weight sensitivity > 0}.
    """
    missing = [n for n in shapes if n not in score]
    if missing:
        raise ValueError(f"score: no value for layers {missing[:4]}")
    for n in shapes:
        if not (math.isfinite(score[n]) and score[n] > 0):
            raise ValueError(f"score[{n!r}] must be a finite number > 0, got {score[n]!r}")
    numel = {n: o * i for n, (o, i) in shapes.items()}

    def cost(name, j, cfg):
        return distortion_cost(score[name], numel[name], option_bits(cfg, *shapes[name]))

    options = build_options(shapes, configs, cost, labels)
    total = sum(numel.values())
    try:
        return knapsack_allocation(options, budget_bits, weights=total, max_states=max_states)
    except ValueError as exc:
        if "max_states" not in str(exc):
            raise
    extra = sum(max(o.bits for o in opts) - min(o.bits for o in opts)
                for opts in options.values())
    unit = max(1, -(-extra // max(1, max_states - 1 - len(options))))
    return knapsack_allocation(options, budget_bits, weights=total, unit=unit,
                               max_states=max_states)


def combined_allocation(shapes: Mapping[str, tuple[int, int]], configs: Sequence[AnyConfig],
                        entropy: Mapping[str, float], fisher: Mapping[str, float],
                        weight: float, budget_bits: float,
                        labels: Optional[Sequence[str]] = None,
                        max_states: int = 200_000) -> Allocation:
    """The combined allocator: sensitivity_allocation on combined_sensitivity(entropy, fisher,
    weight). weight = 1: entropy alone; 0: Fisher alone; in between: both."""
    score = combined_sensitivity({n: entropy[n] for n in shapes if n in entropy},
                                 {n: fisher[n] for n in shapes if n in fisher}, weight)
    alloc = sensitivity_allocation(shapes, configs, score, budget_bits, labels, max_states)
    alloc.method = f"combined(weight={weight:g})"
    return alloc
