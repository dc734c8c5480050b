"""The physkern CLI end to end on a tiny GPT-2 saved to disk with a tokenizer trained in the test."""
import json

import pytest
import torch

from physkern.cli import main

def test_ppl_json(saved_tiny, capsys):
    out = saved_tiny / "out.json"
    rc = main(["ppl", "--model", str(saved_tiny / "model"), "--corpus",
               str(saved_tiny / "corpus.txt"), "--tokens", "2048", "--window", "256",
               "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    for key in ("model", "corpus", "tokens_scored", "protocol", "window", "stride", "dtype",
                "device", "versions", "seconds", "tokens_per_second"):
        assert key in d, key
    assert d["tokens_scored"] == 2048 - 8 and d["window"] == 256
    assert "perplexity" in capsys.readouterr().out


def test_quantize_then_ppl(saved_tiny, capsys):
    qdir = saved_tiny / "q"
    rc = main(["quantize", "--model", str(saved_tiny / "model"), "--corpus",
               str(saved_tiny / "corpus.txt"), "--k", "16", "--block-dim", "4", "--scope", "layer",
               "--calib-windows", "4", "--calib-window", "64", "--out", str(qdir)])
    assert rc == 0 and (qdir / "physkern.json").exists()
    meta = json.loads((qdir / "physkern.json").read_text())
    assert meta["recipe"]["k"] == 16 and meta["calibration"]["windows"] == 4
    rc = main(["ppl", "--model", str(qdir), "--corpus", str(saved_tiny / "corpus.txt"),
               "--tokens", "1024", "--window", "128"])
    assert rc == 0


def _recipes(path):
    cb = {"method": "codebook", "k": 16, "block_dim": 4, "scope": "layer", "iters": 3}
    path.write_text(json.dumps([
        {"name": "mixed_ft", "config": {**cb, "overrides": {
            "*.mlp.*": {"method": "rtn", "bits": 4, "group_size": 16}}},
         "finetune": {"steps": 3, "lr": 1e-3, "windows": 6, "schedule": "cosine"}},
        {"name": "plain", "config": cb},
        {"name": "with_lattice", "config": cb, "lattice": {"xi": 8}},
        {"name": "fp", "config": None}]))
    return str(path)


def _quantize(saved_tiny, out, *extra):
    return main(["quantize", "--model", str(saved_tiny / "model"), "--corpus",
                 str(saved_tiny / "corpus.txt"), "--calib-windows", "4", "--calib-window", "64",
                 "--out", str(out), *extra])


def test_quantize_recipe_with_finetuning(saved_tiny, capsys):
    from physkern.layers import QuantizedLinear
    from physkern.quant.accounting import bits_report
    from physkern.serialization import load_quantized
    recipes = _recipes(saved_tiny / "recipes.json")
    assert _quantize(saved_tiny, saved_tiny / "ft", "--recipe", f"{recipes}:mixed_ft") == 0
    assert "fine-tuning (3 steps" in capsys.readouterr().out
    meta = json.loads((saved_tiny / "ft" / "physkern.json").read_text())
    assert meta["recipe"]["overrides"]["*.mlp.*"]["method"] == "rtn"
    ft = meta["finetune"]
    assert ft["spec"]["windows"] == 6 and ft["schedule"] == "cosine"
    assert ft["train_windows"] == 4 and ft["holdout_windows"] == 2 and ft["steps"] == 3
    # the same recipe without fine-tuning: same indices and bits, other codebooks (if kept)
    assert _quantize(saved_tiny, saved_tiny / "noft", "--recipe", f"{recipes}:mixed_ft",
                     "--finetune-steps", "0") == 0
    assert json.loads((saved_tiny / "noft" / "physkern.json").read_text())["finetune"] is None
    tuned, _ = load_quantized(saved_tiny / "ft")
    plain, _ = load_quantized(saved_tiny / "noft")
    assert bits_report(tuned).to_dict() == bits_report(plain).to_dict()
    pairs = [(a, b) for a, b in zip(tuned.modules(), plain.modules())
             if isinstance(a, QuantizedLinear)]
    assert pairs and all(torch.equal(a.packed, b.packed) for a, b in pairs)
    changed = any(not torch.equal(a.codebooks, b.codebooks) for a, b in pairs)
    assert changed == ft["kept"]
    # code updates from the command line reach the fine-tuner and its record
    assert _quantize(saved_tiny, saved_tiny / "pv", "--recipe", f"{recipes}:mixed_ft",
                     "--finetune-code-update-every", "1",
                     "--finetune-code-update-fraction", "0.5") == 0
    pv = json.loads((saved_tiny / "pv" / "physkern.json").read_text())["finetune"]
    assert pv["code_update_every"] == 1 and pv["code_update_fraction"] == 0.5
    assert len(pv["code_updates"]) == 2   # before steps 1 and 2 (of 3)
    assert "code_update_objective" not in pv["spec"]
    assert _quantize(saved_tiny, saved_tiny / "pvlin", "--recipe", f"{recipes}:mixed_ft",
                     "--finetune-code-update-every", "1",
                     "--finetune-code-update-objective", "linearized",
                     "--finetune-code-update-step", "0.2") == 0
    lin = json.loads((saved_tiny / "pvlin" / "physkern.json").read_text())["finetune"]
    assert lin["spec"]["code_update_objective"] == "linearized"
    assert lin["code_update_step"] == 0.2 and len(lin["code_updates"]) == 2


@pytest.mark.parametrize("recipe,msg", [
    ("RECIPES", "--recipe must be FILE:NAME"),
    ("RECIPES:nope", "no recipe 'nope' in .*; valid: mixed_ft, plain, with_lattice, fp"),
    ("RECIPES:with_lattice", "this recipe has lattice"),
    ("RECIPES:fp", "this recipe has no config"),
    ("/no/such.json:plain", "is not a file"),
    ("RECIPES:plain --finetune-lr 0.01", "--finetune-lr needs --finetune-steps N"),
    ("RECIPES:plain --finetune-steps -2", r"--finetune\.steps must be an integer >= 1"),
    ("RECIPES:plain --finetune-steps 2 --finetune-windows 2",
     r"--finetune\.windows must be null .* > holdout = 2"),
    ("RECIPES:plain --finetune-steps 2 --finetune-windows 100000", "holds only"),
    ("RECIPES:plain --finetune-code-update-every 1",
     "--finetune-code-update-every needs --finetune-steps N"),
    ("RECIPES:plain --finetune-steps 2 --finetune-code-update-every 5",
     r"code_update_every must be < steps"),
    ("RECIPES:plain --finetune-steps 3 --finetune-code-update-every 1 "
     "--finetune-code-update-fraction 1.5", r"code_update_fraction must be a number in \(0, 1\]"),
])
def test_quantize_bad_recipe(saved_tiny, capsys, recipe, msg):
    import re
    recipes = _recipes(saved_tiny / "bad_recipes.json")
    rc = _quantize(saved_tiny, saved_tiny / "bad", "--recipe",
                   *recipe.replace("RECIPES", recipes).split())
    assert rc == 2 and re.search(msg, capsys.readouterr().err)
    assert not (saved_tiny / "bad").exists()


@pytest.mark.parametrize("argv,msg", [
    (["--window", "100000"], "exceeds the model context"),
    (["--stride", "0"], "argument --stride: must be an integer >= 1"),
    (["--tokens", "100000000"], "has only"),
])
def test_ppl_bad_arguments(saved_tiny, capsys, argv, msg):
    rc = main(["ppl", "--model", str(saved_tiny / "model"), "--corpus",
               str(saved_tiny / "corpus.txt"), "--window", "64"] + argv)
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_missing_corpus_and_model(saved_tiny, capsys):
    assert main(["ppl", "--model", str(saved_tiny / "model"), "--corpus", "/no/such.txt"]) == 2
    assert "corpus" in capsys.readouterr().err
    assert main(["ppl", "--model", "/no/such/dir", "--corpus", str(saved_tiny / "corpus.txt")]) == 2


def test_help_everywhere(capsys):
    from physkern.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"ppl", "quantize", "run"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_run_quantizes_the_whole_model_and_reports_the_file(saved_tiny, tmp_path, capsys):
    from safetensors import safe_open

    import physkern
    out, js = tmp_path / "run-model", tmp_path / "run.json"
    rc = main(["run", "--model", str(saved_tiny / "model"), "--corpus",
               str(saved_tiny / "corpus.txt"), "--tokens", "1024", "--window", "64",
               "--calib-windows", "2", "--calib-window", "64", "--out", str(out),
               "--sample-tokens", "3", "--json", str(js)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "physkern deploy (saved)" in text and "decode" in text
    r = json.loads(js.read_text())
    assert r["preset"] == "deploy" and r["recipe"]["embedding"]["k"] == 256
    file_bytes = (out / "model.safetensors").stat().st_size
    assert r["bits"]["file_bytes"] == file_bytes
    # the whole model is quantized: the tied head/embedding is stored once, as the head
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "lm_head.packed" in keys and not any(k.startswith("transformer.wte") for k in keys)
    assert r["bits"]["file_bits_per_parameter"] == pytest.approx(
        file_bytes * 8 / r["bits"]["model_parameters"])
    assert r["bits"]["model_bits_per_weight"] < 16
    # what run evaluated is what it saved: the file, reloaded and scored by `physkern ppl`
    # on the same (evaluation-half) tokens, gives the same perplexity
    rc = main(["ppl", "--model", str(out), "--corpus", str(saved_tiny / "corpus.txt"),
               "--part", "evaluation", "--tokens", "1024", "--window", "64",
               "--json", str(tmp_path / "ppl.json")])
    assert rc == 0
    again = json.loads((tmp_path / "ppl.json").read_text())
    assert again["tokens_scored"] == r["quantized"]["tokens_scored"]
    assert again["perplexity"] == pytest.approx(r["quantized"]["perplexity"], rel=1e-6)
    assert again["perplexity"] != pytest.approx(r["fp"]["perplexity"], rel=1e-6)
