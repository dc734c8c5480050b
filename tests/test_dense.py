"""Dense tensors stored at 16 bits, computed in fp32 (physkern.dense) and counted at 16 bits."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import physkern
from physkern import ScalarConfig
from physkern.dense import set_dense_storage_dtype


def _quantized(model):
    m = copy.deepcopy(model)
    physkern.quantize(m, ScalarConfig(bits=4, group_size=16), progress=False)
    return m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounds_dense_tensors_and_keeps_quantized_buffers(tiny_gpt2, dtype):
    model = _quantized(tiny_gpt2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_dense_storage_dtype(model, dtype)
    assert model.config.physkern_dense_dtype == str(dtype).replace("torch.", "")
    changed = 0
    for key, t in model.state_dict().items():
        old = before[key]
        assert t.dtype == old.dtype  # computation dtype unchanged
        if key.rpartition(".")[2] in ("packed", "codebooks", "scales", "offsets"):
            assert torch.equal(t, old), key
        elif t.is_floating_point():
            assert torch.equal(t, old.to(dtype).to(old.dtype)), key
            changed += int(not torch.equal(t, old))
    assert changed > 0


def test_bits_count_dense_tensors_at_storage_width(tiny_llama):
    model = _quantized(tiny_llama)
    rep32 = physkern.bits_report(model)
    dense = {t.data_ptr(): t.numel() for k, t in model.state_dict().items()  # tied: once
             if t.is_floating_point()
             and k.rpartition(".")[2] not in ("packed", "codebooks", "scales", "offsets")}
    dense_values = sum(dense.values())
    set_dense_storage_dtype(model, "bfloat16")
    rep16 = physkern.bits_report(model)
    assert rep32.model_bits - rep16.model_bits == dense_values * 16
    assert rep16.quantized_bits == rep32.quantized_bits


def test_bad_dtype_and_overflow():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="dtype"):
        set_dense_storage_dtype(model, "int8")
    with torch.no_grad():
        model.model.norm.weight[0] = 1e6
    with pytest.raises(ValueError, match="model.norm.weight"):
        set_dense_storage_dtype(model, torch.float16)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_saved_at_16_bits_loads_identical(request, fixture, tmp_path):
    from physkern.serialization import read_safetensors_header
    model = _quantized(request.getfixturevalue(fixture))
    set_dense_storage_dtype(model, "bfloat16")
    path = physkern.save_quantized(model, tmp_path / "q")
    header = read_safetensors_header(path / "model.safetensors")
    for key, (dtype, shape) in header.items():
        if key.rpartition(".")[2] in ("packed", "codebooks", "scales", "offsets"):
            assert dtype != torch.bfloat16 or key.endswith("codebooks"), key
        else:
            assert dtype in (torch.bfloat16, torch.int64), (key, dtype)
    stored = sum(math.prod(shape) * dtype.itemsize for dtype, shape in header.values())
    rep = physkern.bits_report(model)
    assert abs(stored - rep.total_bytes) <= 0.01 * stored
    loaded, _ = physkern.load_quantized(path)
    assert loaded.config.physkern_dense_dtype == "bfloat16"
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert physkern.bits_report(loaded).total_bytes == rep.total_bytes
