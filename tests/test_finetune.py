"""physkern.finetune: end-to-end fine-tuning of codebooks / scales / offsets (indices fixed),
and the sweep's "finetune" recipe key. Tiny random GPT-2 / LLaMA (tests/conftest.py)."""
import copy
import json

import pytest
import torch

from physkern.api import quantize
from physkern.config import CodebookConfig, ScalarConfig
from physkern.finetune import differentiable_quantized, finetune_quantized, mean_kl
from physkern.layers import QuantizedLinear
from physkern.quant.accounting import bits_report
from test_combined_recipe import _sweep
from test_layers import dense_copy
from test_sweep_quant import tiny_setup  # noqa: F401  (fixture: tiny LLaMA + corpus on disk)

CALIB = torch.randint(0, 96, (10, 24), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
COARSE = CodebookConfig(k=4, block_dim=2, scope="layer", calibrate=False)


def _quantized(fixture, request, cfg=COARSE):
    """(teacher, quantized deep copy) of a tiny model fixture."""
    teacher = request.getfixturevalue(fixture)
    student = copy.deepcopy(teacher)
    quantize(student, cfg, progress=False)
    return teacher, student


def _qlayers(model):
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def _state(model):
    """Every tensor fine-tuning may touch, cloned: quantized buffers and norm parameters."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            for b in ("packed", "codebooks", "scales", "offsets"):
                if getattr(m, b) is not None:
                    out[f"{name}.{b}"] = getattr(m, b).detach().clone()
    for name, p in model.named_parameters():
        if "norm" in name or ".ln_" in name:
            out[name] = p.detach().clone()
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_finetune_lowers_kl_keeps_indices_and_bits(fixture, request):
    teacher, student = _quantized(fixture, request)
    before_state, bits_before = _state(student), bits_report(student).to_dict()
    rep = finetune_quantized(student, teacher, CALIB, steps=30, lr=1e-2, batch_size=2,
                             holdout=2, progress=False)
    held = set(rep["holdout_indices"])
    train = CALIB[[i for i in range(len(CALIB)) if i not in held]]
    # the KL on the training windows, recomputed with the original values put back
    after_state = _state(student)
    tuned = copy.deepcopy(student)
    for name, m in tuned.named_modules():
        if isinstance(m, QuantizedLinear):
            for b in ("codebooks", "scales", "offsets"):
                if getattr(m, b) is not None:
                    getattr(m, b).copy_(before_state[f"{name}.{b}"])
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name in before_state:
                p.copy_(before_state[name])
    kl_orig, kl_tuned = mean_kl(tuned, teacher, train), mean_kl(student, teacher, train)
    assert kl_tuned < 0.9 * kl_orig
    assert rep["kept"] and rep["holdout_kl_after"] < rep["holdout_kl_before"]
    assert rep["steps"] == 30 and len(rep["loss_curve"]) == 30 and rep["train_windows"] == 8
    # packed indices identical, dtypes and bits unchanged, codebooks did change
    for key, t in before_state.items():
        assert after_state[key].dtype == t.dtype
        if key.endswith(".packed"):
            assert torch.equal(after_state[key], t), key
    assert any(not torch.equal(after_state[k], before_state[k]) for k in before_state
               if k.endswith(".codebooks"))
    assert bits_report(student).to_dict() == bits_before
    # trained parameters counted by hand: codebooks + scales (+ offsets) + norm weights/biases
    n = sum(t.numel() for k, t in before_state.items() if not k.endswith(".packed"))
    assert rep["trained_parameters"] == n
    # after write-back the custom-op forward is the dense model holding the new dequantize()
    with torch.no_grad():
        assert torch.allclose(student(X).logits, dense_copy(student)(X).logits, atol=1e-4,
                              rtol=1e-4)
    assert all("forward" not in m.__dict__ for m in _qlayers(student))


def test_scalar_config_finetunes_with_offsets(tiny_llama):
    student = copy.deepcopy(tiny_llama)
    quantize(student, ScalarConfig(bits=2, group_size=16), progress=False)
    assert all(m.offsets is not None for m in _qlayers(student))
    packed = [m.packed.clone() for m in _qlayers(student)]
    bits = bits_report(student).to_dict()
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=10, lr=1e-2, progress=False,
                             train_norms=False)
    assert rep["norm_tensors"] == 0 and isinstance(rep["kept"], bool)
    assert all(torch.equal(a, m.packed) for a, m in zip(packed, _qlayers(student)))
    assert bits_report(student).to_dict() == bits
    with torch.no_grad():
        assert torch.allclose(student(X).logits, dense_copy(student)(X).logits, atol=1e-4,
                              rtol=1e-4)


def test_differentiable_forward_matches_and_unwinds(tiny_gpt2):
    student = copy.deepcopy(tiny_gpt2)
    quantize(student, COARSE, progress=False)
    state = _state(student)
    with torch.no_grad():
        ref = student(X).logits
    with pytest.raises(RuntimeError, match="boom"):
        with differentiable_quantized(student) as tr:
            out = student(X).logits   # float32 copies: the same function as the stored model
            assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
            out.sum().backward()
            assert all(p.grad is not None for p in tr.parameters())
            assert not any(p.requires_grad for n, p in student.named_parameters()
                           if "wte" in n or "wpe" in n)
            for p in tr.parameters():   # an exception inside: nothing is written back
                p.data.add_(1.0)
            raise RuntimeError("boom")
    assert all(torch.equal(state[k], v) for k, v in _state(student).items())
    assert all("forward" not in m.__dict__ for m in _qlayers(student))
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():
        assert torch.equal(student(X).logits, ref)


def test_worse_holdout_restores_the_original(tiny_llama):
    student = copy.deepcopy(tiny_llama)
    quantize(student, COARSE, progress=False)
    state = _state(student)
    # an absurd lr blows the fp16 codebooks up: the held-out KL gets worse (or NaN)
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=3, lr=1e4, progress=False)
    assert rep["kept"] is False and "restored" in rep["note"]
    assert not rep["holdout_kl_after"] < rep["holdout_kl_before"]
    assert all(torch.equal(state[k], v) for k, v in _state(student).items())


def test_bad_inputs(tiny_gpt2):
    student = copy.deepcopy(tiny_gpt2)
    quantize(student, COARSE, progress=False)
    ok = dict(steps=1, progress=False)
    cases = [(dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"),
             (dict(holdout=10), "holdout"), (dict(holdout=0), "holdout"),
             (dict(batch_size=9), "batch_size")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            finetune_quantized(student, tiny_gpt2, CALIB, **{**ok, **kw})
    for calib in (CALIB.float(), CALIB[0], [[1, 2]]):
        with pytest.raises(ValueError, match="calibration must be a 2-D integer tensor"):
            finetune_quantized(student, tiny_gpt2, calib, **ok)
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        finetune_quantized(copy.deepcopy(tiny_gpt2), tiny_gpt2, CALIB, **ok)


# ----------------------------------------------------------------------------------------------
# sweep recipes


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, r"finetune\.steps must be an integer >= 1"),
    ({"steps": 2.5}, r"finetune\.steps must be"),
    ({"lr": 0}, r"finetune\.lr must be a finite number > 0"),
    ({"lr": "1e-3"}, r"finetune\.lr must be"),
    ({"train_norms": 1}, r"finetune\.train_norms must be true or false"),
    ({"holdout": 0}, r"finetune\.holdout must be an integer >= 1"),
    ({"epochs": 3}, r"unknown keys \['epochs'\]; valid: steps, lr, train_norms, batch_size, "
                    r"holdout, schedule, windows, code_update_every, code_update_fraction"),
    ({"code_update_every": -1}, r"finetune\.code_update_every must be an integer >= 0"),
    ({"code_update_every": 2.0}, r"finetune\.code_update_every must be an integer >= 0"),
    ({"code_update_every": 100}, r"finetune\.code_update_every must be < steps = 100"),
    ({"code_update_every": 5, "code_update_fraction": 0}, r"finetune\.code_update_fraction must "
                                                          r"be a number in \(0, 1\]"),
    ({"code_update_fraction": 1.5}, r"finetune\.code_update_fraction must be"),
    ({"code_update_fraction": "all"}, r"finetune\.code_update_fraction must be"),
    ({"schedule": "linear"}, r"finetune\.schedule must be one of constant, cosine"),
    ({"windows": 2}, r"finetune\.windows must be null .* > holdout = 2, got 2"),
    ({"windows": 8.0}, r"finetune\.windows must be"),
    (100, "finetune: must be an object")])
def test_finetune_spec_rejected(bad, match):
    from physkern.sweeps.quant import parse_finetune
    with pytest.raises(ValueError, match=match):
        parse_finetune(bad)


def test_finetune_recipes_load(tmp_path):
    from physkern.sweeps.quant import load_recipes
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"name": "a", "config": None, "finetune": {"steps": 5}}]))
    with pytest.raises(ValueError, match="finetune needs a quantization config"):
        load_recipes(str(p))
    p.write_text(json.dumps([{"name": "a", "config": {"method": "rtn", "bits": 3},
                              "finetune": {"steps": 5, "lr": 1e-3}}]))
    r = load_recipes(str(p))[0]
    assert r["finetune"] == {"steps": 5, "lr": 1e-3, "train_norms": True, "batch_size": 1,
                             "holdout": 2, "schedule": "constant", "windows": None,
                             "code_update_every": 0, "code_update_fraction": 0.1}
    assert r["label"] == "rtn+finetune"


def test_sweep_finetune_point_bits_and_resume(tiny_setup, capsys):  # noqa: F811
    root = tiny_setup
    rtn = {"method": "rtn", "bits": 3, "group_size": 16}
    recipes = [{"name": "rtn", "config": rtn},
               {"name": "rtn_ft", "config": rtn, "finetune": {"steps": 8, "lr": 3e-3}}]
    pts, payload, out = _sweep(root, root / "model", recipes, "finetune", capsys)
    ft = pts["rtn_ft"]
    assert ft["finetune"]["spec"] == {"steps": 8, "lr": 3e-3, "train_norms": True,
                                      "batch_size": 1, "holdout": 2, "schedule": "constant",
                                      "windows": None, "code_update_every": 0,
                                      "code_update_fraction": 0.1}
    assert ft["finetune"]["code_updates"] == [] and ft["finetune"]["codes_changed"] == 0
    assert ft["finetune"]["steps"] == 8 and len(ft["finetune"]["loss_curve"]) == 8
    assert ft["finetune"]["kept"] is True
    assert ft["finetune"]["holdout_kl_after"] < ft["finetune"]["holdout_kl_before"]
    assert ft["calibration"]["windows"] == 4 and pts["rtn"]["calibration"] is None
    assert ft["deterministic"] is False and ft["label"] == "rtn+finetune"
    assert ft["bits"] == pts["rtn"]["bits"]           # indices and dtypes unchanged
    assert pts["rtn"]["finetune"] is None
    assert ft["mean_nll"] != pts["rtn"]["mean_nll"]  # the trained values were evaluated
    summ = {s["recipe"]: s for s in payload["summary"]}
    assert summ["rtn_ft"]["finetune"] == {"spec": ft["finetune"]["spec"], "kept": [True]}
    # resume: a changed step count is a new point, the rest are skipped
    recipes[1]["finetune"]["steps"] = 6
    _, payload2, out2 = _sweep(root, root / "model", recipes, "finetune", capsys)
    assert out2.count("skipped") == 1
    assert [p["finetune"]["spec"]["steps"] for p in payload2["points"]
            if p["recipe"] == "rtn_ft"] == [8, 6]
    # points written before "schedule" / "windows" existed ran with their defaults: still the
    # same points on resume; a recipe fine-tuning on non-overlapping tiles with a cosine lr is
    # a new one
    path = root / "out" / "finetune.json"
    old = json.loads(path.read_text())
    for p in old["points"]:
        if p["finetune"] is not None:
            for key in ("schedule", "windows"):
                del p["finetune"]["spec"][key]
    path.write_text(json.dumps(old))
    recipes.append({"name": "rtn_ft_tiles", "config": rtn,
                    "finetune": {"steps": 4, "lr": 3e-3, "windows": 10, "schedule": "cosine"}})
    pts3, _, out3 = _sweep(root, root / "model", recipes, "finetune", capsys)
    assert out3.count("skipped") == 2
    tiles = pts3["rtn_ft_tiles"]["finetune"]
    assert tiles["schedule"] == "cosine" and tiles["spec"]["windows"] == 10
    assert tiles["train_windows"] == 8 and tiles["holdout_windows"] == 2
    assert "10 non-overlapping 32-token tiles" in tiles["windows_source"]
    assert pts3["rtn_ft_tiles"]["calibration"]["windows"] == 4  # the quantizer's calibration


def test_cosine_schedule_reaches_the_optimizer(tiny_llama, monkeypatch):
    """The lr Adam actually uses at step t is lr_group x (1 + cos(pi t / steps)) / 2."""
    import math
    student = copy.deepcopy(tiny_llama)
    quantize(student, COARSE, progress=False)
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        g = self.param_groups[0]
        seen.append(g["lr"] / g["initial_lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    steps = 6
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=steps, lr=1e-3,
                             schedule="cosine", progress=False)
    assert rep["schedule"] == "cosine" and len(seen) == steps
    want = [(1 + math.cos(math.pi * t / steps)) / 2 for t in range(steps)]
    assert seen == pytest.approx(want, rel=1e-12)
    seen.clear()
    finetune_quantized(copy.deepcopy(student), tiny_llama, CALIB, steps=3, lr=1e-3,
                       progress=False)
    assert seen == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule must be one of constant, cosine"):
        finetune_quantized(student, tiny_llama, CALIB, steps=1, schedule="warmup",
                           progress=False)


@pytest.mark.parametrize("cfg", [COARSE,
                                 CodebookConfig(k=4, block_dim=2, scope="row", stages=2,
                                                scales="row", calibrate=False),
                                 ScalarConfig(bits=3, group_size=8)],
                         ids=["codebook_layer", "codebook_row_2stages_scales", "rtn_offsets"])
def test_trainable_weight_is_dequantize_and_differentiable(cfg, request):
    """The trainable copies rebuild exactly the layer's dequantize() (both go through
    physkern.quant.reconstruct), and gradients reach codebooks, scales and offsets."""
    _, student = _quantized("tiny_llama", request, cfg)
    with differentiable_quantized(student, train_norms=False, write_back=False) as t:
        for layer in t.layers:
            w = layer.weight()
            assert torch.equal(w.detach(), layer.mod.dequantize())
            w.pow(2).sum().backward()
            for p, _ in layer.params():
                assert p.grad is not None and torch.isfinite(p.grad).all()
                assert p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# discrete code updates (physkern.quant.code_update inside the fine-tuning loop)


def _packed(model):
    return {n: m.packed.clone() for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear)}


def _without_seconds(rep):
    drop = ("seconds", "code_update_gram_seconds")
    return {k: ([{a: b for a, b in u.items() if a != "seconds"} for u in v]
                if k == "code_updates" else v) for k, v in rep.items() if k not in drop}


def test_code_updates_run_record_and_keep_the_format(tiny_llama):
    student = copy.deepcopy(tiny_llama)
    quantize(student, COARSE, progress=False)
    before, bits = _packed(student), bits_report(student).to_dict()
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=9, lr=1e-2, progress=False,
                             code_update_every=3, code_update_fraction=0.5)
    assert rep["code_update_every"] == 3 and rep["code_update_fraction"] == 0.5
    ups = rep["code_updates"]
    assert [u["step"] for u in ups] == [3, 6]          # before steps 3 and 6, not after the last
    assert rep["code_update_layers"] == 14 and rep["code_update_skipped"] == {}
    for u in ups:
        assert u["layers"] == 14 and u["objective_after"] <= u["objective_before"]
        assert 0 < u["codes_changed"] <= u["codes_visited"]
    assert rep["kept"] is True and rep["holdout_kl_after"] < rep["holdout_kl_before"]
    assert "code updates before steps [3, 6] on 14 layers" in rep["note"]
    after = _packed(student)
    differ = sum(int((QuantizedLinear.quantized_weight(m).indices() !=
                      _unpacked(m, before[n])).sum())
                 for n, m in student.named_modules() if isinstance(m, QuantizedLinear))
    assert rep["codes_changed"] == differ > 0
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert bits_report(student).to_dict() == bits       # same K, same packing: same bits
    with torch.no_grad():   # the written-back codes are what the custom-op forward reads
        assert torch.allclose(student(X).logits, dense_copy(student)(X).logits, atol=1e-4,
                              rtol=1e-4)


def _unpacked(mod, packed):
    from physkern.quant.packing import unpack_indices
    qw = mod.quantized_weight()
    return unpack_indices(packed, qw.bits, qw.n_blocks)


def test_code_updates_off_is_the_old_run(tiny_llama):
    """code_update_every 0 (the default) gives the run of before: same values, same record
    apart from the new keys, and the training order does not depend on the update option."""
    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    quantize(a, COARSE, progress=False)
    quantize(b, COARSE, progress=False)
    ra = finetune_quantized(a, tiny_llama, CALIB, steps=4, lr=1e-2, progress=False)
    rb = finetune_quantized(b, tiny_llama, CALIB, steps=4, lr=1e-2, progress=False,
                            code_update_every=0, code_update_fraction=0.7)
    assert ra["code_updates"] == [] and ra["codes_changed"] == 0
    assert "code_update_layers" not in ra
    assert ra["loss_curve"] == rb["loss_curve"]
    assert all(torch.equal(x, y) for x, y in zip(_state(a).values(), _state(b).values()))


def test_code_updates_are_deterministic_per_seed(tiny_gpt2):
    runs = []
    for seed in (3, 3, 4):
        student = copy.deepcopy(tiny_gpt2)
        quantize(student, COARSE, progress=False)
        rep = finetune_quantized(student, tiny_gpt2, CALIB, steps=6, lr=1e-2, seed=seed,
                                 progress=False, code_update_every=2,
                                 code_update_fraction=0.25)
        runs.append((_state(student), _without_seconds(rep)))
    (s3, r3), (s3b, r3b), (s4, r4) = runs
    assert r3 == r3b and all(torch.equal(s3[k], s3b[k]) for k in s3)
    assert r3["code_updates"] != r4["code_updates"]


def test_code_updates_behind_the_holdout_guard(tiny_llama):
    """An absurd lr makes the held-out KL worse: the codes are restored with everything else."""
    student = copy.deepcopy(tiny_llama)
    quantize(student, COARSE, progress=False)
    state = _state(student)
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=3, lr=1e4, progress=False,
                             code_update_every=1, code_update_fraction=1.0)
    assert rep["kept"] is False and "original codes" in rep["note"]
    assert rep["codes_changed"] == 0
    assert all(torch.equal(state[k], v) for k, v in _state(student).items())


def test_code_updates_skip_the_embedding_table_and_handle_rotation(tiny_llama):
    student = copy.deepcopy(tiny_llama)
    quantize(student, CodebookConfig(k=4, block_dim=2, scope="layer", calibrate=False,
                                     rotation="hadamard"),
             embedding=CodebookConfig(k=8, block_dim=2, scope="layer", calibrate=False),
             progress=False)
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=4, lr=1e-2, progress=False,
                             code_update_every=2, code_update_fraction=1.0)
    assert rep["code_update_skipped"] == {"lm_head": "also the quantized embedding's table"}
    assert rep["code_update_layers"] == 14
    assert rep["code_updates"][0]["objective_after"] < rep["code_updates"][0]["objective_before"]
    with torch.no_grad():   # rotated layers: the new codes are in the stored basis
        assert torch.allclose(student(X).logits, dense_copy(student)(X).logits, atol=1e-4,
                              rtol=1e-4)


def test_input_grams_share_one_tensor_per_input(tiny_llama):
    """The teacher Grams equal physkern.calib's independent E[x x^T]; q/k/v share one."""
    from physkern.calib import Gram, collect_statistics
    from physkern.finetune import _input_grams
    from physkern.linear import decoder_linear_layers
    layers = decoder_linear_layers(tiny_llama)
    grams = _input_grams(tiny_llama, {l.name: l.module for l in layers}, CALIB, 3)
    ref = collect_statistics(tiny_llama, CALIB, {"g": lambda l: Gram(l.in_features)}, layers,
                             progress=False)
    for l in layers:
        torch.testing.assert_close(grams[l.name], ref[l.name]["g"].mean, rtol=1e-5, atol=1e-6)
    att = "model.layers.0.self_attn."
    assert grams[att + "q_proj"] is grams[att + "k_proj"] is grams[att + "v_proj"]
    assert grams[att + "o_proj"] is not grams[att + "q_proj"]


