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

from physkern.cli import main
from physkern.config import CodebookConfig, GPTQConfig, ScalarConfig, config_from_dict

TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox {i % 7} jumps over the lazy dog near river {i % 5}. "
    f"Numbers like {i * 37 % 101} and words such as alpha beta gamma follow."
    for i in range(200))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 (context 128) with a trained byte-level BPE tokenizer, and a corpus file."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("bad")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32,
                                       n_layer=2, n_head=2)).eval()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "corpus.txt").write_text(TEXT)
    return d


def _cli(capsys, argv):
    """Run the CLI; returns (rc, stderr) and asserts the one-line, no-traceback contract."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
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
