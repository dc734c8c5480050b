"""quant/codebook.py: weighted k-means, scopes, residual stages, error feedback, bad input."""
import pytest
import torch

from physkern.quant.codebook import (kmeans, quantize_codebook, quantize_codebook_error_feedback,
                                     to_blocks)


def weighted_objective(blocks, cent, idx, imp):
    rec = cent.gather(1, idx[..., None].expand(-1, -1, blocks.shape[-1]))
    w = imp.expand_as(blocks) if imp is not None else torch.ones_like(blocks)
    return float((w * (blocks - rec) ** 2).sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_objective_never_increases(weighted):
    g = torch.Generator().manual_seed(1)
    blocks = torch.randn(3, 200, 4, generator=g)
    imp = torch.rand(3, 200, 4, generator=g) + 0.1 if weighted else None
    res = kmeans(blocks, 16, imp, iters=30, tol=0.0, seed=0)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(res.objective, res.objective[1:]))
    assert len(res.objective) > 2
    # the reported objective is the weighted SSE of the returned solution
    assert res.objective[-1] == pytest.approx(weighted_objective(blocks, res.centroids,
                                                                 res.indices, imp), rel=1e-4)


def test_uniform_importance_equals_unweighted():
    blocks = torch.randn(2, 120, 2)
    a = kmeans(blocks, 8, None, seed=5)
    b = kmeans(blocks, 8, torch.full((1, 1, 2), 3.0), seed=5)
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.centroids, b.centroids, atol=1e-5)


def test_per_dimension_importance_changes_assignment():
    # Points spread along x and y; weighting y heavily must split clusters along y instead.
    pts = torch.tensor([[0., 0.], [0., 1.], [10., 0.], [10., 1.]])[None]
    c = torch.tensor([[[5., 0.], [5., 1.]]])
    from physkern.quant.codebook import kmeans_assign
    i_plain, _ = kmeans_assign(pts, torch.tensor([[[0., .5], [10., .5]]]))
    i_w, _ = kmeans_assign(pts, c, torch.tensor([1e-3, 100.]))
    assert i_plain.tolist() == [[0, 0, 1, 1]]
    assert i_w.tolist() == [[0, 1, 0, 1]]
    # and the weighted centroid update is the weighted mean per dimension
    res = kmeans(torch.tensor([[[0., 0.], [2., 4.]]]), 1, torch.tensor([[[1., 1.], [3., 1.]]]),
                 iters=1)
    assert torch.allclose(res.centroids[0, 0], torch.tensor([1.5, 2.0]))


def test_k_equal_blocks_per_row_reconstructs_exactly():
    w = torch.randn(6, 32)
    qw = quantize_codebook(w, k=8, block_dim=4, scope="row", codebook_dtype="float32")
    assert torch.equal(qw.dequantize(), w)


def test_same_seed_same_indices_and_seed_matters():
    w = torch.randn(16, 64)
    a = quantize_codebook(w, k=16, block_dim=2, scope="layer", scales="row", seed=3)
    b = quantize_codebook(w, k=16, block_dim=2, scope="layer", scales="row", seed=3)
    c = quantize_codebook(w, k=16, block_dim=2, scope="layer", scales="row", seed=4)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)


@pytest.mark.parametrize("scope,kw,n_cb", [("row", {}, 12), ("group", {"group_size": 4}, 3),
                                           ("layer", {}, 1)])
def test_scopes_shapes(scope, kw, n_cb):
    w = torch.randn(12, 16)
    qw = quantize_codebook(w, k=4, block_dim=2, scope=scope, **kw)
    assert qw.codebooks.shape == (1, n_cb, 4, 2) and qw.scope == scope
    err = (qw.dequantize() - w).norm() / w.norm()
    assert err < 0.8


def test_residual_stages_reduce_error():
    w = torch.randn(32, 64)
    e1 = (quantize_codebook(w, 16, 4, "layer", scales="row").dequantize() - w).norm()
    e2 = (quantize_codebook(w, 16, 4, "layer", scales="row", stages=2).dequantize() - w).norm()
    assert e2 < 0.85 * e1


def test_scales_fix_mismatched_rows():
    w = torch.randn(32, 64) * torch.logspace(-2, 1, 32)[:, None]
    plain = quantize_codebook(w, 16, 2, "layer", scales="none", input_importance=None)
    scaled = quantize_codebook(w, 16, 2, "layer", scales="row")
    rel = lambda q: float(((q.dequantize() - w).norm(dim=1) / w.norm(dim=1)).max())
    assert rel(scaled) < 0.5 * rel(plain)
    cols = quantize_codebook(w, 16, 2, "layer", scales="columns", scale_group=16)
    assert cols.scales.shape == (32, 4)


