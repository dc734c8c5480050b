import copy

import numpy as np
import pytest
import torch

from physkern.research.analysis._common import weight_groups
from physkern.models import linear_layers, replace_layer
from physkern.research.prune import (LowRankLinear, SVDCache, break_even_rank, compare_rules,
                            compressed_types, factor_parameters, parameters_removed, prune_model,
                            ranks_for_target, saves_bytes, storage_bytes, truncated_svd_factors)


def test_full_rank_is_exact_linear():
    w = torch.randn(24, 16, dtype=torch.float64)
    b = torch.randn(24, dtype=torch.float64)
    layer = LowRankLinear.from_weight(w, 16, b)
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T + b, rtol=1e-10, atol=1e-10)


def test_full_rank_is_exact_in_gpt2_conv1d(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2)
    ids = torch.randint(0, 96, (2, 12))
    ref = model(input_ids=ids).logits
    for layer in [l for l in linear_layers(model) if not l.tied]:
        new = LowRankLinear.from_weight(layer.weight(), min(layer.weight().shape), layer.bias)
        replace_layer(model, layer.name, new)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_truncation_error_is_eckart_young():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 12))
    up, down = truncated_svd_factors(torch.from_numpy(w), 4)
    assert up.shape == (20, 4) and down.shape == (4, 12)
    s = np.linalg.svd(w, compute_uv=False)
    err = np.linalg.norm(w - (up @ down).numpy()) ** 2
    assert err == pytest.approx((s[4:] ** 2).sum(), rel=1e-10)


def test_factor_accounting_matches_hand_count():
    out_f, in_f, r = 48, 32, 5
    layer = LowRankLinear.from_weight(torch.randn(out_f, in_f), r, torch.zeros(out_f))
    hand = 48 * 5 + 5 * 32  # up [48, 5] + down [5, 32]
    assert factor_parameters(out_f, in_f, r) == hand
    assert layer.storage_bits() == {"up": 48 * 5 * 32, "down": 5 * 32 * 32}
    assert layer.weight_numel() == 48 * 32
    assert storage_bytes(out_f, in_f, r, element_bytes=2, bias=True) == (hand + 48) * 2
    assert storage_bytes(out_f, in_f, None, element_bytes=4) == 48 * 32 * 4
    try:
        from physkern.quant.accounting import bits_report
    except ImportError:  # the project accounting module is optional here
        return
    rep = bits_report(torch.nn.Sequential(layer))
    assert rep.layers["0"]["total_bits"] == hand * 32


def test_break_even_rank_by_brute_force():
    for out_f, in_f in [(576, 576), (192, 576), (1536, 576), (7, 3), (1, 1)]:
        ok = [r for r in range(1, min(out_f, in_f) + 1) if r * (out_f + in_f) < out_f * in_f]
        assert break_even_rank(out_f, in_f) == (max(ok) if ok else 0)
        assert all(saves_bytes(out_f, in_f, r) for r in ok)


def test_rules_split_input_and_output_projections(tiny_llama, tiny_gpt2):
    types = list(weight_groups(tiny_llama))
    seeds = compressed_types(types, "seeds")
    assert sorted(t.rsplit(".", 1)[-1] for t in seeds) == \
        ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert sorted(t.rsplit(".", 1)[-1] for t in compressed_types(types, "opposite")) == \
        ["down_proj", "o_proj"]
    assert compressed_types(types, "uniform") == types
    g2 = list(weight_groups(tiny_gpt2))
    assert sorted(compressed_types(g2, "seeds")) == ["attn.c_attn", "mlp.c_fc"]
    with pytest.raises(ValueError, match="rule must be one of"):
        compressed_types(types, "rg")


def test_prune_model_factorises_only_where_it_saves(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    groups = weight_groups(model)
    # q_proj 32x32: break-even 15; gate_proj 64x32: break-even 21
    ranks = {"self_attn.q_proj": 16, "mlp.gate_proj": 8}
    removed = parameters_removed(groups, ranks)
    assert removed == 2 * (64 * 32 - 8 * 96)  # q at 16 saves nothing
    records = prune_model(model, groups, ranks)
    assert [r["factorised"] for r in records] == [False, False, True, True]
    assert isinstance(model.model.layers[0].mlp.gate_proj, LowRankLinear)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert sum(r["dense_parameters"] - r["parameters"] for r in records) == removed


def test_svd_cache_matches_direct(tiny_llama):
    layer = weight_groups(tiny_llama)["mlp.up_proj"][0]
    up, down = SVDCache().factors(layer, 7)
    ref_up, ref_down = truncated_svd_factors(layer.weight(), 7)
    torch.testing.assert_close(up @ down, ref_up @ ref_down, rtol=1e-5, atol=1e-5)


def test_ranks_for_target_hits_target(tiny_llama):
    groups = weight_groups(tiny_llama)
    types = list(groups)
    total = sum(l.out_features * l.in_features for ls in groups.values() for l in ls)
    for rule in ("seeds", "opposite", "uniform"):
        plan = ranks_for_target(groups, compressed_types(types, rule), int(0.1 * total))
        assert plan["removed"] == parameters_removed(groups, plan["ranks"])
        # independent: every plan with one common relative rank, by brute force over a grid
        compressed = compressed_types(types, rule)
        achievable = set()
        for f in np.linspace(0, 1, 2001):
            ranks = {t: max(1, int(np.floor(f * min(groups[t][0].weight().shape))))
                     for t in compressed}
            achievable.add(parameters_removed(groups, ranks))
        best = min(abs(a - int(0.1 * total)) for a in achievable)
        assert abs(plan["removed"] - int(0.1 * total)) == best
    with pytest.raises(ValueError, match="removes at most"):
        ranks_for_target(groups, compressed_types(types, "opposite"), total)


def test_compare_rules_runs_and_leaves_model_alone(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    tokens = torch.randint(0, 96, (129,))
    res = compare_rules(tiny_llama, tokens, 32, [0.1], progress=False)
    assert {r["rule"] for r in res["runs"]} == {"seeds", "opposite", "uniform"}
    assert all(np.isfinite(r["perplexity"]) for r in res["runs"])
    for k, v in tiny_llama.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="removed fractions"):
        compare_rules(tiny_llama, tokens, 32, [1.5])
