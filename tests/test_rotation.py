"""Input-side incoherence rotations (physkern.rotation): exact, seeded, stored as a seed.

References are independent of Rotation.apply/unapply: dense matrices built here from
torch.eye / kron / diag, float64 products, and the FP model's own logits.
"""
from __future__ import annotations

import math

import pytest
import torch

import physkern
from physkern import CodebookConfig
from physkern.layers import QuantizedLinear
from physkern.quant.accounting import layer_bits
from physkern.rotation import Rotation, default_block, hadamard_matrix, rotate_problem

TOKENS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 90]])


def _dense(r: Rotation) -> torch.Tensor:
    """R = P D blockdiag(H) from perm/signs, built without Rotation.matrix/apply."""
    perm, signs = r.perm_signs()
    n, b = r.n, r.block
    p = torch.zeros(n, n, dtype=torch.float64)
    p[torch.arange(n), perm] = 1.0
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return p @ torch.diag(signs) @ torch.kron(torch.eye(n // b, dtype=torch.float64),
                                              h / math.sqrt(b))


# ---- the rotation itself ---------------------------------------------------------------------

def test_default_block():
    assert [default_block(n) for n in (576, 1536, 32, 48, 6, 7, 128)] == [64, 64, 32, 16, 2, 1, 64]
    with pytest.raises(ValueError, match="n"):
        default_block(0)


@pytest.mark.parametrize("n,seed", [(576, 0), (1536, 3), (48, 7), (32, 2**63 - 1)])
def test_orthogonal_seeded_and_as_documented(n, seed):
    r = Rotation.make("hadamard", n, seed)
    m = r.matrix()
    assert torch.allclose(m.T @ m, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(m, _dense(r), atol=1e-15)
    # signed permutation of a block Hadamard: b nonzeros of magnitude 1/sqrt(b) per row/column
    nz = m.abs() > 0
    assert (nz.sum(0) == r.block).all() and (nz.sum(1) == r.block).all()
    assert torch.allclose(m[nz].abs(), torch.full_like(m[nz], 1 / math.sqrt(r.block)))
    # deterministic: a new object (and a cleared cache) gives the same matrix; another seed not
    from physkern import rotation as rot_mod
    rot_mod._perm_signs.cache_clear()
    assert torch.equal(Rotation.make("hadamard", n, seed).matrix(), m)
    other = Rotation.make("hadamard", n, (seed + 1) % 2**63)
    assert not torch.equal(other.matrix(), m)
    perm, signs = r.perm_signs()
    assert sorted(perm.tolist()) == list(range(n)) and set(signs.tolist()) <= {-1.0, 1.0}


def test_stream_is_pinned():
    """The seed -> (perm, signs) stream is part of the stored format: a saved model must load
    to the same function on any machine / torch version. Golden values from the first build."""
    perm, signs = Rotation.make("hadamard", 576, 0).perm_signs()
    assert perm[:8].tolist() == [436, 58, 251, 257, 376, 402, 74, 483]
    assert signs[:8].tolist() == [1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    perm, signs = Rotation.make("hadamard", 64, 12345).perm_signs()
    assert perm[:8].tolist() == [29, 62, 48, 34, 19, 60, 61, 38]
    assert signs[:8].tolist() == [1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_apply_unapply_gram_match_dense(dtype, tol):
    r = Rotation.make("hadamard", 192, 5)           # block 64, 3 blocks
    m = _dense(r)
    x = torch.randn(2, 3, 192, dtype=torch.float64)
    got = r.apply(x.to(dtype)).double()
    assert got.shape == x.shape
    assert torch.allclose(got, x @ m, atol=tol * 10)
    assert torch.allclose(r.unapply(x.to(dtype)).double(), x @ m.T, atol=tol * 10)
    assert torch.allclose(r.unapply(r.apply(x.to(dtype))).double(), x, atol=tol * 10)
    g = torch.randn(192, 192, dtype=torch.float64)
    g = g @ g.T
    assert torch.allclose(r.rotate_gram(g), m.T @ g @ m, atol=1e-10 * float(g.abs().max()))
    with pytest.raises(ValueError, match="last dimension"):
        r.apply(torch.zeros(3, 191))


@pytest.mark.parametrize("n,seed,shape", [(576, 0, (1, 1, 576)), (1536, 3, (1536,)),
                                          (48, 7, (1, 48)), (7, 1, (1, 1, 7)), (64, 2, (1, 64))])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6),
                                       (torch.bfloat16, 2e-2)])
def test_one_row_path_matches_dense(n, seed, shape, dtype, tol):
    """Decode's single-row path (signs folded into the blocks) against the dense R, every block
    size incl. 1 (odd n), under inference_mode like decode and with autograd on."""
    r = Rotation.make("hadamard", n, seed)
    x = torch.randn(shape, dtype=torch.float64)
    ref = x @ _dense(r)
    with torch.inference_mode():
        got = r.apply(x.to(dtype))
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.allclose(got.double(), ref, atol=tol * 10, rtol=tol * 4)
    xg = x.to(dtype).requires_grad_(dtype != torch.bfloat16)
    assert torch.allclose(r.apply(xg).double(), ref, atol=tol * 10, rtol=tol * 4)


def test_shared_input_rotated_once_and_never_stale():
    """q/k/v (and gate/up) call apply on one x: without autograd the second call reuses the
    result; a changed x, another rotation or another tensor recomputes; with autograd nothing
    is reused (the graph must see each use)."""
    r = Rotation.make("hadamard", 64, 0)
    x = torch.randn(3, 64)
    ref = x.double() @ _dense(r)
    with torch.no_grad():
        y1 = r.apply(x)
        assert r.apply(x) is y1                                     # reused
        assert r.apply(x.clone()) is not y1                         # equal values, other tensor
        y2 = r.apply(x)
        x.mul_(2)                                                   # in place: version bump
        y3 = r.apply(x)
        assert y3 is not y2 and torch.allclose(y3.double(), 2 * ref, atol=1e-5)
        other = Rotation.make("hadamard", 64, 1)
        assert not torch.allclose(other.apply(x), y3)               # another seed recomputes
        y4 = r.apply(x)
        y4.zero_()                                                  # a consumer wrote into it
        assert torch.allclose(r.apply(x).double(), 2 * ref, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    a, b = r.apply(xg), r.apply(xg)
    assert a is not b and a.grad_fn is not None
    with torch.inference_mode():                                    # no version counter
        xi = torch.randn(2, 64)
        yi = r.apply(xi)
        xi.add_(1)
        assert yi is not r.apply(xi)
        assert torch.allclose(r.apply(xi).double(), xi.double() @ _dense(r), atol=1e-5)


def test_hadamard_matrix():
    h = hadamard_matrix(8)
    assert torch.equal(h, h.T) and torch.allclose(h @ h, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="block"):
        hadamard_matrix(6)


@pytest.mark.parametrize("meta,field", [
    ({"kind": "walsh", "seed": 0, "block": 64}, "kind"),
    ({"kind": "hadamard", "seed": -1, "block": 64}, "seed"),
    ({"kind": "hadamard", "seed": 1.5, "block": 64}, "seed"),
    ({"kind": "hadamard", "seed": True, "block": 64}, "seed"),
    ({"kind": "hadamard", "seed": 0, "block": 48}, "block"),
    ({"kind": "hadamard", "seed": 0, "block": 128}, "block"),   # does not divide 576
    ({"kind": "hadamard", "seed": 0}, "block"),
    ({"kind": "hadamard", "seed": 0, "block": 64, "extra": 1}, "unknown keys"),
    ("hadamard", "rotation must be an object"),
])
def test_bad_rotation_meta(meta, field):
    with pytest.raises(ValueError, match=field):
        Rotation.from_meta(meta, 576)
    # QuantizedLinear.empty validates it before allocating: this layout would need 2^40 rows
    lm = {"kind": "linear", "in_features": 576, "out_features": 2**40, "stages": 1, "k": 64,
          "block_dim": 2, "codebook_rows": 2**40, "scale_group": 576,
          "codebook_dtype": "float16", "scales_dtype": "float16", "offsets_dtype": None,
          "bias_dtype": None, "recipe": {}, "rotation": meta}
    with pytest.raises(ValueError, match=field):
        QuantizedLinear.empty(lm)


def test_config_validation():
    with pytest.raises(ValueError, match="rotation"):
        CodebookConfig(rotation="random")
    assert CodebookConfig(rotation="hadamard").needs_hessian          # calibrated: needs G
    assert not CodebookConfig(rotation="hadamard", calibrate=False).needs_hessian
    assert not CodebookConfig().needs_hessian


# ---- the quantization problem in the rotated basis --------------------------------------------

def test_rotate_problem_matches_dense():
    r = Rotation.make("hadamard", 64, 1)
    m = _dense(r)
    w = torch.randn(8, 64)
    x = torch.randn(300, 64, dtype=torch.float64) * torch.linspace(0.1, 5, 64, dtype=torch.float64)
    g = x.T @ x
    m2 = torch.diagonal(g) / 300
    w_r, m2_r, g_r = rotate_problem(w, m2, g, r)
    assert torch.allclose(w_r.double(), w.double() @ m, atol=1e-6)
    assert torch.allclose(g_r, m.T @ g @ m, atol=1e-9 * float(g.abs().max()))
    xr = x @ m                                           # the rotated inputs' E[x^2]
    assert torch.allclose(m2_r, (xr ** 2).mean(0), rtol=1e-9)
    assert rotate_problem(w, None, None, r)[1:] == (None, None)
    with pytest.raises(ValueError, match="gram"):
        rotate_problem(w, m2, None, r)


@pytest.mark.parametrize("ef", [True, False])
def test_codebook_quantizer_with_rotation(ef):
    from physkern.api import quantize_weight
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    w[:, 5] *= 20                                        # an outlier input column
    x = torch.randn(512, 128, dtype=torch.float64)
    g = (x.T @ x).float()
    m2 = torch.diagonal(g) / 512
    kw = dict(k=16, block_dim=2, scope="layer", error_feedback=ef, seed=3)
    qw = quantize_weight(w, CodebookConfig(rotation="hadamard", **kw), m2, g)
    r = Rotation.make("hadamard", 128, 3)
    assert qw.rotation == r
    # reference: the unrotated quantizer on the problem rotated with the dense matrix
    m = _dense(r)
    ref = quantize_weight((w.double() @ m).float(), CodebookConfig(**kw),
                          (torch.diagonal(m.T @ g.double() @ m) / 512).float(),
                          (m.T @ g.double() @ m).float())
    q_ref = ref.dequantize().double()
    assert torch.allclose(qw.dequantize().double(), q_ref @ m.T, atol=1e-4)
    # the stored tensors are the rotated basis' Q; the same number of bits as without rotation
    plain = quantize_weight(w, CodebookConfig(**kw), m2, g)
    assert layer_bits(QuantizedLinear(qw)) == layer_bits(QuantizedLinear(plain))


# ---- the layer ----------------------------------------------------------------------------------

def _rotated_layer(kind="linear"):
    from physkern.api import quantize_weight
    w = torch.randn(24, 64)
    qw = quantize_weight(w, CodebookConfig(k=16, block_dim=2, scope="layer", calibrate=False,
                                           rotation="hadamard", seed=9))
    return QuantizedLinear(qw, torch.randn(24), kind)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_forward_and_meta(kind):
    layer = _rotated_layer(kind)
    x = torch.randn(3, 5, 64)
    m = _dense(layer.rotation)
    qw = layer.quantized_weight()
    q_stored = qw.dequantize().double() @ m      # Q = (Q R^T) R
    ref = x.double() @ (q_stored @ m.T).T + layer.bias.double()
    assert torch.allclose(layer(x).double(), ref, atol=1e-5)
    assert torch.allclose(layer(x[0, 0:1]).double(), ref[0, 0:1], atol=1e-5)  # small-M path
    assert torch.allclose(layer(x), x @ layer.dequantize().T + layer.bias, atol=1e-5)
    # the functional op on the QuantizedWeight computes the same function (it used to ignore
    # qw.rotation and silently return x Q_stored^T)
    from physkern import ops
    for backend in ("auto", "cpu", "reference"):
        got = ops.codebook_matmul(x, qw, layer.bias, backend=backend)
        assert torch.allclose(got.double(), ref, atol=1e-5), backend
    meta = layer.layer_meta()
    assert meta["rotation"] == {"kind": "hadamard", "seed": 9, "block": 64}
    empty = QuantizedLinear.empty(meta)
    assert empty.rotation == layer.rotation
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty(x), layer(x))
    assert "rotation=hadamard(seed=9, block=64)" in repr(layer)
    assert "rotation" not in QuantizedLinear.empty({**meta, "rotation": None}).layer_meta()


def test_layer_rows_of_effective_weight():
    layer = _rotated_layer()
    rows = torch.tensor([3, 0, 3, 23])
    assert torch.allclose(layer.quantized_weight().dequantize(rows=rows),
                          layer.dequantize()[rows], atol=1e-6)


# ---- whole models ---------------------------------------------------------------------------

def _exact_config(in_small: int, in_big: int, pattern: str) -> CodebookConfig:
    """Row codebooks of d=1 with K = in_features: every rotated weight value is its own
    centroid, so quantization is exact and only the rotation remains."""
    base = dict(block_dim=1, scope="row", calibrate=False, codebook_dtype="float32",
                rotation="hadamard", seed=4)
    return CodebookConfig(k=in_small, overrides={pattern: CodebookConfig(k=in_big, **base)},
                          **base)


def _copy(model):
    """A deep copy: quantizing the head/embedding may edit the model's config object, which the
    session fixtures share with every other test."""
    import copy
    return copy.deepcopy(model).eval()


@pytest.mark.parametrize("fixture,cfg", [
    ("tiny_llama", _exact_config(32, 64, "*.down_proj")),
    ("tiny_gpt2", _exact_config(32, 128, "*.mlp.c_proj")),   # attn.c_proj has in = 32
])
def test_rotated_model_equals_fp_and_round_trips(request, tmp_path, fixture, cfg):
    from transformers import AutoModelForCausalLM
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        fp = model(TOKENS).logits
    q = _copy(model)
    physkern.quantize(q, cfg, progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.rotation is not None for m in layers)
    # the stored weights really are in the rotated basis (not W itself)
    name, lay = next((n, m) for n, m in q.named_modules() if isinstance(m, QuantizedLinear))
    w = model.get_submodule(name).weight.detach()
    w = w.T if lay.kind == "conv1d" else w
    stored = lay.codebooks[0, :, :, 0].float()
    assert not torch.allclose(stored, w, atol=1e-3)
    assert torch.allclose(lay.dequantize(), w, atol=1e-5)
    with torch.no_grad():
        got = q(TOKENS).logits
    assert (got - fp).abs().max() < 1e-5
    path = physkern.save_quantized(q, tmp_path / "rot")
    ours, _ = physkern.load_quantized(path)
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    for loaded in (ours, theirs):
        names = [n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)]
        assert all(loaded.get_submodule(n).rotation == q.get_submodule(n).rotation
                   for n in names) and names
        with torch.no_grad():
            assert torch.equal(loaded(TOKENS).logits, got)


