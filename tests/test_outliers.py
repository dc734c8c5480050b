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


# ---- in a quantized model: CodebookConfig(outliers=...), forward, bits, save / load --------------

import copy  # noqa: E402
import json  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from _crafted import edit_meta, fresh_copy, load_fails, tensor_bytes  # noqa: E402
from physkern import bits_report, load_quantized, quantize, save_quantized  # noqa: E402
from physkern.config import CodebookConfig  # noqa: E402
from physkern.layers import QuantizedLinear  # noqa: E402
from physkern.quant.reconstruct import reconstruct  # noqa: E402
from physkern.serialization import MARKER  # noqa: E402

ST = "model.safetensors"
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))


def _calib():
    return torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def _quantized(base, **kw):
    m = copy.deepcopy(base)
    cfg = CodebookConfig(**{"k": 4, "block_dim": 2, "scope": "layer", **kw})
    quantize(m, cfg, calibration=_calib() if cfg.calibrate else None, progress=False)
    return m


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.fixture(scope="module")
def q_out(tiny_llama):
    """Error feedback, rotated, 10% outliers."""
    return _quantized(tiny_llama, error_feedback=True, rotation="hadamard", outliers=0.1)


@pytest.fixture(scope="module")
def saved(q_out, tmp_path_factory):
    return save_quantized(q_out, tmp_path_factory.mktemp("outliers") / "m")


def test_layers_hold_outliers_and_compute_with_them(q_out):
    """Effective weight = Q R^T + S rebuilt here by hand; forward = x W^T + b."""
    for name, layer in _layers(q_out).items():
        n = round(0.1 * layer.in_features)
        assert layer.outlier_columns.shape == (layer.out_features, n)
        qw = layer.quantized_weight()
        q = reconstruct(qw.indices(), qw.codebooks, qw.scales, qw.offsets,
                        codebook_rows=qw.codebook_rows, dtype=torch.float64)
        w = q @ layer.rotation.matrix(torch.float64).T
        for r in range(layer.out_features):
            for k in range(n):
                w[r, int(layer.outlier_columns[r, k])] += float(layer.outlier_values[r, k])
        torch.testing.assert_close(layer.dequantize(torch.float64), w, rtol=1e-6, atol=1e-6)
        x = torch.randn(3, layer.in_features, dtype=torch.float32)
        ref = x.double() @ w.T + (0 if layer.bias is None else layer.bias.double())
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-4, atol=1e-4)
        rows = torch.tensor([2, 0, 2])
        torch.testing.assert_close(qw.dequantize(rows=rows), qw.dequantize()[rows])


def test_outliers_lower_every_layers_output_error(tiny_llama):
    """Same seed, same codes: the calibrated objective of every layer drops with outliers."""
    from physkern.api import quantize as api_quantize
    base = copy.deepcopy(tiny_llama)
    plain = api_quantize(base, CodebookConfig(k=4, block_dim=2, scope="layer",
                                              error_feedback=True), calibration=_calib(),
                         progress=False)
    base = copy.deepcopy(tiny_llama)
    out = api_quantize(base, CodebookConfig(k=4, block_dim=2, scope="layer", error_feedback=True,
                                            outliers=0.1), calibration=_calib(), progress=False)
    for a, b in zip(plain.layers, out.layers):
        assert b.relative_output_error < a.relative_output_error
        assert b.bits_per_weight > a.bits_per_weight


def test_bits_count_outliers_and_equal_bytes(q_out, tmp_path):
    rep = bits_report(q_out)
    for name, layer in _layers(q_out).items():
        info = rep.layers[name]
        assert info["outliers"] == layer.outlier_columns.numel() * (16 + 16)
        assert info["total_bits"] == info["indices"] + info["codebooks"] + info["scales"] + \
            info["offsets"] + info["outliers"]
    d = save_quantized(q_out, tmp_path / "m")
    assert rep.model_bits == 8 * tensor_bytes(d)


def test_round_trip_bit_identical(q_out, saved):
    meta = json.loads((saved / MARKER).read_text())
    assert meta["format_version"] == 4
    lm = next(iter(meta["quantized_layers"].values()))
    assert lm["outliers"]["columns_dtype"] == "int16" and lm["outliers"]["values_dtype"] == "float16"
    loaded, _ = load_quantized(saved)
    with torch.no_grad():
        assert torch.equal(q_out(IDS).logits, loaded(IDS).logits)
    assert bits_report(loaded).to_dict() == bits_report(q_out).to_dict()


