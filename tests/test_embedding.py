"""Quantized output head and (tied) input embedding.

References are independent of the code under test: the embedding lookup is compared with
F.embedding over the fully dequantized weight; the whole model with a plain copy whose head and
embedding hold that dequantized weight as ordinary dense tensors.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import physkern
from physkern import CodebookConfig, GPTQConfig, ScalarConfig
from physkern.embedding import QuantizedEmbedding
from physkern.layers import QuantizedLinear
from physkern.quant.format import QuantizedWeight
from physkern.quant.packing import pack_indices

IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 90, 5, 5]])


def _random_qw(out=40, inf=24, k=12, d=4, rows_per_cb=None, stages=2, scales=True,
               offsets=True, seed=0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    rows_per_cb = rows_per_cb or out
    nb = inf // d
    idx = torch.randint(0, k, (stages, out, nb), generator=g)
    bits = max(1, (k - 1).bit_length())
    packed = pack_indices(idx, bits)
    cbs = torch.randn(stages, out // rows_per_cb, k, d, generator=g).half()
    sc = torch.rand(out, 3, generator=g).add(0.5).half() if scales else None
    off = torch.randn(out, 3, generator=g).half() if offsets and scales else None
    return QuantizedWeight(packed, cbs, sc, off, inf, out, rows_per_cb, inf // 3).validate()


@pytest.mark.parametrize("rows_per_cb", [1, 8, 40])
@pytest.mark.parametrize("stages,scales,offsets", [(1, False, False), (2, True, True),
                                                   (1, True, False)])
def test_dequantize_rows_equals_full_dequantize(rows_per_cb, stages, scales, offsets):
    qw = _random_qw(rows_per_cb=rows_per_cb, stages=stages, scales=scales, offsets=offsets)
    full = qw.dequantize()
    rows = torch.tensor([39, 0, 7, 7, 21, 1])
    assert torch.equal(qw.dequantize(rows=rows), full[rows])
    assert qw.dequantize(rows=torch.tensor([], dtype=torch.long)).shape == (0, 24)


@pytest.mark.parametrize("bad", [torch.tensor([40]), torch.tensor([-1]), torch.tensor([[1]]),
                                 torch.tensor([1.0])])
def test_dequantize_rows_rejects_bad_rows(bad):
    with pytest.raises(ValueError, match="rows"):
        _random_qw().dequantize(rows=bad)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_lookup_equals_dequantized_row_lookup(tied):
    qw = _random_qw(out=96, inf=24, k=12, d=4)
    source = QuantizedLinear(qw)
    emb = QuantizedEmbedding(source, tied=tied)
    ref = F.embedding(IDS, qw.dequantize())
    assert torch.equal(emb(IDS), ref)
    # the tied embedding owns nothing: the head's tensors are stored once
    assert (list(emb.state_dict()) == []) == tied


def test_head_equals_codebook_matmul_reference():
    qw = _random_qw(out=96, inf=24, k=12, d=4)
    head = QuantizedLinear(qw)
    x = torch.randn(3, 5, 24)
    ref = x.double() @ qw.dequantize(torch.float64).t()
    torch.testing.assert_close(head(x).double(), ref, rtol=1e-5, atol=1e-5)


def _dense_reference(original, quantized):
    """`original` with its head/embedding weight replaced by the quantized model's dequantized
    weight, and every quantized decoder layer by its dequantized dense weight."""
    ref = copy.deepcopy(original)
    qhead = quantized.get_output_embeddings()
    w = qhead.dequantize(torch.float32)
    with torch.no_grad():
        ref.get_output_embeddings().weight.copy_(w)       # tied: also the embedding
        if not original.get_output_embeddings().weight is original.get_input_embeddings().weight:
            ref.get_input_embeddings().weight.copy_(
                quantized.get_input_embeddings().weight_source.dequantize(torch.float32))
        for name, m in quantized.named_modules():
            if isinstance(m, QuantizedLinear) and m is not qhead and "table" not in name:
                tgt = ref.get_submodule(name)
                dense = m.dequantize(torch.float32)
                tgt.weight.copy_(dense.t() if m.kind == "conv1d" else dense)
    return ref


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("head_cfg", [CodebookConfig(k=12, block_dim=4, scope="layer",
                                                     calibrate=False),
                                      ScalarConfig(bits=4, group_size=16)], ids=["cb", "rtn"])
def test_quantized_head_model_equals_dense_reference(request, fixture, head_cfg):
    original = request.getfixturevalue(fixture)
    model = copy.deepcopy(original)
    physkern.quantize(model, ScalarConfig(bits=4, group_size=16), embedding=head_cfg,
                      progress=False)
    assert isinstance(model.get_output_embeddings(), QuantizedLinear)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert model.get_input_embeddings().tied
    ref = _dense_reference(original, model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)


def test_calibrated_head_with_error_feedback(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    calib = torch.randint(0, 96, (4, 16))
    rep = physkern.quantize(model, CodebookConfig(k=12, block_dim=2, scope="layer",
                                                  error_feedback=True),
                            calibration=calib, embedding=GPTQConfig(bits=3, group_size=16),
                            progress=False)
    names = [r.name for r in rep.layers]
    assert names[-1] == "lm_head" and rep.layers[-1].relative_output_error is not None
    ref = _dense_reference(tiny_llama, model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)


def test_untied_model_quantizes_both(tiny_llama):
    from transformers import LlamaForCausalLM
    cfg = copy.deepcopy(tiny_llama.config)
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    original = LlamaForCausalLM(cfg).eval()
    assert original.get_output_embeddings().weight is not original.get_input_embeddings().weight
    model = copy.deepcopy(original)
    physkern.quantize(model, ScalarConfig(bits=4, group_size=16),
                      embedding=ScalarConfig(bits=4, group_size=16), progress=False)
    emb = model.get_input_embeddings()
    assert not emb.tied and emb.weight_source is not model.get_output_embeddings()
    ref = _dense_reference(original, model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)


def test_tied_weight_counted_and_stored_once(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    physkern.quantize(model, ScalarConfig(bits=4, group_size=16),
                      embedding=ScalarConfig(bits=4, group_size=16), progress=False)
    rep = physkern.bits_report(model)
    head = model.get_output_embeddings()
    assert "lm_head" in rep.layers
    assert not any("embed_tokens" in k for k in model.state_dict())
    # bits: the vocab x hidden weight once, at the head's stored size
    assert rep.layers["lm_head"]["weights"] == 96 * 32
    path = physkern.save_quantized(model, tmp_path / "q")
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        assert not any("embed_tokens" in k for k in f.keys())
    assert abs(stored - rep.total_bytes) <= 0.01 * stored
    loaded, _ = physkern.load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.get_input_embeddings().weight_source is loaded.get_output_embeddings()
    del head


def test_finetuning_trains_the_tied_tensor_in_both_roles(tiny_llama):
    from physkern.finetune import differentiable_quantized, finetune_quantized
    model = copy.deepcopy(tiny_llama)
    physkern.quantize(model, ScalarConfig(bits=4, group_size=16),
                      embedding=CodebookConfig(k=12, block_dim=4, scope="layer", calibrate=False),
                      progress=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with differentiable_quantized(model) as t:
        (copy_,) = [layer for layer in t.layers if layer.mod is head]
        out = emb(IDS)
        assert out.requires_grad  # the lookup goes through the trainable copy
        torch.testing.assert_close(out, F.embedding(IDS, copy_.weight()))
        out.sum().backward()
        assert copy_.codebooks.grad is not None and copy_.codebooks.grad.abs().sum() > 0
    assert not emb(IDS).requires_grad  # restored
    windows = torch.randint(0, 96, (4, 16))
    finetune_quantized(model, tiny_llama, windows, steps=3, lr=1e-2, holdout=1)
    torch.testing.assert_close(emb(IDS), F.embedding(IDS, head.dequantize(torch.float32)))