def test_rotated_tied_head_and_embedding(tiny_llama):
    """A rotated head serving a tied embedding: the lookup reads rows of the effective weight."""
    q = _copy(tiny_llama)
    cfg = CodebookConfig(k=32, block_dim=1, scope="row", calibrate=False,
                         codebook_dtype="float32", rotation="hadamard")
    physkern.quantize(q, CodebookConfig(k=8, block_dim=2, scope="layer", calibrate=False),
                      progress=False, embedding=cfg)
    emb = q.get_input_embeddings()
    ids = torch.tensor([[1, 5, 95, 5]])
    ref = tiny_llama.get_input_embeddings()(ids)
    assert torch.allclose(emb(ids), ref, atol=1e-5)


def test_finetune_copy_equals_layer(tiny_llama):
    from physkern.finetune import differentiable_quantized
    q = _copy(tiny_llama)
    physkern.quantize(q, CodebookConfig(k=8, block_dim=2, scope="layer", calibrate=False,
                                        rotation="hadamard", seed=2), progress=False)
    with torch.no_grad():
        before = q(TOKENS).logits
        x = torch.randn(2, 7, 32)
        layer = q.model.layers[0].self_attn.q_proj
        y_layer = layer(x)
    with differentiable_quantized(q, write_back=False) as t:
        copy = next(c for c in t.layers if c.mod is layer)
        assert torch.allclose(copy.forward(x), y_layer, atol=1e-5)
        assert torch.allclose(copy.weight(), layer.dequantize(), atol=1e-6)
        out = q(TOKENS).logits
        assert torch.allclose(out, before, atol=1e-4)
        out.square().mean().backward()                  # gradients flow through the rotation
        assert copy.codebooks.grad is not None and copy.codebooks.grad.abs().sum() > 0


