"""k-means assignment: Triton kernel (interpreter) and fast CPU path against the torch reference."""
import pytest
import torch

from physkern.kernels.kmeans_assign import (kmeans_assign_cpu, kmeans_assign_reference,
                                            kmeans_assign_triton)


def _check(idx, dist, ref_idx, ref_dist, blocks, centroids, importance, exact_index):
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == ref_idx.shape and dist.shape == ref_dist.shape
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)
    if exact_index:
        # Direct-difference implementations agree on the index except where two centroids are
        # within rounding of each other; then the chosen one must be as near as the reference's.
        mismatch = idx != ref_idx
        assert mismatch.float().mean() < 0.01
    # Whatever was chosen, its true distance is the minimum (up to rounding).
    s, n, d = blocks.shape
    chosen = torch.gather(centroids.float(), 1, idx[:, :, None].expand(s, n, d))
    sq = (blocks.float() - chosen) ** 2
    if importance is not None:
        sq = sq * importance.float().expand(s, n, d)
    torch.testing.assert_close(sq.sum(-1), ref_dist, rtol=1e-5, atol=1e-5)


SHAPES = [  # (scopes, blocks per scope, K, d)
    (1, 1, 1, 1),
    (3, 37, 5, 8),
    (2, 70, 1, 16),
    (4, 9, 256, 4),
    (1, 5, 4096, 2),
    (5, 33, 65, 1),
    (2, 17, 300, 16),
]
IMPORTANCE = ["none", "per_dim", "per_block", "per_scope"]


def _importance(kind, s, n, d):
    if kind == "none":
        return None
    if kind == "per_dim":
        return torch.rand(d) + 0.1
    if kind == "per_block":
        return torch.rand(s, n, d)
    return torch.rand(s, 1, d)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("imp_kind", IMPORTANCE)
def test_triton_matches_reference(shape, imp_kind):
    s, n, k, d = shape
    blocks, centroids = torch.randn(s, n, d), torch.randn(s, k, d)
    imp = _importance(imp_kind, s, n, d)
    ref = kmeans_assign_reference(blocks, centroids, imp)
    # Small tiles: several block tiles and centroid tiles, ragged edges on both.
    got = kmeans_assign_triton(blocks, centroids, imp, block_n=16, block_k=16)
    _check(*got, *ref, blocks, centroids, imp, exact_index=True)


