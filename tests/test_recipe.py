"""physkern.recipe: one Recipe type, one loader/validator, one apply_recipe, one set of defaults."""
import copy
import inspect
import json
import random
from pathlib import Path

import pytest
import torch

from physkern.config import CodebookConfig, ScalarConfig
from physkern.recipe import (DEFAULT_CALIBRATION, FINETUNE_DEFAULTS, Recipe, apply_recipe,
                             load_preset, load_recipe, load_recipes, preset_names)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "bench" / "recipes").glob("*.json")),
                         ids=lambda p: p.name)
def test_committed_recipe_files_load_and_round_trip(path):
    recipes = load_recipes(path)
    raw = json.loads(path.read_text())
    assert [r.name for r in recipes] == [r["name"] for r in raw]
    for r, d in zip(recipes, raw):
        assert Recipe.from_dict(r.to_dict()) == r
        assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r  # through JSON
        # the config is exactly the file's (resume keys depend on it)
        if d.get("config") is None:
            assert r.config is None
        else:
            assert {k: v for k, v in r.config.to_dict().items() if k in d["config"]} == \
                {k: (v if k != "overrides" else r.config.to_dict()["overrides"])
                 for k, v in d["config"].items()}
        assert r["name"] == r.name and r["finetune"] == r.finetune  # dict-style read access


def test_one_finetune_default_lr_is_what_the_committed_results_used():
    from physkern.finetune import finetune_quantized
    lr = inspect.signature(finetune_quantized).parameters["lr"].default
    assert lr == FINETUNE_DEFAULTS["lr"] == 1e-3
    res = json.loads((ROOT / "bench" / "results" / "codebook_push_16k.json").read_text())
    used = {p["finetune"]["spec"]["lr"] for p in res["points"] if p.get("finetune")}
    assert used == {FINETUNE_DEFAULTS["lr"]}
    assert Recipe(config=ScalarConfig(), finetune={"steps": 2}).finetune["lr"] == 1e-3


def test_round_trip_with_every_part():
    r = Recipe(config=CodebookConfig(k=16, block_dim=2, scope="layer",
                                     overrides={"*.mlp.*": ScalarConfig(bits=3)}),
               embedding={"method": "rtn", "bits": 4, "group_size": 16},
               dense_dtype="bfloat16", smooth={"alpha": 0.5},
               prune={"rule": "seeds", "relative_rank": 0.5}, finetune={"steps": 3},
               lattice={"xi": 8}, calibration={"windows": 4}, name="all", seeds=[0, 1])
    d = r.to_dict()
    assert d["embedding"]["method"] == "rtn" and d["dense_dtype"] == "bfloat16"
    assert d["calibration"] == {"windows": 4, "window": DEFAULT_CALIBRATION["window"]}
    assert d["finetune"] == {**FINETUNE_DEFAULTS, "steps": 3}
    assert d["label"] == "smooth+codebook+prune+finetune+lattice"
    assert Recipe.from_dict(d) == r
    assert Recipe.from_dict(json.loads(json.dumps(d))) == r


@pytest.mark.parametrize("bad,msg", [
    ({"config": {"method": "codebook", "k": 0}}, r"r\.json: config: k must be"),
    ({"config": {"method": "rtn", "bits": 4}, "finetune": {"lr": "1e-3"}},
     r"r\.json: finetune\.lr must be"),
    ({"config": {"method": "rtn", "bits": 4}, "dense_dtype": "float8"},
     r"r\.json: dense_dtype must be null"),
    ({"config": {"method": "rtn", "bits": 4},
      "embedding": {"method": "rtn", "bits": 4, "layers": ["x"]}},
     r"r\.json: embedding: the head/embedding config takes no `layers`"),
    ({"config": {"method": "rtn", "bits": 4}, "embedding": {"method": "nope"}},
     r"r\.json: embedding: method must be one of"),
    ({"config": {"method": "rtn", "bits": 4}, "calibration": {"windows": 0}},
     r"r\.json: calibration\.windows must be"),
    ({"config": None, "embedding": {"method": "rtn"}}, "embedding needs a quantization config"),
    ({"config": None, "finetun": {}}, r"unknown keys \['finetun'\]"),
])
def test_errors_name_the_file_the_recipe_and_the_key(tmp_path, bad, msg):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"name": "a", **bad}]))
    with pytest.raises(ValueError, match=msg) as err:
        load_recipes(p)
    assert "(a)" in str(err.value)