# ---- configs: dicts, RTN and GPTQ ----------------------------------------------------------

def test_config_dicts_unchanged_without_rotation():
    """Unrotated configs keep the dicts they had before the field existed (saved recipes and
    sweep point keys resume); rotated ones round-trip through config_from_dict."""
    from physkern import GPTQConfig, ScalarConfig
    from physkern.config import config_from_dict
    assert "rotation" not in CodebookConfig().to_dict()
    for cls in (ScalarConfig, GPTQConfig):
        d = cls(rotation_seed=5).to_dict()
        assert "rotation" not in d and "rotation_seed" not in d
    for cfg in (CodebookConfig(rotation="hadamard", seed=3),
                ScalarConfig(bits=3, rotation="hadamard", rotation_seed=3),
                GPTQConfig(rotation="hadamard", rotation_seed=3),
                CodebookConfig(overrides={"*.q": CodebookConfig(rotation="hadamard")})):
        assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="rotation"):
        ScalarConfig(rotation="x")
    with pytest.raises(ValueError, match="rotation_seed"):
        GPTQConfig(rotation="hadamard", rotation_seed=-2)


def test_rtn_and_gptq_with_rotation():
    from physkern import GPTQConfig, ScalarConfig
    from physkern.api import quantize_weight
    from physkern.quant.gptq import gptq_quantize_scalar
    from physkern.quant.scalar import rtn_quantize
    torch.manual_seed(2)
    w = torch.randn(12, 64)
    x = torch.randn(256, 64, dtype=torch.float64)
    g = (x.T @ x).float()
    r = Rotation.make("hadamard", 64, 7)
    m = _dense(r)
    w_r = (w.double() @ m).float()
    qw = quantize_weight(w, ScalarConfig(bits=3, group_size=16, rotation="hadamard",
                                               rotation_seed=7))
    ref = rtn_quantize(w_r, 3, 16, False, False).dequantize().double() @ m.T
    assert qw.rotation == r and torch.allclose(qw.dequantize().double(), ref, atol=1e-5)
    qw = quantize_weight(w, GPTQConfig(bits=3, group_size=16, rotation="hadamard", rotation_seed=7),
                         torch.diagonal(g) / 256, g)
    ref = gptq_quantize_scalar(w_r, (m.T @ g.double() @ m).float(), 3, 16, False)
    assert qw.rotation == r
    assert torch.allclose(qw.dequantize().double(), ref.dequantize().double() @ m.T, atol=1e-5)