@pytest.mark.parametrize("shape", [(3, 37, 5, 8), (1, 5, 4096, 2), (2, 40, 70, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_production_tiles(shape):
    s, n, k, d = shape
    blocks, centroids = torch.randn(s, n, d), torch.randn(s, k, d)
    imp = torch.rand(s, n, d)
    _check(*kmeans_assign_triton(blocks, centroids, imp),
           *kmeans_assign_reference(blocks, centroids, imp), blocks, centroids, imp, True)


@pytest.mark.parametrize("shape", SHAPES + [(64, 96, 64, 8), (1, 3000, 256, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("imp_kind", IMPORTANCE)
def test_cpu_path_matches_reference(shape, imp_kind):
    s, n, k, d = shape
    blocks, centroids = torch.randn(s, n, d), torch.randn(s, k, d)
    imp = _importance(imp_kind, s, n, d)
    ref = kmeans_assign_reference(blocks, centroids, imp)
    # The expanded form may pick a different centroid on near-ties: check optimality instead.
    _check(*kmeans_assign_cpu(blocks, centroids, imp), *ref, blocks, centroids, imp, False)
    if s * n * k > 20000:
        return
    # Tiny chunks exercise every chunking loop.
    _check(*kmeans_assign_cpu(blocks, centroids, imp, chunk_elements=64), *ref, blocks,
           centroids, imp, False)


def test_reference_chunking_is_exact():
    blocks, centroids = torch.randn(3, 20, 4), torch.randn(3, 50, 4)
    a = kmeans_assign_reference(blocks, centroids)
    b = kmeans_assign_reference(blocks, centroids, chunk_elements=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reference_k65536_memory_bounded():
    blocks, centroids = torch.randn(1, 4, 2), torch.randn(1, 65536, 2)
    idx, dist = kmeans_assign_reference(blocks, centroids, chunk_elements=1 << 16)
    brute = ((blocks[0, :, None, :] - centroids[0, None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(dist[0], brute.min(-1).values)


@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
def test_ties_go_to_lowest_index(impl):
    # Centroid 3 and 40 (and 70) are identical; every block nearest to them must get 3.
    centroids = torch.full((1, 80, 4), 10.0)
    centroids[0, 3] = centroids[0, 40] = centroids[0, 70] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    centroids[0, 10] = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    blocks = torch.randn(1, 25, 4) * 0.1
    blocks[0, :, 0] += torch.where(torch.arange(25) % 2 == 0, 1.0, -1.0)
    fn = {"triton": lambda *a: kmeans_assign_triton(*a, block_n=16, block_k=16),
          "cpu": kmeans_assign_cpu, "reference": kmeans_assign_reference}[impl]
    idx, _ = fn(blocks, centroids, None)
    want = torch.where(torch.arange(25) % 2 == 0, 3, 10)
    assert torch.equal(idx[0], want)
    # All-equal distances (all centroids equal): index 0.
    same = torch.zeros(2, 33, 4)
    idx, _ = fn(torch.randn(2, 5, 4), same, None)
    assert (idx == 0).all()


@pytest.mark.parametrize("impl", ["triton", "cpu", "reference"])
def test_importance_changes_assignment(impl):
    # Block (1, 1): centroid A = (1, 0) differs in dim 1, B = (0, 1) in dim 0.
    blocks = torch.tensor([[[0.9, 0.9]]])
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    fn = {"triton": kmeans_assign_triton, "cpu": kmeans_assign_cpu,
          "reference": kmeans_assign_reference}[impl]
    assert fn(blocks, centroids, torch.tensor([10.0, 1.0]))[0].item() == 0
    assert fn(blocks, centroids, torch.tensor([1.0, 10.0]))[0].item() == 1
    # Uniform importance equals no importance (scaled distances).
    b, c = torch.randn(2, 30, 4), torch.randn(2, 7, 4)
    i0, d0 = fn(b, c, None)
    i1, d1 = fn(b, c, torch.full((4,), 2.0))
    assert torch.equal(i0, i1)
    torch.testing.assert_close(d1, 2 * d0)


def test_non_contiguous_and_half_inputs():
    base = torch.randn(8, 3, 12)
    blocks = base.transpose(0, 1)[:, :, ::3]            # [3, 8, 4], odd strides
    centroids = torch.randn(3, 4, 9).half()[:, :, :4]
    ref = kmeans_assign_reference(blocks, centroids)
    _check(*kmeans_assign_triton(blocks, centroids, block_n=16, block_k=16), *ref, blocks,
           centroids, None, True)
    _check(*kmeans_assign_cpu(blocks, centroids), *ref, blocks, centroids, None, False)


@pytest.mark.parametrize("impl", [kmeans_assign_triton, kmeans_assign_cpu, kmeans_assign_reference])
def test_bad_input(impl):
    with pytest.raises(ValueError, match="blocks"):
        impl(torch.randn(4, 2), torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match="centroids"):
        impl(torch.randn(1, 4, 2), torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="K >= 1"):
        impl(torch.randn(1, 4, 2), torch.randn(1, 0, 2))
    with pytest.raises(ValueError, match="importance"):
        impl(torch.randn(1, 4, 2), torch.randn(1, 3, 2), torch.rand(3))


def test_triton_rejects_unsupported_block_dim():
    with pytest.raises(ValueError, match="block dim"):
        kmeans_assign_triton(torch.randn(1, 4, 3), torch.randn(1, 2, 3))
