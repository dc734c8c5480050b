"""Quantization is bit-identical across runs and across torch thread counts.

Issue 15 item 3: `make run` printed 48.35 where README quotes 46.63 for the same recipe and seed.
The cause was not nondeterminism: on the packaged model the cb_k32_d2_layer_ef recipe (make
run's default until 4d9a84d) gives bit-identical indices, codebooks and scales with 1 and 2
threads, and the pure-torch assignment path reproduces
the committed figure's per-layer errors exactly; the C++ k-means assignment op (commit 9b85d4c,
after the figure was made) picks a different, equally near centroid at one fp32 near-tie in
layer 1 v_proj, and error feedback plus block-sequential calibration carry that into every
later layer. These tests keep the thread-count part of that finding true: a figure must not
depend on how many threads produced it.
"""
import copy

import pytest
import torch

from physkern.kernels.kmeans_assign import (kmeans_assign_torch,
                                            native_kmeans_available)
from physkern.quant.codebook import quantize_codebook_error_feedback


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _buffers(model):
    """Every quantized layer's stored tensors, as bytes (bitwise comparison)."""
    from physkern.layers import QuantizedLinear
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            for b in ("packed", "codebooks", "scales", "offsets"):
                t = getattr(m, b)
                out[f"{name}.{b}"] = None if t is None else t.contiguous().view(torch.uint8) \
                    .numpy().tobytes()
    return out


@pytest.mark.parametrize("path, shape", [
    # the C++ op, big enough that at::parallel_for splits the tiles over threads (d=2 with
    # per-block importance: the 2d-wide product form, as in error feedback)
    ("native", (200_000, 32, 2)),
    # the matmul path the selector takes for large problems without AVX-512
    ("torch", (4096, 4096, 8)),
])
def test_assign_paths_same_with_1_and_2_threads(path, shape):
    if path == "native" and not native_kmeans_available():
        pytest.skip("needs physkern._C")
    fn = torch.ops.physkern.kmeans_assign_cpu if path == "native" else kmeans_assign_torch
    n, k, d = shape
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(1, n, d, generator=g)
    cents = torch.randn(1, k, d, generator=g)
    imp = torch.rand(1, n, d, generator=g) + 0.1
    one = _with_threads(1, lambda: fn(blocks, cents, imp))
    two = _with_threads(2, lambda: fn(blocks, cents, imp))
    assert torch.equal(one[0], two[0])
    assert torch.equal(one[1], two[1])


def test_error_feedback_codebook_same_with_1_and_2_threads():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 576, generator=g)
    x = torch.randn(2048, 576, generator=g) * torch.linspace(0.2, 3.0, 576)
    gram = x.t() @ x

    def run():
        qw = quantize_codebook_error_feedback(w, gram, k=32, block_dim=2, scope="layer",
                                              scales="row", seed=0)
        return qw.packed.clone(), qw.codebooks.clone(), qw.scales.clone()

    first = _with_threads(1, run)
    again = _with_threads(1, run)
    two = _with_threads(2, run)
    for a, b, c in zip(first, again, two):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


def test_quantize_model_same_with_1_and_2_threads(tiny_llama):
    """The README's cb_k32_d2_layer_ef recipe through quantize() (block-sequential calibration,
    Gram statistics, k-means, error feedback) on a tiny LLaMA: bitwise equal stored tensors."""
    from physkern.api import quantize
    from physkern.config import CodebookConfig
    recipe = CodebookConfig(k=32, block_dim=2, scope="layer", calibrate=True, error_feedback=True)
    calib = torch.randint(0, 96, (4, 48), generator=torch.Generator().manual_seed(2))

    def run():
        m = copy.deepcopy(tiny_llama)
        quantize(m, recipe, calibration=calib, progress=False)
        return _buffers(m)

    one = _with_threads(1, run)
    two = _with_threads(2, run)
    assert one.keys() == two.keys() and len(one) > 0
    assert [k for k in one if one[k] != two[k]] == []
