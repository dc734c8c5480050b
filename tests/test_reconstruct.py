"""physkern.quant.reconstruct against an independent construction, and its gradients.

The reference walks every row, block and column with explicit Python loops and the format's
formula written out (physkern.quant.format's docstring); it shares no code with reconstruct().
"""
from __future__ import annotations

import pytest
import torch

from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import index_bits, pack_indices
from physkern.quant.reconstruct import reconstruct
from physkern.quant.scalar import rtn_quantize


def _loop_reference(idx, cbs, scales, offsets, codebook_rows, rows=None) -> torch.Tensor:
    """W[r, j] = scale[r, j // g] * sum_s C[s, r // rows, idx[s, r, j // d], j % d] + offset."""
    s_n, _, _, d = cbs.shape
    n, nb = idx.shape[1], idx.shape[2]
    inf = nb * d
    g = inf // scales.shape[1] if scales is not None else inf
    w = torch.zeros(n, inf, dtype=torch.float64)
    for r in range(n):
        row = r if rows is None else int(rows[r])
        c = row // codebook_rows
        for b in range(nb):
            for t in range(d):
                j = b * d + t
                v = 0.0
                for s in range(s_n):
                    v += float(cbs[s, c, int(idx[s, r, b]), t])
                if scales is not None:
                    v *= float(scales[r, j // g])
                if offsets is not None:
                    v += float(offsets[r, j // g])
                w[r, j] = v
    return w


def _random_case(out, inf, k, d, codebook_rows, stages, n_groups, offsets, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (stages, out, inf // d), generator=g)
    cbs = torch.randn(stages, out // codebook_rows, k, d, generator=g, dtype=torch.float64)
    sc = (torch.rand(out, n_groups, generator=g, dtype=torch.float64) + 0.5
          if n_groups else None)
    off = torch.randn(out, n_groups, generator=g, dtype=torch.float64) if offsets else None
    return idx, cbs, sc, off


# (out, in, K, d, codebook_rows, stages, scale groups per row (0 = no scales), offsets)
CASES = [
    (5, 6, 4, 2, 1, 1, 0, False),      # row scope, no scales
    (6, 9, 3, 3, 2, 2, 3, True),       # group scope, 2 stages, scales + offsets, odd shapes
    (7, 5, 5, 1, 7, 1, 5, True),       # layer scope, d = 1, a scale per column
    (4, 6, 1, 2, 4, 1, 1, False),      # K = 1 (index_bits 1), per-row scales
    (6, 8, 8, 4, 3, 3, 2, False),      # group scope, 3 stages, scales only
    (3, 7, 2, 7, 1, 2, 1, True),       # one block per row (d = in), scales + offsets
]


@pytest.mark.parametrize("case", CASES)
def test_reconstruct_equals_loops(case):
    out, inf, k, d, rows, stages, n_groups, offsets = case
    idx, cbs, sc, off = _random_case(out, inf, k, d, rows, stages, n_groups, offsets)
    ref = _loop_reference(idx, cbs, sc, off, rows)
    got = reconstruct(idx, cbs, sc, off, codebook_rows=rows)
    assert got.dtype == torch.float64 and got.shape == (out, inf)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # int32 indices (what fine-tuning keeps) give the same W
    torch.testing.assert_close(reconstruct(idx.int(), cbs, sc, off, codebook_rows=rows), ref,
                               rtol=1e-12, atol=1e-12)
    # a subset of rows, in any order with repeats, finds each row's own codebook
    pick = torch.tensor([out - 1, 0, out // 2, out // 2])
    sub = reconstruct(idx[:, pick], cbs, None if sc is None else sc[pick],
                      None if off is None else off[pick], codebook_rows=rows, rows=pick)
    torch.testing.assert_close(sub, ref[pick], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_dequantize_through_the_stored_format_equals_loops(case):
    """QuantizedWeight (packed indices, float16 storage) -> dequantize == the loops."""
    out, inf, k, d, rows, stages, n_groups, offsets = case
    idx, cbs, sc, off = _random_case(out, inf, k, d, rows, stages, n_groups, offsets, seed=1)
    cbs, sc = cbs.half(), None if sc is None else sc.half()
    off = None if off is None else off.half()
    qw = QuantizedWeight(pack_indices(idx, index_bits(k)), cbs, sc, off, inf, out, rows,
                         inf // n_groups if n_groups else inf).validate()
    assert qw.scope == ("row" if rows == 1 else "layer" if rows == out else "group")
    ref = _loop_reference(idx, cbs, sc, off, rows)
    torch.testing.assert_close(qw.dequantize(torch.float64), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qw.dequantize(), ref.float(), rtol=1e-6, atol=1e-6)
    pick = torch.tensor([out - 1, 0, out // 2])
    torch.testing.assert_close(qw.dequantize(torch.float64, rows=pick), ref[pick],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 3])
def test_scalar_rtn_grid_equals_loops(symmetric, group_size):
    """RTN grids (d = 1, K = 2^bits, layer scope, integer codebook, affine scales/offsets)."""
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(2))
    qw = rtn_quantize(w, 3, group_size=group_size, symmetric=symmetric)
    assert qw.block_dim == 1 and qw.k == 8 and qw.scope == "layer"
    assert (qw.offsets is None) == symmetric
    ref = _loop_reference(qw.indices(), qw.codebooks, qw.scales, qw.offsets, qw.codebook_rows)
    torch.testing.assert_close(qw.dequantize(torch.float64), ref, rtol=1e-12, atol=1e-12)


def test_reconstruct_rejects_bad_inputs():
    idx, cbs, sc, off = _random_case(4, 6, 3, 2, 2, 1, 2, True)
    with pytest.raises(ValueError, match="offsets need scales"):
        reconstruct(idx, cbs, None, off, codebook_rows=2)
    with pytest.raises(ValueError, match="stages"):
        reconstruct(idx.repeat(2, 1, 1), cbs, sc, off, codebook_rows=2)
    with pytest.raises(ValueError, match="scales"):
        reconstruct(idx, cbs, sc[:, :1].repeat(1, 4), None, codebook_rows=2)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_reconstruct_gradcheck(case):
    """d reconstruct / d (codebooks, scales, offsets) in float64 matches finite differences."""
    out, inf, k, d, rows, stages, n_groups, offsets = case
    idx, cbs, sc, off = _random_case(out, inf, k, d, rows, stages, n_groups, offsets, seed=3)
    params = [t.clone().requires_grad_(True) for t in (cbs, sc, off) if t is not None]
    if off is not None:
        fn = lambda c, s, o: reconstruct(idx, c, s, o, codebook_rows=rows)
    else:
        fn = lambda c, s: reconstruct(idx, c, s, None, codebook_rows=rows)
    assert torch.autograd.gradcheck(fn, tuple(params), eps=1e-6, atol=1e-8)


def test_reconstruct_gradcheck_codebooks_only_and_float32_cast():
    """Without scales; and with dtype= the cast is differentiable (grad in the input dtype)."""
    idx, cbs, _, _ = _random_case(6, 8, 4, 2, 3, 2, 0, False, seed=4)
    c = cbs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: reconstruct(idx, c, codebook_rows=3), (c,))
    w = reconstruct(idx, c, codebook_rows=3, dtype=torch.float32)
    assert w.dtype == torch.float32
    w.sum().backward()
    # each entry's gradient counts how many (row, block) picked it, per column of the block
    counts = torch.zeros_like(cbs)
    for s in range(2):
        for r in range(6):
            for b in range(4):
                counts[s, r // 3, idx[s, r, b]] += 1
    torch.testing.assert_close(c.grad, counts)
