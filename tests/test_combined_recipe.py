"""Combined recipes of `physkern sweep quant`: RG pruning + quantization + lattice attention.

Uses the tiny saved LLaMA and character corpus of tests/test_sweep_quant.py (its `tiny_setup`
fixture). Bits are checked against a count by hand from the layer shapes and the storage format.
"""
import json
import math

import pytest
import torch

from test_sweep_quant import tiny_setup  # noqa: F401  (fixture: tiny LLaMA + corpus on disk)

DECODER_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SEEDS_RULE_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                    "mlp.up_proj")


def _sweep(root, model_dir, recipes, name, capsys=None):
    """Run `physkern sweep quant` on `recipes`; returns ({recipe: point}, payload, stdout)."""
    from physkern.cli import main
    path = root / f"{name}_recipes.json"
    path.write_text(json.dumps(recipes))
    assert main(["sweep", "quant", "--model", str(model_dir), "--corpus",
                 str(root / "corpus.txt"), "--recipes", str(path), "--name", name,
                 "--out-dir", str(root / "out"), "--tokens", "192", "--window", "32",
                 "--calib-windows", "4", "--calib-window", "32"]) == 0
    out = capsys.readouterr().out if capsys is not None else ""
    payload = json.loads((root / "out" / f"{name}.json").read_text())
    return {p["recipe"]: p for p in payload["points"]}, payload, out