def test_code_update_bad_arguments(tiny_gpt2):
    student = copy.deepcopy(tiny_gpt2)
    quantize(student, COARSE, progress=False)
    ok = dict(steps=4, progress=False)
    for kw, match in [(dict(code_update_every=-1), "code_update_every must be an integer >= 0"),
                      (dict(code_update_every=True), "code_update_every must be an integer"),
                      (dict(code_update_every=4), r"code_update_every must be < steps = 4"),
                      (dict(code_update_every=1, code_update_fraction=0.0),
                       r"code_update_fraction must be a number in \(0, 1\]"),
                      (dict(code_update_fraction=1.01), "code_update_fraction"),
                      (dict(code_update_fraction=None), "code_update_fraction")]:
        with pytest.raises(ValueError, match=match):
            finetune_quantized(student, tiny_gpt2, CALIB, **{**ok, **kw})


def test_code_update_recipes(tiny_llama):
    """Recipe keys: defaults in FINETUNE_DEFAULTS equal finetune_quantized's, run_finetune
    passes them, and code updates are refused where the teacher is not the target."""
    import inspect
    from physkern.recipe import FINETUNE_DEFAULTS, Recipe, parse_finetune, run_finetune
    sig = inspect.signature(finetune_quantized).parameters
    for key in ("code_update_every", "code_update_fraction"):
        assert sig[key].default == FINETUNE_DEFAULTS[key]
    spec = parse_finetune({"steps": 4, "lr": 1e-2, "code_update_every": 2,
                           "code_update_fraction": 1})
    assert spec["code_update_fraction"] == 1.0 and spec["code_update_every"] == 2
    student = copy.deepcopy(tiny_llama)
    quantize(student, COARSE, progress=False)
    rep = run_finetune(student, tiny_llama, CALIB, spec, 0, "test windows")
    assert rep["spec"] == spec and [u["step"] for u in rep["code_updates"]] == [2]
    assert json.loads(json.dumps(rep))["code_updates"] == rep["code_updates"]  # JSON as is
    cfg = {"method": "codebook", "k": 4, "block_dim": 2, "scope": "layer"}
    with pytest.raises(ValueError, match="code_update_every needs the teacher's layers"):
        Recipe(config=cfg, smooth={"alpha": 0.5}, finetune=spec)
    r = Recipe(config=cfg, finetune=spec)
    assert Recipe.from_dict(r.to_dict()).finetune == spec


