"""Allocators and sensitivities (physkern.research.alloc) on constructed cases and tiny models."""
import copy
import itertools
import random

import pytest
import torch

from physkern.research.alloc import (Option, correlation, entropy_linear, entropy_sensitivity,
                            fisher_diagonal, fisher_sensitivity, greedy_allocation,
                            isolation_sensitivity, knapsack_allocation, option_bits, top_n)
from physkern.config import CodebookConfig, GPTQConfig, ScalarConfig
from physkern.models import decoder_linear_layers


def _brute(options, budget):
    names = list(options)
    best = None
    for combo in itertools.product(*[range(len(options[n])) for n in names]):
        bits = sum(options[n][j].bits for n, j in zip(names, combo))
        if bits > budget:
            continue
        cost = sum(options[n][j].cost for n, j in zip(names, combo))
        if best is None or cost < best - 1e-12:
            best = cost
    return best


def test_knapsack_meets_budget_exactly_and_beats_greedy():
    # Greedy takes A's cheap high-ratio upgrade first, which blocks B's big one.
    opts = {"A": [Option(None, 0, 10.0), Option(None, 1, 0.0)],
            "B": [Option(None, 0, 50.0), Option(None, 10, 0.0)]}
    ks = knapsack_allocation(opts, 10)
    gr = greedy_allocation(opts, 10)
    assert ks.total_bits == 10 and ks.choice == {"A": 0, "B": 1}
    assert ks.total_cost == 10.0
    assert gr.total_cost == 50.0 and gr.total_bits == 1
    assert ks.total_cost < gr.total_cost


@pytest.mark.parametrize("trial", range(30))
def test_knapsack_equals_brute_force(trial):
    rng = random.Random(trial)
    g = rng.choice([1, 16, 96])
    opts = {f"l{i}": [Option(None, g * rng.randint(0, 40) + 1000 * i, rng.uniform(0, 10))
                      for _ in range(rng.randint(1, 4))] for i in range(rng.randint(1, 5))}
    lo = sum(min(o.bits for o in v) for v in opts.values())
    hi = sum(max(o.bits for o in v) for v in opts.values())
    budget = rng.randint(lo, hi)
    ks = knapsack_allocation(opts, budget)
    assert ks.total_bits <= budget
    assert ks.total_cost == pytest.approx(_brute(opts, budget), abs=1e-9)
    assert ks.total_cost == pytest.approx(sum(opts[n][j].cost for n, j in ks.choice.items()))


def test_knapsack_coarse_unit_still_meets_budget():
    rng = random.Random(5)
    opts = {f"l{i}": [Option(None, rng.randint(0, 999), rng.uniform(0, 10)) for _ in range(4)]
            for i in range(6)}
    budget = 3000
    ks = knapsack_allocation(opts, budget, unit=64)
    assert ks.total_bits <= budget
    assert ks.total_cost >= _brute(opts, budget) - 1e-9
    assert "rounded up" in ks.notes


def test_budget_below_smallest_option_raises():
    opts = {"A": [Option(None, 5, 1.0), Option(None, 9, 0.0)],
            "B": [Option(None, 7, 1.0)]}
    with pytest.raises(ValueError, match="budget_bits"):
        knapsack_allocation(opts, 11)
    with pytest.raises(ValueError, match="budget_bits"):
        greedy_allocation(opts, 11)
    assert knapsack_allocation(opts, 12).total_bits == 12


def test_knapsack_state_limit():
    opts = {"A": [Option(None, 0, 1.0), Option(None, 10_000_019, 0.0)],
            "B": [Option(None, 0, 1.0), Option(None, 10_000_079, 0.0)]}
    with pytest.raises(ValueError, match="max_states"):
        knapsack_allocation(opts, 20_000_098)


@pytest.mark.parametrize("mean,lo,hi", [(4, 3, 6), (4, 2, 8), (3.5, 2, 6)])
def test_entropy_linear_exact_mean(mean, lo, hi):
    gen = torch.Generator().manual_seed(1)
    ent = {f"l{i}": float(v) for i, v in enumerate(torch.rand(12, generator=gen) * 5)}
    bits = entropy_linear(ent, mean, lo, hi)
    assert sum(bits.values()) == mean * len(ent)
    assert all(lo <= b <= hi for b in bits.values())
    # monotone: more entropy never gets fewer bits
    order = sorted(ent, key=ent.get)
    assert all(bits[a] <= bits[b] for a, b in zip(order, order[1:]))
    with pytest.raises(ValueError, match="mean_bits"):
        entropy_linear(ent, hi + 1, lo, hi)


def test_entropy_linear_weighted_not_above_budget():
    ent = {"a": 1.0, "b": 2.0, "c": 3.0}
    w = {"a": 100, "b": 300, "c": 50}
    bits = entropy_linear(ent, 4, 2, 8, weights=w)
    mean = sum(bits[n] * w[n] for n in ent) / sum(w.values())
    assert mean <= 4 + 1e-12 and mean > 3.8


