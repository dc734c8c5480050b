"""`physkern sweep quant` end to end on a tiny model saved to disk, with a tiny text corpus."""
import json
import random

import pytest
import torch


def _char_tokenizer(text: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set(text))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("sweepq")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
    docs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(12)]
    text = "\n\n".join(docs) + "\n"
    (root / "corpus.txt").write_text(text)
    tok = _char_tokenizer(text)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    recipes = [
        {"name": "fp", "config": None},
        {"name": "rtn4", "config": {"method": "rtn", "bits": 4, "group_size": 16},
         "seeds": [0, 1, 2]},
        {"name": "gptq3", "config": {"method": "gptq", "bits": 3, "group_size": 16},
         "seeds": [0]},
        {"name": "cb", "config": {"method": "codebook", "k": 16, "block_dim": 4,
                                  "scope": "layer", "iters": 3}, "seeds": [0, 1, 2],
         "label": "codebook d4"},
    ]
    (root / "recipes.json").write_text(json.dumps(recipes))
    return root


def _args(root, *extra):
    return ["sweep", "quant", "--model", str(root / "model"), "--corpus",
            str(root / "corpus.txt"), "--recipes", str(root / "recipes.json"),
            "--out-dir", str(root / "out"), "--tokens", "192", "--window", "32",
            "--calib-windows", "4", "--calib-window", "32", *extra]


def test_sweep_quant_end_to_end_and_resume(tiny_setup, capsys):
    from physkern.cli import main
    root = tiny_setup
    assert main(_args(root)) == 0
    res = json.loads((root / "out" / "recipes.json").read_text())
    assert (root / "out" / "recipes.png").stat().st_size > 0
    pts = res["points"]
    # RTN is deterministic: one seed; codebook: three
    assert [p["seed"] for p in pts if p["recipe"] == "rtn4"] == [0]
    assert [p["seed"] for p in pts if p["recipe"] == "cb"] == [0, 1, 2]
    for p in pts:
        assert p["tokens_scored"] == 186 and p["perplexity"] > 1
        assert p["bits"]["model_bits_per_weight"] > 0
        assert isinstance(p["git_commit"], str) and p["git_commit"]  # per point: files span commits
    fp = next(p for p in pts if p["recipe"] == "fp")
    assert fp["bits"]["model_bits_per_weight"] == pytest.approx(32.0)
    rtn = next(p for p in pts if p["recipe"] == "rtn4")
    # 4-bit indices + fp16 scale and offset per 16 columns = 6 bits/weight, plus each layer's
    # 16-entry fp16 grid codebook (256 bits) over a block's 9216 weights in 7 layers
    assert rtn["bits"]["quantized_bits_per_weight"] == pytest.approx(6 + 7 * 256 / 9216)
    assert rtn["calibration"] is None
    gq = next(p for p in pts if p["recipe"] == "gptq3")
    assert gq["calibration"] == {"windows": 4, "window": 32, "tokens": 128, "seed": 0}
    assert "versions" in res and "device" in res and res["setup"]["protocol"]["window"] == 32
    summ = {s["recipe"]: s for s in res["summary"]}
    assert summ["cb"]["perplexity_std"] is not None and summ["cb"]["label"] == "codebook d4"
    assert "| cb | codebook d4 |" in capsys.readouterr().out
    # resume: nothing recomputed
    assert main(_args(root)) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 6
    assert json.loads((root / "out" / "recipes.json").read_text())["points"] == pts


def test_calibration_and_evaluation_windows_disjoint(tiny_setup):
    from physkern.data import calibration_tokens, calibration_windows, evaluation_tokens, \
        load_corpus
    from physkern.models import load_model
    root = tiny_setup
    corpus = load_corpus(str(root / "corpus.txt"))
    _, tok = load_model(str(root / "model"))
    assert not set(corpus.calibration_documents) & set(corpus.evaluation_documents)
    calib_text = corpus.calibration_text
    dec = lambda ids: "".join(tok.convert_ids_to_tokens(ids.tolist()))  # char-level tokens
    ev = evaluation_tokens(tok, corpus, 192)
    ev_text = dec(ev)
    assert ev_text not in calib_text
    cal_ids = calibration_tokens(tok, corpus)
    for seed in range(3):
        w = calibration_windows(tok, corpus, 4, 32, seed)
        for row in w:
            # every calibration window is a contiguous slice of the calibration token stream
            s = row.tolist()
            ids = cal_ids.tolist()
            assert any(ids[i:i + 32] == s for i in range(len(ids) - 31))
            assert dec(row) in calib_text


