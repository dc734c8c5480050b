"""Streaming quantization (physkern.streaming, issue 18 items 1-2): a checkpoint read one block
at a time gives the file the in-memory path gives (physkern.quantize + save_quantized), byte for
byte, on CPU: the same indices, codebooks and scales; resumed after a kill in the middle, the
same file again."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import physkern
from physkern.config import CodebookConfig, GPTQConfig, ScalarConfig
from physkern.dense import set_dense_storage_dtype
from physkern.serialization import save_quantized
from physkern.streaming import quantize_streaming, state_dir_for

CALIB = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
CB = CodebookConfig(k=12, block_dim=2, scope="layer", iters=3)  # calibrated, error feedback


def _llama(tied: bool = True, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied)).eval()


def _in_memory(model, out, config, embedding=None, dense_dtype=None):
    m = copy.deepcopy(model)
    physkern.quantize(m, config, calibration=CALIB, progress=False, embedding=embedding)
    if dense_dtype is not None:
        set_dense_storage_dtype(m, dense_dtype)
    return save_quantized(m, out)


def _same_files(a, b):
    """Same tensors (every quantized buffer compared by name) and the same bytes."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert any(k.endswith(".packed") for k in ta) and any(k.endswith(".codebooks") for k in ta)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    ma, mb = (json.loads((d / "physkern.json").read_text()) for d in (a, b))
    for key in ("quantized_layers", "quantized_embeddings", "bits", "dense_dtype"):
        assert ma[key] == mb[key], key