def test_code_update_objective_is_the_teacher_layer_error(tiny_gpt2):
    """The recorded objective before an update equals sum over layers of
    tr((W - Q) H (W - Q)^T) computed here: W the teacher's weight read by hand (GPT-2 Conv1D
    stores [in, out]), Q the layer's dequantize(), H = E[x x^T] from physkern.calib."""
    from physkern.calib import Gram, collect_statistics
    from physkern.finetune import _CodeUpdater
    from physkern.linear import decoder_linear_layers
    student = copy.deepcopy(tiny_gpt2)
    quantize(student, COARSE, progress=False)
    layers = decoder_linear_layers(tiny_gpt2)
    grams = collect_statistics(tiny_gpt2, CALIB, {"g": lambda l: Gram(l.in_features)}, layers,
                               progress=False)
    want = 0.0
    for l in layers:
        w = l.module.weight.detach().double()
        w = w.T if type(l.module).__name__ == "Conv1D" else w
        e = w - student.get_submodule(l.name).dequantize(torch.float64)
        want += float(torch.trace(e @ grams[l.name]["g"].mean.double() @ e.T))
    with differentiable_quantized(student, train_norms=False, write_back=False) as tr:
        up = _CodeUpdater(student, tiny_gpt2, tr, CALIB, 1.0, 0, 2)
        up(0)
    (rec,) = up.records
    assert rec["layers"] == len(layers) == 8
    assert rec["objective_before"] == pytest.approx(want, rel=1e-5)
    assert rec["objective_after"] < rec["objective_before"]


