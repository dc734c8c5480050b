"""Codebooks shared across layers (CodebookConfig scope="shared", physkern.shared_codebook):
forward vs a float64 decode by explicit indexing, one tensor per group after quantize / load /
fine-tuning, bits = bytes on disk, save/load round trip, crafted files refused before
allocating, determinism per seed, the pooled k-means objective, config and recipe errors, and
the K = 65536, d = 8 paths (assignment, forward)."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _crafted import edit_meta, fresh_copy, guard_allocations, load_fails, tensor_bytes
from physkern import bits_report, load_quantized, quantize, save_quantized
from physkern.api import select_layers
from physkern.config import CodebookConfig, config_from_dict
from physkern.layers import QuantizedLinear, shared_codebook_parameter
from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import index_bits, pack_indices, unpack_indices
from physkern.serialization import MARKER, install_quantized_modules
from physkern.shared_codebook import fit_shared_codebooks, plan_shared_groups

ST = "model.safetensors"


def _calib(n=4, seq=16):
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(1))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _quantized(base, **kw):
    m = copy.deepcopy(base)
    cfg = CodebookConfig(**{"k": 16, "block_dim": 4, "scope": "shared", "share": "type", **kw})
    quantize(m, cfg, calibration=_calib() if cfg.calibrate else None, progress=False)
    return m


@pytest.fixture(scope="module")
def q_type(tiny_llama):
    """Shared by layer type, calibrated, error feedback, rotated."""
    return _quantized(tiny_llama, error_feedback=True, rotation="hadamard")


@pytest.fixture(scope="module")
def q_model(tiny_gpt2):
    """One codebook for the whole model (GPT-2 Conv1D layers), K not a power of two, 2 stages."""
    return _quantized(tiny_gpt2, k=12, share="model", stages=2, calibrate=False)


@pytest.fixture(scope="module")
def saved(q_model, tmp_path_factory):
    return save_quantized(q_model, tmp_path_factory.mktemp("shared") / "m")


def _decode64(layer: QuantizedLinear) -> torch.Tensor:
    """The effective weight [out, in] in float64 by explicit indexing into the shared codebook:
    W[r, b*d:(b+1)*d] = s_r * sum_s C[s, 0, idx[s, r, b]], then R^T for a rotation."""
    cb = layer.codebooks.double()                                    # [S, 1, K, d]
    s_, _, k, d = cb.shape
    idx = unpack_indices(layer.packed, index_bits(k), layer.in_features // d)
    w = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    for s in range(s_):
        for r in range(layer.out_features):
            for b in range(layer.in_features // d):
                w[r, b * d:(b + 1) * d] += cb[s, 0, int(idx[s, r, b])]
    if layer.scales is not None:
        w = w * layer.scales.double().repeat_interleave(layer.scale_group, 1)
    if layer.rotation is not None:
        w = w @ layer.rotation.matrix().T                            # Q R^T
    return w


# ---- quantize: groups, one tensor, forward ----------------------------------------------------

def test_groups_hold_one_tensor(q_type, q_model):
    layers = _layers(q_type)
    by_group = {}
    for name, l in layers.items():
        assert l.shared_codebook == name.split(".", 3)[3]       # "self_attn.q_proj", ...
        by_group.setdefault(l.shared_codebook, set()).add(id(l.codebooks))
        assert isinstance(l.codebooks, torch.nn.Parameter) and not l.codebooks.requires_grad
    assert len(by_group) == 7 and all(len(ids) == 1 for ids in by_group.values())
    gpt = _layers(q_model)
    assert {l.shared_codebook for l in gpt.values()} == {"model"}
    assert len({id(l.codebooks) for l in gpt.values()}) == 1
    assert next(iter(gpt.values())).codebooks.shape == (2, 1, 12, 4)


@pytest.mark.parametrize("which", ["q_type", "q_model"])
def test_forward_equals_float64_decode(which, request):
    model = request.getfixturevalue(which)
    for name, l in _layers(model).items():
        xi = torch.randn(3, 5, l.in_features, generator=torch.Generator().manual_seed(3))
        want = xi.double() @ _decode64(l).T
        if l.bias is not None:
            want = want + l.bias.double()
        for xin, ref in ((xi, want), (xi[:1, :1], want[:1, :1])):   # GEMM and decode paths
            got = l(xin)
            assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-4), name


def test_model_moves_keep_one_tensor(q_model):
    m = copy.deepcopy(q_model).to(torch.float32)
    assert len({id(l.codebooks) for l in _layers(m).values()}) == 1
    m.to("cpu")
    assert len({id(l.codebooks) for l in _layers(m).values()}) == 1


# ---- bits and bytes ---------------------------------------------------------------------------

def test_bits_count_shared_codebook_once(q_type):
    rep = bits_report(q_type)
    layers = _layers(q_type)
    groups = {}
    for l in layers.values():
        groups.setdefault(l.shared_codebook, []).append(l)
    by_hand = sum(l.packed.numel() * 32 + l.scales.numel() * 16 for l in layers.values()) + \
        sum(g[0].codebooks.numel() * 16 for g in groups.values())
    assert rep.quantized_bits == by_hand
    assert {g: v["bits"] for g, v in rep.shared_codebooks.items()} == \
        {g: ls[0].codebooks.numel() * 16 for g, ls in groups.items()}
    for name, info in rep.layers.items():   # an even share each
        n = len(groups[layers[name].shared_codebook])
        assert info["codebooks"] == layers[name].codebooks.numel() * 16 / n
        assert info["codebook_share"] == n


def test_shared_codebook_bits_equal_bytes(q_type, q_model, tmp_path):
    for i, model in enumerate((q_type, q_model)):
        d = save_quantized(model, tmp_path / f"m{i}")
        rep = bits_report(model)
        assert rep.model_bits == 8 * tensor_bytes(d)
        assert rep.total_bytes == tensor_bytes(d)
        keys = set(load_file(d / ST))
        assert not any(k.endswith(".codebooks") and not k.startswith("shared_codebooks.")
                       for k in keys)
        assert {k for k in keys if k.startswith("shared_codebooks.")} == \
            {f"shared_codebooks.{g}.codebooks" for g in rep.shared_codebooks}


# ---- save / load ------------------------------------------------------------------------------

def test_round_trip_bit_identical(q_type, q_model, tmp_path):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    for i, model in enumerate((q_type, q_model)):
        d = save_quantized(model, tmp_path / f"m{i}")
        meta = json.loads((d / MARKER).read_text())
        assert meta["format_version"] == 3 and set(meta["shared_codebooks"]) == \
            set(bits_report(model).shared_codebooks)
        loaded, _ = load_quantized(d)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)
        by_group = {}
        for l in _layers(loaded).values():
            by_group.setdefault(l.shared_codebook, set()).add(id(l.codebooks))
        assert all(len(v) == 1 for v in by_group.values())
        assert bits_report(loaded).total_bytes == bits_report(model).total_bytes


def test_transformers_path_refuses_shared(saved, tiny_gpt2):
    meta = json.loads((saved / MARKER).read_text())
    with torch.device("meta"):
        m = copy.deepcopy(tiny_gpt2).to("meta")
    with pytest.raises(ValueError, match="physkern.load_quantized"):
        install_quantized_modules(m, meta["quantized_layers"], {}, "config.json", {})


def test_from_pretrained_refuses_shared(saved):
    """transformers' loader (physkern.hf_quantizer) reads format versions 1 and 2 only: a file
    with shared codebooks is refused there, never loaded without them."""
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match="format_version"):
        AutoModelForCausalLM.from_pretrained(saved)


def _group(meta):
    return meta["shared_codebooks"]["model"]


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m.pop("shared_codebooks"), "format_version 3 needs shared_codebooks"),
    (lambda m: m["shared_codebooks"].update(other=m["shared_codebooks"].pop("model")),
     "missing from shared_codebooks"),
    (lambda m: _group(m)["layers"].pop(), "does not list it in shared_codebooks"),
    (lambda m: _group(m).update(k=13), "has k 12, the group 13"),
    (lambda m: m.update(format_version=2), "shared_codebooks need format_version 3"),
    (lambda m: next(iter(m["quantized_layers"].values())).update(shared_codebook=""),
     "shared_codebook must be a group name"),
    (lambda m: _group(m).update(extra=1), "exactly the fields"),
])
def test_crafted_marker_refused(saved, tmp_path, monkeypatch, edit, pattern):
    d = fresh_copy(saved, tmp_path)
    edit_meta(d, edit)
    guard_allocations(monkeypatch, 10**5)
    load_fails(d, MARKER, pattern)


def test_crafted_shape_refused_before_allocating(saved, tmp_path, monkeypatch):
    """The marker claims K = 65536 for the group and its layers; the file holds K = 12: refused
    against the header before any [2, 1, 65536, 4] tensor exists."""
    d = fresh_copy(saved, tmp_path)

    def big(m):
        _group(m)["k"] = 65536
        for lm in m["quantized_layers"].values():
            lm["k"] = 65536
    edit_meta(d, big)
    guard_allocations(monkeypatch, 10**5)
    load_fails(d, "has shape")


def test_crafted_group_dtype_refused(saved, tmp_path, monkeypatch):
    d = fresh_copy(saved, tmp_path)

    def wide(m):
        _group(m)["codebook_dtype"] = "float32"
        for lm in m["quantized_layers"].values():
            lm["codebook_dtype"] = "float32"
    edit_meta(d, wide)
    guard_allocations(monkeypatch, 10**5)
    load_fails(d, "shared_codebooks.model", "codebooks has dtype")


def test_crafted_wrong_tensor_refused(saved, tmp_path):
    d = fresh_copy(saved, tmp_path)
    t = load_file(d / ST)
    t["shared_codebooks.model.codebooks"] = t["shared_codebooks.model.codebooks"][:, :, :11].contiguous()
    save_file(t, d / ST)
    load_fails(d, "codebooks has shape")
    t.pop("shared_codebooks.model.codebooks")
    save_file(t, d / ST)
    load_fails(d, "shared_codebooks.model", "missing")


def test_crafted_index_refused(saved, tmp_path):
    d = fresh_copy(saved, tmp_path)
    t = load_file(d / ST)
    key = next(k for k in t if k.endswith(".packed"))
    idx = unpack_indices(t[key], index_bits(12), 32 // 4)
    idx[1, 0, 3] = 15                                   # 4 bits hold 15 >= k = 12
    t[key] = pack_indices(idx, index_bits(12))
    save_file(t, d / ST)
    load_fails(d, "index 15", ">= k = 12")


# ---- determinism, pooled fit ------------------------------------------------------------------

def test_determinism_per_seed(tiny_llama):
    kw = dict(calibrate=False, iters=5, share="model")
    a, b, c = (_layers(_quantized(tiny_llama, seed=s, **kw)) for s in (0, 0, 1))
    first = next(iter(a))
    assert torch.equal(a[first].codebooks, b[first].codebooks)
    assert all(torch.equal(a[n].packed, b[n].packed) for n in a)
    assert not torch.equal(a[first].codebooks, c[first].codebooks)


def test_pooled_objective_never_increases(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    cfg = CodebookConfig(k=16, block_dim=4, scope="shared", share="type", error_feedback=True,
                         rotation="hadamard", iters=8, tol=1e-12, stages=2)
    groups = plan_shared_groups(m, select_layers(m, cfg, allow_shared=True))
    fitted = fit_shared_codebooks(m, groups, _calib())
    for f in {id(v): v for v in fitted.values()}.values():
        assert len(f.objective) == 2
        for hist in f.objective:
            assert len(hist) >= 2 and all(b <= a for a, b in zip(hist, hist[1:]))
            assert hist[-1] < hist[0]


def test_pool_importance_is_rotated_gram_diagonal(tiny_llama):
    """The pooled fit's weights: diag(R^T X^T X R) / its mean, from the FP model's inputs,
    computed here from the collected inputs and the dense R."""
    from physkern.shared_codebook import rotated_importance
    m = copy.deepcopy(tiny_llama)
    cfg = CodebookConfig(k=16, block_dim=4, scope="shared", share="type", rotation="hadamard")
    groups = plan_shared_groups(m, select_layers(m, cfg, allow_shared=True))
    got = rotated_importance(m, groups, _calib())
    layer = groups["mlp.down_proj"].layers[1]
    xs = []
    h = layer.module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in _calib():
            m(input_ids=row[None])
    h.remove()
    x = torch.cat(xs).double()
    from physkern.rotation import config_rotation
    rm = config_rotation(cfg, 64).matrix()
    diag = torch.diagonal(rm.T @ (x.T @ x) @ rm)
    assert torch.allclose(got[layer.name].double(), diag / diag.mean(), rtol=1e-5, atol=1e-6)


def test_pool_sample_and_k_too_large(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    cfg = CodebookConfig(k=64, block_dim=4, scope="shared", share="type", calibrate=False,
                         max_fit_blocks=100)
    groups = plan_shared_groups(m, select_layers(m, cfg, allow_shared=True))
    fitted = fit_shared_codebooks(m, {"mlp.up_proj": groups["mlp.up_proj"]}, None)
    assert next(iter(fitted.values())).fit_blocks == 100      # 2 layers x ceil(100 / 2)
    with pytest.raises(ValueError, match="k=128 exceeds the 100 blocks pooled"):
        quantize(copy.deepcopy(tiny_llama), CodebookConfig(
            k=128, block_dim=4, scope="shared", share="type", calibrate=False,
            max_fit_blocks=100), progress=False)


def test_groups_split_by_config(tiny_llama):
    over = CodebookConfig(k=8, block_dim=4, scope="shared", share="model", calibrate=False)
    cfg = CodebookConfig(k=16, block_dim=4, scope="shared", share="model", calibrate=False,
                         overrides={"*.mlp.*": over})
    m = copy.deepcopy(tiny_llama)
    quantize(m, cfg, progress=False)
    names = {n: l.shared_codebook for n, l in _layers(m).items()}
    assert {v for n, v in names.items() if ".mlp." in n} == {"model#2"}
    assert {v for n, v in names.items() if ".mlp." not in n} == {"model"}
    assert _layers(m)["model.layers.0.mlp.up_proj"].codebooks.shape[2] == 8


# ---- fine-tuning ------------------------------------------------------------------------------

def test_finetune_keeps_one_parameter(q_model, tiny_gpt2):
    from physkern.finetune import differentiable_quantized, finetune_quantized
    m = copy.deepcopy(q_model)
    layers = list(_layers(m).values())
    with differentiable_quantized(m, train_norms=False, write_back=False) as tr, \
            torch.enable_grad():
        copies = {id(l.codebooks) for l in tr.layers}
        assert len(copies) == 1 and len(tr.param_groups(1e-3)) == 1 + len(layers)  # + scales
        p = tr.layers[0].codebooks
        grads = []
        for picks in ([0], [1], [0, 1]):
            p.grad = None
            sum(tr.layers[i].forward(torch.ones(2, layers[i].in_features)).pow(2).sum()
                for i in picks).backward()
            grads.append(p.grad.clone())
        assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
        assert torch.allclose(grads[2], grads[0] + grads[1], rtol=1e-5, atol=1e-6)
    calib = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(5))
    before = layers[0].codebooks.detach().clone()
    out = finetune_quantized(m, tiny_gpt2, calib, steps=3, lr=1e-2, holdout=1, progress=False)
    assert len({id(l.codebooks) for l in _layers(m).values()}) == 1
    assert out["trained_parameters"] == before.numel() + sum(l.scales.numel() for l in layers) + \
        sum(p.numel() for n, p in m.named_parameters() if "ln" in n and p.dtype == torch.float32)
    if out["kept"]:
        assert not torch.equal(layers[0].codebooks, before)


# ---- config, recipe, paths that refuse --------------------------------------------------------

@pytest.mark.parametrize("kw,pattern", [
    (dict(share="type"), "share is only used with scope='shared'"),
    (dict(scope="shared"), "share must be one of"),
    (dict(scope="shared", share="block"), "share must be one of"),
    (dict(scope="shared", share="type", error_feedback=True, refine_steps=5), "refine_steps"),
    (dict(scope="everything"), "scope must be one of"),
])
def test_config_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        CodebookConfig(**kw)


def test_recipe_and_dict_round_trip():
    from physkern.recipe import Recipe
    d = {"method": "codebook", "k": 65536, "block_dim": 8, "scope": "shared", "share": "type",
         "rotation": "hadamard", "error_feedback": True, "max_fit_blocks": 262144}
    r = Recipe.from_dict({"name": "shared", "config": d})
    assert r.config.scope == "shared" and r.config.share == "type" and r.config.k == 65536
    assert config_from_dict(r.config.to_dict()) == r.config
    assert "share" not in CodebookConfig().to_dict()          # unshared dicts unchanged
    with pytest.raises(ValueError, match="share"):
        Recipe.from_dict({"name": "bad", "config": {**d, "share": "all"}})


def test_streaming_path_and_embedding_refuse(tiny_llama):
    cfg = CodebookConfig(k=16, block_dim=4, scope="shared", share="type", calibrate=False)
    with pytest.raises(ValueError, match="in memory"):
        select_layers(tiny_llama, cfg)
    with pytest.raises(ValueError, match="embedding: scope='shared'"):
        quantize(copy.deepcopy(tiny_llama), CodebookConfig(k=16, block_dim=4, calibrate=False),
                 progress=False, embedding=cfg)
    from physkern.api import quantize_weight
    with pytest.raises(ValueError, match="fitted over all of the group"):
        quantize_weight(torch.randn(8, 16), cfg)


# ---- K = 65536, d = 8 -------------------------------------------------------------------------

def test_k65536_d8_assignment_and_forward():
    """A fixed K = 65536, d = 8 codebook: the assignment (chunked, never [blocks, K, d]) equals a
    float64 brute force, and the forward (decode M = 1 and GEMM paths) equals the float64
    decode; the layer stores 16-bit indices."""
    from physkern.quant.codebook import quantize_codebook
    g = torch.Generator().manual_seed(6)
    k, d, out, inf = 65536, 8, 8, 32
    cb = torch.randn(1, 1, k, d, generator=g).half()
    w = torch.randn(out, inf, generator=g)
    imp = torch.rand(inf, generator=g) + 0.5
    qw = quantize_codebook(w, k, d, scope="layer", scales="row", input_importance=imp,
                           codebooks=cb)
    assert qw.bits == 16
    sc = qw.scales.double()
    blocks = (w.double() / sc).reshape(out, inf // d, d)
    wts = (imp.double()[None, :] * sc.pow(2)).reshape(out, inf // d, d)
    c64 = cb[0, 0].double()
    want = torch.stack([torch.stack([((blocks[r, b] - c64).pow(2) * wts[r, b]).sum(-1).argmin()
                                     for b in range(inf // d)]) for r in range(out)])
    assert torch.equal(qw.indices()[0], want)
    layer = QuantizedLinear(QuantizedWeight(qw.packed, shared_codebook_parameter(cb), qw.scales,
                                            None, inf, out, out, inf, shared="g"))
    ref = _decode64(layer)
    for m_rows in (1, 40):
        x = torch.randn(m_rows, inf, generator=g)
        assert torch.allclose(layer(x).double(), x.double() @ ref.T, atol=1e-4, rtol=1e-4)
    # the Triton kernel (the CUDA path; here in the interpreter, fp32 operands) takes K = 65536
    from physkern import ops
    q32 = QuantizedWeight(qw.packed, cb.float(), qw.scales.float(), None, inf, out, out, inf)
    x = torch.randn(3, inf, generator=g)
    assert torch.allclose(ops.codebook_matmul(x, q32, backend="triton").double(),
                          x.double() @ ref.T, atol=1e-4, rtol=1e-4)
