"""The psum GEMV (kernels/codebook_gemv_psum.py) under the Triton interpreter against
codebook_matmul_reference: every K / d of the layer-scope formats, odd shapes, scale groups,
offsets, residual stages, its index layout and cache, bad inputs, and the CUDA selector switch."""
import pytest
import torch

from physkern.kernels import codebook_gemv_psum as psum
from physkern.kernels.codebook_matmul import codebook_matmul_reference, codebook_matmul_triton
from physkern.kernels.packing import index_bits, pack_indices, unpack_indices


def make(out, inf, d, k, stages=1, scale_group=None, scales=True, offsets=False, n_cb=1,
         seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (stages, out, inf // d), generator=g)
    packed = pack_indices(idx, index_bits(k))
    cb = torch.randn(stages, n_cb, k, d, generator=g)
    sg = scale_group or inf
    sc = torch.rand(out, inf // sg, generator=g) + 0.5 if scales else None
    of = torch.randn(out, inf // sg, generator=g) * 0.1 if offsets else None
    return packed, cb, sc, of, sg


def run_both(x, packed, cb, sc, of, bias, inf, sg, **kw):
    out = packed.shape[1]
    rows = out // cb.shape[1]
    y = psum.codebook_matmul_psum(x, packed, cb, sc, of, bias, inf, rows, sg, **kw)
    ref = codebook_matmul_reference(x, packed, cb, sc, of, bias, inf, rows, sg)
    return y, ref


def close(y, ref, tol=1e-5):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol,
                               atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("k", [1, 2, 16, 64, 256])
@pytest.mark.parametrize("d", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 3])
def test_matches_reference_every_k_and_d(k, d, m):
    out, inf = 37, d * 13                       # odd rows, odd slice count
    packed, cb, sc, of, sg = make(out, inf, d, k)
    x = torch.randn(m, inf)
    close(*run_both(x, packed, cb, sc, of, None, inf, sg))


# (out, in, d, K, stages, scale_group, scales, offsets)
CASES = [
    (33, 24, 1, 16, 2, 8, True, True),       # RTN-like: d = 1, groups of 8, affine, two stages
    (19, 36, 2, 512, 1, 12, True, True),     # 9-bit indices: 8-bit + 1-bit planes, groups of 6
    (21, 40, 4, 1024, 1, None, True, False),  # 10-bit: 8 + 2
    (17, 48, 4, 8, 1, 16, True, False),      # 3-bit indices in 4-bit fields, groups of 4 slices
    (9, 30, 2, 100, 2, 10, True, True),      # 7-bit (8-bit fields), groups of 5 slices (SL = 1)
    (5, 16, 4, 256, 1, None, False, False),  # no scales
    (130, 8, 2, 64, 1, 4, True, True),       # more rows than one 128-row block, groups < SL
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}-d{c[2]}-K{c[3]}-S{c[4]}-g{c[5]}"
                                             for c in CASES])
def test_formats_groups_offsets_stages(case):
    out, inf, d, k, stages, sg, has_sc, has_of = case
    packed, cb, sc, of, sg = make(out, inf, d, k, stages, sg, has_sc, has_of)
    x = torch.randn(2, inf)
    bias = torch.randn(out)
    close(*run_both(x, packed, cb, sc, of, bias, inf, sg))


def test_row_loop_and_small_blocks():
    # rows_per_prog > BLOCK_N: each program walks several row blocks (the row loop), and the
    # last block is partial
    packed, cb, sc, of, sg = make(75, 32, 2, 64, stages=2, scale_group=8, offsets=True)
    x = torch.randn(1, 32)
    close(*run_both(x, packed, cb, sc, of, None, 32, sg, config={"BLOCK_N": 16},
                    rows_per_prog=48))


def test_batched_leading_dims_and_fp16():
    packed, cb, sc, of, sg = make(23, 64, 4, 256)
    x = torch.randn(2, 3, 64)
    y, ref = run_both(x, packed, cb, sc, of, None, 64, sg)
    close(y, ref)
    xh = x.half()
    y16 = psum.codebook_matmul_psum(xh, packed, cb.half(), sc.half(), None, None, 64, 23, 64)
    ref16 = codebook_matmul_reference(xh.float(), packed, cb.half().float(), sc.half().float(),
                                      None, None, 64, 23, 64)
    assert y16.dtype == torch.float16 and y16.shape == (2, 3, 23)
    torch.testing.assert_close(y16.float(), ref16, rtol=2e-3, atol=2e-3 * ref16.abs().max())


def test_zero_rows_of_x():
    packed, cb, sc, of, sg = make(7, 16, 4, 16)
    y = psum.codebook_matmul_psum(torch.randn(0, 16), packed, cb, sc, of, None, 16, 7, 16)
    assert y.shape == (0, 7)


@pytest.mark.parametrize("k", [1, 2, 8, 16, 100, 256, 512, 1024])
def test_layout_round_trip(k):
    d, out, n_slices = 2, 5, 21
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, k, (2, out, n_slices), generator=g)
    packed = pack_indices(idx, index_bits(k))
    sl = psum.chunk_slices(k, n_slices, n_slices)
    lo, hi = psum.build_layout(packed, k, n_slices, sl)
    lo_w, hi_w = psum.plane_bits(index_bits(k))
    assert (hi is None) == (hi_w == 0)

    def fields(plane, w):
        per = min(32 // w, sl)
        v = plane.to(torch.int64) & 0xFFFFFFFF                    # [S, chunks, words, out]
        f = (v[:, :, :, None, :] >> (torch.arange(per) * w)[None, None, None, :, None]) \
            & ((1 << w) - 1)                                       # [S, chunks, words, per, out]
        return f.reshape(2, -1, out).transpose(1, 2)[:, :, :n_slices]

    got = fields(lo, lo_w)
    if hi is not None:
        got = got | (fields(hi, hi_w) << 8)
    assert torch.equal(got, unpack_indices(packed, index_bits(k), n_slices))
    assert lo.shape[2] == psum.plane_words(sl, lo_w) and lo.dtype == torch.int32


def test_chunk_slices_fit_groups_and_tables():
    assert psum.plane_bits(3) == (4, 0) and psum.plane_bits(8) == (8, 0)
    assert psum.plane_bits(9) == (8, 1) and psum.plane_bits(10) == (8, 2)
    for k in (1, 16, 256, 1024):
        for n_slices, gs in ((1024, 1024), (1024, 16), (96, 24), (15, 5), (3, 3)):
            sl = psum.chunk_slices(k, n_slices, gs)
            assert sl & (sl - 1) == 0 and sl * max(1, k) <= max(psum.PSUM_TABLE_ENTRIES, k)
            assert gs == n_slices or gs % sl == 0


def test_layout_cached_until_modified():
    packed, cb, sc, of, sg = make(9, 16, 4, 16)
    sl = psum.chunk_slices(16, 4, 4)
    a = psum.psum_layout(packed, 16, 4, sl)
    assert psum.psum_layout(packed, 16, 4, sl) is a
    packed.add_(0)                                 # an in-place write bumps the version
    assert psum.psum_layout(packed, 16, 4, sl) is not a


def test_bad_inputs_name_the_argument():
    packed, cb, sc, of, sg = make(8, 16, 4, 16, n_cb=2)
    x = torch.randn(1, 16)
    with pytest.raises(ValueError, match="codebooks.*one codebook"):
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 16, 4, sg)
    packed, cb, sc, of, sg = make(8, 16, 4, 4, stages=3)
    with pytest.raises(ValueError, match="stages"):
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 16, 8, sg)
    packed, cb, sc, of, sg = make(8, 16, 4, 2048)
    with pytest.raises(ValueError, match="K <= 1024"):
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 16, 8, sg)
    packed, cb, sc, of, sg = make(8, 16, 4, 16, scale_group=2)
    with pytest.raises(ValueError, match="scale_group"):
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 16, 8, sg)
    packed, cb, sc, of, sg = make(8, 16, 4, 16)
    with pytest.raises(ValueError, match="BLOCK_N"):
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 16, 8, sg, config={"BLOCK_N": 24})
    with pytest.raises(ValueError, match="rows_per_prog"):
        psum.codebook_matmul_psum(x, packed, cb, sc, of, None, 16, 8, sg,
                                  config={"BLOCK_N": 16}, rows_per_prog=24)
    with pytest.raises(ValueError, match="in_features"):
        psum.codebook_matmul_psum(torch.randn(1, 12), packed, cb, sc, of, None, 16, 8, sg)
    with pytest.raises(ValueError, match="cuda gemv"):
        psum.set_cuda_gemv("fast")


def test_selector_switch_routes_codebook_matmul_triton():
    packed, cb, sc, of, sg = make(11, 32, 4, 64)
    x = torch.randn(1, 32)
    assert psum.cuda_gemv() == "dequant"          # off by default
    try:
        psum.set_cuda_gemv("psum")
        psum.LAYOUT_CACHE.clear()
        y = codebook_matmul_triton(x, packed, cb, sc, of, None, 32, 11, sg)
        assert id(packed) in psum.LAYOUT_CACHE._entries  # the psum kernel ran
        close(y, codebook_matmul_reference(x, packed, cb, sc, of, None, 32, 11, sg))
        # a format it does not take (two codebooks) stays on the dequantizing kernels
        p2, cb2, sc2, of2, sg2 = make(12, 32, 4, 64, n_cb=2)
        y2 = codebook_matmul_triton(x, p2, cb2, sc2, of2, None, 32, 6, sg2)
        assert id(p2) not in psum.LAYOUT_CACHE._entries
        close(y2, codebook_matmul_reference(x, p2, cb2, sc2, of2, None, 32, 6, sg2), 2e-5)
    finally:
        psum.set_cuda_gemv("dequant")