# ----------------------------------------------------------------------------------------------
# linearised code updates (the end-to-end gradient's P step)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_linearized_code_updates_run_and_lower_their_objective(tiny_llama, rotation):
    student = copy.deepcopy(tiny_llama)
    quantize(student, CodebookConfig(k=4, block_dim=2, scope="layer", calibrate=False,
                                     rotation=rotation), progress=False)
    bits = bits_report(student).to_dict()
    rep = finetune_quantized(student, tiny_llama, CALIB, steps=6, lr=1e-2, progress=False,
                             code_update_every=2, code_update_fraction=1.0,
                             code_update_objective="linearized", code_update_step=0.3)
    assert rep["code_update_objective"] == "linearized" and rep["code_update_step"] == 0.3
    ups = rep["code_updates"]
    assert [u["step"] for u in ups] == [2, 4]
    for u in ups:
        assert u["objective_after"] <= u["objective_before"] and u["codes_changed"] > 0
        assert u["gradient_windows"] == min(4, CALIB.shape[0] - 2) and u["eta_median"] > 0
    assert "linearised objective" in rep["note"]
    assert bits_report(student).to_dict() == bits
    with torch.no_grad():
        assert torch.allclose(student(X).logits, dense_copy(student)(X).logits, atol=1e-4,
                              rtol=1e-4)


