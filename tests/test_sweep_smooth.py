"""SmoothQuant recipes of `physkern sweep quant` ("smooth": {"alpha": a}): the alpha sweep.

Uses the tiny saved LLaMA and character corpus of tests/test_sweep_quant.py.
"""
import pytest

from test_combined_recipe import _sweep
from test_sweep_quant import tiny_setup  # noqa: F401  (fixture: tiny LLaMA + corpus on disk)


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"alpha": -0.1}, {"alpha": "0.5"}, {},
                                 {"alpha": 0.5, "beta": 1}, 0.5])
def test_smooth_spec_rejected(bad):
    from physkern.sweeps.quant import parse_smooth
    with pytest.raises(ValueError, match="smooth"):
        parse_smooth(bad)


def test_smooth_alone_is_exact_and_changes_rtn(tiny_setup, capsys):  # noqa: F811
    root = tiny_setup
    rtn = {"method": "rtn", "bits": 3, "group_size": 16}
    recipes = [{"name": "fp", "config": None},
               {"name": "smooth_only", "config": None, "smooth": {"alpha": 0.5}},
               {"name": "rtn", "config": rtn},
               {"name": "smooth_rtn", "config": rtn, "smooth": {"alpha": 0.8}}]
    pts, payload, out = _sweep(root, root / "model", recipes, "smooth", capsys)
    # migration alone leaves the model's outputs unchanged (absorbed into the RMSNorm weights)
    assert pts["smooth_only"]["mean_nll"] == pytest.approx(pts["fp"]["mean_nll"], rel=1e-5)
    assert pts["smooth_only"]["smooth"] == {"alpha": 0.5}
    assert pts["smooth_only"]["calibration"]["windows"] == 4
    assert pts["smooth_only"]["label"] == "smooth"
    # with quantization the migrated weights round differently; bits are the same storage
    assert pts["smooth_rtn"]["mean_nll"] != pts["rtn"]["mean_nll"]
    assert pts["smooth_rtn"]["bits"]["quantized_bits_per_weight"] == \
        pts["rtn"]["bits"]["quantized_bits_per_weight"]
    assert pts["smooth_rtn"]["label"] == "smooth+rtn"
    summ = {s["recipe"]: s for s in payload["summary"]}
    assert summ["smooth_rtn"]["smooth"] == {"alpha": 0.8}
    # resume: a changed alpha is a new point, the rest are skipped
    recipes[3]["smooth"]["alpha"] = 0.3
    _, payload2, out2 = _sweep(root, root / "model", recipes, "smooth", capsys)
    assert out2.count("skipped") == 3
    assert [p["smooth"] for p in payload2["points"] if p["recipe"] == "smooth_rtn"] == \
        [{"alpha": 0.8}, {"alpha": 0.3}]
