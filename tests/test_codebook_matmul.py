"""Codebook matmul: Triton kernel (interpreter) and CPU path against dequantize + matmul."""
import pytest
import torch

from physkern.kernels.codebook_matmul import (INDEX_CACHE, codebook_matmul_cpu,
                                              codebook_matmul_reference, codebook_matmul_triton,
                                              unpack_fast, wordwise_decode)
from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import index_bits, pack_indices, unpack_indices

SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}


def make_qw(out, inf, d, k, stages=1, codebook_rows=1, scale_group=None, scales=False,
            offsets=False, cb_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb = inf // d
    idx = torch.randint(0, k, (stages, out, nb), generator=g)
    packed = pack_indices(idx, index_bits(k))
    cb = torch.randn(stages, out // codebook_rows, k, d, generator=g).to(cb_dtype)
    sg = scale_group or inf
    sc = (torch.rand(out, inf // sg, generator=g) + 0.5) if scales else None
    of = torch.randn(out, inf // sg, generator=g) * 0.1 if offsets else None
    return QuantizedWeight(packed, cb, sc, of, inf, out, codebook_rows, sg).validate()


def args(qw, x, bias):
    return (x, qw.packed, qw.codebooks, qw.scales, qw.offsets, bias, qw.in_features,
            qw.codebook_rows, qw.scale_group)


def check(y, x, qw, bias, tol=2e-5):
    ref = x.float() @ qw.dequantize().T + (bias.float() if bias is not None else 0)
    assert y.shape == (*x.shape[:-1], qw.out_features) and y.dtype == x.dtype
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


# (out, in, d, K, stages, codebook_rows, scale_group, scales, offsets): odd rows/cols, every
# straddling bit width (3, 5, 6, 7, 12 bits), K = 1, scopes row/group/layer, groups < d.
CASES = [
    (37, 40, 8, 5, 1, 1, None, False, False),       # 3-bit straddling, row scope
    (20, 48, 4, 128, 2, 4, 16, True, True),         # 7-bit, 2 stages, group scope, affine
    (33, 24, 1, 8, 1, 33, 8, True, True),           # scalar RTN grid: d = 1, layer scope
    (17, 32, 16, 7, 2, 1, 16, True, False),         # d = 16, 3 bits
    (1, 16, 2, 1, 1, 1, None, False, False),        # one row, K = 1
    (24, 40, 2, 32, 1, 24, 4, True, True),          # 5 bits, layer
    (18, 36, 4, 64, 1, 6, 2, True, True),           # 6 bits, scale groups smaller than d
    (9, 48, 8, 256, 1, 9, 16, True, False),         # 8 bits, layer
    (8, 64, 8, 4096, 1, 8, None, False, False),     # 12 bits, K = 4096
    (5, 32, 1, 2, 2, 5, 16, True, True),            # 1 bit, 2 stages
]
IDS = [f"{c[0]}x{c[1]}-d{c[2]}-K{c[3]}-S{c[4]}-r{c[5]}-g{c[6]}-{'s' if c[7] else ''}"
       f"{'o' if c[8] else ''}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("m", [1, 5, 19])
def test_triton_matches_reference(case, m):
    qw = make_qw(*case)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    # Small tiles: several tiles along every dim, ragged edges; split-K exercised for m <= 16.
    check(codebook_matmul_triton(*args(qw, x, bias), config=SMALL_TILES), x, qw, bias)


VEC_TILES = {"kernel": "gemv_vec", "BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("m", [1, 3, 4])
def test_triton_gemv_vec_matches_reference(case, m):
    """The tensor-core-free decode kernel (M <= BLOCK_M), split-K and reduction kernel."""
    qw = make_qw(*case)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    check(codebook_matmul_triton(*args(qw, x, bias), config=VEC_TILES), x, qw, bias)
    check(codebook_matmul_triton(*args(qw, x, None), config=VEC_TILES, split_k=1), x, qw, None)


# Word-wise index decoding (32 % bits == 0, a step covers whole words) and one scale per row:
# odd rows, in_features whose last word is partial, every power-of-two width.
WORDWISE_CASES = [
    (19, 72, 2, 2, 1, 19, None, True, True),        # 1 bit, row scale + offset, partial word
    (13, 88, 1, 4, 2, 13, None, True, False),       # 2 bits, 2 stages
    (21, 100, 4, 16, 1, 3, None, True, False),      # 4 bits, group scope
    (9, 136, 8, 256, 1, 9, None, True, True),       # 8 bits, 17 blocks: last word partial
    (7, 96, 1, 64, 1, 1, 32, True, False),          # 6 bits: the generic path beside them
]


@pytest.mark.parametrize("case", WORDWISE_CASES, ids=[f"wordwise{i}" for i in range(5)])
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("split", [None, 1, 2])
def test_triton_wordwise_decode_and_row_scales(case, m, split):
    qw = make_qw(*case)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    cfg = dict(VEC_TILES, BLOCK_K=64) if m <= 4 else dict(SMALL_TILES, BLOCK_K=64)
    if case[3] in (2, 4, 16, 256):
        assert wordwise_decode(qw.bits, 64 // qw.block_dim)
    check(codebook_matmul_triton(*args(qw, x, bias), config=cfg, split_k=split), x, qw, bias)


def test_triton_16bit_indices_wordwise():
    g = torch.Generator().manual_seed(3)
    out, inf, d, k = 11, 80, 1, 65536
    idx = torch.randint(0, k, (1, out, inf), generator=g)
    cb = torch.randn(1, 1, k, d, generator=g)
    qw = QuantizedWeight(pack_indices(idx, 16), cb, torch.rand(out, 1) + 0.5, None, inf, out, out,
                         inf)
    x = torch.randn(2, inf)
    assert wordwise_decode(16, 64)
    check(codebook_matmul_triton(*args(qw, x, None), config=dict(VEC_TILES, BLOCK_K=64)), x, qw, None)


def test_triton_noncontiguous_codebooks():
    qw = make_qw(16, 32, 4, 16, 1, 16, None, True, False)
    cb_t = qw.codebooks.transpose(2, 3).contiguous().transpose(2, 3)   # same values, other strides
    assert not cb_t.is_contiguous()
    x = torch.randn(2, 32)
    y = codebook_matmul_triton(x, qw.packed, cb_t, qw.scales, qw.offsets, None, 32, 16, 32,
                               config=VEC_TILES)
    check(y, x, qw, None)


def test_triton_gemv_vec_rejects_more_rows_than_block_m():
    qw = make_qw(*CASES[0])
    x = torch.randn(5, qw.in_features)
    with pytest.raises(ValueError, match="BLOCK_M"):
        codebook_matmul_triton(*args(qw, x, None), config=VEC_TILES)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_triton_gemv_vec_production_configs(m):
    qw = make_qw(*CASES[1])
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    check(codebook_matmul_triton(*args(qw, x, bias)), x, qw, bias)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[6]], ids=[IDS[0], IDS[1], IDS[6]])
@pytest.mark.parametrize("m", [1, 17])
def test_triton_production_configs(case, m):
    qw = make_qw(*case)
    x = torch.randn(m, qw.in_features)
    check(codebook_matmul_triton(*args(qw, x, None)), x, qw, None)


def test_triton_split_k_and_3d_input():
    qw = make_qw(40, 96, 8, 16, 1, 8, 32, True, True)
    x = torch.randn(2, 3, 96)
    bias = torch.randn(40)
    for split in (1, 2, 3, 6):
        check(codebook_matmul_triton(*args(qw, x, bias), config=SMALL_TILES, split_k=split),
              x, qw, bias)


def test_triton_fp16_codebooks_and_strided_x():
    qw = make_qw(21, 32, 4, 16, 1, 7, 8, True, False, cb_dtype=torch.float16)
    x = torch.randn(3, 32)
    xs = torch.randn(3, 64)[:, ::2]                         # non-unit stride along in
    check(codebook_matmul_triton(*args(qw, x, None), config=SMALL_TILES), x, qw, None)
    check(codebook_matmul_triton(*args(qw, xs, None), config=SMALL_TILES), xs, qw, None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("method", ["auto", "lut", "dequant"])
def test_cpu_path_matches_reference(case, m, method):
    qw = make_qw(*case)
    x = torch.randn(m, qw.in_features)
    bias = torch.randn(qw.out_features)
    if method == "lut" and qw.scales is not None and qw.scale_group % qw.block_dim:
        with pytest.raises(ValueError, match="scale_group"):
            codebook_matmul_cpu(*args(qw, x, bias), method=method)
        return
    check(codebook_matmul_cpu(*args(qw, x, bias), method=method), x, qw, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_path_half_inputs(dtype):
    qw = make_qw(24, 64, 8, 16, 1, 24, 32, True, True, cb_dtype=torch.float16)
    x = torch.randn(4, 64).to(dtype)
    bias = torch.randn(24).to(dtype)
    y = codebook_matmul_cpu(*args(qw, x, bias))
    ref = codebook_matmul_reference(*args(qw, x, bias))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("method", ["lut", "dequant"])
def test_cpu_index_cache_follows_in_place_writes(method):
    # The torch path caches unpacked indices (small M goes to the C++ op, which reads the packed
    # indices directly: hence the explicit torch methods).
    INDEX_CACHE.clear()
    qw = make_qw(16, 32, 8, 4, 1, 16)
    x = torch.randn(2, 32)
    check(codebook_matmul_cpu(*args(qw, x, None), method=method), x, qw, None)
    hits = INDEX_CACHE.hits
    check(codebook_matmul_cpu(*args(qw, x, None), method=method), x, qw, None)
    assert INDEX_CACHE.hits == hits + 1
    qw.packed.copy_(make_qw(16, 32, 8, 4, 1, 16, seed=5).packed)  # new indices, same tensor
    check(codebook_matmul_cpu(*args(qw, x, None), method=method), x, qw, None)


def test_unpack_fast_matches_unpack():
    for bits in (1, 2, 3, 4, 5, 8, 11, 16):
        n = 37
        idx = torch.randint(0, 1 << bits, (3, 5, n))
        p = pack_indices(idx, bits)
        assert torch.equal(unpack_fast(p, bits, n), unpack_indices(p, bits, n))
        assert torch.equal(unpack_fast(p, bits, n), idx)


def test_reference_is_dequantize_matmul():
    qw = make_qw(10, 16, 4, 8, 2, 5, 8, True, True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(codebook_matmul_reference(*args(qw, x, None)),
                               x @ qw.dequantize().T)


@pytest.mark.parametrize("impl", [codebook_matmul_triton, codebook_matmul_cpu,
                                  codebook_matmul_reference])
def test_bad_input(impl):
    qw = make_qw(8, 16, 4, 4, 1, 8, 8, True, True)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="in_features"):
        impl(torch.randn(2, 12), *args(qw, x, None)[1:])
    a = list(args(qw, x, None))
    a[5] = torch.randn(7)
    with pytest.raises(ValueError, match="bias"):
        impl(*a)
    a = list(args(qw, x, None))
    a[1] = qw.packed.to(torch.int64)
    with pytest.raises(ValueError, match="packed"):
        impl(*a)
    a = list(args(qw, x, None))
    a[3] = None
    with pytest.raises(ValueError, match="offsets need scales"):
        impl(*a)
    a = list(args(qw, x, None))
    a[7] = 3
    with pytest.raises(ValueError, match="codebook_rows"):
        impl(*a)


@pytest.mark.parametrize("m,bits,d,expect", [
    (1, 8, 4, "m1_wordwise"), (1, 9, 4, "m1"), (1, 4, 1, "m1"), (1, 12, 8, "m1"),
    (5, 8, 4, "gemv"), (16, 9, 4, "gemv"), (17, 8, 4, "tiled"), (255, 6, 2, "tiled"),
    (256, 8, 4, "tiled_large_wordwise"), (2048, 9, 4, "tiled_large"),
    (2048, 4, 1, "tiled_large"),   # d = 1 keeps the smaller tile (the 128x128 one spills)
])
def test_pick_config_by_rows_and_format(m, bits, d, expect):
    from physkern.kernels.codebook_matmul import GEMV_VEC_CONFIGS, MATMUL_CONFIGS, pick_config
    cfg = pick_config(m, bits, d)
    if expect == "m1_wordwise":   # two stages keep the smaller tile (the larger one spills)
        assert pick_config(m, bits, d, stages=2) == {"kernel": "gemv_vec", **GEMV_VEC_CONFIGS["m1"]}
    want = GEMV_VEC_CONFIGS.get(expect) or MATMUL_CONFIGS[expect]
    assert {k: v for k, v in cfg.items() if k != "kernel"} == want
    assert (cfg.get("kernel") == "gemv_vec") == (m == 1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dequantize_reference_equals_the_format(case):
    """The kernels' own plain-torch reading of the format (they import nothing of physkern.quant)
    equals QuantizedWeight.dequantize."""
    from physkern.kernels.codebook_matmul import dequantize_reference
    qw = make_qw(*case, cb_dtype=torch.float16)
    w = dequantize_reference(qw.packed, qw.codebooks, qw.scales, qw.offsets, qw.in_features,
                             qw.codebook_rows, qw.scale_group)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, qw.dequantize(torch.float32), rtol=1e-6, atol=1e-6)


def test_kernels_import_nothing_of_quant():
    """Kernels take plain tensors: no module of kernels/ imports physkern.quant."""
    import ast
    from pathlib import Path

    import physkern.kernels
    for path in Path(physkern.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("physkern.quant") for n in names), path.name