def test_refine_codebooks_on_a_rotated_weight():
    """refine_codebooks takes W and H in the input basis; a rotated weight is refined in its
    stored basis: the same result as refining the unrotated problem (W R, R^T H R)."""
    from dataclasses import replace
    from physkern.api import quantize_weight
    from physkern.quant.codebook import refine_codebooks
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    x = torch.randn(256, 64, dtype=torch.float64) * torch.linspace(0.2, 3, 64, dtype=torch.float64)
    g = (x.T @ x).float()
    qw = quantize_weight(w, CodebookConfig(k=8, block_dim=2, scope="layer", error_feedback=True,
                                           rotation="hadamard", seed=1), torch.diagonal(g) / 256, g)
    r = qw.rotation
    got = refine_codebooks(qw, w, g, steps=20)
    ref = refine_codebooks(replace(qw, rotation=None), r.apply(w.double()).float(),
                           r.rotate_gram(g.double()).float(), steps=20)
    assert got.rotation == r
    assert torch.equal(got.codebooks, ref.codebooks) and torch.equal(got.scales, ref.scales)
    loss = lambda q: float(torch.einsum("oi,ij,oj->", (w - q).double(), g.double(),
                                        (w - q).double()))
    assert loss(got.dequantize()) <= loss(qw.dequantize())


