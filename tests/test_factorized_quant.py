"""Codebook / RTN quantization of MPO cores and low-rank factors (factorize's "quantize",
physkern.methods.factor_quant, physkern.research.quantized_factors; issue 21.2).

References are independent of the code under test: each quantized factor is decoded here by
an explicit loop over the unpacked indices (not physkern.quant.reconstruct), the MPO contracted
by a hand-written einsum (not physkern.research.mpo), bits counted from the layout's formula
(not from tensor sizes), and saved models compared with the in-memory model they came from.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from _crafted import edit_meta, fresh_copy, guard_allocations, load_fails, tensor_bytes

import physkern
from physkern.methods.factor_quant import check_factor_config, quantize_factors
from physkern.methods.factorized import (apply_factorization, factorization_from_dict,
                                         heal_factorized)
from physkern.methods.lowrank import SVDConfig
from physkern.methods.mpo import MPOConfig
from physkern.quant.accounting import bits_report
from physkern.quant.packing import unpack_indices
from physkern.research.mpo import MPOLinear
from physkern.research.prune import LowRankLinear
from physkern.research.quantized_factors import (QuantizedFactor, QuantizedLowRankLinear,
                                                 QuantizedMPOLinear, matrix_shape)
from physkern.serialization import MARKER, load_quantized, save_quantized

CB = {"method": "codebook", "k": 8, "block_dim": 2, "scope": "layer", "calibrate": False,
      "iters": 5}
RTN = {"method": "rtn", "bits": 3, "group_size": 2}
X = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
ST = "model.safetensors"
MPO_LAYER = "model.layers.0.mlp.gate_proj"     # [64, 32]: 2 cores (8, 8) x (8, 4)
SVD_LAYER = "model.layers.0.self_attn.o_proj"  # [32, 32]


# ---- independent references ------------------------------------------------------------------

def decode(q: QuantizedFactor) -> torch.Tensor:
    """The factor from its buffers by explicit loops, float64, in the factor's shape:
    W[r, j] = scale[r, j // g] * sum_s C[s, r // cr, idx[s, r, j // d], j % d] + offset."""
    S, _, K, d = q.codebooks.shape
    rows, cols = matrix_shape(q.shape)
    idx = unpack_indices(q.packed, max(1, math.ceil(math.log2(K))), cols // d)
    W = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for j in range(cols):
            v = sum(float(q.codebooks[s, r // q.codebook_rows, idx[s, r, j // d], j % d])
                    for s in range(S))
            if q.scales is not None:
                v *= float(q.scales[r, j // q.scale_group])
            if q.offsets is not None:
                v += float(q.offsets[r, j // q.scale_group])
            W[r, j] = v
    return W.reshape(q.shape)


def dense_mpo(cores) -> torch.Tensor:
    """W [out, in] of 2 or 3 cores by one einsum per case (row-major multi-indices)."""
    if len(cores) == 2:
        a, b = cores
        t = torch.einsum("xaby,ycdz->acbd", a, b)
        return t.reshape(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2])
    a, b, c = cores
    t = torch.einsum("xabp,pcdq,qefz->acebdf", a, b, c)
    return t.reshape(a.shape[1] * b.shape[1] * c.shape[1], a.shape[2] * b.shape[2] * c.shape[2])


def bits_by_hand(q: QuantizedFactor) -> int:
    """Indices in whole int32 words per row and stage, codebooks and scales/offsets at 16 bits
    (fp16 everywhere here), from the layout alone."""
    lay = q.layout()
    rows, cols = matrix_shape(q.shape)
    ib = max(1, math.ceil(math.log2(lay["k"])))
    words = math.ceil(cols // lay["block_dim"] * ib / 32)
    n = lay["stages"] * rows * words * 32
    n += lay["stages"] * (rows // lay["codebook_rows"]) * lay["k"] * lay["block_dim"] * 16
    per = rows * (cols // lay["scale_group"]) * 16
    n += per * (lay["scales_dtype"] is not None) + per * (lay["offsets_dtype"] is not None)
    return n


def _mpo(cores=2, chi=3, seed=0, out=64, inp=32):
    torch.manual_seed(seed)
    return MPOLinear.from_linear(torch.randn(out, inp), chi, cores=cores, sweeps=0)


def _logits(model, x=X):
    with torch.no_grad():
        return model(x).logits




# ---- forward = independent reference -----------------------------------------------------------

@pytest.mark.parametrize("cores", [2, 3])
@pytest.mark.parametrize("qcfg", [CB, RTN], ids=["codebook", "rtn"])
@pytest.mark.parametrize("mode", ["contract", "dense", "auto"])
def test_mpo_forward_equals_dense_product_of_decoded_cores(cores, qcfg, mode):
    q = quantize_factors(_mpo(cores, chi=4), check_factor_config(dict(qcfg)))
    assert isinstance(q, QuantizedMPOLinear)
    q.mode = mode
    W = dense_mpo([decode(c) for c in q.cores])                    # float64 reference
    x = torch.randn(5, 3, 32)
    ref = x.double() @ W.t()
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (5, 3, 64)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(q.weight().double(), W, atol=1e-6)
    # the dequantized cores differ from the float ones (it is quantized), within reason
    Wf = _mpo(cores, chi=4).weight().double()
    err = float((W - Wf).norm() / Wf.norm())
    assert 1e-4 < err < 1.0


def test_lowrank_forward_equals_product_of_decoded_factors():
    torch.manual_seed(1)
    lr = LowRankLinear.from_weight(torch.randn(24, 40), 6, bias=torch.randn(24))
    q = quantize_factors(lr, check_factor_config(dict(RTN)))
    assert isinstance(q, QuantizedLowRankLinear) and q.rank == 6
    W = decode(q.up) @ decode(q.down)
    x = torch.randn(7, 40)
    ref = x.double() @ W.t() + lr.bias.double()
    assert torch.allclose(q(x).double(), ref, atol=1e-5)
    assert torch.allclose(q.weight().double(), W, atol=1e-6)


def test_exact_codebook_gives_the_float_mpo():
    """Cores whose values take 6 levels, codebooks of K = 6 scalars (d = 1, no scales): k-means
    finds every level, so the quantized MPO computes exactly what the float one does."""
    g = torch.Generator().manual_seed(4)
    levels = torch.tensor([-1.5, -0.75, -0.25, 0.125, 0.5, 1.0])
    cores = [levels[torch.randint(0, 6, s, generator=g)] for s in ((1, 8, 8, 3), (3, 8, 4, 1))]
    for c in cores:
        c.view(-1)[:6] = levels  # every level present in every core
    f = MPOLinear(cores)
    for k in (6, 7):  # K = distinct values, and one more
        q = quantize_factors(f, check_factor_config(
            {"method": "codebook", "k": k, "block_dim": 1, "scope": "layer", "scales": "none",
             "calibrate": False}))
        for a, b in zip(q.core_tensors(), f.core_tensors()):
            assert torch.equal(a, b), k
        x = torch.randn(4, 32)
        for mode in ("contract", "dense"):
            q.mode = f.mode = mode
            assert torch.equal(q(x), f(x)), (k, mode)


# ---- bits ------------------------------------------------------------------------------------

def _model(tiny_llama, mpo_q=CB, svd_q=RTN, dense_q=False):
    m = copy.deepcopy(tiny_llama)
    apply_factorization(m, MPOConfig(chi=3, cores=2, sweeps=1, layers=["*.mlp.gate_proj"],
                                     quantize=mpo_q))
    apply_factorization(m, SVDConfig(rank=4, layers=["*.self_attn.o_proj"], quantize=svd_q))
    if dense_q:
        physkern.quantize(m, physkern.CodebookConfig(k=8, block_dim=2, scope="layer",
                                                     calibrate=False, iters=3), progress=False)
    return m


@pytest.fixture(scope="module")
def qmodel(tiny_llama):
    return _model(tiny_llama)


@pytest.fixture(scope="module")
def saved(qmodel, tmp_path_factory):
    return save_quantized(qmodel, tmp_path_factory.mktemp("fq") / "q")


def test_bits_by_hand_equal_bits_report(qmodel, tiny_llama):
    rep = bits_report(qmodel)
    for name in (MPO_LAYER, MPO_LAYER.replace("0.mlp", "1.mlp"), SVD_LAYER):
        mod = qmodel.get_submodule(name)
        facs = list(mod.cores) if isinstance(mod, QuantizedMPOLinear) else [mod.up, mod.down]
        hand = sum(bits_by_hand(q) for q in facs)
        info = rep.layers[name]
        assert info["total_bits"] == hand and info["weights"] == mod.out_features * \
            mod.in_features
        assert info["kind"] in ("QuantizedMPOLinear", "QuantizedLowRankLinear")
    # whole model: the factorized layers' stored bits replace their float weights
    base = bits_report(tiny_llama)
    assert rep.model_parameters == base.model_parameters
    swapped = sum(rep.layers[n]["total_bits"] for n in rep.layers)
    dense_w = sum(qmodel.get_submodule(n).out_features * qmodel.get_submodule(n).in_features
                  for n in rep.layers) * 32
    assert rep.model_bits == base.model_bits - dense_w + swapped


def test_bits_equal_bytes_of_the_saved_file(qmodel, saved):
    rep = bits_report(qmodel)
    disk = tensor_bytes(saved)
    assert abs(disk - rep.total_bytes) <= 0.01 * disk
    from physkern.checkpoint import read_safetensors_header
    header = read_safetensors_header(saved / ST)
    for name in (MPO_LAYER, SVD_LAYER):
        stored = sum(torch.empty(0, dtype=dt).element_size() * math.prod(sh)
                     for k, (dt, sh) in header.items() if k.startswith(name + "."))
        assert rep.layers[name]["total_bits"] == 8 * stored


def test_bits_target_counts_index_bits():
    """With quantize, a bits target converts with the quantizer's index bits per value (here
    3 bits for K=8 d=1), not the float dtype's 16: 16/3 times the values."""
    f = MPOConfig(bits=2.0, cores=2)
    q = MPOConfig(bits=2.0, cores=2, quantize={**CB, "block_dim": 1})
    from physkern.research.mpo import chi_for_bits
    assert q.chi_for(64, 32)[0] == chi_for_bits((8, 8), (8, 4), 2.0, 3)
    assert q.chi_for(64, 32)[0] > f.chi_for(64, 32)[0]
    s = SVDConfig(bits=2.0, quantize=RTN)
    assert s.rank_for(64, 32) == int(2.0 * 64 * 32 // (3 * 96))


# ---- save / load -------------------------------------------------------------------------------

def test_round_trip_bit_identical(qmodel, saved):
    loaded, _ = load_quantized(saved)
    for name, cls in ((MPO_LAYER, QuantizedMPOLinear), (SVD_LAYER, QuantizedLowRankLinear)):
        a, b = qmodel.get_submodule(name), loaded.get_submodule(name)
        assert type(b) is cls
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)
    assert torch.equal(_logits(loaded), _logits(qmodel))
    assert bits_report(loaded).to_dict() == bits_report(qmodel).to_dict()
    fm = json.loads((saved / MARKER).read_text())["factorized_layers"]
    assert fm[MPO_LAYER]["dtype"] is None and set(fm[MPO_LAYER]["quantized"]) == \
        {"cores.0", "cores.1"}
    assert fm[SVD_LAYER]["quantized"]["up"]["k"] == 8  # RTN 3 bits: a grid of 8 levels


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_from_pretrained_and_dense_dtype_identical_logits(request, fixture, tmp_path):
    from transformers import AutoModelForCausalLM
    m = copy.deepcopy(request.getfixturevalue(fixture))
    apply_factorization(m, MPOConfig(chi=3, cores=2, sweeps=0, layers=["*.mlp.*"], quantize=CB))
    apply_factorization(m, SVDConfig(rank=4, layers=["*.0.*"], quantize=RTN))
    physkern.quantize(m, physkern.CodebookConfig(k=8, block_dim=2, scope="layer",
                                                 calibrate=False, iters=3), progress=False)
    d = save_quantized(m, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(d).eval()
    assert any(isinstance(mod, QuantizedMPOLinear) for mod in theirs.modules())
    assert torch.equal(_logits(theirs), _logits(m))
    # dense tensors at bf16 (the quantized factors' buffers stay as they are): load_quantized
    from physkern.dense import set_dense_storage_dtype
    set_dense_storage_dtype(m, "bfloat16")
    d = save_quantized(m, tmp_path / "bf16")
    mine, _ = load_quantized(d)
    assert torch.equal(_logits(mine), _logits(m))
    rep = bits_report(m)
    assert abs(tensor_bytes(d) - rep.total_bytes) <= 0.01 * tensor_bytes(d)


def test_float_layouts_unchanged(tiny_llama):
    """Without quantize nothing new appears in the layouts or the config's dict."""
    from physkern.serialization import factorized_module_layouts
    m = copy.deepcopy(tiny_llama)
    apply_factorization(m, MPOConfig(chi=3, cores=2, layers=["*.mlp.gate_proj"]))
    assert all("quantized" not in fm for fm in factorized_module_layouts(m).values())
    assert "quantize" not in MPOConfig(chi=3).to_dict()
    assert "quantize" not in SVDConfig(rank=3).to_dict()


# ---- crafted directories -----------------------------------------------------------------------

@pytest.fixture
def crafted(saved, tmp_path):
    return fresh_copy(saved, tmp_path)


def _q(layer, fname, **upd):
    return lambda f: f[layer]["quantized"][fname].update(upd)


@pytest.mark.parametrize("edit,says", [
    (lambda f: f[MPO_LAYER]["quantized"].pop("cores.1"), "quantized must be an object with one "
     "layout per factor"),
    (lambda f: f[MPO_LAYER].update(quantized=[1]), "quantized must be an object of factor name"),
    (lambda f: f[MPO_LAYER].update(dtype="float16"), "dtype must be null when the factors are "
     "quantized"),
    (lambda f: f[SVD_LAYER].update(up_dtype="float16"), "up_dtype must be null"),
    (_q(MPO_LAYER, "cores.0", k=0), "quantized cores.0: k must be a positive integer"),
    (_q(MPO_LAYER, "cores.0", k=70000), "k must be in [1, 65536]"),
    (_q(MPO_LAYER, "cores.1", block_dim=3), "block_dim (3) must divide the factor's 4 columns"),
    (_q(MPO_LAYER, "cores.0", codebook_rows=5), "codebook_rows (5) must divide the factor's 8 "
     "rows"),
    (_q(SVD_LAYER, "down", scale_group=5), "scale_group (5) must divide"),
    (_q(MPO_LAYER, "cores.0", codebook_dtype="int8"), "codebook_dtype must be one of"),
    (_q(SVD_LAYER, "up", scales_dtype=None), "offsets_dtype is set but scales_dtype is null"),
    (_q(MPO_LAYER, "cores.0", rotation={"kind": "hadamard"}), "unknown fields ['rotation']"),
])
def test_bad_quantized_layouts(crafted, edit, says):
    edit_meta(crafted, edit, "factorized_layers")
    load_fails(crafted, MARKER, "layer model.layers.0.", says)


def test_layout_disagreeing_with_the_file(crafted):
    edit_meta(crafted, _q(MPO_LAYER, "cores.0", k=16), "factorized_layers")
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "cores.0.codebooks has shape [1, 1, 8, 2]",
               "implies [1, 1, 16, 2]")


def test_index_beyond_k_refused(tiny_llama, tmp_path):
    """K = 5 is not a power of two: a packed index of 7 is refused after loading."""
    m = _model(tiny_llama, mpo_q={**CB, "k": 5})
    d = save_quantized(m, tmp_path / "q")
    from safetensors.torch import load_file, save_file
    sd = {k: v.clone() for k, v in load_file(str(d / ST)).items()}
    sd[f"{MPO_LAYER}.cores.1.packed"][0, 0, 0] = -1  # every 3-bit index = 7
    save_file(sd, str(d / ST), metadata={"format": "pt"})
    load_fails(d, ST, f"layer {MPO_LAYER}.cores.1", ">= k = 5")


def test_inflated_layout_fails_before_allocating(crafted, monkeypatch):
    edit_meta(crafted, lambda f: f[MPO_LAYER].update(bonds=[1, 2**40, 1]), "factorized_layers")
    guard_allocations(monkeypatch)
    load_fails(crafted, MARKER, f"layer {MPO_LAYER}", "quantized cores.0", str(8 * 2**40))
    # a bond whose view the layout admits (scale groups of the new width) is refused against
    # the file's header
    def wide(f):
        f[MPO_LAYER].update(bonds=[1, 2**40, 1])
        f[MPO_LAYER]["quantized"]["cores.0"].update(scale_group=8 * 2**40)
        f[MPO_LAYER]["quantized"]["cores.1"].update(codebook_rows=8 * 2**40)
    edit_meta(crafted, wide, "factorized_layers")
    load_fails(crafted, ST, f"layer {MPO_LAYER}", "cores.0.packed has shape",
               f"implies [1, 8, {8 * 2**40 // 2 * 3 // 32}]")  # 3-bit indices in int32 words


def test_saving_refuses_a_mix_of_float_and_quantized_factors(qmodel, tmp_path):
    bad = copy.deepcopy(qmodel)
    mod = bad.get_submodule(SVD_LAYER)
    mod.down = torch.nn.Parameter(mod.down.dequantize().half(), requires_grad=False)
    with pytest.raises(ValueError, match="all quantized or all float"):
        save_quantized(bad, tmp_path / "x")
    assert not any(tmp_path.iterdir())  # nothing written, not even a temporary folder


# ---- configs and recipes -----------------------------------------------------------------------

@pytest.mark.parametrize("q,says", [
    ({"method": "codebook", "k": 8, "block_dim": 2}, "factorize.quantize: codebook with "
     "calibration"),
    ({**CB, "calibrate": True, "error_feedback": True}, "factorize.quantize: codebook with "
     "calibration"),
    ({"method": "gptq", "bits": 4}, "factorize.quantize: gptq with calibration"),
    ({**CB, "k": 0}, "factorize.quantize: k must be an integer"),
    ({**CB, "block_dim": 3}, "factorize.quantize: block_dim must be one of"),
    ({**CB, "kk": 3}, "factorize.quantize: unknown codebook config keys ['kk']"),
    ({"method": "nope"}, "factorize.quantize: method must be one of"),
    ({**CB, "layers": ["*"]}, "factorize.quantize.layers / overrides: not supported"),
    ({**CB, "rotation": "hadamard"}, "factorize.quantize.rotation: must be 'none'"),
    ({"method": "rtn", "bits": 9}, "factorize.quantize: bits must be an integer"),
    (3, "factorize.quantize: must be a quantizer config"),
])
@pytest.mark.parametrize("method", ["mpo", "svd"])
def test_bad_quantize_config_names_the_key(q, says, method):
    d = {"method": method, "chi" if method == "mpo" else "rank": 3, "quantize": q}
    with pytest.raises(ValueError) as exc:
        factorization_from_dict(d)
    assert says in str(exc.value)


def test_quantizer_refusing_a_factor_names_it(tiny_llama):
    """block_dim 8 does not divide core 1's 4 columns ([3 * 8, 4 * 1])."""
    m = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match=r"factorize.quantize: factor cores.1 \(2-D view "
                                         r"\[24, 4\]\)"):
        apply_factorization(m, MPOConfig(chi=3, cores=2, layers=[MPO_LAYER],
                                         quantize={**CB, "block_dim": 8, "k": 2}))


def test_recipe_quantize_and_heal(tiny_llama):
    """The recipe path: factorize with quantize, then healing trains the cores' codebooks and
    scales (indices and bits unchanged) and keeps them only if the holdout KL falls."""
    from physkern.recipe import Recipe
    r = Recipe.from_dict({"name": "q", "factorize": {
        "method": "mpo", "chi": 3, "cores": 2, "sweeps": 0, "layers": ["*.mlp.*"],
        "quantize": CB}})
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()
    assert r.to_dict()["factorize"]["quantize"]["k"] == 8
    m = copy.deepcopy(tiny_llama)
    rep = apply_factorization(m, r.factorize)
    row = rep["layers"][0]
    assert row["relative_weight_error"] > 0 and "relative_weight_error_float" in row
    assert row["bits_per_weight"] < row["bits_per_weight_float"]
    before = bits_report(m).to_dict()
    packed = {n: b.clone() for n, b in m.named_buffers() if n.endswith("packed")}
    cbs = {n: b.clone() for n, b in m.named_buffers() if n.endswith("codebooks")}
    calib = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))
    out = heal_factorized(m, tiny_llama, calib, steps=4, lr=1e-2, progress=False)
    assert out["trained_parameters"] > 0
    assert bits_report(m).to_dict() == before
    for n, b in m.named_buffers():
        if n in packed:
            assert torch.equal(b, packed[n])
    changed = any(not torch.equal(b, cbs[n]) for n, b in m.named_buffers() if n in cbs)
    assert changed == out["kept"]
    assert all(b.dtype == torch.float16 for n, b in m.named_buffers() if n in cbs)