def _decoder_shapes(model):
    """{layer name: (out, in)} of the decoder linear layers, from the modules themselves."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _type_of(name):
    return name.split(".", 3)[3]   # model.layers.<i>.<type>


# ----------------------------------------------------------------------------------------------
# validation


def test_recipe_validation_errors(tmp_path):
    from physkern.research.prune import RULES
    from physkern.sweeps.quant import PRUNE_RULES, load_recipes
    assert PRUNE_RULES == RULES
    p = tmp_path / "r.json"

    def bad(recipe, match):
        p.write_text(json.dumps([{"name": "a", "config": None, **recipe}]))
        with pytest.raises(ValueError, match=match):
            load_recipes(str(p))

    bad({"prune": {"rule": "rg", "removed_fraction": 0.1}},
        r"prune\.rule must be one of seeds, opposite, uniform, got 'rg'")
    bad({"prune": {"removed_fraction": 0.1}}, r"prune\.rule must be one of")
    bad({"prune": {"rule": "seeds"}}, "exactly one of removed_fraction, relative_rank")
    bad({"prune": {"rule": "seeds", "removed_fraction": 0.1, "relative_rank": 0.5}},
        "exactly one of")
    bad({"prune": {"rule": "seeds", "removed_fraction": 1.0}}, r"removed_fraction must be .*\(0, 1\)")
    bad({"prune": {"rule": "seeds", "removed_fraction": True}}, "removed_fraction must be")
    bad({"prune": {"rule": "seeds", "relative_rank": 0}}, r"relative_rank must be .*\(0, 1\]")
    bad({"prune": {"rule": "seeds", "relative_rank": 0.5, "rank": 3}},
        r"unknown keys \['rank'\]; valid: rule, removed_fraction, relative_rank")
    bad({"prune": "seeds"}, "prune: must be an object")
    bad({"lattice": {"eps": 0.001}}, r"lattice\.xi is required")
    bad({"lattice": {"xi": 0}}, r"lattice\.xi must be a number > 0 or \"inf\"")
    bad({"lattice": {"xi": "big"}}, r"lattice\.xi must be")
    bad({"lattice": {"xi": 64, "eps": 1.5}}, r"lattice\.eps must be a number in \(0, 1\) or null")
    bad({"lattice": {"xi": 64, "decay": 1}}, r"unknown keys \['decay'\]; valid: xi, eps")
    bad({"lattice": 64}, "lattice: must be an object")
    bad({"pruning": {}}, "unknown keys")

    p.write_text(json.dumps([
        {"name": "fp", "config": None},
        {"name": "lat", "config": None, "lattice": {"xi": "inf"}},
        {"name": "all", "config": {"method": "rtn", "bits": 4},
         "prune": {"rule": "opposite", "relative_rank": 1}, "lattice": {"xi": 8, "eps": 1e-3}},
        {"name": "named", "config": None, "prune": {"rule": "uniform", "removed_fraction": 0.1},
         "label": "mine"}]))
    r = {x["name"]: x for x in load_recipes(str(p))}
    assert [r[n]["label"] for n in ("fp", "lat", "all", "named")] == \
        ["FP", "lattice", "rtn+prune+lattice", "mine"]
    assert r["lat"]["lattice"] == {"xi": "inf", "eps": None}
    assert r["all"]["lattice"] == {"xi": 8.0, "eps": 1e-3}
    assert r["all"]["prune"] == {"rule": "opposite", "relative_rank": 1.0}
    assert r["fp"]["prune"] is None and r["fp"]["lattice"] is None


def test_packaged_combined_recipe_file_is_valid():
    from pathlib import Path
    from physkern.sweeps.quant import load_recipes
    path = Path(__file__).resolve().parents[1] / "bench" / "recipes" / "combined.json"
    recipes = load_recipes(str(path))
    assert any(r["prune"] and r["lattice"] and r["config"] for r in recipes)
    assert any(r["config"] is None and r["prune"] is None and r["lattice"] is None
               for r in recipes)


# ----------------------------------------------------------------------------------------------
# end to end


def test_combined_point_bits_equal_hand_count(tiny_setup, capsys):  # noqa: F811
    from physkern.models import load_model
    root = tiny_setup
    cb = {"method": "codebook", "k": 16, "block_dim": 4, "scope": "layer", "iters": 3,
          "error_feedback": True}
    recipes = [{"name": "all3", "config": cb, "prune": {"rule": "seeds", "relative_rank": 0.25},
                "lattice": {"xi": 64, "eps": None}}]
    pts, payload, out = _sweep(root, root / "model", recipes, "combined", capsys)
    p = pts["all3"]
    assert p["label"] == "codebook+prune+lattice" and math.isfinite(p["perplexity"])
    assert p["lattice"] == {"xi": 64.0, "eps": None}

    # hand count from the original model's shapes
    model, _ = load_model(str(root / "model"))
    shapes = _decoder_shapes(model)
    assert sorted({_type_of(n) for n in shapes}) == sorted(DECODER_TYPES)
    ranks = {t: max(1, math.floor(0.25 * min(o, i))) for n, (o, i) in shapes.items()
             for t in [_type_of(n)] if t in SEEDS_RULE_TYPES}
    factor_bits = quant_bits = removed = n_factorised = 0
    for n, (o, i) in shapes.items():
        r = ranks.get(_type_of(n))
        if r is not None and r * (o + i) < o * i:           # factorised: up [o, r] + down [r, i]
            factor_bits += r * (o + i) * 32                  # fp32 factors, not quantized
            removed += o * i - r * (o + i)
            n_factorised += 1
        else:                                                # codebook k=16, d=4, layer scope
            words = math.ceil((i // 4) * 4 / 32)             # 4-bit indices in int32 words per row
            quant_bits += o * words * 32 + 16 * 4 * 16 + o * 16   # + fp16 codebook + row scales
    weights = sum(o * i for o, i in shapes.values())
    decoder_weight_names = {f"{n}.weight" for n in shapes}
    other = [t for name, t in model.named_parameters() if name not in decoder_weight_names]
    other_bits = sum(t.numel() * 32 for t in other)          # tied embedding once, norms
    other_params = sum(t.numel() for t in other)

    assert p["prune"]["ranks"] == ranks
    assert p["prune"]["compressed_types"] == list(SEEDS_RULE_TYPES)
    assert p["prune"]["layers_factorised"] == n_factorised == 10
    assert p["prune"]["parameters_removed"] == removed
    assert p["prune"]["removed_fraction"] == pytest.approx(removed / weights)
    b = p["bits"]
    assert b["by_kind"]["LowRankLinear"]["bits"] == factor_bits
    assert b["by_kind"]["quantized"]["bits"] == quant_bits
    assert b["by_kind"]["quantized"]["layers"] == 4 and b["quantized_layers"] == 14
    assert b["quantized_weights"] == weights
    assert b["quantized_bits_per_weight"] == pytest.approx((factor_bits + quant_bits) / weights)
    assert b["model_bits_per_weight"] == pytest.approx(
        (other_bits + factor_bits + quant_bits) / (other_params + weights))
    assert b["seeds_formula_bits_per_weight"] == pytest.approx(1.0)   # log2(16) / 4
    assert "all3: pruned 10 layers" in out
    md = out[out.index("| recipe |"):]
    assert "| all3 | codebook+prune+lattice |" in md and "rule seeds" in md
    assert "all3 xi = 64.0, eps = None" in md
    assert (root / "out" / "combined.png").stat().st_size > 0


@pytest.fixture(scope="module")
def lowrank_model(tiny_setup):  # noqa: F811
    """The tiny model with every seeds'-rule weight replaced by its rank-2 truncation, so that
    factorising those layers at rank >= 2 loses nothing."""
    from physkern.models import load_model
    root = tiny_setup
    model, tok = load_model(str(root / "model"))
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in n and \
                    _type_of(n) in SEEDS_RULE_TYPES:
                u, s, vh = torch.linalg.svd(m.weight.double(), full_matrices=False)
                m.weight.copy_(((u[:, :2] * s[:2]) @ vh[:2]).float())
    model.save_pretrained(root / "lowrank")
    tok.save_pretrained(root / "lowrank")
    return root / "lowrank"


def test_prune_only_exact_when_nothing_is_lost(tiny_setup, lowrank_model, capsys):  # noqa: F811
    root = tiny_setup
    recipes = [
        {"name": "fp", "config": None},
        # ranks 4 (q, gate, up) and 2 (k, v): every seeds'-rule layer factorised, exactly
        {"name": "exact", "config": None, "prune": {"rule": "seeds", "relative_rank": 0.125}},
        # rank 1 < 2: the same layers factorised with loss (shows the check below can fail)
        {"name": "lossy", "config": None, "prune": {"rule": "seeds", "relative_rank": 0.01}},
        # full rank never saves bytes: nothing factorised, the model is untouched
        {"name": "full", "config": None, "prune": {"rule": "seeds", "relative_rank": 1.0}},
        {"name": "opp5", "config": None, "prune": {"rule": "opposite",
                                                    "removed_fraction": 0.05}},
    ]
    pts, _, _ = _sweep(root, lowrank_model, recipes, "prune_exact", capsys)
    fp, exact, full, opp = (pts[n] for n in ("fp", "exact", "full", "opp5"))
    assert exact["prune"]["layers_factorised"] == 10
    assert exact["prune"]["ranks"] == {"self_attn.q_proj": 4, "self_attn.k_proj": 2,
                                       "self_attn.v_proj": 2, "mlp.gate_proj": 4,
                                       "mlp.up_proj": 4}
    # a random tiny model is nearly uniform, so differences are small: compare mean NLL tightly
    assert exact["mean_nll"] == pytest.approx(fp["mean_nll"], rel=1e-7)
    assert pts["lossy"]["prune"]["layers_factorised"] == 10
    assert abs(pts["lossy"]["mean_nll"] / fp["mean_nll"] - 1) > 1e-5
    assert exact["deterministic"] and exact["config"] is None
    assert exact["bits"]["model_bits_per_weight"] < fp["bits"]["model_bits_per_weight"] == 32.0
    assert full["prune"]["layers_factorised"] == 0 and full["prune"]["parameters_removed"] == 0
    assert full["perplexity"] == fp["perplexity"]
    assert full["bits"]["quantized_bits_per_weight"] == 32 and full["bits"]["by_kind"] == {}
    # removed_fraction: one relative rank for o and down that removes about 5%
    assert opp["prune"]["compressed_types"] == ["self_attn.o_proj", "mlp.down_proj"]
    assert set(opp["prune"]["ranks"]) == {"self_attn.o_proj", "mlp.down_proj"}
    assert opp["prune"]["removed_fraction"] == pytest.approx(0.05, abs=0.01)


def test_lattice_huge_xi_matches_fp_and_resume_key(tiny_setup, capsys):  # noqa: F811
    root = tiny_setup
    recipes = [{"name": "fp", "config": None},
               {"name": "lat_huge", "config": None, "lattice": {"xi": 1e9, "eps": None}},
               {"name": "lat_small", "config": None, "lattice": {"xi": 2, "eps": None}}]
    pts, _, _ = _sweep(root, root / "model", recipes, "lattice", capsys)
    fp = pts["fp"]["mean_nll"]
    assert pts["lat_huge"]["mean_nll"] == pytest.approx(fp, rel=1e-7)
    assert abs(pts["lat_small"]["mean_nll"] / fp - 1) > 1e-4   # the bias is really applied
    assert pts["lat_huge"]["bits"]["model_bits_per_weight"] == 32.0
    assert pts["lat_huge"]["label"] == "lattice"
    # resuming: same settings skipped, a changed lattice setting is a new point
    recipes[2]["lattice"]["xi"] = 4
    pts2, payload, out = _sweep(root, root / "model", recipes, "lattice", capsys)
    assert out.count("skipped") == 2 and "lat_small seed 0: already" not in out
    assert [p["lattice"] for p in payload["points"] if p["recipe"] == "lat_small"] == \
        [{"xi": 2.0, "eps": None}, {"xi": 4.0, "eps": None}]