def test_linearized_code_updates_follow_the_gradient(tiny_gpt2):
    """A tiny step moves (almost) nothing; the layer objective's updates and the linearised ones
    move different codes; both deterministic per seed."""
    def run(objective, step=0.05, seed=0):
        student = copy.deepcopy(tiny_gpt2)
        quantize(student, COARSE, progress=False)
        kw = {} if objective == "layer" else dict(code_update_objective=objective,
                                                  code_update_step=step)
        rep = finetune_quantized(student, tiny_gpt2, CALIB, steps=3, lr=1e-2, seed=seed,
                                 progress=False, code_update_every=1, code_update_fraction=1.0,
                                 **kw)
        return _state(student), _without_seconds(rep)
    (s1, r1), (s1b, r1b) = run("linearized", 0.3), run("linearized", 0.3)
    assert r1 == r1b and all(torch.equal(s1[k], s1b[k]) for k in s1)
    tiny = run("linearized", 1e-7)[1]
    assert sum(u["codes_changed"] for u in tiny["code_updates"]) == 0
    layer = run("layer")[1]
    assert [u["codes_changed"] for u in layer["code_updates"]] != \
        [u["codes_changed"] for u in r1["code_updates"]]


def test_linearized_code_update_arguments_and_recipe_keys(tiny_gpt2):
    from physkern.recipe import parse_finetune
    student = copy.deepcopy(tiny_gpt2)
    quantize(student, COARSE, progress=False)
    for kw, match in [(dict(code_update_objective="global"), "code_update_objective must be"),
                      (dict(code_update_step=0.0), "code_update_step must be"),
                      (dict(code_update_step=float("inf")), "code_update_step must be"),
                      (dict(code_update_step=True), "code_update_step must be")]:
        with pytest.raises(ValueError, match=match):
            finetune_quantized(student, tiny_gpt2, CALIB, steps=4, progress=False, **kw)
    # defaults are left out of the parsed spec (old resume keys hold), others kept
    assert "code_update_objective" not in parse_finetune({"steps": 4})
    assert "code_update_step" not in parse_finetune({"steps": 4, "code_update_step": 0.05})
    spec = parse_finetune({"steps": 4, "code_update_every": 2,
                           "code_update_objective": "linearized", "code_update_step": 1})
    assert spec["code_update_objective"] == "linearized" and spec["code_update_step"] == 1.0
    with pytest.raises(ValueError, match=r"finetune\.code_update_objective must be"):
        parse_finetune({"steps": 4, "code_update_objective": "x"})
    from physkern.recipe import run_finetune
    rep = run_finetune(student, tiny_gpt2, CALIB, spec, 0, "test windows")
    assert rep["code_update_objective"] == "linearized" and rep["code_update_step"] == 1.0
    assert "linearised objective" in rep["note"]