CASES = {
    "llama-tied-ef-head-bf16dense": (lambda: _llama(True), CB,
                                     CodebookConfig(k=16, block_dim=2, scope="layer", iters=3),
                                     "bfloat16"),
    "llama-untied-gptq-rtnhead": (lambda: _llama(False), GPTQConfig(bits=4, group_size=16),
                                  ScalarConfig(bits=4, group_size=16), None),
    "gpt2-rows-gptqhead-fp16dense": ("tiny_gpt2", CodebookConfig(k=12, block_dim=2, scope="row",
                                                                 iters=3),
                                     GPTQConfig(bits=4, group_size=16), "float16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_in_memory(request, tmp_path, case):
    make, config, embedding, dense = CASES[case]
    model = request.getfixturevalue(make) if isinstance(make, str) else make()
    model.save_pretrained(tmp_path / "src")
    ref = _in_memory(model, tmp_path / "mem", config, embedding, dense)
    r = quantize_streaming(tmp_path / "src", tmp_path / "str", config, CALIB,
                           embedding=embedding, dense_dtype=dense, progress=False)
    _same_files(ref, tmp_path / "str")
    assert r.blocks == len(r.block_seconds) and r.blocks_resumed == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # state gone


def test_sharded_source_disk_activations_sharded_output(tmp_path):
    model = _llama(True)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) > 2
    ref = _in_memory(model, tmp_path / "mem", CB)
    quantize_streaming(tmp_path / "src", tmp_path / "str", CB, CALIB, activations="disk",
                       progress=False)
    _same_files(ref, tmp_path / "str")
    quantize_streaming(tmp_path / "src", tmp_path / "shards", CB, CALIB, progress=False,
                       max_shard_size=5000)
    assert len(list((tmp_path / "shards").glob("model-*.safetensors"))) > 2
    x = CALIB[:1]
    assert torch.equal(physkern.load_quantized(tmp_path / "shards")[0](x).logits,
                       physkern.load_quantized(ref)[0](x).logits)


KILL = textwrap.dedent("""
    import os, sys, torch
    import physkern.streaming as s
    from physkern.config import CodebookConfig
    src, out = sys.argv[1], sys.argv[2]
    calib = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    real, calls = s._quantize_one, []
    def killed(*a, **kw):  # killed inside block 1, after two of its layers
        calls.append(1)
        if len(calls) == 7 + 2:
            os._exit(9)
        return real(*a, **kw)
    s._quantize_one = killed
    s.quantize_streaming(src, out, CodebookConfig(k=12, block_dim=2, scope="layer", iters=3),
                         calib, progress=False)
""")


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    model = _llama(True)
    model.save_pretrained(tmp_path / "src")
    ref = _in_memory(model, tmp_path / "mem", CB)
    r = subprocess.run([sys.executable, "-c", KILL, str(tmp_path / "src"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 9, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    [state] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.stream-")]
    assert (state / "block-00000.safetensors").is_file()
    assert not (state / "block-00001.safetensors").exists()
    rep = quantize_streaming(tmp_path / "src", tmp_path / "out", CB, CALIB, progress=False)
    assert rep.blocks_resumed == 1 and len(rep.block_seconds) == 2
    _same_files(ref, tmp_path / "out")
    assert not state.exists()


def test_stop_and_resume_in_process_and_fresh(tmp_path):
    model = _llama(True, layers=2)
    model.save_pretrained(tmp_path / "src")
    ref = _in_memory(model, tmp_path / "mem", CB)
    assert quantize_streaming(tmp_path / "src", tmp_path / "out", CB, CALIB, progress=False,
                              stop_after=1) is None
    state = [p for p in tmp_path.iterdir() if p.name.startswith(".out.stream-")]
    assert len(state) == 1
    # resume=False drops the state of the stopped run and starts afresh
    rep = quantize_streaming(tmp_path / "src", tmp_path / "out", CB, CALIB, progress=False,
                             resume=False)
    assert rep.blocks_resumed == 0
    _same_files(ref, tmp_path / "out")


def test_bad_inputs(tmp_path):
    model = _llama(True, layers=1)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16, fp16"):
        quantize_streaming(tmp_path / "src", tmp_path / "o", CB, CALIB, dtype="int8")
    with pytest.raises(ValueError, match="activations must be one of memory, disk"):
        quantize_streaming(tmp_path / "src", tmp_path / "o", CB, CALIB, activations="gpu")
    with pytest.raises(FileNotFoundError, match="source"):
        quantize_streaming(tmp_path / "nothing", tmp_path / "o", CB, CALIB)
    with pytest.raises(ValueError, match="calibration"):
        quantize_streaming(tmp_path / "src", tmp_path / "o", CB, None)
    (tmp_path / "src" / "model.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(ValueError, match="model.safetensors"):
        quantize_streaming(tmp_path / "src", tmp_path / "o", CB, CALIB)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.stream-*"))


def _cli(saved_tiny, out, *extra):
    from physkern.cli import main
    return main(["quantize", "--model", str(saved_tiny / "model"), "--corpus",
                 str(saved_tiny / "corpus.txt"), "--k", "16", "--block-dim", "4", "--scope",
                 "layer", "--iters", "3", "--calib-windows", "3", "--calib-window", "32",
                 "--embedding", "rtn:bits=4,group_size=16", "--out", str(out), *extra])


@pytest.mark.parametrize("dtype", ["bf16"])  # fp32: the API tests above
def test_cli_streams_by_default_same_file_as_in_memory(saved_tiny, capsys, dtype):
    s, m = saved_tiny / f"s_{dtype}", saved_tiny / f"m_{dtype}"
    assert _cli(saved_tiny, s, "--dtype", dtype) == 0
    assert "streamed 2 blocks (0 resumed)" in capsys.readouterr().out
    assert _cli(saved_tiny, m, "--dtype", dtype, "--in-memory") == 0
    assert "streamed" not in capsys.readouterr().out
    _same_files(m, s)
    a, b = (json.loads((d / "physkern.json").read_text()) for d in (s, m))
    for key in ("recipe", "whole_recipe", "calibration", "quantized_layers", "bits"):
        assert a[key] == b[key], key
    if dtype == "bf16":  # 16-bit loading: biases and norms stored as loaded
        t = load_file(str(s / "model.safetensors"))
        assert t["transformer.h.0.ln_1.weight"].dtype == torch.bfloat16


def test_cli_bad_memory_flags(saved_tiny, capsys):
    assert _cli(saved_tiny, saved_tiny / "bad", "--dtype", "int4") == 2
    assert "--dtype: invalid choice" in capsys.readouterr().err
    assert _cli(saved_tiny, saved_tiny / "bad", "--max-shard-size", "huge") == 2
    assert "max_shard_size" in capsys.readouterr().err
    assert not (saved_tiny / "bad").exists()


def test_finetune_takes_the_in_memory_path_and_says_its_memory(tmp_path):
    from types import SimpleNamespace

    from physkern.commands.quantize import finetune_memory_note, stream_source
    from physkern.recipe import Recipe
    _llama(True, layers=1).save_pretrained(tmp_path / "src")
    args = SimpleNamespace(model=str(tmp_path / "src"), in_memory=False, dtype="bf16")
    assert stream_source(args, Recipe(config=CB)) == tmp_path / "src"
    assert stream_source(args, Recipe(config=CB, finetune={"steps": 2})) is None
    note = finetune_memory_note(args)
    n = sum(p.numel() for p in _llama(True, layers=1).parameters())
    assert "does not stream" in note and "model twice" in note and "bf16" in note
    assert f"{2 * n * 2 / 2**30:.2f} GiB" in note


def test_shared_codebook_recipes_take_the_in_memory_path(tmp_path, saved_tiny, capsys):
    """Shared codebooks are fitted over all of a group's layers at once: physkern quantize
    quantizes them in memory (with a note) instead of refusing to stream."""
    from types import SimpleNamespace

    from physkern.commands.quantize import stream_source, uses_shared_codebooks
    from physkern.recipe import Recipe
    shared = {"method": "codebook", "k": 16, "block_dim": 4, "scope": "shared", "share": "type"}
    in_override = {**CB.to_dict(), "overrides": {"*.mlp.*": shared}}
    _llama(True, layers=1).save_pretrained(tmp_path / "src")
    args = SimpleNamespace(model=str(tmp_path / "src"), in_memory=False, dtype="bf16")
    assert not uses_shared_codebooks(Recipe(config=CB))
    assert uses_shared_codebooks(Recipe(config=shared))
    assert uses_shared_codebooks(Recipe(config=in_override))
    assert stream_source(args, Recipe(config=shared)) is None
    assert stream_source(args, Recipe(config=in_override)) is None
    out = tmp_path / "q"
    from physkern.cli import main
    assert main(["quantize", "--model", str(saved_tiny / "model"), "--corpus",
                 str(saved_tiny / "corpus.txt"), "--k", "16", "--block-dim", "4", "--scope",
                 "shared", "--share", "type", "--iters", "3", "--calib-windows", "3",
                 "--calib-window", "32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "shared codebooks" in err and "in memory" in err
    assert json.loads((out / "physkern.json").read_text())["format_version"] == 3
    # --outliers and --rotation reach the config (outliers stream like any per-layer option)
    assert _cli(saved_tiny, tmp_path / "o", "--outliers", "0.1", "--rotation", "hadamard") == 0
    meta = json.loads((tmp_path / "o" / "physkern.json").read_text())
    lm = meta["quantized_layers"]["transformer.h.0.attn.c_attn"]
    assert meta["format_version"] == 4 and lm["outliers"]["per_row"] == 3   # round(0.1 * 32)
    assert lm["recipe"]["rotation"] == "hadamard" and lm["recipe"]["outliers"] == 0.1
