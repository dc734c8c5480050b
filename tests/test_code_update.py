"""physkern.quant.code_update: discrete code updates with the codebooks fixed. The objective
tr((W - Q) H (W - Q)^T) is recomputed here independently in float64 from the dequantized
weight (QuantizedWeight.dequantize), never from the module's own numbers."""
import itertools
import math

import pytest
import torch

from physkern.quant import code_update
from physkern.quant.code_update import choose_blocks, update_codes, update_quantized_weight
from physkern.quant.codebook import quantize_codebook
from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import index_bits, pack_indices
from physkern.rotation import Rotation


def _problem(out=24, inf=16, seed=0, tokens=64):
    """(W [out, in], H = X^T X [in, in]) with unequal input scales (a non-trivial H)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inf, generator=g)
    x = torch.randn(tokens, inf, generator=g) * torch.linspace(0.3, 2.0, inf)
    x = x + 0.5 * torch.randn(tokens, 1, generator=g)       # correlated inputs: H not diagonal
    return w, x.T @ x


def _objective(w, h, qw: QuantizedWeight) -> float:
    """tr((W - Q) H (W - Q)^T) in float64 from the effective dequantized weight."""
    e = w.double() - qw.dequantize(torch.float64)
    return float(torch.trace(e @ h.double() @ e.T))


def _rows(w, h, qw: QuantizedWeight) -> torch.Tensor:
    e = w.double() - qw.dequantize(torch.float64)
    return torch.einsum("ri,ij,rj->r", e, h.double(), e)


def _perturbed(qw: QuantizedWeight, seed: int, share: float = 0.5) -> QuantizedWeight:
    """qw with a seeded share of its codes replaced by random ones (clearly improvable)."""
    g = torch.Generator().manual_seed(seed)
    idx = qw.indices()
    mask = torch.rand(idx.shape, generator=g) < share
    idx = torch.where(mask, torch.randint(0, qw.k, idx.shape, generator=g), idx)
    return QuantizedWeight(pack_indices(idx, index_bits(qw.k)), qw.codebooks, qw.scales,
                           qw.offsets, qw.in_features, qw.out_features, qw.codebook_rows,
                           qw.scale_group, qw.rotation)


CASES = [  # (d, k, scope, group_size, stages, scales, scale_group)
    (1, 4, "layer", None, 1, "none", None),
    (1, 1, "layer", None, 1, "row", None),
    (2, 1, "row", None, 1, "none", None),
    (2, 8, "row", None, 1, "row", None),
    (2, 4, "group", 6, 2, "group", 8),
    (4, 16, "layer", None, 1, "group", 4),
    (4, 3, "group", 12, 2, "row", None),
    (2, 16, "layer", None, 1, "group", 1),   # scale groups narrower than a block
]


@pytest.mark.parametrize("case", CASES, ids=[f"d{c[0]}k{c[1]}{c[2]}s{c[4]}{c[5]}" for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_never_increases_the_objective(case, seed):
    d, k, scope, gsize, stages, scales, sgroup = case
    w, h = _problem(seed=seed)
    qw = quantize_codebook(w, k, d, scope=scope, group_size=gsize, stages=stages,
                           scales=scales, scale_group=sgroup, seed=seed)
    for start in (qw, _perturbed(qw, seed)):
        for fraction in (0.3, 1.0):
            new, res = update_quantized_weight(start, w, h, fraction, seed)
            before, after = _objective(w, h, start), _objective(w, h, new)
            assert res.objective_before == pytest.approx(before, rel=1e-10)
            assert res.objective_after == pytest.approx(after, rel=1e-10)
            assert after <= before * (1 + 1e-12)
            # each row is its own term of f: none got worse
            assert (_rows(w, h, new) <= _rows(w, h, start) * (1 + 1e-12) + 1e-9).all()
            # only codes of the visited block columns may change; nothing else does
            moved = (new.indices() != start.indices()).any(0).any(0)
            assert set(moved.nonzero().flatten().tolist()) <= set(res.blocks)
            assert res.changed == int((new.indices() != start.indices()).sum())
            assert torch.equal(new.codebooks, start.codebooks)
            if k == 1:
                assert res.changed == 0 and after == pytest.approx(before, rel=1e-12)


def test_perturbed_codes_strictly_improve_and_recover():
    w, h = _problem(out=32, inf=16, seed=3)
    qw = quantize_codebook(w, 8, 2, scope="layer", scales="row")
    bad = _perturbed(qw, 0, share=0.7)
    new, res = update_quantized_weight(bad, w, h, 1.0, 0)
    assert _objective(w, h, new) < 0.7 * _objective(w, h, bad)
    assert res.changed > 0 and res.rows_kept == 0
    assert res.visited == 32 * 8 and len(res.blocks) == 8
    # a second full pass can only go on improving (coordinate descent converges)
    newer, _ = update_quantized_weight(new, w, h, 1.0, 1)
    assert _objective(w, h, newer) <= _objective(w, h, new) * (1 + 1e-12)


def test_diagonal_gram_gives_the_weighted_nearest_code():
    """With H diagonal, blocks decouple: one full pass from any start lands on the code
    minimising sum_j H_jj (w_j - a_j c_j)^2 per block (brute force here)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, 12, generator=g)
    h = torch.diag(torch.rand(12, generator=g) + 0.1)
    qw = _perturbed(quantize_codebook(w, 6, 2, scope="layer", scales="row"), 1, share=1.0)
    new, _ = update_quantized_weight(qw, w, h, 1.0, 0)
    cb = qw.codebooks[0, 0].double()                                       # [K, d]
    a = qw.scales.double()                                                 # [out, 1]
    wb = w.double().reshape(10, 6, 1, 2)
    hb = torch.diagonal(h).double().reshape(1, 6, 1, 2)
    cost = (hb * (wb - a[:, :, None, None] * cb[None, None]) ** 2).sum(-1)  # [out, nb, K]
    assert torch.equal(new.indices()[0], cost.argmin(-1))


