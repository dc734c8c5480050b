"""The physkern CLI end to end on a tiny GPT-2 saved to disk with a tokenizer trained in the test."""
import json

import pytest
import torch

from physkern.cli import main

TEXT = "\n\n".join(
    f"Article {i}. The quick brown fox {i % 7} jumps over the lazy dog near river {i % 5}. "
    f"Numbers like {i * 37 % 101} and words such as alpha beta gamma follow."
    for i in range(400))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32,
                                       n_layer=2, n_head=2)).eval()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.txt").write_text(TEXT)
    return d


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