def test_streaming_with_rotation_equals_in_memory(tiny_llama, tmp_path):
    """physkern.streaming (block by block from a checkpoint) writes the file the in-memory path
    writes, rotation seeds included; calibrated (the rotated X^T X path), rotated RTN head."""
    import json
    from physkern import ScalarConfig
    from physkern.streaming import quantize_streaming
    from safetensors.torch import load_file
    calib = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    cfg = CodebookConfig(k=12, block_dim=2, scope="layer", iters=3, error_feedback=True,
                         rotation="hadamard", seed=5,
                         overrides={"*.mlp.*": CodebookConfig(k=12, block_dim=2, scope="layer",
                                                              iters=3, rotation="hadamard")})
    head = ScalarConfig(bits=4, group_size=16, rotation="hadamard", rotation_seed=2)
    tiny_llama.save_pretrained(tmp_path / "src")
    m = _copy(tiny_llama)
    physkern.quantize(m, cfg, calibration=calib, progress=False, embedding=head)
    ref = physkern.save_quantized(m, tmp_path / "mem")
    quantize_streaming(tmp_path / "src", tmp_path / "str", cfg, calib, embedding=head,
                       progress=False)
    ta, tb = load_file(str(ref / "model.safetensors")), load_file(str(tmp_path / "str" /
                                                                    "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    la, lb = (json.loads((d / "physkern.json").read_text())["quantized_layers"]
              for d in (ref, tmp_path / "str"))
    assert la == lb
    assert la["model.layers.0.self_attn.q_proj"]["rotation"] == {"kind": "hadamard", "seed": 5,
                                                                "block": 32}
    assert la["model.layers.0.mlp.down_proj"]["rotation"]["block"] == 64
    assert la["lm_head"]["rotation"]["seed"] == 2
    with torch.no_grad():
        want = m(TOKENS).logits
        assert torch.equal(physkern.load_quantized(tmp_path / "str")[0](TOKENS).logits, want)