def test_rotated_weight_is_updated_in_its_stored_basis():
    w, h = _problem(out=16, inf=16, seed=2)
    rot = Rotation.make("hadamard", 16, seed=4)
    qw = quantize_codebook(rot.apply(w.double()).float(), 4, 2, scope="layer", scales="row")
    qw = _perturbed(QuantizedWeight(qw.packed, qw.codebooks, qw.scales, None, 16, 16,
                                    qw.codebook_rows, qw.scale_group, rot), 0)
    new, res = update_quantized_weight(qw, w, h, 1.0, 0)
    assert new.rotation is rot
    # objective of the EFFECTIVE weight Q R^T against W and H, as the layer computes
    assert res.objective_before == pytest.approx(_objective(w, h, qw), rel=1e-9)
    assert res.objective_after == pytest.approx(_objective(w, h, new), rel=1e-9)
    assert res.objective_after < res.objective_before


def test_determinism_per_seed():
    w, h = _problem(out=24, inf=32, seed=1)
    qw = _perturbed(quantize_codebook(w, 8, 2, scope="row", scales="row"), 2)
    runs = [update_quantized_weight(qw, w, h, 0.25, seed) for seed in (7, 7, 8)]
    (a, ra), (b, rb), (_, rc) = runs
    assert torch.equal(a.packed, b.packed) and ra.blocks == rb.blocks
    assert ra.summary() == rb.summary()
    assert ra.blocks != rc.blocks              # another seed visits other columns
    # the columns come from the generator alone: the same draw as choose_blocks'
    assert ra.blocks == choose_blocks(16, 0.25, torch.Generator().manual_seed(7)).tolist()
    assert len(ra.blocks) == 4 and ra.blocks == sorted(ra.blocks)


def test_chunked_candidates_give_the_same_codes(monkeypatch):
    w, h = _problem(out=20, inf=16, seed=4)
    qw = _perturbed(quantize_codebook(w, 16, 2, scope="group", group_size=4, scales="row"), 3)
    ref, _ = update_quantized_weight(qw, w, h, 1.0, 0)
    lay = _perturbed(quantize_codebook(w, 16, 2, scope="layer", scales="row"), 3)
    ref_lay, _ = update_quantized_weight(lay, w, h, 1.0, 0)
    # 6 rows x K a piece: one 4-row codebook a piece, and 6-row slices of the layer codebook
    monkeypatch.setattr(code_update, "_CHUNK_ELEMENTS", 16 * 6)
    assert list(code_update._pieces(5, 4, 16)) == [(c, c + 1, 0, 4) for c in range(5)]
    assert list(code_update._pieces(1, 20, 16)) == [(0, 1, r, min(20, r + 6))
                                                    for r in range(0, 20, 6)]
    assert torch.equal(ref.packed, update_quantized_weight(qw, w, h, 1.0, 0)[0].packed)
    assert torch.equal(ref_lay.packed, update_quantized_weight(lay, w, h, 1.0, 0)[0].packed)


