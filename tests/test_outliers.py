"""physkern.quant.outliers: sparse corrections against explicit loops and the layer objective."""
import pytest
import torch

from physkern.quant.outliers import (SparseOutliers, column_dtype, fit_outliers, outlier_values,
                                     per_row_count, select_columns)


def _psd(n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 3 * n, n, generator=g, dtype=torch.float64)
    x[:, 0] *= 10  # one loud input dimension, as real activations have
    return (x.T @ x).float()


def _row_objective(e, gram):
    return torch.einsum("oi,ij,oj->o", e.double(), gram.double(), e.double())


@pytest.mark.parametrize("out,inf,n", [(1, 1, 1), (3, 7, 2), (5, 16, 0), (8, 33, 5), (2, 9, 9)])
def test_dense_and_apply_match_explicit_loops(out, inf, n):
    g = torch.Generator().manual_seed(out * 100 + inf)
    cols = torch.stack([torch.randperm(inf, generator=g)[:n] for _ in range(out)]) \
        if n else torch.zeros(out, 0, dtype=torch.int64)
    vals = torch.randn(out, n, generator=g).half()
    s = SparseOutliers(cols.to(column_dtype(inf)), vals, inf).validate()
    dense = torch.zeros(out, inf, dtype=torch.float64)
    for r in range(out):
        for k in range(n):
            dense[r, int(cols[r, k])] += float(vals[r, k])
    assert torch.equal(s.to_dense(torch.float64), dense)
    x = torch.randn(2, 3, inf, generator=g)
    ref = torch.zeros(2, 3, out, dtype=torch.float64)
    for r in range(out):
        for k in range(n):
            ref[..., r] += x[..., int(cols[r, k])].double() * float(vals[r, k])
    torch.testing.assert_close(s.apply(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert s.apply(x).shape == (2, 3, out) and s.apply(x).dtype == x.dtype
    assert s.bits() == (cols.numel() * 2 + vals.numel() * 2) * 8


def test_select_columns_are_the_largest_weighted_errors():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 20, generator=g)
    imp = torch.rand(20, generator=g) * 4
    cols = select_columns(e, imp, 3)
    for r in range(6):
        score = [abs(float(e[r, j])) * float(imp[j]) ** 0.5 for j in range(20)]
        want = sorted(sorted(range(20), key=lambda j: -score[j])[:3])
        assert cols[r].tolist() == want
    assert select_columns(e, None, 2).tolist() == \
        e.abs().topk(2, dim=1).indices.sort(dim=1).values.tolist()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("percdamp", [0.0, 0.01, 0.5])
def test_values_never_raise_any_rows_output_error(seed, percdamp):
    inf = 24
    gram = _psd(inf, seed)
    e = torch.randn(10, inf, generator=torch.Generator().manual_seed(seed + 50))
    cols = select_columns(e, gram.diagonal(), 4)
    s = outlier_values(e, gram, cols, percdamp)
    after = e.clone().scatter_(1, cols, e.gather(1, cols) - s)
    assert (_row_objective(after, gram) <= _row_objective(e, gram) * (1 + 1e-6)).all()
    assert (_row_objective(after, gram) < _row_objective(e, gram)).any()


def test_undamped_values_solve_the_normal_equations():
    """percdamp=0, full-rank G: the gradient of (e-s)^T G (e-s) vanishes on the chosen columns,
    checked against an independent least-squares solve through a Cholesky factor of G."""
    inf = 12
    gram = _psd(inf, 3).double()
    e = torch.randn(4, inf, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cols = select_columns(e, gram.diagonal(), 3)
    s = outlier_values(e, gram, cols, 0.0).double()
    l = torch.linalg.cholesky(gram)          # G = L L^T: (e-s)^T G (e-s) = |L^T (e-s)|^2
    for r in range(4):
        j = cols[r]
        ref = torch.linalg.lstsq(l.T[:, j], (l.T @ e[r])[:, None]).solution[:, 0]
        torch.testing.assert_close(s[r], ref, rtol=1e-4, atol=1e-6)
        full = torch.zeros(inf, dtype=torch.float64).index_put_((j,), s[r])
        grad = gram @ (e[r] - full)
        assert grad[j].abs().max() < 1e-5 * grad.abs().max().clamp_min(1)


def test_without_gram_the_weights_become_exact_there():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 16, generator=g)
    q = w + 0.1 * torch.randn(5, 16, generator=g)
    q[2, 7] += 5.0                       # a gross error: must be picked and fixed exactly
    s = fit_outliers(w, q, 2, value_dtype="float32")
    fixed = q + s.to_dense()
    assert 7 in s.columns[2].tolist()
    for r in range(5):
        for j in s.columns[r].tolist():
            assert float(fixed[r, j]) == pytest.approx(float(w[r, j]), abs=1e-6)


def test_fit_with_gram_lowers_the_layer_objective_in_float16():
    inf = 32
    gram = _psd(inf, 7)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, inf, generator=g)
    q = (w * 4).round() / 4
    s = fit_outliers(w, q, 3, gram=gram)
    assert s.values.dtype == torch.float16 and s.columns.dtype == torch.int16
    before = _row_objective(w - q, gram).sum()
    after = _row_objective(w - q - s.to_dense(), gram).sum()
    assert after < 0.9 * before


def test_bad_values_are_refused_naming_the_field():
    cols = torch.tensor([[0, 3]], dtype=torch.int16)
    vals = torch.ones(1, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        SparseOutliers(cols, vals, 3).validate()
    with pytest.raises(ValueError, match="same column twice"):
        SparseOutliers(torch.tensor([[1, 1]], dtype=torch.int16), vals, 4).validate()
    with pytest.raises(ValueError, match="int16/int32"):
        SparseOutliers(cols.long(), vals, 4).validate()
    with pytest.raises(ValueError, match="must be torch.int16"):
        SparseOutliers(cols.int(), vals, 4).validate()
    with pytest.raises(ValueError, match="shape of columns"):
        SparseOutliers(cols, vals[:, :1], 4).validate()
    with pytest.raises(ValueError, match="finite"):
        SparseOutliers(cols, torch.tensor([[1.0, float("nan")]]).half(), 4).validate()
    with pytest.raises(ValueError, match="values must be one of"):
        SparseOutliers(cols, vals.double(), 4).validate()
    with pytest.raises(ValueError, match="fraction"):
        per_row_count(1.0, 10)
    with pytest.raises(ValueError, match="value_dtype"):
        fit_outliers(torch.ones(2, 4), torch.zeros(2, 4), 1, value_dtype="int8")
    with pytest.raises(ValueError, match="n per row"):
        fit_outliers(torch.ones(2, 4), torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="in_features"):
        SparseOutliers(cols, vals, 4).apply(torch.ones(2, 5))
    assert column_dtype(32768) == torch.int16 and column_dtype(32769) == torch.int32
    assert per_row_count(0.005, 576) == 3 and per_row_count(0.0, 576) == 0