def test_load_recipe_by_file_and_name(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"name": "a", "config": None},
                             {"name": "b", "config": {"method": "rtn", "bits": 3}}]))
    assert load_recipe(f"{p}:b").config == ScalarConfig(bits=3)
    assert load_recipe(p, "a").config is None
    with pytest.raises(ValueError, match="no recipe 'c' in .*; valid: a, b"):
        load_recipe(f"{p}:c")
    with pytest.raises(ValueError, match="holds 2 recipes"):
        load_recipe(p)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"name": "solo", "config": {"method": "rtn", "bits": 4}}))
    assert load_recipe(one).name == "solo"


def test_apply_recipe_runs_the_steps_in_order(monkeypatch):
    """smoothing -> pruning -> quantization (+embedding) -> dense dtype -> fine-tuning ->
    lattice, with the seed in every codebook config and the calibration of the recipe."""
    import physkern.api
    import physkern.research.attention
    import physkern.data
    import physkern.dense
    import physkern.recipe
    import physkern.smoothquant
    calls = []
    calib = torch.zeros(3, 5, dtype=torch.long)

    def windows(tok, corpus, n, window, seed):
        calls.append(("calibration", n, window, seed))
        return calib
    monkeypatch.setattr(physkern.data, "calibration_windows", windows)
    monkeypatch.setattr(physkern.smoothquant, "smooth_model",
                        lambda m, c, a, b: calls.append(("smooth", a)))
    monkeypatch.setattr(physkern.recipe, "apply_prune",
                        lambda m, spec: calls.append(("prune", spec["rule"])) or {})
    monkeypatch.setattr(physkern.api, "quantize", lambda m, cfg, calibration, progress, embedding:
                        calls.append(("quantize", cfg.seed, embedding.seed,
                                      calibration is calib)) or "report")
    monkeypatch.setattr(physkern.dense, "set_dense_storage_dtype",
                        lambda m, d: calls.append(("dense", d)))
    monkeypatch.setattr(physkern.recipe, "run_finetune",
                        lambda m, t, w, spec, seed, src: calls.append(("finetune", seed)) or {})
    monkeypatch.setattr(physkern.research.attention, "enable_lattice",
                        lambda m, xi, eps: calls.append(("lattice", xi)))
    cb = CodebookConfig(k=4, block_dim=2, scope="layer", error_feedback=True)
    r = Recipe(config=cb, embedding=CodebookConfig(k=4, block_dim=2, scope="layer"),
               dense_dtype="float16", smooth={"alpha": 0.5},
               prune={"rule": "seeds", "relative_rank": 0.5}, finetune={"steps": 1},
               lattice={"xi": 4}, calibration={"windows": 3, "window": 5})
    rep = apply_recipe(torch.nn.Linear(2, 2), r, None, None, seed=7, progress=False)
    assert calls == [("calibration", 3, 5, 7), ("smooth", 0.5), ("prune", "seeds"),
                     ("quantize", 7, 7, True), ("dense", "float16"), ("finetune", 7),
                     ("dense", "float16"), ("lattice", 4.0)]
    assert rep.quantization == "report" and rep.config.seed == 7 and rep.calibration is calib
    assert r.config.seed == 0  # the recipe itself is not changed


