"""transformers-native loading: AutoModelForCausalLM.from_pretrained on a physkern directory.

The reference is physkern's own loader (physkern.load_quantized), which builds the layers itself
from physkern.json; transformers goes through its config registry, the registered HfQuantizer and
its own safetensors loading. Both must give the same logits, bit for bit. Whether transformers
refuses without physkern is checked in subprocesses, where nothing has registered physkern yet.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import physkern
from physkern import CodebookConfig, ScalarConfig

TOKENS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 90]])


def _quantized_dir(model, tmp_path, config, name="q"):
    m = model.__class__(model.config).eval()
    m.load_state_dict(model.state_dict())
    physkern.quantize(m, config, progress=False)
    return m, physkern.save_quantized(m, tmp_path / name)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("config", [CodebookConfig(k=12, block_dim=2, scope="layer",
                                                   calibrate=False),
                                    ScalarConfig(bits=4, group_size=16)], ids=["codebook", "rtn"])
def test_from_pretrained_equals_load_quantized(request, tmp_path, fixture, config):
    from transformers import AutoModelForCausalLM
    model = request.getfixturevalue(fixture)
    _, path = _quantized_dir(model, tmp_path, config)
    ours, _ = physkern.load_quantized(path)
    theirs = AutoModelForCausalLM.from_pretrained(path).eval()
    names = {n for n, m in ours.named_modules() if isinstance(m, physkern.QuantizedLinear)}
    assert names and names == {n for n, m in theirs.named_modules()
                               if isinstance(m, physkern.QuantizedLinear)}
    for n in names:  # stored dtypes kept (codebooks fp16, packed int32), not cast to fp32
        a, b = ours.get_submodule(n), theirs.get_submodule(n)
        for buf in ("packed", "codebooks", "scales", "offsets"):
            ta, tb = getattr(a, buf), getattr(b, buf)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), (n, buf)
    assert torch.equal(_logits(ours), _logits(theirs))


def test_save_pretrained_round_trips(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    _, path = _quantized_dir(tiny_llama, tmp_path, CodebookConfig(k=12, block_dim=2,
                                                                  scope="layer", calibrate=False))
    first = AutoModelForCausalLM.from_pretrained(path).eval()
    first.save_pretrained(tmp_path / "again")
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert isinstance(second.model.layers[0].mlp.up_proj, physkern.QuantizedLinear)
    assert torch.equal(_logits(first), _logits(second))


def test_config_json_names_physkern(tiny_gpt2, tmp_path):
    _, path = _quantized_dir(tiny_gpt2, tmp_path, ScalarConfig(bits=4, group_size=16))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "physkern" and cfg["physkern_base_model_type"] == "gpt2"
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "physkern"
    meta = json.loads((path / "physkern.json").read_text())
    assert qc["quantized_layers"] == meta["quantized_layers"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_transformers_alone_refuses_and_physkern_loads(tiny_llama, tmp_path):
    _, path = _quantized_dir(tiny_llama, tmp_path, CodebookConfig(k=12, block_dim=2,
                                                                  scope="layer", calibrate=False))
    load = f"from transformers import AutoModelForCausalLM\nm = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
    alone = _run("import sys\n" + load + "print('loaded', type(m.model.layers[0].mlp.up_proj).__name__)\n"
                 "assert 'physkern' not in sys.modules")
    assert alone.returncode != 0, alone.stdout
    assert "physkern" in alone.stderr and "loaded" not in alone.stdout
    with_physkern = _run("import physkern\n" + load +
                         "print('loaded', type(m.model.layers[0].mlp.up_proj).__name__)")
    assert with_physkern.returncode == 0, with_physkern.stderr[-3000:]
    assert "loaded QuantizedLinear" in with_physkern.stdout


def test_crafted_quantization_config_is_refused(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    _, path = _quantized_dir(tiny_llama, tmp_path, CodebookConfig(k=12, block_dim=2,
                                                                  scope="layer", calibrate=False))
    cfg = json.loads((path / "config.json").read_text())
    name = "model.layers.0.mlp.up_proj"
    cfg["quantization_config"]["quantized_layers"][name]["k"] = 2 ** 27
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="up_proj"):
        AutoModelForCausalLM.from_pretrained(path)
    cfg["quantization_config"]["quantized_layers"] = {"model.layers.9.mlp.up_proj":
                                                      cfg["quantization_config"]["quantized_layers"][name]}
    cfg["quantization_config"]["quantized_layers"]["model.layers.9.mlp.up_proj"]["k"] = 12
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layers.9"):
        AutoModelForCausalLM.from_pretrained(path)
