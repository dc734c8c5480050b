"""physkern::histogram_update (C++ op and pure-torch fallback) and StreamingHistogram, checked
against numpy.histogram and hand-computed entropies."""
import math

import numpy as np
import pytest
import torch
from _subprocess import assert_snippet_prints_ok

import physkern.research.histogram as H
from physkern import StreamingHistogram
from physkern.research.histogram import (FiniteRange, bin_edges, entropy_from_counts, histogram_two_pass,
                                histogram_update, histogram_update_torch)

IMPLS = {"op": histogram_update, "torch": histogram_update_torch}


def reference(x: torch.Tensor, bins: int, lo: float, hi: float, groups_shape=()) -> np.ndarray:
    """[*G, bins + 3] from numpy.histogram on float64 values, tails counted directly."""
    v = x.double().numpy()
    gd = len(groups_shape)
    v = v.reshape(-1, *groups_shape) if gd else v.reshape(-1, 1)
    v = v.reshape(v.shape[0], -1)
    out = []
    for g in range(v.shape[1]):
        col = v[:, g]
        hist, _ = np.histogram(col[np.isfinite(col)], bins=bins, range=(lo, hi))
        out.append(np.concatenate([hist, [(col < lo).sum(), (col > hi).sum(),
                                          np.isnan(col).sum()]]))
    return np.stack(out).reshape(*groups_shape, bins + 3)


def nasty_values(n: int, lo: float, hi: float, bins: int, dtype: torch.dtype,
                 seed: int = 0) -> torch.Tensor:
    """Random values inside and outside [lo, hi], every bin edge with its float neighbours in
    `dtype`, lo/hi themselves, NaN and +-inf."""
    g = torch.Generator().manual_seed(seed)
    width = hi - lo
    body = torch.rand(n, generator=g, dtype=torch.float64) * 1.4 * width + lo - 0.2 * width
    edges = torch.from_numpy(np.histogram_bin_edges([], bins=bins, range=(lo, hi)))
    e = edges.to(dtype)
    near = torch.cat([e, torch.nextafter(e, torch.tensor(math.inf, dtype=dtype)),
                      torch.nextafter(e, torch.tensor(-math.inf, dtype=dtype))])
    special = torch.tensor([lo, hi, math.nan, math.inf, -math.inf, math.nan], dtype=torch.float64)
    x = torch.cat([body.to(dtype), near, special.to(dtype)])
    return x[torch.randperm(x.numel(), generator=g)]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bins,lo,hi", [(1, -1.0, 1.0), (7, 0.1, 0.7), (256, -4.0, 4.0),
                                        (4096, -3.0, 5.0), (100, -1000.0, 3.3)])
def test_matches_numpy(impl, dtype, bins, lo, hi):
    x = nasty_values(3000, lo, hi, bins, dtype)
    counts = torch.zeros(bins + 3, dtype=torch.int64)
    IMPLS[impl](x, counts, lo, hi)
    np.testing.assert_array_equal(counts.numpy(), reference(x, bins, lo, hi))


@pytest.mark.parametrize("bins,lo,hi", [(256, -4.0, 4.0), (4096, -4.0, 4.0),
                                        (64, 1.0e6, 1.0e6 + 1.0)])  # last: float64-only path