def test_calibration_importance_lowers_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    x = torch.randn(2048, 64, generator=g) * torch.logspace(-1.5, 1, 64)  # uneven channels
    m2 = x.pow(2).mean(0)
    out_err = lambda qw: float(((qw.dequantize() - w) @ x.T).norm())
    for scope in ("row", "layer"):
        k = 4 if scope == "row" else 16
        plain = quantize_codebook(w, k, 4, scope, scales="row")
        calib = quantize_codebook(w, k, 4, scope, scales="row", input_importance=m2)
        assert out_err(calib) < (0.7 if scope == "row" else 0.95) * out_err(plain)


def test_error_feedback_beats_plain_calibration_on_proxy_loss():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    base = torch.randn(4096, 16, generator=g)
    x = base @ torch.randn(16, 64, generator=g) + 0.1 * torch.randn(4096, 64, generator=g)
    gram = x.T @ x
    loss = lambda qw: float(((qw.dequantize() - w) @ x.T).pow(2).sum())
    calib = quantize_codebook(w, 16, 2, "layer", scales="row", input_importance=torch.diagonal(gram))
    ef = quantize_codebook_error_feedback(w, gram, 16, 2, "layer", scales="row")
    assert loss(ef) < 0.9 * loss(calib)
    assert torch.equal(ef.codebooks, calib.codebooks)  # same codebook, better indices


def test_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="exceeds the 4 blocks"):
        quantize_codebook(w, k=5, block_dim=4, scope="row")
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.randn(1, 5, 2), 0)
    with pytest.raises(ValueError, match="not divisible by block_dim"):
        quantize_codebook(torch.randn(8, 10), k=2, block_dim=4)
    with pytest.raises(ValueError, match="group_size"):
        quantize_codebook(w, k=2, block_dim=4, scope="group", group_size=3)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_codebook(bad, k=2, block_dim=4)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_codebook(bad, k=2, block_dim=4)
    with pytest.raises(ValueError, match="gram must be"):
        quantize_codebook_error_feedback(w, torch.eye(3), 2, 4)


def test_to_blocks_layout():
    w = torch.arange(24.).reshape(4, 6)
    b = to_blocks(w, 2, 2)
    assert b.shape == (2, 6, 2)
    assert b[1, 0].tolist() == [12., 13.]


def test_config_validation():
    from physkern.config import CodebookConfig, GPTQConfig, ScalarConfig, config_from_dict
    with pytest.raises(ValueError, match="scope must be one of"):
        CodebookConfig(scope="tensor")
    with pytest.raises(ValueError, match="block_dim must be one of"):
        CodebookConfig(block_dim=3)
    with pytest.raises(ValueError, match="k must be"):
        CodebookConfig(k=0)
    with pytest.raises(ValueError, match="needs group_size"):
        CodebookConfig(scope="group")
    with pytest.raises(ValueError, match="bits must be"):
        ScalarConfig(bits=9)
    with pytest.raises(ValueError, match="error_feedback"):
        CodebookConfig(calibrate=False, error_feedback=True)
    cfg = CodebookConfig(k=16, overrides={"*.mlp.*": ScalarConfig(bits=3)})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.for_layer("model.layers.0.mlp.up_proj") == ScalarConfig(bits=3)
    assert config_from_dict(GPTQConfig(bits=3).to_dict()) == GPTQConfig(bits=3)
    with pytest.raises(ValueError, match="unknown codebook config keys"):
        config_from_dict({"method": "codebook", "kk": 3})


def test_refine_codebooks_lowers_output_loss_and_keeps_indices():
    from physkern.quant.codebook import refine_codebooks
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    x = torch.randn(1024, 8, generator=g) @ torch.randn(8, 48, generator=g) \
        + 0.3 * torch.randn(1024, 48, generator=g)
    gram = x.T @ x
    loss = lambda q: float(((q.dequantize() - w) @ x.T).pow(2).sum())
    qw = quantize_codebook_error_feedback(w, gram, 16, 2, "layer", scales="row")
    ref = refine_codebooks(qw, w, gram, steps=60, lr=1e-2)
    assert loss(ref) < loss(qw)
    assert torch.equal(ref.packed, qw.packed)
    assert refine_codebooks(qw, w, gram, steps=0) is qw
    with torch.no_grad():   # physkern.quantize runs layers under no_grad: refining must still work
        assert torch.equal(refine_codebooks(qw, w, gram, steps=60, lr=1e-2).codebooks, ref.codebooks)


def test_subsampled_fit_keeps_rare_outlier_blocks():
    """A rare block of huge weighted energy must shape the codebook even when k-means fits on a
    sample (it dominates the output error; a uniform sample usually misses it)."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(1, 20000, 2, generator=g)
    blocks[0, 12345] = torch.tensor([40.0, -40.0])
    res = kmeans(blocks, 8, None, max_fit_blocks=1000, seed=0)
    rec = res.centroids[0, res.indices[0, 12345]]
    assert torch.allclose(rec, blocks[0, 12345], atol=1.0)
    assert res.indices.shape == (1, 20000)
