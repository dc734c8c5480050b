"""k-means assignment: Triton kernel (interpreter), fused C++ CPU op and its pure-torch fallback
against the torch reference."""

import pytest
import torch
from _subprocess import assert_snippet_prints_ok

from physkern.kernels.kmeans_assign import (kmeans_assign_cpu, kmeans_assign_reference,
                                            kmeans_assign_torch, kmeans_assign_triton,
                                            native_kmeans_available)

needs_native = pytest.mark.skipif(not native_kmeans_available(),
                                  reason="physkern._C without physkern::kmeans_assign_cpu")


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
    _check(*kmeans_assign_torch(blocks, centroids, imp), *ref, blocks, centroids, imp, False)
    if s * n * k > 20000:
        return
    # Tiny chunks exercise every chunking loop of the torch fallback.
    _check(*kmeans_assign_torch(blocks, centroids, imp, chunk_elements=64), *ref, blocks,
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


@pytest.mark.parametrize("impl", ["triton", "cpu", "torch", "reference"])
def test_ties_go_to_lowest_index(impl):
    # Centroid 3 and 40 (and 70) are identical; every block nearest to them must get 3.
    centroids = torch.full((1, 80, 4), 10.0)
    centroids[0, 3] = centroids[0, 40] = centroids[0, 70] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    centroids[0, 10] = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    blocks = torch.randn(1, 25, 4) * 0.1
    blocks[0, :, 0] += torch.where(torch.arange(25) % 2 == 0, 1.0, -1.0)
    fn = {"triton": lambda *a: kmeans_assign_triton(*a, block_n=16, block_k=16),
          "cpu": kmeans_assign_cpu, "torch": kmeans_assign_torch,
          "reference": kmeans_assign_reference}[impl]
    idx, _ = fn(blocks, centroids, None)
    want = torch.where(torch.arange(25) % 2 == 0, 3, 10)
    assert torch.equal(idx[0], want)
    # All-equal distances (all centroids equal): index 0.
    same = torch.zeros(2, 33, 4)
    idx, _ = fn(torch.randn(2, 5, 4), same, None)
    assert (idx == 0).all()


@pytest.mark.parametrize("impl", ["triton", "cpu", "torch", "reference"])
def test_importance_changes_assignment(impl):
    # Block (1, 1): centroid A = (1, 0) differs in dim 1, B = (0, 1) in dim 0.
    blocks = torch.tensor([[[0.9, 0.9]]])
    centroids = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    fn = {"triton": kmeans_assign_triton, "cpu": kmeans_assign_cpu,
          "torch": kmeans_assign_torch, "reference": kmeans_assign_reference}[impl]
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
    _check(*kmeans_assign_torch(blocks, centroids), *ref, blocks, centroids, None, False)


@pytest.mark.parametrize("impl", [kmeans_assign_triton, kmeans_assign_cpu, kmeans_assign_torch,
                                  kmeans_assign_reference])
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


# ---- fused C++ op (physkern._C) vs the reference ----------------------------------------------

def _brute_gap(blocks, centroids, importance):
    """Independent float64 brute force: (best, second best, tolerance) per block. Where
    second - best exceeds the tolerance (a bound on the fp32 rounding of either form) the index
    is unambiguous."""
    s, n, d = blocks.shape
    w, c = blocks.double(), centroids.double()
    imp = (importance.double().expand(s, n, d) if importance is not None
           else torch.ones(s, n, d, dtype=torch.float64))
    dist = (imp[:, :, None, :] * (w[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)  # [S,N,K]
    two = dist.topk(min(2, c.shape[1]), dim=-1, largest=False).values
    second = two[..., 1] if c.shape[1] > 1 else torch.full_like(two[..., 0], float("inf"))
    scale = (imp * w * w).sum(-1) + (imp[:, :, None, :] * c[:, None, :, :] ** 2).sum(-1).amax(-1)
    return two[..., 0], second, 1e-5 * scale + 1e-30


def _check_native(blocks, centroids, imp, threads=None):
    ref_idx, ref_dist = kmeans_assign_reference(blocks, centroids, imp)
    op = torch.ops.physkern.kmeans_assign_cpu   # the C++ op itself, whatever the selector picks
    if threads is None:
        idx, dist = op(blocks, centroids, imp)
    else:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            idx, dist = op(blocks, centroids, imp)
        finally:
            torch.set_num_threads(old)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == ref_idx.shape == dist.shape
    best, second, tol = _brute_gap(blocks, centroids, imp)
    clear = (second - best) > tol
    assert torch.equal(idx[clear], ref_idx[clear])
    # The distance of the chosen centroid is computed in the reference's order and rounding:
    # bit-identical wherever the same centroid was chosen, within rounding of the minimum
    # elsewhere.
    same = idx == ref_idx
    assert torch.equal(dist[same], ref_dist[same])
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist.double(), best, rtol=1e-5, atol=1e-6)
    assert idx.min() >= 0 and idx.max() < centroids.shape[1]
    return idx, dist


NATIVE_SHAPES = [  # (scopes, blocks per scope, K, d): one block, one row, K = 1, big K, ragged n
    (1, 1, 1, 1), (1, 1, 7, 8), (1, 96, 64, 8), (7, 1, 3, 4), (3, 37, 5, 8), (2, 70, 1, 16),
    (4, 9, 256, 4), (1, 5, 4096, 2), (1, 33, 4096, 8), (5, 33, 65, 1), (2, 17, 300, 16),
    (64, 96, 64, 8), (1, 1000, 256, 4), (3, 129, 31, 2), (2, 47, 16, 16),
    # block dims with no compile-time width (padded to a power of two, or run-time if > 32)
    (3, 50, 20, 3), (2, 40, 10, 12), (2, 21, 9, 24), (2, 19, 11, 40),
]
NATIVE_IMPORTANCE = ["none", "per_dim", "per_block", "per_scope", "per_block_shared", "zeros"]


def _native_importance(kind, s, n, d):
    if kind == "per_block_shared":  # E[x^2] per input dimension, shared by every row (the bench)
        return torch.rand(1, n, d) + 0.1
    if kind == "zeros":  # some dimensions do not count at all
        imp = torch.rand(s, n, d)
        imp[..., ::2] = 0
        return imp
    return _importance(kind, s, n, d)


@needs_native
@pytest.mark.parametrize("shape", NATIVE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("imp_kind", NATIVE_IMPORTANCE)
def test_native_matches_reference(shape, imp_kind):
    torch.manual_seed(hash((shape, imp_kind)) % (1 << 31))
    s, n, k, d = shape
    blocks, centroids = torch.randn(s, n, d), torch.randn(s, k, d)
    _check_native(blocks, centroids, _native_importance(imp_kind, s, n, d))


@needs_native
@pytest.mark.parametrize("imp_kind", ["none", "per_block_shared"])
def test_native_threads_agree(imp_kind):
    # Tiles are split over threads; every thread count gives the same bits.
    s, n, k, d = 40, 100, 64, 8
    blocks, centroids = torch.randn(s, n, d) * 0.02, torch.randn(s, k, d) * 0.02
    imp = _native_importance(imp_kind, s, n, d)
    i1, d1 = _check_native(blocks, centroids, imp, threads=1)
    i2, d2 = _check_native(blocks, centroids, imp, threads=2)
    assert torch.equal(i1, i2) and torch.equal(d1, d2)


@needs_native
def test_native_weight_like_scales():
    # Weight-scale values (0.02) and centroids drawn from the blocks themselves (k-means init),
    # so some blocks sit exactly on a centroid: distance 0, the first copy wins.
    torch.manual_seed(1)
    s, n, k, d = 16, 96, 64, 8
    blocks = torch.randn(s, n, d) * 0.02
    pick = torch.stack([torch.randperm(n)[:k] for _ in range(s)])
    centroids = torch.gather(blocks, 1, pick[:, :, None].expand(s, k, d)).clone()
    centroids[:, 5] = centroids[:, 3]  # duplicated centroid: a tie that must go to 3
    for imp in (None, torch.rand(1, n, d) + 0.1):
        idx, dist = _check_native(blocks, centroids, imp)
        on = torch.zeros(s, n, dtype=torch.bool)
        on.scatter_(1, pick[:, torch.arange(k) != 5], True)  # blocks still on a centroid
        assert (dist[on] == 0).all()
        assert not (idx == 5).any()


@needs_native
def test_native_strided_half_and_broadcast_inputs():
    base = torch.randn(8, 3, 12)
    blocks = base.transpose(0, 1)[:, :, ::3]            # [3, 8, 4], odd strides
    centroids = torch.randn(3, 4, 9).half()[:, :, :4]   # half, non-contiguous
    for imp in (None, torch.rand(4).half(), torch.rand(8, 1).expand(8, 4),
                torch.rand(3, 8, 8)[:, :, ::2]):
        _check_native(blocks, centroids, imp)
    # Empty inputs.
    for shape in ((0, 5, 4), (3, 0, 4)):
        idx, dist = kmeans_assign_cpu(torch.randn(*shape), torch.randn(shape[0], 2, 4))
        assert idx.shape == dist.shape == shape[:2] and idx.dtype == torch.int64


@needs_native
def test_native_op_checks_its_arguments():
    op = torch.ops.physkern.kmeans_assign_cpu
    with pytest.raises(ValueError, match="blocks"):
        op(torch.randn(4, 2), torch.randn(1, 3, 2), None)
    with pytest.raises(ValueError, match="do not match"):
        op(torch.randn(1, 4, 2), torch.randn(2, 3, 2), None)
    with pytest.raises(ValueError, match="K >= 1"):
        op(torch.randn(1, 4, 2), torch.randn(1, 0, 2), None)
    with pytest.raises(ValueError, match="floating point"):
        op(torch.randn(1, 4, 2), torch.randn(1, 3, 2), torch.ones(2, dtype=torch.int64))


def test_cpu_path_falls_back_without_extension():
    """With physkern._C unimportable, kmeans_assign_cpu runs the pure-torch path."""
    code = (
        "import sys, warnings\n"
        "sys.modules['physkern._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch\n"
        "from physkern.kernels import kmeans_assign as K\n"
        "assert not K.native_kmeans_available()\n"
        "b, c, s = torch.randn(3, 37, 8), torch.randn(3, 9, 8), torch.rand(1, 37, 8)\n"
        "i, d = K.kmeans_assign_cpu(b, c, s)\n"
        "ri, rd = K.kmeans_assign_reference(b, c, s)\n"
        "assert i.dtype == torch.int64 and d.dtype == torch.float32\n"
        "torch.testing.assert_close(d, rd, rtol=1e-5, atol=1e-6)\n"
        "from physkern import ops\n"
        "i2, _ = ops.kmeans_assign(b, c, s)\n"
        "assert torch.equal(i, i2)\n"
        "print('ok')\n")
    assert_snippet_prints_ok(code)


def test_selector_prefers_matmul_path_for_large_problems_without_avx512():
    """prefer_native_kmeans: the C++ op on AVX-512 always, elsewhere only for small problems
    (measured 2-10x slower than the matmul path above them on AVX2: bench/bench_kmeans_paths.py)."""
    from physkern.kernels.kmeans_assign import NATIVE_MAX_WORK_WITHOUT_AVX512, prefer_native_kmeans
    assert prefer_native_kmeans(1, 1536, 65536, 8, capability="AVX512")
    assert not prefer_native_kmeans(1, 1536, 65536, 8, capability="AVX2")
    assert not prefer_native_kmeans(1, 1536, 65536, 8, capability="DEFAULT")
    assert prefer_native_kmeans(1, 192, 64, 8, capability="AVX2")
    small = NATIVE_MAX_WORK_WITHOUT_AVX512
    assert prefer_native_kmeans(1, small // 16, 4, 4, capability="AVX2")
    assert not prefer_native_kmeans(1, small // 16 + 1, 4, 4, capability="AVX2")


@needs_native
def test_cpu_path_agrees_with_reference_on_both_sides_of_the_selector():
    """The same problem sizes either side of the work threshold go through different paths;
    both must give optimal assignments (near-ties aside) against the reference."""
    from physkern.kernels.kmeans_assign import prefer_native_kmeans
    torch.manual_seed(3)
    for s, n, k, d in ((1, 192, 64, 8), (1, 1536, 1024, 8), (4, 300, 256, 4)):
        blocks, centroids = torch.randn(s, n, d), torch.randn(s, k, d)
        imp = torch.rand(s, n, d)
        ref = kmeans_assign_reference(blocks, centroids, imp)
        _check(*kmeans_assign_cpu(blocks, centroids, imp), *ref, blocks, centroids, imp, False)
        if torch.backends.cpu.get_cpu_capability() == "AVX2":
            assert prefer_native_kmeans(s, n, k, d) == (s * n * k * d <= 1 << 20)