def test_models_without_outliers_keep_their_format(tiny_gpt2, tmp_path):
    m = _quantized(tiny_gpt2, calibrate=False)
    d = save_quantized(m, tmp_path / "m")
    meta = json.loads((d / MARKER).read_text())
    assert meta["format_version"] == 1
    assert all("outliers" not in lm for lm in meta["quantized_layers"].values())
    assert "outliers" not in CodebookConfig().to_dict()


def test_from_pretrained_refuses_outliers(saved):
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match="format_version.*physkern.load_quantized"):
        AutoModelForCausalLM.from_pretrained(saved)


def _first(meta):
    return next(iter(meta["quantized_layers"].values()))


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m.update(format_version=2), "need format_version 4"),
    (lambda m: m.update(format_version=1), "need format_version 4"),
    (lambda m: _first(m)["outliers"].update(per_row=10**6), "outliers.per_row must be"),
    (lambda m: _first(m)["outliers"].update(columns_dtype="int32"), "columns_dtype must be"),
    (lambda m: _first(m)["outliers"].update(values_dtype="int8"), "values_dtype must be"),
    (lambda m: _first(m)["outliers"].update(extra=1), "outliers must be an object"),
    (lambda m: [lm.pop("outliers") for lm in m["quantized_layers"].values()],
     "needs a layer with outliers"),
])
def test_crafted_layouts_refused(saved, tmp_path, edit, pattern):
    d = fresh_copy(saved, tmp_path)
    edit_meta(d, edit)
    load_fails(d, pattern)


@pytest.mark.parametrize("what,pattern", [("range", "columns must lie in"),
                                          ("repeat", "same column twice"),
                                          ("shape", "outlier_columns has shape")])
def test_crafted_tensors_refused(saved, tmp_path, what, pattern):
    d = fresh_copy(saved, tmp_path)
    t = load_file(d / ST)
    key = next(k for k in t if k.endswith(".outlier_columns"))
    cols = t[key].clone()
    if what == "range":
        cols[1, 0] = 32000
    elif what == "repeat":
        cols[0, 1] = cols[0, 0]
    else:
        cols = cols[:, :-1].contiguous()
    t[key] = cols
    save_file(t, d / ST)
    load_fails(d, pattern)


def test_finetuning_keeps_outliers_and_the_function(q_out, tiny_llama):
    from physkern.finetune import finetune_quantized
    from test_layers import dense_copy
    student = copy.deepcopy(q_out)
    before = {n: (l.outlier_columns.clone(), l.outlier_values.clone())
              for n, l in _layers(student).items()}
    rep = finetune_quantized(student, tiny_llama, _calib(), steps=3, lr=1e-2, holdout=1,
                             progress=False, code_update_every=1, code_update_fraction=1.0)
    assert rep["steps"] == 3
    for n, l in _layers(student).items():
        assert torch.equal(l.outlier_columns, before[n][0])
        assert torch.equal(l.outlier_values, before[n][1])
    with torch.no_grad():
        torch.testing.assert_close(student(IDS).logits, dense_copy(student)(IDS).logits,
                                   rtol=1e-4, atol=1e-4)


def test_bad_outlier_config():
    with pytest.raises(ValueError, match=r"outliers must be a finite number in \[0, 1\)"):
        CodebookConfig(outliers=1.0)
    with pytest.raises(ValueError, match="outliers"):
        CodebookConfig(outliers=-0.1)
    assert CodebookConfig(outliers=0.05).to_dict()["outliers"] == 0.05


def test_outliers_with_a_shared_codebook_round_trip(tiny_llama, tmp_path):
    m = copy.deepcopy(tiny_llama)
    quantize(m, CodebookConfig(k=8, block_dim=2, scope="shared", share="model", outliers=0.1,
                               max_fit_blocks=4096), calibration=_calib(), progress=False)
    d = save_quantized(m, tmp_path / "m")
    meta = json.loads((d / MARKER).read_text())
    assert meta["format_version"] == 4 and meta["shared_codebooks"]
    loaded, _ = load_quantized(d)
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, loaded(IDS).logits)
    assert bits_report(loaded).model_bits == bits_report(m).model_bits == 8 * tensor_bytes(d)
