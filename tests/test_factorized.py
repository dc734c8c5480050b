"""Factorization methods (MPO, truncated SVD) through the recipe: configs, layer replacement,
bits counted, composition with codebook quantization, healing. Saving and loading such models
(and `physkern quantize` with a factorize recipe): tests/test_factorized_save.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from physkern.methods import MPOConfig, SVDConfig
from physkern.methods.factorized import apply_factorization, heal_factorized
from physkern.methods.lowrank import whitened_factors
from physkern.quant.accounting import bits_report
from physkern.recipe import Recipe
from physkern.research.mpo import MPOLinear
from physkern.research.prune import LowRankLinear

CALIB = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))


class _Corpus:
    """apply_recipe only draws calibration windows from it (monkeypatched below)."""


def _apply(model, recipe, monkeypatch, seed=0):
    import physkern.data as data
    monkeypatch.setattr(data, "calibration_windows", lambda tok, corpus, n, w, s: CALIB[:n, :w])
    from physkern.recipe import apply_recipe
    return apply_recipe(model, recipe, None, _Corpus(), seed=seed, progress=False)


@pytest.mark.parametrize("bad, match", [
    ({"method": "mpo"}, "exactly one of chi"),
    ({"method": "mpo", "chi": 4, "bits": 2}, "exactly one of chi"),
    ({"method": "mpo", "chi": 0}, "chi"),
    ({"method": "mpo", "chi": 4, "cores": 1}, "cores"),
    ({"method": "mpo", "chi": 4, "dtype": "int8"}, "dtype"),
    ({"method": "svd", "bits": -1}, "bits"),
    ({"method": "svd", "rank": 2, "colour": 1}, "unknown svd factorize keys"),
    ({"method": "tucker", "rank": 2}, "factorize.method must be one of"),
])
def test_bad_factorize_specs_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"name": "x", "factorize": bad})


def test_recipe_round_trip_and_label():
    r = Recipe.from_dict({"name": "m", "factorize": {"method": "mpo", "bits": 4.0, "cores": 2,
                                                      "layers": ["*.mlp.*"]},
                          "config": {"method": "rtn", "bits": 4},
                          "finetune": {"steps": 3}})
    assert r.label == "mpo+rtn+finetune"
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.to_dict()["factorize"]["method"] == "mpo"
    # fine-tuning a factorized model needs no quantization config
    Recipe.from_dict({"name": "s", "factorize": {"method": "svd", "rank": 2},
                      "finetune": {"steps": 1}})
    assert "factorize" not in Recipe(name="plain").to_dict()  # older dicts unchanged


def test_mpo_recipe_replaces_layers_bits_and_forward(tiny_llama, monkeypatch):
    m = copy.deepcopy(tiny_llama)
    pattern = "*.mlp.gate_proj"
    rec = Recipe.from_dict({"name": "m", "factorize": {"method": "mpo", "chi": 3, "cores": 2,
                                                        "layers": pattern, "sweeps": 1}})
    rep = _apply(m, rec, monkeypatch)
    mods = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, MPOLinear)]
    assert len(mods) == 2 and all(n.endswith("mlp.gate_proj") for n, _ in mods)
    bits = bits_report(m)
    for n, mod in mods:  # bits = bytes of the fp16 cores
        nbytes = sum(g.numel() * g.element_size() for g in mod.cores)
        assert bits.layers[n]["total_bits"] == 8 * nbytes
        assert all(g.dtype == torch.float16 for g in mod.cores)
        assert rep.factorize["layers"][0]["chi"] == 3
    # the model's output = the same model with dense weights equal to the MPOs
    ref = copy.deepcopy(tiny_llama)
    for n, mod in mods:
        sub = ref.get_submodule(n)
        with torch.no_grad():
            sub.weight.copy_(mod.weight())
    with torch.no_grad():
        torch.testing.assert_close(m(X).logits, ref(X).logits, rtol=1e-4, atol=1e-4)


def test_svd_at_bits_target_and_composes_with_codebook(tiny_llama, monkeypatch):
    m = copy.deepcopy(tiny_llama)
    rec = Recipe.from_dict({
        "name": "c", "factorize": {"method": "svd", "bits": 8.0, "layers": ["*.mlp.*"]},
        "config": {"method": "codebook", "k": 4, "block_dim": 2, "scope": "layer",
                   "calibrate": False}})
    rep = _apply(m, rec, monkeypatch)
    low = [mod for mod in m.modules() if isinstance(mod, LowRankLinear)]
    assert len(low) == 6  # gate, up, down of 2 blocks
    for mod in low:
        o, i = mod.out_features, mod.in_features
        assert mod.rank == min(int(8 * o * i // (16 * (o + i))), o, i)
        assert mod.up.dtype == torch.float16
    # the rest quantized (attention projections), the factorized ones skipped
    qnames = {l.name for l in rep.quantization.layers}
    assert qnames and not any(".mlp." in n for n in qnames)
    b = bits_report(m)
    assert {v["kind"] for v in b.layers.values()} == {"quantized", "LowRankLinear"}


def test_whitened_svd_minimises_the_weighted_error():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 10, generator=g, dtype=torch.float64)
    Xs = torch.randn(40, 10, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 10,
                                                                                 dtype=torch.float64)
    H = Xs.t() @ Xs

    def werr(A):
        E = W - A
        return float(((E @ H) * E).sum())

    up, down = whitened_factors(W.float(), H.float(), 3, percdamp=0.0)
    u, s, vh = torch.linalg.svd(W)
    plain = (u[:, :3] * s[:3]) @ vh[:3]
    assert werr((up @ down).double()) < werr(plain)
    # optimal: no rank-3 perturbation direction lowers it (compare with a few random ones)
    best = werr((up @ down).double())
    for k in range(5):
        du = 1e-2 * torch.randn(12, 3, generator=g, dtype=torch.float64)
        assert werr(((up.double() + du) @ down.double())) >= best - 1e-6


def test_weighted_recipes_use_calibration(tiny_llama, monkeypatch):
    m = copy.deepcopy(tiny_llama)
    rec = Recipe.from_dict({"name": "w", "factorize": {"method": "svd", "rank": 4,
                                                        "weighted": True,
                                                        "layers": "*.self_attn.o_proj"}})
    assert rec.needs_calibration() and rec.is_random()
    rep = _apply(m, rec, monkeypatch)
    assert all("relative_output_error" in r for r in rep.factorize["layers"])
    m2 = copy.deepcopy(tiny_llama)
    rec2 = Recipe.from_dict({"name": "w2", "factorize": {"method": "mpo", "chi": 2, "cores": 2,
                                                          "weighted": True, "sweeps": 1,
                                                          "layers": "*.self_attn.o_proj"}})
    rep2 = _apply(m2, rec2, monkeypatch)
    # weighted sweeps: the output error is no worse than TT-SVD's (sweeps never raise it)
    assert all(r["relative_output_error"] < 1.0 for r in rep2.factorize["layers"])


def test_heal_lowers_kl_keeps_bits_and_dtypes(tiny_llama, monkeypatch):
    m = copy.deepcopy(tiny_llama)
    rec = Recipe.from_dict({"name": "h", "factorize": {"method": "mpo", "chi": 2, "cores": 2,
                                                        "layers": "*.mlp.*"},
                            "config": {"method": "rtn", "bits": 3, "group_size": 16},
                            "finetune": {"steps": 25, "lr": 1e-2, "batch_size": 2}})
    rep = _apply(m, rec, monkeypatch)
    t = rep.finetune
    assert t["factorized_layers"] == 6 and t["quantized_layers"] == 8
    assert t["holdout_kl_after"] < t["holdout_kl_before"] and t["kept"]
    assert all(g.dtype == torch.float16 and not g.requires_grad
               for mod in m.modules() if isinstance(mod, MPOLinear) for g in mod.cores)
    # bits unchanged by healing: same as a fresh un-healed application
    m0 = copy.deepcopy(tiny_llama)
    _apply(m0, Recipe.from_dict({**rec.to_dict(), "finetune": None}), monkeypatch)
    assert bits_report(m).total_bytes == bits_report(m0).total_bytes
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    assert all(p.requires_grad == flags[n] for n, p in m.named_parameters() if n in flags)


def test_heal_restores_when_holdout_worsens(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    apply_factorization(m, SVDConfig(rank=3, layers=["*.mlp.up_proj"]))
    before = {n: t.detach().clone() for n, t in m.state_dict().items()}
    rep = heal_factorized(m, tiny_llama, CALIB, steps=3, lr=1e6, progress=False)  # diverges
    assert not rep["kept"]
    after = m.state_dict()
    for n, t in before.items():
        assert torch.equal(after[n], t), n


def test_heal_needs_factorized_layers(tiny_llama):
    with pytest.raises(ValueError, match="no factorized"):
        heal_factorized(copy.deepcopy(tiny_llama), tiny_llama, CALIB, steps=1, progress=False)


def test_factorize_layers_must_match(tiny_llama):
    with pytest.raises(ValueError, match="match no decoder linear layer"):
        apply_factorization(copy.deepcopy(tiny_llama), SVDConfig(rank=1, layers=["*.nope"]))


def test_mpo_bits_target_picks_the_largest_fitting_chi():
    from physkern.research.mpo import bits_per_weight, max_bonds
    cfg = MPOConfig(bits=3.0, cores=2)
    chi, of, inf = cfg.chi_for(64, 32)
    assert math.prod(of) == 64 and math.prod(inf) == 32
    assert bits_per_weight(of, inf, chi) <= 3.0
    assert chi == max(max_bonds(of, inf)) or bits_per_weight(of, inf, chi + 1) > 3.0
    assert MPOConfig(chi=5).chi_for(64, 32)[0] == 5


@pytest.mark.parametrize("weighted", [False, True])
def test_svd_at_full_rank_reproduces_the_model(tiny_llama, monkeypatch, weighted):
    m = copy.deepcopy(tiny_llama)
    rec = Recipe.from_dict({"name": "f", "factorize": {"method": "svd", "rank": 64,
                                                        "weighted": weighted, "percdamp": 0.0,
                                                        "dtype": "float32",
                                                        "layers": ["*.mlp.*"]}})
    _apply(m, rec, monkeypatch)
    assert sum(isinstance(mod, LowRankLinear) for mod in m.modules()) == 6
    with torch.no_grad():
        torch.testing.assert_close(m(X).logits, tiny_llama(X).logits, rtol=1e-3, atol=1e-3)