def test_top_n_picks_most_sensitive():
    sens = {"a": 0.1, "b": 5.0, "c": 2.0, "d": 3.0}
    big, small = CodebookConfig(k=128, block_dim=8), CodebookConfig(k=64, block_dim=8)
    ov, top = top_n(sens, 2, big, small)
    assert top == ["b", "d"]
    assert ov["b"] is big and ov["d"] is big and ov["a"] is small and ov["c"] is small
    with pytest.raises(ValueError):
        top_n(sens, 5, big, small)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_fisher_matches_direct_autograd(fixture, request):
    model = request.getfixturevalue(fixture)
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 96, (3, 16), generator=gen)
    fisher = fisher_diagonal(model, windows)
    layers = decoder_linear_layers(model)
    # direct: backward() per window on a copy, accumulate grad^2 of each module weight
    ref_model = copy.deepcopy(model)
    ref_layers = {l.name: l for l in decoder_linear_layers(ref_model)}
    ref = {n: torch.zeros_like(l.module.weight, dtype=torch.float64) for n, l in ref_layers.items()}
    for b in range(windows.shape[0]):
        ref_model.zero_grad()
        ids = windows[b:b + 1]
        out = ref_model(input_ids=ids, labels=ids)
        # HF loss is the mean over the seq-1 predicted tokens: undo the mean
        (out.loss * (ids.shape[1] - 1)).backward()
        for n, l in ref_layers.items():
            ref[n] += l.module.weight.grad.double().pow(2)
    for l in layers:
        r = ref[l.name].t() if l.kind == "conv1d" else ref[l.name]
        torch.testing.assert_close(fisher[l.name], r, rtol=1e-4, atol=1e-10)
    sens = fisher_sensitivity(fisher)
    assert all(v > 0 for v in sens.values())
    from physkern.research.alloc import fisher_trace
    tr = fisher_trace(model, windows)
    assert all(tr[n]["sum"] == pytest.approx(sens[n], rel=1e-6) for n in sens)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("cfg", [
    CodebookConfig(k=16, block_dim=4, scope="layer", error_feedback=True),
    CodebookConfig(k=8, block_dim=8, scope="group", group_size=4),
    CodebookConfig(k=4, block_dim=2, stages=2, scope="row", calibrate=False),
    ScalarConfig(bits=3, group_size=16),
    GPTQConfig(bits=4, group_size=16, symmetric=True),
])
def test_option_bits_equal_accounting_of_real_quantization(cfg, tiny_llama):
    from physkern.api import quantize
    model = copy.deepcopy(tiny_llama)
    calib = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = quantize(model, cfg, calibration=calib, progress=False)
    shapes = {l.name: (l.out_features, l.in_features) for l in decoder_linear_layers(tiny_llama)}
    from physkern.quant.accounting import layer_bits
    assert len(rep.layers) == len(shapes)
    for name in shapes:
        true = layer_bits(model.get_submodule(name))["total_bits"]
        assert option_bits(cfg, *shapes[name]) == true


def test_isolation_sensitivity_restores_model(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=windows).logits
    sens = isolation_sensitivity(model, ScalarConfig(bits=2), windows)
    assert set(sens) == {l.name for l in decoder_linear_layers(model)}
    assert all(isinstance(v, float) for v in sens.values())
    torch.testing.assert_close(model(input_ids=windows).logits, before)
    sens_gptq = isolation_sensitivity(model, GPTQConfig(bits=2), windows,
                                      layers=["model.layers.0.mlp.down_proj"])
    assert list(sens_gptq) == ["model.layers.0.mlp.down_proj"]


def test_entropy_and_correlation(tiny_llama):
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    ent = entropy_sensitivity(tiny_llama, windows, bins=32)
    assert set(ent) == {l.name for l in decoder_linear_layers(tiny_llama)}
    fis = fisher_sensitivity(fisher_diagonal(tiny_llama, windows))
    c = correlation(ent, fis)
    assert -1 <= c["pearson"] <= 1 and -1 <= c["spearman"] <= 1 and c["n"] == len(ent)
    assert correlation({"a": 1, "b": 2, "c": 3}, {"a": 2, "b": 4, "c": 7})["spearman"] == \
        pytest.approx(1.0)


def test_knapsack_overrides_plug_into_config(tiny_llama):
    from physkern.api import quantize
    from physkern.quant.accounting import bits_report
    model = copy.deepcopy(tiny_llama)
    layers = decoder_linear_layers(model)
    cfgs = [ScalarConfig(bits=2, group_size=16), ScalarConfig(bits=4, group_size=16),
            ScalarConfig(bits=8, group_size=16)]
    from physkern.research.alloc import build_options
    opts = build_options(layers, cfgs, cost=lambda name, j, c: 2.0 ** -c.bits)
    lo = sum(min(o.bits for o in v) for v in opts.values())
    budget = lo + (sum(max(o.bits for o in v) for v in opts.values()) - lo) // 2
    alloc = knapsack_allocation(opts, budget)
    base = ScalarConfig(bits=2, group_size=16, overrides=alloc.overrides)
    quantize(model, base, progress=False)
    assert bits_report(model).quantized_bits == alloc.total_bits <= budget