def test_bad_recipes(tmp_path):
    from physkern.sweeps.quant import load_recipes
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"name": "a", "config": {"method": "rtn", "bits": 9}}]))
    with pytest.raises(ValueError, match="bits"):
        load_recipes(str(p))
    p.write_text(json.dumps([{"name": "a", "config": None}, {"name": "a", "config": None}]))
    with pytest.raises(ValueError, match="twice"):
        load_recipes(str(p))
    p.write_text(json.dumps([{"name": "a", "config": None, "seeds": []}]))
    with pytest.raises(ValueError, match="seeds"):
        load_recipes(str(p))
    with pytest.raises(FileNotFoundError):
        load_recipes(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("content, what", [
    ('{"setup": {"model": "m"}, "points": [{"recipe": "fp", "se', "not valid JSON"),  # truncated
    ("[1, 2]", "JSON list"),
    ('{"points": []}', "no 'setup'"),
    ('{"setup": {}, "points": {"a": 1}}', "'points' must be a list"),
    ('{"setup": {}, "points": [{"recipe": "fp"}]}', r"points\[0\]"),
])
def test_resume_from_corrupt_results_names_file_and_fresh(tmp_path, content, what):
    from physkern.sweeps.quant import read_results
    bad = tmp_path / "sweep.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=what) as exc:
        read_results(bad)
    assert str(bad) in str(exc.value) and "--fresh" in str(exc.value)
    assert read_results(tmp_path / "missing.json") is None


def test_corrupt_results_cli_error_then_fresh_keeps_backup(tiny_setup, tmp_path, capsys):
    from physkern.cli import main
    root, out = tiny_setup, tmp_path / "out"
    out.mkdir()
    bad = out / "fresh.json"
    truncated = '{"experiment": "quantization recipes", "setup": {"model": '
    bad.write_text(truncated)
    args = _args(root, "--out-dir", str(out), "--name", "fresh", "--only", "fp")
    assert main(args) == 2                      # one error line, no traceback
    err = capsys.readouterr().err
    assert str(bad) in err and "--fresh" in err and "not valid JSON" in err
    assert bad.read_text() == truncated         # untouched

    assert main(args + ["--fresh"]) == 0
    backups = list(out.glob("fresh.json.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == truncated
    res = json.loads(bad.read_text())
    assert [p["recipe"] for p in res["points"]] == ["fp"]
    assert "moved" in capsys.readouterr().out
    # a second --fresh keeps both backups (the first is never overwritten)
    assert main(args + ["--fresh"]) == 0
    assert len(list(out.glob("fresh.json.bak-*"))) == 2
    # and a plain run resumes from the valid file
    assert main(args) == 0
    assert "skipped" in capsys.readouterr().out


def test_point_key_tells_factorize_recipes_apart():
    from physkern.sweeps.quant import _key_of, point_key
    base = dict(recipe="f", seed=0, config=None, prune=None, lattice=None)
    a = point_key(**base, factorize={"method": "svd", "rank": 2})
    b = point_key(**base, factorize={"method": "svd", "rank": 4})
    assert a != b and point_key(**base) != a
    # a point recorded before factorize existed keeps its key
    old = {"recipe": "f", "seed": 0, "config": None}
    assert _key_of(old) == point_key(**base)
    assert _key_of({**old, "factorize": {"method": "svd", "rank": 2}}) == a


def test_sweep_quant_is_a_plain_function(tiny_setup, capsys):
    """physkern.sweeps.quant.run takes keyword arguments (the CLI lives in physkern/commands/):
    called directly it writes the same points as `physkern sweep quant`, resuming its file, and
    checks its arguments with ValueErrors naming them."""
    from physkern.cli import main
    from physkern.sweeps import quant
    root = tiny_setup
    kw = dict(model=str(root / "model"), corpus=str(root / "corpus.txt"), tokens=192, window=32,
              calib_windows=4, calib_window=32, only=["fp", "rtn4"])
    assert main(_args(root, "--name", "plain", "--only", "fp", "rtn4")) == 0
    cli_points = json.loads((root / "out" / "plain.json").read_text())["points"]
    path = quant.run(str(root / "recipes.json"), name="plain", out_dir=str(root / "out"), **kw)
    assert path == root / "out" / "plain.json"
    assert capsys.readouterr().out.count("skipped") == 2
    assert json.loads(path.read_text())["points"] == cli_points
    path = quant.run(str(root / "recipes.json"), name="plain2", out_dir=str(root / "out"), **kw)
    fresh = json.loads(path.read_text())["points"]
    strip = lambda pts: [{k: v for k, v in p.items() if not k.startswith("seconds")}
                         for p in pts]
    assert strip(fresh) == strip(cli_points)
    with pytest.raises(ValueError, match="only"):
        quant.run(str(root / "recipes.json"), out_dir=str(root / "out"), only=["nope"])
    with pytest.raises(ValueError, match="calib-windows"):
        quant.run(str(root / "recipes.json"), out_dir=str(root / "out"), calib_windows=0)
    # No argparse left in the sweeps.
    import physkern.sweeps.plot
    import physkern.sweeps.xi
    for mod in (quant, physkern.sweeps.plot, physkern.sweeps.xi):
        assert not hasattr(mod, "register_sweep") and not hasattr(mod, "argparse")


def test_also_eval_scores_other_corpus_with_the_same_protocol(tiny_setup, tmp_path, capsys):
    """--also-eval: new points and the existing FP point get the other corpus's perplexity,
    equal to an independent evaluation of that corpus's evaluation part; the resume key and
    the wiki figures are untouched."""
    from physkern.cli import main
    from physkern.data import evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import load_model
    root = tiny_setup
    rng = random.Random(1)
    other = "\n\n".join(" ".join(rng.choice(["alpha", "omega", "beta"]) for _ in range(60)) + "."
                        for _ in range(12)) + "\n"
    (tmp_path / "other.txt").write_text(other)
    out = ["--out-dir", str(tmp_path / "o"), "--only", "fp", "rtn4"]
    assert main(_args(root, *out)) == 0                    # without: no other_corpora
    first = json.loads((tmp_path / "o" / "recipes.json").read_text())["points"]
    assert all("other_corpora" not in p for p in first)
    assert main(_args(root, *out, "--also-eval", str(root / "corpus.txt"))) == 2  # itself
    assert "also-eval" in capsys.readouterr().err
    assert main(_args(root, *out, "--also-eval", str(tmp_path / "other.txt"))) == 0
    pts = json.loads((tmp_path / "o" / "recipes.json").read_text())["points"]
    fp = next(p for p in pts if p["recipe"] == "fp")
    got = fp["other_corpora"][str(tmp_path / "other.txt")]
    model, tok = load_model(str(root / "model"))
    toks = evaluation_tokens(tok, load_corpus(str(tmp_path / "other.txt")), 192)
    ref = perplexity(model, toks, 32, None, 1)
    assert got["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert got["tokens_scored"] == ref.tokens_scored
    assert got["perplexity"] != pytest.approx(fp["perplexity"], rel=1e-3)  # really another text
    # the quantized point was already done: skipped, not rescored (it would need requantizing)
    rtn = next(p for p in pts if p["recipe"] == "rtn4")
    assert "other_corpora" not in rtn
    assert [p["perplexity"] for p in pts] == [p["perplexity"] for p in first]
    # a new point gets it (and is saved: the saved model reloads to the same perplexity)
    assert main(_args(root, "--out-dir", str(tmp_path / "o2"), "--only", "rtn4",
                      "--also-eval", str(tmp_path / "other.txt"),
                      "--save-models", str(tmp_path / "models"))) == 0
    res = json.loads((tmp_path / "o2" / "recipes.json").read_text())
    import physkern
    saved = physkern.load_quantized(tmp_path / "models" / "rtn4-seed0")[0]
    wiki = evaluation_tokens(tok, load_corpus(str(root / "corpus.txt")), 192)
    assert perplexity(saved, wiki, 32, None, 1).perplexity == pytest.approx(
        res["points"][0]["perplexity"], rel=1e-6)
    assert "other_corpora" in res["points"][0]
    assert "other_corpora" in res["summary"][0]
    assert "Out of the calibration domain" in capsys.readouterr().out


def test_calib_corpus_calibrates_elsewhere_and_is_recorded(tiny_setup, tmp_path, capsys):
    """--calib-corpus: the calibrated recipe draws its windows from that corpus (a different
    result than from --corpus), the setup says so, and also-eval refuses that corpus."""
    from physkern.cli import main
    root = tiny_setup
    rng = random.Random(2)
    other = "\n\n".join(" ".join(rng.choice(["zeta", "eta", "iota", "rho"]) for _ in range(60))
                        + "." for _ in range(12)) + "\n"
    (tmp_path / "cal.txt").write_text(other)
    assert main(_args(root, "--out-dir", str(tmp_path / "a"), "--only", "gptq3")) == 0
    assert main(_args(root, "--out-dir", str(tmp_path / "b"), "--only", "gptq3",
                      "--calib-corpus", str(tmp_path / "cal.txt"))) == 0
    a = json.loads((tmp_path / "a" / "recipes.json").read_text())
    b = json.loads((tmp_path / "b" / "recipes.json").read_text())
    assert "corpus" not in a["setup"]["calibration"]
    assert b["setup"]["calibration"]["corpus"]["name"] == "cal.txt"
    assert b["setup"]["corpus"] == a["setup"]["corpus"]                  # evaluation unchanged
    assert b["points"][0]["perplexity"] != a["points"][0]["perplexity"]
    assert main(_args(root, "--out-dir", str(tmp_path / "c"), "--only", "gptq3",
                      "--calib-corpus", str(tmp_path / "cal.txt"),
                      "--also-eval", str(tmp_path / "cal.txt"))) == 2
    assert "calibration domain" in capsys.readouterr().err


def test_prefix_perplexity_recorded_per_point(tiny_setup, tmp_path, monkeypatch, capsys):
    """A long sweep also records the shorter standard run's figure (its leading windows), equal to
    an independent evaluation of the first tokens only, for wiki and an also-eval corpus."""
    from physkern.cli import main
    from physkern.data import evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import load_model
    from physkern.sweeps import quant as sweep_quant
    monkeypatch.setattr(sweep_quant, "PREFIX_TOKENS", (64, 100))  # 100: not whole windows
    root = tiny_setup
    (tmp_path / "other.txt").write_text((root / "corpus.txt").read_text()[::-1])
    assert main(_args(root, "--out-dir", str(tmp_path / "p"), "--only", "fp",
                      "--also-eval", str(tmp_path / "other.txt"))) == 0
    res = json.loads((tmp_path / "p" / "recipes.json").read_text())
    fp = res["points"][0]
    assert set(fp["prefix"]) == {"64"}
    model, tok = load_model(str(root / "model"))
    for text, got in ((root / "corpus.txt", fp["prefix"]["64"]),
                      (tmp_path / "other.txt",
                       fp["other_corpora"][str(tmp_path / "other.txt")]["prefix"]["64"])):
        ref = perplexity(model, evaluation_tokens(tok, load_corpus(str(text)), 64), 32, None, 1,
                         progress=False)
        assert got["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
        assert got["tokens_scored"] == ref.tokens_scored == 62
    assert res["summary"][0]["prefix"]["64"]["perplexity_mean"] == fp["prefix"]["64"]["perplexity"]
    assert "leading windows" in capsys.readouterr().out


def test_also_eval_tokens_scores_other_corpus_on_its_own_length(tiny_setup, tmp_path, capsys):
    from physkern.cli import main
    from physkern.data import evaluation_tokens, load_corpus
    from physkern.eval import perplexity
    from physkern.models import load_model
    root = tiny_setup
    (tmp_path / "other.txt").write_text((root / "corpus.txt").read_text()[::-1])
    other = str(tmp_path / "other.txt")
    args = _args(root, "--out-dir", str(tmp_path / "o"), "--only", "fp", "--also-eval", other)
    assert main(args + ["--also-eval-tokens", "96"]) == 0
    res = json.loads((tmp_path / "o" / "recipes.json").read_text())
    assert res["setup"]["also_eval_tokens"] == 96
    got = res["points"][0]["other_corpora"][other]
    model, tok = load_model(str(root / "model"))
    ref = perplexity(model, evaluation_tokens(tok, load_corpus(other), 96), 32, None, 1,
                     progress=False)
    assert got["tokens_scored"] == ref.tokens_scored == 93
    assert got["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert res["points"][0]["tokens_scored"] == 186            # wiki keeps --tokens
    assert main(args + ["--also-eval-tokens", "64"]) == 2      # another setup: refused
    assert "another setup" in capsys.readouterr().err
    assert main(_args(root, "--out-dir", str(tmp_path / "p"), "--only", "fp",
                      "--also-eval-tokens", "64")) == 2
    assert "only used with also-eval" in capsys.readouterr().err
