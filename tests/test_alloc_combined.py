"""The combined entropy + Fisher allocator (physkern.research.alloc, issue 21.4) on constructed
cases: budget respected on true bits, each criterion recovered at the extreme weights, brute
force agreement, monotonicity in the score, bad inputs."""
from __future__ import annotations

import itertools
import math

import pytest

from physkern.config import ScalarConfig
from physkern.research.alloc import (combined_allocation, combined_sensitivity,
                                     distortion_cost, normalized_sensitivity, option_bits,
                                     sensitivity_allocation)

CONFIGS = [ScalarConfig(bits=b, group_size=16) for b in (2, 3, 4)]
LABELS = ["2", "3", "4"]
SHAPES = {f"l{i}": s for i, s in enumerate([(32, 16), (32, 16), (16, 32), (48, 16), (16, 16)])}
ENTROPY = {"l0": 3.0, "l1": 6.0, "l2": 4.5, "l3": 5.0, "l4": 2.0}
FISHER = {"l0": 1e-2, "l1": 1e-6, "l2": 1e-4, "l3": 1e-3, "l4": 1e-1}


def _bits(name, j):
    return option_bits(CONFIGS[j], *SHAPES[name])


def _uniform_budget(j=1):
    return sum(_bits(n, j) for n in SHAPES)


def test_normalized_and_combined_scores():
    e = normalized_sensitivity(ENTROPY)
    assert math.isclose(sum(math.log(v) for v in e.values()), 0.0, abs_tol=1e-12)
    assert combined_sensitivity(ENTROPY, FISHER, 1.0) == e
    assert combined_sensitivity(ENTROPY, FISHER, 0.0) == normalized_sensitivity(FISHER)
    half = combined_sensitivity(ENTROPY, FISHER, 0.5)
    f = normalized_sensitivity(FISHER)
    for n in ENTROPY:
        assert math.isclose(half[n], math.sqrt(e[n] * f[n]), rel_tol=1e-12)
    # scale-free: multiplying one criterion by a constant changes nothing
    scaled = combined_sensitivity({n: 7 * v for n, v in ENTROPY.items()}, FISHER, 0.3)
    for n, v in combined_sensitivity(ENTROPY, FISHER, 0.3).items():
        assert math.isclose(scaled[n], v, rel_tol=1e-12)


def _brute(score, budget):
    """Exhaustive search over every assignment (the reference)."""
    names = list(SHAPES)
    best = None
    for js in itertools.product(range(len(CONFIGS)), repeat=len(names)):
        bits = sum(_bits(n, j) for n, j in zip(names, js))
        if bits > budget:
            continue
        cost = sum(distortion_cost(score[n], SHAPES[n][0] * SHAPES[n][1], _bits(n, j))
                   for n, j in zip(names, js))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, dict(zip(names, js)), bits)
    return best


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("budget_at", [0.5, 1.0, 1.5])
def test_combined_allocation_respects_budget_and_is_optimal(weight, budget_at):
    lo, hi = _uniform_budget(0), _uniform_budget(2)
    budget = lo + budget_at * (hi - lo) / 2
    alloc = combined_allocation(SHAPES, CONFIGS, ENTROPY, FISHER, weight, budget, LABELS)
    assert alloc.total_bits <= budget
    assert alloc.total_bits == sum(_bits(n, j) for n, j in alloc.choice.items())
    cost, choice, bits = _brute(combined_sensitivity(ENTROPY, FISHER, weight), budget)
    assert math.isclose(alloc.total_cost, cost, rel_tol=1e-9)


def test_extreme_weights_reduce_to_each_criterion_alone():
    budget = _uniform_budget(1)
    ent = sensitivity_allocation(SHAPES, CONFIGS, ENTROPY, budget, LABELS)
    fis = sensitivity_allocation(SHAPES, CONFIGS, FISHER, budget, LABELS)
    assert combined_allocation(SHAPES, CONFIGS, ENTROPY, FISHER, 1.0, budget,
                               LABELS).choice == ent.choice
    assert combined_allocation(SHAPES, CONFIGS, ENTROPY, FISHER, 0.0, budget,
                               LABELS).choice == fis.choice
    # the two criteria disagree on this case (anti-correlated), so the extremes differ
    assert ent.choice != fis.choice


def test_exact_budget_is_used_when_reachable():
    # equal-shaped layers, budget = the uniform middle option: the knapsack spends all of it
    shapes = {f"l{i}": (32, 16) for i in range(4)}
    budget = sum(option_bits(CONFIGS[1], 32, 16) for _ in shapes)
    score = {"l0": 1.0, "l1": 2.0, "l2": 3.0, "l3": 4.0}
    alloc = sensitivity_allocation(shapes, CONFIGS, score, budget, LABELS)
    assert alloc.total_bits == budget
    # more sensitive layers never get fewer bits
    bits = [alloc.options[n][alloc.choice[n]].bits for n in sorted(shapes)]
    assert bits == sorted(bits)


def test_equal_scores_give_the_uniform_allocation():
    shapes = {f"l{i}": (32, 16) for i in range(4)}
    budget = sum(option_bits(CONFIGS[1], 32, 16) for _ in shapes)
    alloc = sensitivity_allocation(shapes, CONFIGS, {n: 1.0 for n in shapes}, budget, LABELS)
    assert set(alloc.choice.values()) == {1}  # convex cost: the even split is optimal


def test_coarse_units_when_the_state_space_is_large():
    budget = _uniform_budget(1)
    alloc = sensitivity_allocation(SHAPES, CONFIGS, ENTROPY, budget, LABELS, max_states=20)
    assert alloc.total_bits <= budget
    assert "rounded up" in alloc.notes


@pytest.mark.parametrize("kwargs, match", [
    ({"weight": 1.5}, "weight must be a number in"),
    ({"weight": True}, "weight must be a number in"),
    ({"fisher": {**FISHER, "l9": 1.0}}, "same layers"),
    ({"fisher": {**FISHER, "l0": 0.0}}, "finite number > 0"),
    ({"entropy": {**ENTROPY, "l0": float("nan")}}, "finite number > 0"),
])
def test_bad_inputs(kwargs, match):
    args = {"entropy": ENTROPY, "fisher": FISHER, "weight": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        combined_sensitivity(**args)


def test_budget_below_cheapest_raises():
    with pytest.raises(ValueError, match="below the smallest possible total"):
        combined_allocation(SHAPES, CONFIGS, ENTROPY, FISHER, 0.5, _uniform_budget(0) - 1)
