"""physkern.sweeps.plot: families, the SmoothQuant alpha panel, re-plotting from JSON."""
import json

import pytest


def _payload(rows):
    """A minimal `physkern sweep quant` payload: rows (recipe, label, config, smooth, q, m, ppl)."""
    points, summary = [], []
    for recipe, label, cfg, smooth, q, m, ppl in rows:
        points.append({"recipe": recipe, "label": label, "seed": 0, "config": cfg,
                       "smooth": smooth, "perplexity": ppl})
        summary.append({"recipe": recipe, "label": label, "seeds": [0],
                        "perplexity_mean": ppl, "perplexity_min": ppl, "perplexity_max": ppl,
                        "quantized_bits_per_weight": q, "model_bits_per_weight": m})
    return {"setup": {"model": "tiny", "protocol": {"tokens_input": 64, "kind": "non-overlapping",
                                                   "window": 32}},
            "points": points, "summary": summary}


def _cb(k, d, scope="layer"):
    return {"method": "codebook", "k": k, "block_dim": d, "scope": scope, "seed": 0,
            "overrides": {}}


def test_families_join_only_k_sweeps():
    from physkern.sweeps.plot import curves
    rows = curves(_payload([
        ("fp", "FP", None, None, 32, 32, 10.0),
        ("k16_d8", "row", _cb(16, 8, "row"), None, 3.5, 9.5, 100.0),
        ("k64_d8", "row", _cb(64, 8, "row"), None, 12.0, 16.0, 40.0),
        ("k16_d4", "row", _cb(16, 4, "row"), None, 2.5, 8.7, 50.0),   # other d: own family
        ("s25", "rtn", {"method": "rtn", "bits": 3}, {"alpha": 0.25}, 3.5, 9.5, 60.0),
        ("s50", "rtn", {"method": "rtn", "bits": 3}, {"alpha": 0.5}, 3.5, 9.5, 50.0),
    ]))
    fam = {r["recipe"]: r["family"] for r in rows}
    assert fam["k16_d8"] == fam["k64_d8"] != fam["k16_d4"]
    assert fam["s25"] != fam["s50"]           # different alpha: not joined on the bits axes
    base = {r["recipe"]: r["base_family"] for r in rows}
    assert base["s25"] == base["s50"]         # but one curve on the alpha axis


def test_plot_alpha_sweep_and_replot(tmp_path):
    from physkern.sweeps import plot as P
    payload = _payload([
        ("fp", "FP", None, None, 32, 32, 10.0),
        ("rtn3", "RTN", {"method": "rtn", "bits": 3}, None, 3.5, 9.5, 130.0),
        ("s25", "RTN", {"method": "rtn", "bits": 3}, {"alpha": 0.25}, 3.5, 9.5, 110.0),
        ("s75", "RTN", {"method": "rtn", "bits": 3}, {"alpha": 0.75}, 3.5, 9.5, 50.0),
    ])
    assert set(P._alpha_families(P.curves(payload))) != set()
    src = tmp_path / "sq.json"
    src.write_text(json.dumps(payload))
    out = P.replot(src)
    assert out == tmp_path / "sq.png" and out.stat().st_size > 0
    assert P.main([str(src), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").stat().st_size > 0


def test_replot_bad_input(tmp_path):
    from physkern.sweeps.plot import replot
    with pytest.raises(FileNotFoundError, match="missing.json"):
        replot(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"setup\": ")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        replot(bad)
    bad.write_text("{\"points\": []}")
    with pytest.raises(ValueError, match="summary"):
        replot(bad)
