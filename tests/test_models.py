"""models.py: uniform enumeration of GPT-2 Conv1D and LLaMA nn.Linear layers, ties, swaps."""
import copy

import pytest
import torch
from torch import nn

from physkern.models import (decoder_linear_layers, linear_layers, load_model, replace_layer)


def test_gpt2_enumeration(tiny_gpt2):
    layers = linear_layers(tiny_gpt2)
    names = [l.name for l in layers]
    expected = [f"transformer.h.{i}.{s}" for i in range(2)
                for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"]
    assert names == expected
    kinds = {l.name: l.kind for l in layers}
    assert kinds["lm_head"] == "linear" and kinds["transformer.h.0.attn.c_attn"] == "conv1d"
    tied = [l for l in layers if l.tied]
    assert [l.name for l in tied] == ["lm_head"] and tied[0].tied_to == "transformer.wte.weight"
    c_fc = next(l for l in layers if l.name.endswith("h.0.mlp.c_fc"))
    assert (c_fc.out_features, c_fc.in_features) == (128, 32)
    # canonical [out, in] view, no copy
    assert c_fc.weight().shape == (128, 32)
    assert c_fc.weight().data_ptr() == c_fc.module.weight.data_ptr()
    assert [l.name for l in decoder_linear_layers(tiny_gpt2)] == expected[:-1]


def test_llama_enumeration(tiny_llama):
    layers = linear_layers(tiny_llama)
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = [f"model.layers.{i}.{s}" for i in range(2) for s in per_block] + ["lm_head"]
    assert [l.name for l in layers] == expected
    assert all(l.kind == "linear" for l in layers)
    k = next(l for l in layers if l.name == "model.layers.0.self_attn.k_proj")
    assert (k.out_features, k.in_features) == (16, 32)  # GQA: 2 kv heads of 8
    assert next(l for l in layers if l.name == "lm_head").tied_to == "model.embed_tokens.weight"
    assert len(decoder_linear_layers(tiny_llama)) == 14


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_swap_round_trip_is_bit_identical(fixture, request):
    model = copy.deepcopy(request.getfixturevalue(fixture))
    x = torch.randint(0, 96, (2, 11))
    ref = model(x).logits
    for layer in decoder_linear_layers(model):
        w, b = layer.weight().detach(), layer.bias
        lin = nn.Linear(layer.in_features, layer.out_features, bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        old = replace_layer(model, layer.name, lin)
        assert old is layer.module
    out = model(x).logits
    assert torch.equal(out, ref)


def test_replace_unknown_name(tiny_llama):
    with pytest.raises(KeyError, match="no submodule"):
        replace_layer(copy.deepcopy(tiny_llama), "model.layers.9.mlp", nn.Identity())


def test_load_model_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="model"):
        load_model("no-such-org/no-such-model-physkern")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(fake))
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "nowhere"))


def test_load_saved_directory(tiny_gpt2, tmp_path):
    from transformers import GPT2TokenizerFast  # noqa: F401  (tokenizer optional)
    tiny_gpt2.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = torch.randint(0, 96, (1, 9))
    assert torch.equal(m(x).logits, tiny_gpt2(x).logits)