def _char_tokenizer(text):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(set(text)))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_apply_recipe_on_a_tiny_model(tiny_llama, tmp_path):
    from physkern.data import load_corpus
    from physkern.dense import dense_storage_dtype
    from physkern.layers import QuantizedLinear
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(80)) for _ in range(10))
    (tmp_path / "c.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "c.txt"))
    tok = _char_tokenizer(text)
    model = copy.deepcopy(tiny_llama)
    r = Recipe(config=ScalarConfig(bits=4, group_size=16), dense_dtype="float16",
               embedding=ScalarConfig(bits=4, group_size=16),
               finetune={"steps": 2, "holdout": 1}, calibration={"windows": 3, "window": 32})
    rep = apply_recipe(model, r, tok, corpus, seed=1, progress=False)
    # 14 decoder linear layers + the head (tied: it serves the input embedding too)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 15
    assert rep.quantization.layers[-1].name == "lm_head"
    assert dense_storage_dtype(model) == torch.float16
    assert rep.finetune["spec"] == r.finetune and rep.calibration.shape == (3, 32)
    assert rep.to_dict()["recipe"] == r.to_dict()


def test_presets_are_listed():
    assert set(preset_names()) >= {"3bit", "2.5bit", "fast", "rtn4"}
    assert load_preset("fast").config == CodebookConfig(k=32, block_dim=2, scope="layer",
                                                        calibrate=True, error_feedback=True)


def _committed_sweeps():
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(payload, dict) and "recipes_file" in payload and payload.get("points"):
            yield pytest.param(payload, id=path.name)


@pytest.mark.parametrize("payload", list(_committed_sweeps()))
def test_committed_points_keep_their_resume_keys(payload):
    """Every committed point is found again by `sweep quant` resume with today's recipe files,
    so rerunning its committed command skips it (and a fresh run recomputes the same point)."""
    from physkern.sweeps.quant import _key_of, point_key, with_seed
    recipes = {r.name: r for r in load_recipes(ROOT / payload["recipes_file"])}
    for p in payload["points"]:
        r = recipes[p["recipe"]]
        cfg, emb = with_seed(r.config, p["seed"]), with_seed(r.embedding, p["seed"])
        assert point_key(r.name, p["seed"], None if cfg is None else cfg.to_dict(), r.prune,
                         r.lattice, r.smooth, r.finetune, None if emb is None else emb.to_dict(),
                         r.dense_dtype) == _key_of(p), (p["recipe"], p["seed"])


def test_embedding_and_dense_dtype_join_the_resume_key_only_when_set():
    from physkern.sweeps.quant import _key_of, point_key
    plain = point_key("a", 0, {"method": "rtn"}, None, None, None, None)
    assert len(plain) == 7 and point_key("a", 0, {"method": "rtn"}, None, None, None, None,
                                         None, None) == plain
    dense = point_key("a", 0, {"method": "rtn"}, None, None, None, None, None, "float16")
    assert dense != plain
    assert _key_of({"recipe": "a", "seed": 0, "config": {"method": "rtn"},
                    "dense_dtype": "float16"}) == dense


def test_sweep_records_embedding_and_dense_dtype_and_resumes(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from physkern.cli import main
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(12))
    (tmp_path / "corpus.txt").write_text(text + "\n")
    tok = _char_tokenizer(text + "\n")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rtn = {"method": "rtn", "bits": 4, "group_size": 16}
    (tmp_path / "r.json").write_text(json.dumps([
        {"name": "plain", "config": rtn},
        {"name": "whole", "config": rtn, "embedding": rtn, "dense_dtype": "float16"}]))
    argv = ["sweep", "quant", "--model", str(tmp_path / "model"), "--corpus",
            str(tmp_path / "corpus.txt"), "--recipes", str(tmp_path / "r.json"), "--out-dir",
            str(tmp_path / "out"), "--tokens", "128", "--window", "32", "--calib-windows", "2",
            "--calib-window", "32"]
    assert main(argv) == 0
    pts = {p["recipe"]: p for p in json.loads((tmp_path / "out" / "r.json").read_text())["points"]}
    assert "embedding" not in pts["plain"] and "dense_dtype" not in pts["plain"]
    assert pts["whole"]["embedding"]["method"] == "rtn"
    assert pts["whole"]["dense_dtype"] == "float16"
    assert pts["whole"]["bits"]["model_bits_per_weight"] < \
        pts["plain"]["bits"]["model_bits_per_weight"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plain seed 0: already in" in out and "whole seed 0: already in" in out
