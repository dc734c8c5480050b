"""bench/budget_table.py: ratios to FP, budgets and goals from a hand-made results payload."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "budget_table.py"


@pytest.fixture(scope="module")
def bt():
    spec = importlib.util.spec_from_file_location("budget_table", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _point(recipe, seed, wiki, prefix, c4, bits):
    return {"recipe": recipe, "seed": seed, "perplexity": wiki, "tokens_scored": 1000,
            "prefix": {"16384": {"perplexity": prefix, "tokens_scored": 100}},
            "other_corpora": {"c4": {"perplexity": c4, "tokens_scored": 500}},
            "bits": {"quantized_bits_per_weight": bits, "model_bits_per_weight": bits + 1}}


def test_table_ratios_budgets_and_goals(bt):
    pts = [_point("fp", 0, 20.0, 18.0, 30.0, 32.0),
           _point("a", 0, 22.0, 19.0, 33.0, 2.96), _point("a", 1, 23.0, 20.0, 35.0, 2.96),
           _point("b", 0, 40.0, 30.0, 60.0, 1.98)]
    out = bt.table({"points": pts})
    row_a = next(l for l in out.splitlines() if l.startswith("| <= 3.0 | a |"))
    # mean 22.5 / 20 = 1.125 > 1.12: not met on wiki; c4 34 / 30 = 1.13: not met
    assert "22.50 (1.12x) (22.00-23.00)" in row_a and "19.50 (1.08x)" in row_a
    assert "| no / no |" in row_a and "| 0,1 |" in row_a
    row_b = next(l for l in out.splitlines() if l.startswith("| <= 2.0 | b |"))
    assert "40.00 (2.00x)" in row_b and "| no / no |" in row_b      # 2.0 > 1.6
    pts[3] = _point("b", 0, 31.0, 25.0, 45.0, 1.98)
    assert "| yes / yes |" in next(l for l in bt.table({"points": pts}).splitlines()
                                   if "| b |" in l)
    assert bt.budget_of(3.2) is None and bt.budget_of(2.4) == 2.5
    with pytest.raises(SystemExit, match="no FP point"):
        bt.table({"points": pts[1:]})


def test_join_files_checks_setup_and_duplicates(bt, tmp_path, capsys):
    import json

    setup = {"model": "m", "corpus": {"name": "wiki"}, "protocol": {"tokens_input": 1000},
             "calibration": {"windows": 32}, "also_eval_tokens": 500}
    a = {"setup": setup, "points": [_point("fp", 0, 20.0, 18.0, 30.0, 32.0),
                                    _point("a", 0, 22.0, 19.0, 33.0, 2.96)]}
    b = {"setup": dict(setup), "points": [_point("a", 1, 24.0, 21.0, 36.0, 2.96),
                                          _point("t", 0, 26.0, 22.0, 40.0, 3.03)]}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert bt.main(["--results", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    row_a = next(l for l in out.splitlines() if "| a |" in l)
    assert "23.00 (1.15x) (22.00-24.00)" in row_a and "| 0,1 |" in row_a
    assert bt.main(["--results", str(pa), str(pb), "--recipes", "t"]) == 0
    out = capsys.readouterr().out
    assert "| t |" in out and "| a |" not in out
    with pytest.raises(SystemExit, match=r"recipes: \['zz'\] not in the results"):
        bt.main(["--results", str(pa), "--recipes", "zz"])
    b["points"].append(_point("a", 0, 25.0, 21.0, 36.0, 2.96))
    pb.write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="a seed 0 is in both"):
        bt.main(["--results", str(pa), str(pb)])
    b["points"].pop()
    b["setup"] = dict(setup, protocol={"tokens_input": 2000})
    pb.write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="setup protocol"):
        bt.main(["--results", str(pa), str(pb)])
