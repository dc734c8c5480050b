"""Saving and loading models with factorized layers (MPOLinear, LowRankLinear; issue 21).

The reference is the in-memory model that was saved: load_quantized (and transformers'
from_pretrained through physkern's HfQuantizer) must give the same logits bit for bit. A saved
model is untrusted input: crafted layouts (bond chain, factor products, dtypes) and truncated or
mismatched tensors fail with one-line ValueErrors naming the file, layer and field, before
anything is allocated. bits_report and the bytes on disk agree within 1%.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _crafted import edit_meta, fresh_copy, guard_allocations, load_fails, tensor_bytes

import physkern
from physkern.methods.factorized import apply_factorization, check_savable
from physkern.methods.lowrank import SVDConfig
from physkern.methods.mpo import MPOConfig
from physkern.quant.accounting import bits_report
from physkern.research.mpo import MPOLinear
from physkern.research.prune import LowRankLinear
from physkern.serialization import MARKER, load_quantized, save_quantized

X = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
ST = "model.safetensors"
MPO_LAYER = "model.layers.0.mlp.gate_proj"    # [64, 32]: 2 cores (8, 8) x (8, 4)
SVD_LAYER = "model.layers.0.self_attn.o_proj"  # [32, 32]


def _factorized(model, dense_dtype=None, quantize=False):
    """MPO on the MLP gate/up projections, low-rank SVD on o_proj (+ codebooks elsewhere)."""
    m = copy.deepcopy(model)
    apply_factorization(m, MPOConfig(chi=3, cores=2, sweeps=1,
                                     layers=["*.mlp.gate_proj", "*.mlp.up_proj"]))
    apply_factorization(m, SVDConfig(rank=5, layers=["*.self_attn.o_proj"]))
    if quantize:
        physkern.quantize(m, physkern.CodebookConfig(k=8, block_dim=2, scope="layer",
                                                     calibrate=False, iters=3),
                          progress=False)
    if dense_dtype is not None:
        from physkern.dense import set_dense_storage_dtype
        set_dense_storage_dtype(m, dense_dtype)
    return m


def _logits(model, x=X):
    with torch.no_grad():
        return model(x).logits




@pytest.fixture(scope="module")
def fact_llama(tiny_llama):
    return _factorized(tiny_llama)


@pytest.fixture(scope="module")
def saved(fact_llama, tmp_path_factory):
    return save_quantized(fact_llama, tmp_path_factory.mktemp("f") / "q")


@pytest.fixture
def crafted(saved, tmp_path):
    return fresh_copy(saved, tmp_path)


def _edit_meta(d, fn):
    edit_meta(d, fn, "factorized_layers")


def _edit_tensors(d, fn):
    sd = {k: v.clone() for k, v in load_file(str(d / ST)).items()}
    fn(sd)
    save_file(sd, str(d / ST), metadata={"format": "pt"})




# ---- round trips ---------------------------------------------------------------------------

def test_round_trip_mpo_and_lowrank_identical_logits(fact_llama, saved):
    loaded, _ = load_quantized(saved)
    for name, cls in ((MPO_LAYER, MPOLinear), (SVD_LAYER, LowRankLinear)):
        a, b = fact_llama.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, cls)
        for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and ta.dtype == tb.dtype and torch.equal(ta, tb), (name, ka)
    assert torch.equal(_logits(loaded), _logits(fact_llama))
    meta = json.loads((saved / MARKER).read_text())
    assert meta["format_version"] == 2
    fm = meta["factorized_layers"][MPO_LAYER]
    assert fm["type"] == "mpo" and fm["bonds"][0] == fm["bonds"][-1] == 1
    assert meta["factorized_layers"][SVD_LAYER] == {
        "type": "lowrank", "in_features": 32, "out_features": 32, "rank": 5,
        "up_dtype": "float16", "down_dtype": "float16", "bias_dtype": None}
    assert not meta["quantized_layers"]
    # the loaded model counts the same stored bytes as the saved one
    assert bits_report(loaded).total_bytes == bits_report(fact_llama).total_bytes


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_round_trip_mixed_with_codebooks_and_dense_dtype(request, fixture, tmp_path):
    """Factorized + codebook-quantized layers, dense tensors (and fp32 factors) at bf16."""
    model = copy.deepcopy(request.getfixturevalue(fixture))
    m = model
    apply_factorization(m, MPOConfig(chi=4, cores=2, sweeps=0, layers=["*.mlp.*"],
                                     dtype="float32"))
    apply_factorization(m, SVDConfig(rank=6, layers=["*.0.*"], dtype="float32"))
    physkern.quantize(m, physkern.CodebookConfig(k=8, block_dim=2, scope="layer",
                                                 calibrate=False, iters=3), progress=False)
    from physkern.dense import set_dense_storage_dtype
    set_dense_storage_dtype(m, "bfloat16")
    kinds = {v["kind"] for v in bits_report(m).layers.values()}
    assert kinds == {"quantized", "MPOLinear", "LowRankLinear"}
    d = save_quantized(m, tmp_path / "q")
    loaded, _ = load_quantized(d)
    assert torch.equal(_logits(loaded), _logits(m))
    # fp32 factors are stored at the dense dtype (rounded in memory: lossless), and counted so
    meta = json.loads((d / MARKER).read_text())
    assert {fm.get("dtype", fm.get("up_dtype")) for fm in meta["factorized_layers"].values()} \
        == {"bfloat16"}
    rep = bits_report(m)
    assert abs(tensor_bytes(d) - rep.total_bytes) <= 0.01 * tensor_bytes(d)
    assert bits_report(loaded).total_bytes == rep.total_bytes


def test_bits_equal_bytes(fact_llama, saved):
    rep = bits_report(fact_llama)
    disk = tensor_bytes(saved)
    assert abs(disk - rep.total_bytes) <= 0.01 * disk
    # the factorized layers' bits are exactly their tensors' bytes in the file
    from physkern.checkpoint import read_safetensors_header
    header = read_safetensors_header(saved / ST)
    for name in (MPO_LAYER, SVD_LAYER):
        stored = sum(torch.empty(0, dtype=dt).element_size() * int(torch.tensor(sh).prod())
                     for k, (dt, sh) in header.items() if k.startswith(name + "."))
        assert rep.layers[name]["total_bits"] == 8 * stored


def test_sharded_save_round_trips(fact_llama, tmp_path):
    d = save_quantized(fact_llama, tmp_path / "s", max_shard_size=4000)
    assert (d / "model.safetensors.index.json").is_file()
    loaded, _ = load_quantized(d)
    assert torch.equal(_logits(loaded), _logits(fact_llama))


def test_from_pretrained_equals_load_quantized(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    m = _factorized(tiny_llama, quantize=True)
    d = save_quantized(m, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert cfg["format_version"] == 2 and set(cfg["factorized_layers"]) == \
        set(json.loads((d / MARKER).read_text())["factorized_layers"])
    theirs = AutoModelForCausalLM.from_pretrained(d).eval()
    assert isinstance(theirs.get_submodule(MPO_LAYER), MPOLinear)
    assert isinstance(theirs.get_submodule(SVD_LAYER), LowRankLinear)
    for name in (MPO_LAYER, SVD_LAYER):  # factors kept at their stored dtype, not cast
        for (_, a), (_, b) in zip(m.get_submodule(name).state_dict().items(),
                                  theirs.get_submodule(name).state_dict().items()):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    theirs.save_pretrained(tmp_path / "again")  # keeps the quantization config: loads again
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert isinstance(again.get_submodule(MPO_LAYER), MPOLinear)
    assert torch.equal(_logits(again), _logits(m))
    assert torch.equal(_logits(theirs), _logits(m))


def test_saving_checks_layouts_and_stays_atomic(fact_llama, tmp_path, monkeypatch):
    check_savable(fact_llama)
    bad = copy.deepcopy(fact_llama)
    mod = bad.get_submodule(MPO_LAYER)
    mod.cores[1] = torch.nn.Parameter(mod.cores[1].detach().float(), requires_grad=False)
    with pytest.raises(ValueError, match="share one dtype"):
        save_quantized(bad, tmp_path / "x")
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary folder

    class Other(torch.nn.Linear):
        def weight_numel(self):
            return 1

        def storage_bits(self):
            return {}
    other = copy.deepcopy(fact_llama)
    other.model.layers[1].mlp.down_proj = Other(64, 32)
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        check_savable(other)
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        save_quantized(other, tmp_path / "x")
    assert not any(tmp_path.iterdir())


# ---- crafted directories -------------------------------------------------------------------

@pytest.mark.parametrize("layer,field,value,says", [
    (MPO_LAYER, "bonds", [1, 4], "bonds must be a list of 3 entries"),
    (MPO_LAYER, "bonds", [2, 3, 1], "bonds must start and end with 1"),
    (MPO_LAYER, "bonds", [1, 0, 1], "bonds entry must be a positive integer"),
    (MPO_LAYER, "out_factors", [8, 4], "out_factors [8, 4] multiply to 32, not out_features 64"),
    (MPO_LAYER, "in_factors", [8, 4, 1], "in_factors must be a list of 2 entries"),
    (MPO_LAYER, "in_factors", [4, 4], "in_factors [4, 4] multiply to 16, not in_features 32"),
    (MPO_LAYER, "dtype", "int8", "dtype must be one of"),
    (MPO_LAYER, "type", "tucker", "type must be one of"),
    (MPO_LAYER, "out_features", 128, "out_factors [8, 8] multiply to 64, not out_features 128"),
    (SVD_LAYER, "rank", 0, "rank must be a positive integer"),
    (SVD_LAYER, "rank", True, "rank must be a positive integer"),
    (SVD_LAYER, "up_dtype", None, "up_dtype must be one of"),
    (SVD_LAYER, "bias_dtype", "int32", "bias_dtype must be one of"),
])
def test_bad_factorized_metadata(crafted, layer, field, value, says):
    _edit_meta(crafted, lambda f: f[layer].update({field: value}))
    load_fails(crafted, MARKER, f"layer {layer}", says)


def test_layouts_must_match_the_model(crafted):
    def swap(f):  # a layout valid on its own, on a layer of another shape
        f["model.layers.0.mlp.down_proj"] = f.pop(MPO_LAYER)
    _edit_meta(crafted, swap)
    load_fails(crafted, MARKER, "layer model.layers.0.mlp.down_proj",
                "in_features 32, out_features 64 do not match the model's 64, 32")
    _edit_meta(crafted, lambda f: f.update({MPO_LAYER: f.pop("model.layers.0.mlp.down_proj"),
                                            "model.layers.9.nothing": f[SVD_LAYER]}))
    load_fails(crafted, MARKER, "layer model.layers.9.nothing", "no linear layer")


def test_factorized_needs_version_2(crafted):
    meta = json.loads((crafted / MARKER).read_text())
    meta["format_version"] = 1
    (crafted / MARKER).write_text(json.dumps(meta))
    load_fails(crafted, MARKER, "factorized_layers need format_version 2")


def test_wrong_bond_dims_in_file_and_meta(crafted, fact_llama):
    """Both the layout's bond and the file's core changed consistently for core 0 only: the
    chain breaks at core 1 (its left bond no longer matches), caught on the header."""
    r = fact_llama.get_submodule(MPO_LAYER).cores[0].shape[3]
    _edit_meta(crafted, lambda f: f[MPO_LAYER].update(bonds=[1, r + 1, 1]))
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "cores.0 has shape",
                f"implies [1, 8, 8, {r + 1}]")
    _edit_tensors(crafted, lambda sd: sd.update({f"{MPO_LAYER}.cores.0": torch.zeros(
        1, 8, 8, r + 1, dtype=torch.float16)}))
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "cores.1 has shape",
                f"implies [{r + 1}, 8, 4, 1]")


def test_wrong_dtype_in_file(crafted):
    _edit_tensors(crafted, lambda sd: sd.update({f"{SVD_LAYER}.up": sd[f"{SVD_LAYER}.up"].float()}))
    load_fails(crafted, ST, f"layer {SVD_LAYER}", "up has dtype F32", "implies float16")


def test_wrong_dtype_in_meta(crafted):
    _edit_meta(crafted, lambda f: f[MPO_LAYER].update(dtype="bfloat16"))
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "cores.0 has dtype F16", "implies bfloat16")


def test_missing_and_unexpected_factor(crafted):
    _edit_tensors(crafted, lambda sd: sd.pop(f"{MPO_LAYER}.cores.1"))
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "tensor cores.1 is missing")
    _edit_tensors(crafted, lambda sd: sd.update({
        f"{MPO_LAYER}.cores.1": torch.zeros(3, 8, 4, 1, dtype=torch.float16),
        f"{MPO_LAYER}.cores.2": torch.zeros(1)}))
    load_fails(crafted, ST, "unexpected tensors", f"{MPO_LAYER}.cores.2")


@pytest.mark.parametrize("cut", [8, 2000, 100])
def test_truncated_file(crafted, cut):
    data = (crafted / ST).read_bytes()
    (crafted / ST).write_bytes(data[:cut] if cut < 1000 else data[:-cut])
    load_fails(crafted, ST)


def test_inflated_bonds_fail_before_allocating(crafted, monkeypatch):
    """A bond of 2**40 in the layout (cores of terabytes) is refused against the header."""
    _edit_meta(crafted, lambda f: f[MPO_LAYER].update(bonds=[1, 2**40, 1]))
    guard_allocations(monkeypatch)
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "cores.0 has shape", str(2**40))


# ---- the CLI -------------------------------------------------------------------------------

def test_quantize_cli_factorize_recipe_end_to_end(saved_tiny, tmp_path, capsys):
    """A factorize recipe on a local checkpoint (which would stream) runs in memory with a
    note, saves, and the saved model loads with the factorized layers and scores with `ppl`."""
    from physkern.cli import main
    recipes = tmp_path / "r.json"
    recipes.write_text(json.dumps([
        {"name": "svd_rtn", "factorize": {"method": "svd", "rank": 4, "layers": ["*.mlp.*"]},
         "config": {"method": "rtn", "bits": 4, "group_size": 16}},
        {"name": "mpo_only", "factorize": {"method": "mpo", "chi": 3, "cores": 2, "sweeps": 0,
                                           "layers": ["*.attn.c_proj"]}}]))
    for name in ("svd_rtn", "mpo_only"):
        out = tmp_path / name
        rc = main(["quantize", "--model", str(saved_tiny / "model"), "--corpus",
                   str(saved_tiny / "corpus.txt"), "--recipe", f"{recipes}:{name}",
                   "--calib-windows", "2", "--calib-window", "32", "--out", str(out)])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert "factorize" in cap.err and "in memory" in cap.err
        meta = json.loads((out / MARKER).read_text())
        assert meta["whole_recipe"]["factorize"]["method"] == name[:3]
        loaded, tok = load_quantized(out)
        assert tok is not None
        kinds = {type(m) for m in loaded.modules()}
        assert (LowRankLinear if name == "svd_rtn" else MPOLinear) in kinds
        assert (physkern.QuantizedLinear in kinds) == (name == "svd_rtn")
        rep = bits_report(loaded)
        assert abs(tensor_bytes(out) - rep.total_bytes) <= 0.01 * tensor_bytes(out)
    rc = main(["ppl", "--model", str(tmp_path / "mpo_only"), "--corpus",
               str(saved_tiny / "corpus.txt"), "--tokens", "256", "--window", "32"])
    assert rc == 0, capsys.readouterr().err
