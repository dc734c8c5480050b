"""QuantizedLinear, quantize(), accounting and save/load on tiny GPT-2 and LLaMA models."""
import copy
import os

import pytest
import torch
from torch import nn

from physkern.api import quantize
from physkern.config import CodebookConfig, GPTQConfig, ScalarConfig
from physkern.layers import QuantizedLinear
from physkern.models import decoder_linear_layers, linear_layers, replace_layer
from physkern.quant.accounting import bits_report, layer_bits
from physkern.quant.codebook import quantize_codebook
from physkern.serialization import load_quantized, save_quantized

CALIB = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
CONFIGS = [CodebookConfig(k=4, block_dim=4, scope="row", calibrate=False),
           CodebookConfig(k=8, block_dim=2, scope="group", group_size=16),
           CodebookConfig(k=16, block_dim=4, scope="layer", error_feedback=True, stages=2,
                          refine_steps=3),
           ScalarConfig(bits=3, group_size=16), GPTQConfig(bits=4, group_size=16)]


def dense_copy(model):
    """The same model with every QuantizedLinear replaced by an nn.Linear holding dequantize()."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantizedLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            replace_layer(m, name, lin)
    return m


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method + str(getattr(c, "scope", "")))
def test_quantized_model_equals_dense_dequantized(fixture, cfg, request):
    model = copy.deepcopy(request.getfixturevalue(fixture))
    rep = quantize(model, cfg, calibration=CALIB, progress=False)
    assert len(rep.layers) == len(decoder_linear_layers(request.getfixturevalue(fixture)))
    assert all(isinstance(l.module, QuantizedLinear) for l in linear_layers(model) if not l.tied)
    ref = dense_copy(model)(X).logits
    assert torch.allclose(model(X).logits, ref, atol=1e-4, rtol=1e-4)


def test_layer_matches_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nx=16 inputs, nf=24 outputs, weight [16, 24]
    w = conv.weight.detach().t()
    qw = quantize_codebook(w, 4, 4, "row", codebook_dtype="float32")  # exact: 4 blocks per row
    q = QuantizedLinear(qw, conv.bias, kind="conv1d")
    x = torch.randn(3, 5, 16)
    assert torch.allclose(q(x), conv(x), atol=1e-5)
    assert q(x).shape == (3, 5, 24)
    assert "k=4" in repr(q) and "replaces=conv1d" in repr(q)
    with pytest.raises(ValueError, match="kind"):
        QuantizedLinear(qw, None, kind="conv2d")


def test_bits_report_equals_hand_count():
    torch.manual_seed(0)
    lin = nn.Linear(32, 12, bias=True)
    qw = quantize_codebook(lin.weight.detach(), k=8, block_dim=4, scope="group", group_size=4,
                           scales="row")
    layer = QuantizedLinear(qw, lin.bias)
    # indices: 8 blocks x 3 bits = 24 bits -> 1 int32 word per row; 12 rows
    # codebooks: 3 codebooks x 8 entries x 4 dims x fp16; scales: 12 x fp16
    hand = 12 * 32 + 3 * 8 * 4 * 16 + 12 * 16
    b = layer_bits(layer)
    assert b["total_bits"] == hand
    assert b["bits_per_weight"] == pytest.approx(hand / (12 * 32))
    assert b["seeds_formula_bits_per_weight"] == pytest.approx(3 / 4)
    model = nn.Sequential(nn.Embedding(10, 32), layer)
    rep = bits_report(model)
    assert rep.quantized_bits == hand
    assert rep.model_bits == hand + 12 * 32 + 10 * 32 * 32  # + fp32 bias + fp32 embedding
    assert rep.model_parameters == 10 * 32 + 12 * 32 + 12


def test_fp_model_report_counts_ties_once(tiny_llama):
    rep = bits_report(tiny_llama)
    n = sum(p.numel() for p in tiny_llama.parameters())  # parameters() dedups tied weights
    assert rep.model_parameters == n and rep.model_bits == 32 * n
    assert rep.model_bits_per_weight == 32.0


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_save_load_round_trip_bit_identical(fixture, request, tmp_path):
    model = copy.deepcopy(request.getfixturevalue(fixture))
    quantize(model, CodebookConfig(k=8, block_dim=2, scope="layer"), calibration=CALIB,
             progress=False)
    out = tmp_path / "q"
    save_quantized(model, out)
    loaded, tok = load_quantized(out)
    assert tok is None
    assert torch.equal(loaded(X).logits, model(X).logits)
    # accounting agrees with the tensor bytes on disk within 1% (the safetensors JSON header,
    # a few KB, is counted apart: on a 135M model it is far below 1% of the file)
    with open(out / "model.safetensors", "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    disk = os.path.getsize(out / "model.safetensors") - 8 - header
    assert abs(disk - bits_report(model).total_bytes) / disk < 0.01
    # saving again over a physkern model needs overwrite=True and replaces it atomically
    with pytest.raises(ValueError, match="overwrite"):
        save_quantized(model, out)
    save_quantized(model, out, overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_load_bad_paths(tiny_gpt2, tmp_path):
    other = tmp_path / "notmodel"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a physkern model"):
        save_quantized(copy.deepcopy(tiny_gpt2), other)
    assert (other / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="not a physkern quantized model"):
        load_quantized(other)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing")


def test_quantize_bad_inputs(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    with pytest.raises(ValueError, match="match no decoder linear layer"):
        quantize(m, CodebookConfig(k=4, layers=["nothing.*"]), progress=False)
    with pytest.raises(ValueError, match="calibration"):
        quantize(m, CodebookConfig(k=4, block_dim=4), progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        quantize(m, CodebookConfig(k=100, block_dim=4, calibrate=False), progress=False)


def test_overrides_and_patterns(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    cfg = CodebookConfig(k=4, block_dim=4, calibrate=False, layers=["*.mlp.*"],
                         overrides={"*.down_proj": ScalarConfig(bits=4)})
    rep = quantize(m, cfg, progress=False)
    methods = {r.name: r.method for r in rep.layers}
    assert len(methods) == 6
    assert methods["model.layers.0.mlp.down_proj"] == "rtn"
    assert methods["model.layers.0.mlp.up_proj"] == "codebook"
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
