"""Hostile inputs (issue 15, item 6): each gets one clear line naming the argument or file.

CLI cases run in-process through physkern.cli.main and must return 2 with no traceback; API
cases raise ValueError / FileNotFoundError. Models are tiny and saved to tmp dirs; the packaged
model is never loaded.
"""
import copy
import json
import math
import re

import pytest
import torch

from _tiny import corpus_text, save_tiny_gpt2
from physkern.cli import main
from physkern.config import CodebookConfig, GPTQConfig, ScalarConfig, config_from_dict

TEXT = corpus_text("Paragraph", 200)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 (context 128) with a trained byte-level BPE tokenizer, and a corpus file."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("bad"), TEXT, 128)


def _cli(capsys, argv):
    """Run the CLI; returns (rc, stderr) and asserts the one-line, no-traceback contract."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # progress bars (transformers' "Loading weights") may precede it: one error line
    lines = [l for l in err.splitlines() if "error" in l.lower()]
    assert len(lines) == 1 and lines[0].startswith("physkern"), err
    return rc, err


def _quantize_argv(saved, *extra, out=None):
    return ["quantize", "--model", saved / "model", "--corpus", saved / "corpus.txt",
            "--calib-windows", "2", "--calib-window", "32", "--method", "rtn",
            "--out", out or saved / "never", *extra]


# ----------------------------------------------------------------------------------------------
# 1. layers / overrides


@pytest.mark.parametrize("cls", [CodebookConfig, ScalarConfig, GPTQConfig])
def test_layers_string_is_one_pattern(cls, tiny_llama):
    from physkern.api import select_layers
    cfg = cls(layers="*mlp*")
    assert cfg.layers == ["*mlp*"]
    names = [l.name for l, _ in select_layers(tiny_llama, cfg)]
    assert names and all(".mlp." in n for n in names)
    # and through a recipe JSON
    assert config_from_dict({"method": cls.method, "layers": "*mlp*"}).layers == ["*mlp*"]


@pytest.mark.parametrize("kw,msg", [
    ({"layers": [1, 2]}, "layers must be"),
    ({"layers": []}, "layers must be"),
    ({"layers": {"a": 1}}, "layers must be"),
    ({"overrides": ["*mlp*"]}, "overrides must be a dict"),
    ({"overrides": {"*mlp*": {"method": "rtn"}}}, r"overrides\['\*mlp\*'\] must be"),
    ({"overrides": {3: ScalarConfig()}}, "overrides: keys must be"),
])
@pytest.mark.parametrize("cls", [CodebookConfig, ScalarConfig, GPTQConfig])
def test_layers_and_overrides_validated(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(**kw)


def test_recipe_overrides_not_an_object():
    with pytest.raises(ValueError, match="overrides must be an object"):
        config_from_dict({"method": "codebook", "overrides": ["*mlp*"]})
    with pytest.raises(ValueError, match="config must be an object"):
        config_from_dict("codebook")


# ----------------------------------------------------------------------------------------------
# 2. float fields, seeds, bools


@pytest.mark.parametrize("cls,kw,name", [
    (CodebookConfig, {"tol": -1}, "tol"),
    (CodebookConfig, {"tol": 0}, "tol"),
    (CodebookConfig, {"tol": math.nan}, "tol"),
    (CodebookConfig, {"tol": math.inf}, "tol"),
    (CodebookConfig, {"tol": True}, "tol"),
    (CodebookConfig, {"percdamp": math.nan}, "percdamp"),
    (CodebookConfig, {"percdamp": 1.5}, "percdamp"),
    (GPTQConfig, {"percdamp": math.nan}, "percdamp"),
    (GPTQConfig, {"percdamp": 0}, "percdamp"),
    (CodebookConfig, {"seed": 2**70}, "seed"),
    (CodebookConfig, {"seed": -1}, "seed"),
    (CodebookConfig, {"seed": 1.5}, "seed"),
    (CodebookConfig, {"calibrate": "false"}, "calibrate"),
    (ScalarConfig, {"symmetric": 1}, "symmetric"),
    (GPTQConfig, {"act_order": "yes"}, "act_order"),
])
def test_config_numbers_and_bools(cls, kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cls(**kw)


def test_largest_seed_accepted():
    CodebookConfig(seed=2**63 - 1)
    torch.Generator().manual_seed(2**63 - 1)  # what the k-means does with it


# ----------------------------------------------------------------------------------------------
# 3. NaN / Inf weights


@pytest.mark.parametrize("cfg", [ScalarConfig(bits=4), GPTQConfig(bits=4),
                                 CodebookConfig(k=4, block_dim=2, scope="layer", calibrate=False)])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_weight_names_layer(tiny_llama, cfg, bad):
    from physkern.api import quantize
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 3] = bad
    calib = torch.randint(0, 96, (2, 16)) if cfg.needs_calibration else None
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.down_proj: weight has "
                                         r"\d+ NaN and \d+ Inf values"):
        quantize(model, cfg, calibration=calib, progress=False)


def test_nonfinite_weight_low_level_messages():
    from physkern.quant.gptq import gptq_quantize_scalar
    from physkern.quant.scalar import rtn_quantize
    w = torch.randn(4, 8)
    w[1, 1] = math.nan
    with pytest.raises(ValueError, match="NaN") as e:
        rtn_quantize(w, 4)
    assert "too large" not in str(e.value)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize_scalar(w, torch.eye(8), 4)
    h = torch.eye(8)
    h[2, 2] = math.nan
    with pytest.raises(ValueError, match="hessian .* NaN"):
        gptq_quantize_scalar(torch.randn(4, 8), h, 4)


def test_nonfinite_weight_cli(saved, capsys, tmp_path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(saved / "model")
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = math.nan
    m.save_pretrained(tmp_path / "nan")
    for f in (saved / "model").glob("*token*"):
        (tmp_path / "nan" / f.name).write_bytes(f.read_bytes())
    rc, err = _cli(capsys, ["quantize", "--model", tmp_path / "nan", "--corpus",
                            saved / "corpus.txt", "--method", "rtn", "--out", tmp_path / "q"])
    assert rc == 2 and "layer transformer.h.0.mlp.c_fc: weight has 1 NaN" in err


# ----------------------------------------------------------------------------------------------
# 5. calibration windows longer than the model context


def test_api_calibration_longer_than_context(tiny_gpt2):
    from physkern.api import quantize
    model = copy.deepcopy(tiny_gpt2)  # n_positions = 64
    with pytest.raises(ValueError, match=r"calibration: windows of 65 tokens exceed the model "
                                         r"context \(64 tokens\)"):
        quantize(model, GPTQConfig(), calibration=torch.zeros(1, 65, dtype=torch.long),
                 progress=False)


def test_cli_calib_window_longer_than_context(saved, capsys):
    rc, err = _cli(capsys, _quantize_argv(saved, "--method", "gptq", "--calib-window", "200"))
    assert rc == 2 and "--calib-window: 200 tokens exceed the model context (128 tokens)" in err
    assert not (saved / "never").exists()


def test_run_calib_window_longer_than_context(saved, capsys, monkeypatch):
    import physkern.eval as ev

    def no_eval(*a, **k):
        raise AssertionError("the window must be refused before any evaluation")
    monkeypatch.setattr(ev, "perplexity", no_eval)
    rc, err = _cli(capsys, ["run", "--model", saved / "model", "--corpus", saved / "corpus.txt",
                            "--window", "64", "--tokens", "256", "--calib-window", "129"])
    assert rc == 2 and "--calib-window: 129 tokens exceed the model context (128" in err


# ----------------------------------------------------------------------------------------------
# 11. integer arguments, missing model, recipe files


@pytest.mark.parametrize("flag,value", [
    ("--calib-windows", "0"), ("--calib-windows", "-3"),
    ("--calib-window", "0"), ("--calib-window", "1"), ("--k", "0"), ("--k", "-5"),
    ("--bits", "0"), ("--bits", "9"), ("--block-dim", "3"), ("--block-dim", "0"),
    ("--group-size", "0"), ("--group-size", "-64"), ("--seed", "-1"), ("--seed", str(2**70)),
    ("--seed", "abc"), ("--stages", "0"), ("--iters", "-1"), ("--scale-group", "0"),
])
def test_quantize_bad_integer(saved, capsys, monkeypatch, flag, value):
    import physkern.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc, err = _cli(capsys, _quantize_argv(saved, flag, value))
    assert rc == 2 and f"argument {flag}:" in err and value in err


@pytest.mark.parametrize("argv,flag", [
    (["--tokens", "-5"], "--tokens"), (["--window", "1"], "--window"),
    (["--window", "0"], "--window"), (["--stride", "-1"], "--stride"),
    (["--batch-size", "0"], "--batch-size"), (["--part", "middle"], "--part"),
])
def test_ppl_bad_arguments(saved, capsys, argv, flag):
    rc, err = _cli(capsys, ["ppl", "--model", saved / "model", "--corpus",
                            saved / "corpus.txt", *argv])
    assert rc == 2 and f"argument {flag}:" in err


@pytest.mark.parametrize("flag,value", [("--calib-windows", "0"), ("--calib-window", "-1"),
                                        ("--seed", "-2"), ("--tokens", "-1")])
def test_run_bad_integer(saved, capsys, flag, value):
    rc, err = _cli(capsys, ["run", "--model", saved / "model", flag, value])
    assert rc == 2 and f"argument {flag}:" in err


@pytest.mark.parametrize("model", ["/no/such/dir", "./no-such-model", "/no/such/model.gguf"])
def test_model_path_missing(saved, capsys, model):
    rc, err = _cli(capsys, ["ppl", "--model", model, "--corpus", saved / "corpus.txt"])
    assert rc == 2 and "model" in err and model in err


def test_recipe_file_missing(saved, capsys):
    rc, err = _cli(capsys, _quantize_argv(saved, "--recipe", "/no/such/recipes.json:plain"))
    assert rc == 2 and "/no/such/recipes.json" in err and "is not a file" in err


def test_recipe_file_not_json(saved, capsys, tmp_path):
    bad = tmp_path / "recipes.json"
    bad.write_text("[{'name': 'x',")
    rc, err = _cli(capsys, _quantize_argv(saved, "--recipe", f"{bad}:x"))
    assert rc == 2 and str(bad) in err and "not valid JSON" in err


@pytest.mark.parametrize("config,msg", [
    ({"method": "codebook", "tol": -1}, "tol must be"),
    ({"method": "codebook", "seed": 2**70}, "seed must be"),
    ({"method": "rtn", "layers": [3]}, "layers must be"),
    ({"method": "gptq", "percdamp": "x"}, "percdamp must be"),
])
def test_recipe_bad_config_names_file(saved, capsys, tmp_path, config, msg):
    f = tmp_path / "recipes.json"
    f.write_text(json.dumps([{"name": "r", "config": config}]))
    rc, err = _cli(capsys, _quantize_argv(saved, "--recipe", f"{f}:r"))
    assert rc == 2 and str(f) in err and msg in err


def test_recipe_layers_string_is_one_pattern(saved, capsys, tmp_path):
    f = tmp_path / "recipes.json"
    f.write_text(json.dumps([{"name": "r", "config": {"method": "rtn", "layers": "*.mlp.c_fc"}}]))
    out = tmp_path / "q"
    rc = main([str(a) for a in _quantize_argv(saved, "--recipe", f"{f}:r", out=out)])
    assert rc == 0
    layers = json.loads((out / "physkern.json").read_text())["quantized_layers"]
    assert sorted(layers) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


# ----------------------------------------------------------------------------------------------
# 4. --out checked before any work; --overwrite


def test_out_checked_before_work(saved, capsys, tmp_path, monkeypatch):
    import physkern.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    rc, err = _cli(capsys, _quantize_argv(saved, out=taken))
    assert rc == 2 and str(taken) in err
    assert (taken / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = _cli(capsys, _quantize_argv(saved, out=afile))
    assert rc == 2 and str(afile) in err


def test_out_overwrite_flag(saved, capsys, tmp_path):
    out = tmp_path / "q"
    assert main([str(a) for a in _quantize_argv(saved, out=out)]) == 0
    rc, err = _cli(capsys, _quantize_argv(saved, out=out))
    assert rc == 2 and str(out) in err and "overwrite" in err
    assert main([str(a) for a in _quantize_argv(saved, "--overwrite", "--bits", "3",
                                                out=out)]) == 0
    assert json.loads((out / "physkern.json").read_text())["recipe"]["bits"] == 3


# ----------------------------------------------------------------------------------------------
# 6. unreadable files: one line naming the file


def _copy_model(saved, dst):
    import shutil
    shutil.copytree(saved / "model", dst)
    return dst


def test_corrupt_safetensors(saved, capsys, tmp_path):
    m = _copy_model(saved, tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    rc, err = _cli(capsys, ["ppl", "--model", m, "--corpus", saved / "corpus.txt"])
    assert rc == 2 and str(m) in err


def test_corrupt_config_json(saved, capsys, tmp_path):
    m = _copy_model(saved, tmp_path / "m")
    (m / "config.json").write_text("{oops")
    rc, err = _cli(capsys, ["ppl", "--model", m, "--corpus", saved / "corpus.txt"])
    assert rc == 2 and str(m) in err


def test_corrupt_quantized_model(saved, capsys, tmp_path):
    out = tmp_path / "q"
    assert main([str(a) for a in _quantize_argv(saved, out=out)]) == 0
    (out / "physkern.json").write_text("{not json")
    rc, err = _cli(capsys, ["ppl", "--model", out, "--corpus", saved / "corpus.txt"])
    assert rc == 2 and "JSON" in err and str(out) in err
    out2 = tmp_path / "q2"
    assert main([str(a) for a in _quantize_argv(saved, out=out2)]) == 0
    (out2 / "model.safetensors").write_bytes(b"garbage")
    rc, err = _cli(capsys, ["ppl", "--model", out2, "--corpus", saved / "corpus.txt"])
    assert rc == 2 and "safetensors" in err and str(out2) in err


def test_corpus_not_utf8(saved, capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n\nd\xe9j\xe0 vu\n".encode("latin-1"))
    rc, err = _cli(capsys, ["ppl", "--model", saved / "model", "--corpus", bad])
    assert rc == 2 and str(bad) in err and "UTF-8" in err


def test_corpus_unreadable(saved, capsys, tmp_path):
    import os
    bad = tmp_path / "secret.txt"
    bad.write_text(TEXT)
    bad.chmod(0)
    try:
        if os.access(bad, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        rc, err = _cli(capsys, ["ppl", "--model", saved / "model", "--corpus", bad])
        assert rc == 2 and str(bad) in err
    finally:
        bad.chmod(0o644)


@pytest.mark.parametrize("command", ["ppl", "run", "steer", "prune"])
def test_output_paths_checked_before_work(saved, capsys, tmp_path, monkeypatch, command):
    import physkern.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    f = tmp_path / "plain_file"
    f.write_text("x")
    target = f / "out.json"
    m, c = saved / "model", saved / "corpus.txt"
    argv = {"ppl": ["ppl", "--model", m, "--corpus", c, "--json", target],
            "run": ["run", "--model", m, "--corpus", c, "--json", target],
            "steer": ["steer", "--model", m, "--prompt", "a", "--target", "b", "--json", target],
            "prune": ["prune", "--model", m, "--corpus", c, "--out-dir", target]}[command]
    rc, err = _cli(capsys, argv)
    assert rc == 2 and str(f) in err and "is not a directory" in err
    flag = "--out-dir" if command == "prune" else "--json"
    assert flag in err
    if command != "prune":
        rc, err = _cli(capsys, argv[:-1] + [tmp_path])  # a directory given as the JSON file
        assert rc == 2 and "--json" in err and "is a directory" in err


# ----------------------------------------------------------------------------------------------
# 8. --device


def _device_commands(saved, tmp_path):
    m, c = str(saved / "model"), str(saved / "corpus.txt")
    return {
        "ppl": ["ppl", "--model", m, "--corpus", c],
        "quantize": _quantize_argv(saved, out=tmp_path / "dq"),
        "run": ["run", "--model", m, "--corpus", c],
        "prune": ["prune", "--model", m, "--corpus", c],
        "steer": ["steer", "--model", m, "--prompt", "a", "--target", "b"],
        "generate": ["generate", "--model", m, "--prompt", "a"],
        "analyze spectra": ["analyze", "spectra", "--model", m],
        "sweep quant": ["sweep", "quant", "--model", m, "--corpus", c, "--recipes", "r.json"],
    }


@pytest.mark.parametrize("command", ["ppl", "quantize", "run", "prune", "steer", "generate",
                                     "analyze spectra", "sweep quant"])
@pytest.mark.parametrize("device,msg", [
    ("cuda", "device: cuda is not available here (torch.cuda.is_available() is False); "
             "use --device cpu"),
    ("cuda:1", "device: cuda:1 is not available here"),
    ("gpu", "device: 'gpu' is not a torch device; use cpu, cuda, cuda:N or mps"),
    ("meta", "device: 'meta' is not supported"),
])
def test_device(saved, capsys, tmp_path, monkeypatch, command, device, msg):
    import physkern.models as models
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    argv = _device_commands(saved, tmp_path)[command]
    rc, err = _cli(capsys, argv + ["--device", device])
    assert rc == 2 and msg in err, err


def test_every_device_command_covered(saved, tmp_path):
    """Every (sub)command that takes --device appears in test_device."""
    from physkern.cli import build_parser

    def leaves(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
        if not subs:
            yield prefix, parser
        for s in subs:
            for name, p in s.choices.items():
                yield from leaves(p, prefix + [name])
    with_device = {" ".join(path) for path, p in leaves(build_parser(), [])
                   if any("--device" in a.option_strings for a in p._actions)}
    covered = set(_device_commands(saved, tmp_path))
    # analyses and sweeps share one check in cli.main; one of each kind is exercised
    kinds = {c.split()[0] for c in with_device}
    assert kinds <= {c.split()[0] for c in covered}, with_device - covered


# ----------------------------------------------------------------------------------------------
# 9. ppl on a user's file scores the whole file; packaged corpora their evaluation part


def test_ppl_user_file_scored_whole(saved, capsys, tmp_path):
    out_all, out_eval = tmp_path / "all.json", tmp_path / "eval.json"
    base = ["ppl", "--model", saved / "model", "--corpus", saved / "corpus.txt", "--tokens", "0",
            "--window", "64"]
    assert main([str(a) for a in base + ["--json", out_all]]) == 0
    assert "(whole text)" in capsys.readouterr().out
    assert main([str(a) for a in base + ["--part", "evaluation", "--json", out_eval]]) == 0
    assert "(evaluation part)" in capsys.readouterr().out
    a, e = json.loads(out_all.read_text()), json.loads(out_eval.read_text())
    assert a["extra"]["part"] == "all" and e["extra"]["part"] == "evaluation"
    assert a["tokens_scored"] > 1.9 * e["tokens_scored"]


def test_ppl_packaged_corpus_default_unchanged(saved, capsys, tmp_path, monkeypatch):
    import physkern.data as data
    from physkern.data import Corpus
    packaged = Corpus("wiki", "packaged", TEXT.split("\n\n")[:100], TEXT.split("\n\n")[100:])
    assert not packaged.user_file and packaged.default_part == "evaluation"
    monkeypatch.setattr(data, "load_corpus", lambda spec=None: packaged)
    out = tmp_path / "p.json"
    assert main(["ppl", "--model", str(saved / "model"), "--tokens", "256", "--window", "64",
                 "--json", str(out)]) == 0
    assert "(evaluation part)" in capsys.readouterr().out
    assert json.loads(out.read_text())["extra"]["part"] == "evaluation"


# ----------------------------------------------------------------------------------------------
# 7. analysis outputs stay out of the committed results


def test_analysis_outputs_default_outside_results():
    from physkern.cli import build_parser
    from physkern.commands._common import ANALYSIS_OUT_DIR as DEFAULT_OUT_DIR
    assert "bench/results" not in DEFAULT_OUT_DIR
    parser = build_parser()
    for argv in (["analyze", "spectra"], ["prune"], ["steer", "--prompt", "a", "--target", "b"]):
        args = parser.parse_args(argv)
        dest = getattr(args, "out_dir", None) or getattr(args, "json", None)
        assert dest and "bench/results" not in dest, (argv, dest)


def test_truncated_gguf(saved, capsys, tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00junkjunk")
    rc, err = _cli(capsys, ["ppl", "--model", bad, "--corpus", saved / "corpus.txt"])
    assert rc == 2 and str(bad) in err and "truncated or malformed" in err


@pytest.mark.parametrize("flag,value", [("--gain", "nan"), ("--gain", "-1"), ("--tol", "inf"),
                                        ("--tol", "0"), ("--iterations", "0"),
                                        ("--max-new-tokens", "0")])
def test_steer_bad_numbers(saved, capsys, flag, value):
    rc, err = _cli(capsys, ["steer", "--model", saved / "model", "--prompt", "a", "--target", "b",
                            flag, value])
    assert rc == 2 and f"argument {flag}:" in err


@pytest.mark.parametrize("value", ["nan", "-0.1", "inf"])
def test_finetune_lr_not_finite(saved, capsys, value):
    rc, err = _cli(capsys, _quantize_argv(saved, "--finetune-steps", "2", "--finetune-lr", value))
    assert rc == 2 and "argument --finetune-lr:" in err