def test_choose_blocks_counts():
    gen = torch.Generator().manual_seed(0)
    for nb, frac in itertools.product((1, 5, 16), (0.01, 0.2, 0.5, 1.0)):
        got = choose_blocks(nb, frac, gen)
        assert len(got) == max(1, math.ceil(frac * nb))
        assert len(set(got.tolist())) == len(got) and int(got.max()) < nb
    assert choose_blocks(16, 1.0, gen).tolist() == list(range(16))


def test_bad_arguments():
    w, h = _problem(out=8, inf=8)
    qw = quantize_codebook(w, 4, 2, scope="layer")
    idx = qw.indices()
    ok = dict(codebook_rows=8, weight=w, gram=h, fraction=0.5,
              generator=torch.Generator().manual_seed(0))
    for frac in (0, 0.0, -0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="fraction must be a number in"):
            update_codes(idx, qw.codebooks, None, None, **{**ok, "fraction": frac})
    with pytest.raises(ValueError, match=r"weight must be \[8, 8\]"):
        update_codes(idx, qw.codebooks, None, None, **{**ok, "weight": w[:, :6]})
    with pytest.raises(ValueError, match=r"gram must be \[8, 8\]"):
        update_codes(idx, qw.codebooks, None, None, **{**ok, "gram": h[:4, :4]})
    with pytest.raises(ValueError, match="finite"):
        update_codes(idx, qw.codebooks, None, None, **{**ok, "gram": h * float("inf")})
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        update_codes(idx, qw.codebooks, None, None, **{**ok, "generator": 0})
    with pytest.raises(ValueError, match="indices must be"):
        update_codes(idx[0], qw.codebooks, None, None, **ok)
    with pytest.raises(ValueError, match="scales must be"):
        update_codes(idx, qw.codebooks, torch.ones(8, 3), None, **ok)
    with pytest.raises(ValueError, match=r"gram must be \[8, 8\]"):
        update_quantized_weight(qw, w, h[:4, :4], 0.5, 0)


def _linearized(q0, g, m, eta, q1) -> float:
    """<G, Q1 - Q0> + 1/(2 eta) tr((Q1 - Q0) M (Q1 - Q0)^T), float64, written out directly."""
    d = q1.double() - q0.double()
    return float((g.double() * d).sum() + torch.trace(d @ m @ d.T) / (2 * eta))


@pytest.mark.parametrize("use_gram", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linearized_step_never_raises_the_linearized_loss(use_gram, seed):
    """The P step on the end-to-end gradient: the new codes' linearised loss (computed directly
    from G, M, eta) is <= 0 = its value at the old codes, and < 0 when the step is large."""
    from physkern.quant.code_update import linearized_target
    w, h = _problem(seed=seed)
    qw = quantize_codebook(w, 8, 2, scope="layer", scales="row", seed=seed)
    q0 = qw.dequantize(torch.float64)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 9), dtype=torch.float64)
    for rel in (1e-4, 0.3):
        t, m, eta = linearized_target(q0, g, rel, gram=h if use_gram else None)
        direction = g if not use_gram else torch.linalg.solve(m, g.T).T
        assert float((eta * direction).norm()) == pytest.approx(rel * float(q0.norm()), rel=1e-9)
        res = update_codes(qw.indices(), qw.codebooks, qw.scales, qw.offsets,
                           codebook_rows=qw.codebook_rows, weight=t, gram=m, fraction=1.0,
                           generator=torch.Generator().manual_seed(0))
        q1 = code_update.reconstruct(res.indices, qw.codebooks, qw.scales, qw.offsets,
                                     codebook_rows=qw.codebook_rows, dtype=torch.float64)
        after = _linearized(q0, g, m, eta, q1)
        assert after <= 1e-9 * abs(float((g * q0).sum()))
        if rel > 0.1:
            assert res.changed > 0 and after < 0
    with pytest.raises(ValueError, match="relative_step"):
        linearized_target(q0, g, 0.0)
    with pytest.raises(ValueError, match="same"):
        linearized_target(q0, g[:, :3], 0.1)
    with pytest.raises(ValueError, match="gram must be"):
        linearized_target(q0, g, 0.1, gram=h[:3, :3])