def test_large_input_multithreaded(bins, lo, hi):
    """Enough values for several threads and for the float32 fast path's float64 redo."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600_000, generator=g) * (hi - lo) / 6 + (lo + hi) / 2
    x[::1001] = math.nan
    counts = torch.zeros(bins + 3, dtype=torch.int64)
    histogram_update(x, counts, lo, hi)
    np.testing.assert_array_equal(counts.numpy(), reference(x, bins, lo, hi))
    assert int(counts.sum()) == x.numel()


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("xshape,gshape,bins", [((500, 5), (5,), 16), ((7, 3, 4), (3, 4), 9),
                                                (
                                                    (16, 1100), (1100,), 256)])  # by-groups path
def test_groups(impl, xshape, gshape, bins):
    x = torch.randn(xshape, dtype=torch.float32)
    x.view(-1)[::37] = math.nan
    counts = torch.zeros(*gshape, bins + 3, dtype=torch.int64)
    IMPLS[impl](x, counts, -2.0, 2.0)
    np.testing.assert_array_equal(counts.numpy(), reference(x, bins, -2.0, 2.0, gshape))


def test_groups_noncontiguous_input():
    x = torch.randn(40, 300).t()  # [300, 40], not contiguous
    counts = torch.zeros(40, 11, dtype=torch.int64)
    histogram_update(x, counts, -1.0, 1.0)
    np.testing.assert_array_equal(counts.numpy(), reference(x.contiguous(), 8, -1.0, 1.0, (40,)))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_empty_input(impl):
    counts = torch.arange(7 * 8, dtype=torch.int64).reshape(7, 8)
    before = counts.clone()
    IMPLS[impl](torch.empty(0, 7), counts, 0.0, 1.0)
    IMPLS[impl](torch.empty(3, 0, 7), counts, 0.0, 1.0)
    assert torch.equal(counts, before)


def test_streaming_equals_one_call():
    x = torch.randn(10_001, 6)
    one = StreamingHistogram(32, -3.0, 3.0, shape=(6,)).update(x)
    chunked = StreamingHistogram(32, -3.0, 3.0, shape=(6,))
    for part in torch.split(x, [1, 999, 5000, 0, 4001]):
        chunked.update(part)
    assert torch.equal(one.raw, chunked.raw)


def test_merge_equals_concatenation():
    a, b = torch.randn(1000), torch.randn(777) * 3
    b[5] = math.nan
    ha = StreamingHistogram(50, -2.0, 2.0).update(a)
    hb = StreamingHistogram(50, -2.0, 2.0).update(b)
    both = StreamingHistogram(50, -2.0, 2.0).update(torch.cat([a, b]))
    assert torch.equal(ha.merge(hb).raw, both.raw)
    assert int(both.nan) == 1 and int(both.total) == 1777
    with pytest.raises(ValueError, match="ranges differ"):
        ha.merge(StreamingHistogram(50, -1.0, 2.0))
    with pytest.raises(ValueError, match="bins/shape"):
        ha.merge(StreamingHistogram(49, -2.0, 2.0))


def test_views_and_edges():
    h = StreamingHistogram(4, 0.0, 1.0)
    h.update(torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, -0.1, math.nan, math.inf, -math.inf]))
    assert h.counts.tolist() == [1, 1, 1, 1]
    assert (int(h.below), int(h.above), int(h.nan)) == (2, 2, 1)
    np.testing.assert_array_equal(h.edges.numpy(), np.histogram_bin_edges([], 4, (0.0, 1.0)))
    np.testing.assert_array_equal(bin_edges(1000, -0.3, 0.7).numpy(),
                                  np.histogram_bin_edges([], 1000, (-0.3, 0.7)))


# ----------------------------------------------------------------------------------------------
# entropy


def test_entropy_by_hand():
    c = torch.tensor([[2, 2, 0], [1, 1, 1], [3, 1, 0]])
    plug = entropy_from_counts(c, "bits", None)
    want = [1.0, math.log2(3), -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))]
    assert plug.tolist() == pytest.approx(want, abs=1e-12)
    # direct formula H = log N - (1/N) sum c log c, in nats
    for row, h in zip(c.tolist(), entropy_from_counts(c, "nats", None).tolist()):
        n = sum(row)
        assert h == pytest.approx(math.log(n) - sum(k * math.log(k) for k in row if k) / n,
                                  abs=1e-12)
    # Miller-Madow: + (m - 1) / (2N) nats with m non-empty cells: (2-1)/8, (3-1)/6, (2-1)/8
    mm = entropy_from_counts(c, "nats", "miller-madow")
    nats = entropy_from_counts(c, "nats", None)
    assert (mm - nats).tolist() == pytest.approx([1 / 8, 2 / 6, 1 / 8], abs=1e-12)
    assert entropy_from_counts(c, "bits").tolist() == pytest.approx(
        [(n + d) / math.log(2) for n, d in zip(nats.tolist(), [1 / 8, 2 / 6, 1 / 8])])
    assert math.isnan(float(entropy_from_counts(torch.zeros(4, dtype=torch.int64))))


def test_histogram_entropy_cells():
    h = StreamingHistogram(2, 0.0, 1.0).update(torch.tensor([0.1, 0.9, 5.0, 6.0, math.nan]))
    # cells [1, 1] + below 0 + above 2 -> [1, 1, 0, 2]
    assert float(h.entropy("bits", None)) == pytest.approx(1.5)
    assert float(h.entropy("bits", None, include_outside=False)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unit"):
        h.entropy("bans")
    with pytest.raises(ValueError, match="correction"):
        h.entropy(correction="grassberger")


# ----------------------------------------------------------------------------------------------
# counters and ranges


def test_counters_beyond_int32():
    counts = torch.zeros(4 + 3, dtype=torch.int64)
    counts[1] = 2**31 - 3
    counts[4 + H.NAN] = 2**40
    x = torch.full((10,), 0.3)
    x[0] = math.nan
    histogram_update(x, counts, 0.0, 1.0)
    assert int(counts[1]) == 2**31 + 6
    assert int(counts[4 + H.NAN]) == 2**40 + 1
    h = StreamingHistogram(4, 0.0, 1.0)
    h.raw[2] = 2**32 - 1
    h.update(torch.full((100_000,), 0.6))
    assert int(h.counts[2]) == 2**32 - 1 + 100_000


def test_range_from_first_update_and_two_pass():
    h = StreamingHistogram(10)
    h.update(torch.tensor([math.nan, math.inf]))  # no finite value: range still open
    assert h.lo is None and int(h.nan) == 1 and int(h.above) == 1
    h.update(torch.tensor([-1.0, 3.0, 1.0]))
    assert (h.lo, h.hi) == (-1.0, 3.0)
    h.update(torch.tensor([4.0]))
    assert int(h.above) == 2 and int(h.counts.sum()) == 3

    data = [torch.randn(100) for _ in range(3)]
    two = histogram_two_pass(lambda: iter(data), 20)
    assert (two.lo, two.hi) == (float(torch.cat(data).min()), float(torch.cat(data).max()))
    assert int(two.counts.sum()) == 300
    r = FiniteRange()
    r.update(torch.tensor([2.0, 2.0]))
    lo, hi = r.range()
    assert lo < 2.0 < hi
    with pytest.raises(ValueError, match="no finite"):
        FiniteRange().range()


# ----------------------------------------------------------------------------------------------
# errors, opcheck, schema, fallback


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_bad_arguments(impl):
    f = IMPLS[impl]
    x = torch.randn(10, 3)
    ok = torch.zeros(3, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        f(x, torch.zeros(3, 8, dtype=torch.int32), 0.0, 1.0)
    with pytest.raises(ValueError, match="int64"):
        f(x, torch.zeros(3, 8), 0.0, 1.0)
    with pytest.raises(ValueError, match="bins >= 1"):
        f(x, torch.zeros(3, 3, dtype=torch.int64), 0.0, 1.0)
    with pytest.raises(ValueError, match="trailing dims"):
        f(x, torch.zeros(4, 8, dtype=torch.int64), 0.0, 1.0)
    with pytest.raises(ValueError, match="trailing dims"):
        f(x, torch.zeros(2, 10, 3, 8, dtype=torch.int64), 0.0, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        f(x, torch.zeros(8, 3, dtype=torch.int64).t(), 0.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        f(x, ok, 1.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        f(x, ok, 2.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        f(x, ok, math.nan, 1.0)
    with pytest.raises(ValueError, match="too many"):
        f(x, ok, 1e16, 1e16 + 4)
    with pytest.raises(ValueError, match="float16, bfloat16"):
        f(x.long(), ok, 0.0, 1.0)
    with pytest.raises(ValueError, match="same device"):
        f(torch.empty(10, 3, device="meta"), ok, 0.0, 1.0)


def test_streaming_histogram_bad_arguments():
    with pytest.raises(ValueError, match="bins"):
        StreamingHistogram(0, 0.0, 1.0)
    with pytest.raises(ValueError, match="bins"):
        StreamingHistogram(2.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        StreamingHistogram(4, 1.0, 0.0)
    with pytest.raises(ValueError, match="both lo and hi"):
        StreamingHistogram(4, 1.0)
    with pytest.raises(ValueError, match="trailing dims"):
        StreamingHistogram(4, 0.0, 1.0, shape=(3,)).update(torch.randn(5, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    op = torch.ops.physkern.histogram_update.default
    x = torch.randn(64, 5).to(dtype)
    torch.library.opcheck(op, (x, torch.zeros(5, 19, dtype=torch.int64), -1.5, 2.0))
    torch.library.opcheck(op, (x, torch.zeros(259, dtype=torch.int64), -1.5, 2.0))


def test_compiles_with_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, counts):
        torch.ops.physkern.histogram_update(x * 2, counts, -1.0, 1.0)
        return counts

    x = torch.randn(100)
    counts = torch.zeros(11, dtype=torch.int64)
    f(x, counts)
    np.testing.assert_array_equal(counts.numpy(), reference(x * 2, 8, -1.0, 1.0))


def test_schema_is_one_place():
    if H.EXTENSION_ERROR is not None:
        pytest.skip(f"extension not built: {H.EXTENSION_ERROR}")
    assert str(torch.ops.physkern.histogram_update.default._schema) == \
        H.OP_NAME + H.HISTOGRAM_UPDATE_SCHEMA
    assert H.extension_available("cpu")


def test_fallback_when_extension_missing():
    """With physkern._C unimportable, the same op comes from pure torch, with a warning."""
    code = (
        "import sys, warnings, math\n"
        "sys.modules['physkern._C'] = None\n"
        "warnings.simplefilter('error', RuntimeWarning)\n"
        "try:\n"
        "    import physkern.research.histogram\n"
        "except RuntimeWarning as w:\n"
        "    assert 'fallback' in str(w), w\n"
        "warnings.simplefilter('ignore')\n"
        "import physkern.research.histogram as H, torch\n"
        "assert H.EXTENSION_ERROR is not None and not H.extension_available()\n"
        "c = torch.zeros(7, dtype=torch.int64)\n"
        "torch.ops.physkern.histogram_update(torch.tensor([0., .5, 1., 2., math.nan]), c, 0., 1.)\n"
        "assert c.tolist() == [1, 0, 1, 1, 0, 1, 1], c\n"
        "torch.library.opcheck(torch.ops.physkern.histogram_update.default,\n"
        "                      (torch.randn(20), c, -1., 1.))\n"
        "print('ok')\n")
    assert_snippet_prints_ok(code)


# ----------------------------------------------------------------------------------------------
# calibration


def test_activation_entropy_tiny_llama(tiny_llama):
    from physkern.research.histogram import activation_entropy
    from physkern.models import decoder_linear_layers
    windows = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    res = activation_entropy(tiny_llama, windows, bins=32)
    layers = decoder_linear_layers(tiny_llama)
    assert list(res) == [l.name for l in layers]
    for l in layers:
        e = res[l.name]
        assert e.values == 3 * 16 * l.in_features and e.nan == 0 and e.outside == 0
        assert 0.0 < e.entropy_plugin <= e.entropy <= math.log2(34) + 1e-9
        assert e.channel_entropy.shape == (l.in_features,)
        assert torch.isfinite(e.channel_entropy).all()


def test_entropy_analysis_outputs(tiny_gpt2, tmp_path):
    import argparse
    import json

    from physkern.commands.analyze import register_entropy as register_analysis
    from physkern.research.analysis.entropy import entropy_analysis, plot_entropy
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    res = entropy_analysis(tiny_gpt2, windows, bins=16)
    assert len(res["layers"]) == 8 and res["max_bits"] == pytest.approx(math.log2(18))
    for row in res["layers"]:
        assert 0 < row["entropy_bits"] <= res["max_bits"] + 1e-9
        assert row["channels"]["min"] <= row["channels"]["mean"] <= row["channels"]["max"]
    json.dumps(res)
    plot_entropy(res, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 0
    parser = argparse.ArgumentParser()
    register_analysis(parser.add_subparsers())
    args = parser.parse_args(["entropy", "--windows", "3", "--bins", "64", "--out", "d"])
    assert (args.windows, args.bins, args.out_dir, args.per_channel) == (3, 64, "d", True)
