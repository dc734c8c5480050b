"""load_quantized builds the model on the meta device and reads only the stored tensors; models
are saved in one file or in Hugging Face shards (model.safetensors.index.json) and load the same
either way, through physkern and through transformers (issue 18 item 4, issue 16 item 3).

The memory probe runs in a fresh interpreter: the peak resident memory (ru_maxrss) that
load_quantized adds stays far below the fp32 model it would have built first before, while
building that fp32 model in the same process does add its size (the probe can fail)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import physkern
from physkern.checkpoint import INDEX_FILE, parse_size, plan_shards
from physkern.config import CodebookConfig, ScalarConfig
from physkern.serialization import MARKER, load_quantized, save_quantized

X = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 90]])


def _quantized(model):
    m = model.__class__(model.config).eval()
    m.load_state_dict(model.state_dict())
    physkern.quantize(m, CodebookConfig(k=12, block_dim=2, scope="layer", calibrate=False),
                      progress=False)
    return m


def _logits(m):
    with torch.no_grad():
        return m(X).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_sharded_save_loads_like_one_file(request, tmp_path, fixture):
    from transformers import AutoModelForCausalLM
    q = _quantized(request.getfixturevalue(fixture))
    one = save_quantized(q, tmp_path / "one")
    many = save_quantized(q, tmp_path / "many", max_shard_size=4000)
    shards = sorted(p.name for p in many.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (many / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((many / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(json.loads((many / MARKER).read_text())["files"]) >= {*shards, INDEX_FILE}
    ref = _logits(load_quantized(one)[0])
    assert torch.equal(_logits(q), ref)
    assert torch.equal(_logits(load_quantized(many)[0]), ref)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(many).eval()), ref)
    # re-saved as one file over the sharded model: the shards (listed as its own) go
    save_quantized(q, many, overwrite=True)
    assert not list(many.glob("model-*.safetensors")) and not (many / INDEX_FILE).exists()
    assert torch.equal(_logits(load_quantized(many)[0]), ref)


def test_tied_tensors_stay_one_parameter(tiny_gpt2, tmp_path):
    q = _quantized(tiny_gpt2)
    m, _ = load_quantized(save_quantized(q, tmp_path / "q"))
    assert m.lm_head.weight is m.transformer.wte.weight
    assert not [k for k, t in m.state_dict(keep_vars=True).items() if t.is_meta]


@pytest.fixture
def sharded(tiny_llama, tmp_path):
    return save_quantized(_quantized(tiny_llama), tmp_path / "s", max_shard_size=4000)


def _edit_index(d, fn):
    index = json.loads((d / INDEX_FILE).read_text())
    fn(index["weight_map"])
    (d / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("bad,says", [("../x.safetensors", "not a plain"),
                                      ("/etc/passwd", "not a plain"),
                                      ("model-99999-of-99999.safetensors", "is missing")])
def test_crafted_index_rejected(sharded, bad, says):
    key = "model.norm.weight"
    _edit_index(sharded, lambda wm: wm.__setitem__(key, bad))
    with pytest.raises(ValueError, match=says) as exc:
        load_quantized(sharded)
    assert INDEX_FILE in str(exc.value) and "\n" not in str(exc.value)


def test_index_disagreeing_with_shards_rejected(sharded):
    wm = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    shards = sorted(set(wm.values()))
    key = next(k for k, v in wm.items() if v == shards[0])
    _edit_index(sharded, lambda m: m.__setitem__(key, shards[1]))
    with pytest.raises(ValueError, match="maps to|not in the shards"):
        load_quantized(sharded)
    _edit_index(sharded, lambda m: m.__setitem__("model.ghost.weight", shards[1]))
    with pytest.raises(ValueError):
        load_quantized(sharded)


def test_shard_planning_and_sizes():
    assert plan_shards([("a", 5), ("b", 5), ("c", 5)], 10) == [["a", "b"], ["c"]]
    assert plan_shards([("a", 50), ("b", 5)], 10) == [["a"], ["b"]]
    assert plan_shards([("a", 5)], None) == [["a"]]
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30
    assert parse_size(123) == 123
    for bad in ("lots", 0, -5, "1.5XB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


PROBE = textwrap.dedent("""
    import gc, json, sys, threading, time
    from pathlib import Path
    import psutil, torch
    import physkern
    from transformers import AutoConfig, AutoModelForCausalLM
    d = Path(sys.argv[1])
    proc = psutil.Process()

    def added(fn):
        \"\"\"Peak RSS above the RSS before fn(), sampled every millisecond while it runs.\"\"\"
        gc.collect()
        start, peak, stop = proc.memory_info().rss, [0], threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)
        t = threading.Thread(target=sample)
        t.start()
        try:
            out = fn()
        finally:
            stop.set()
            t.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        return out, peak[0] - start

    # warm up on a tiny model of the same kind: imports and first-call caches are not the load
    physkern.load_quantized(sys.argv[2])[0](torch.tensor([[1, 2]]))
    AutoModelForCausalLM.from_pretrained(sys.argv[2])
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[2]))
    # every model stays alive, so no measurement reuses memory another one freed
    a, ours = added(lambda: physkern.load_quantized(d)[0])
    b, theirs = added(lambda: AutoModelForCausalLM.from_pretrained(d))
    cfg = AutoConfig.from_pretrained(d / "fp32")
    c, fp32 = added(lambda: AutoModelForCausalLM.from_config(cfg))  # what loading built first
    print(json.dumps({"physkern": ours, "transformers": theirs, "fp32_build": fp32}))
""")


@pytest.fixture(scope="module")
def big_saved(tmp_path_factory):
    """A LLaMA of ~21M parameters (85 MB in fp32), RTN 4-bit: a ~13 MB file; and a tiny one of
    the same kind (the probe's warm-up)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    out = []
    for hidden, inter, layers, vocab in ((512, 1536, 6, 1024), (32, 64, 1, 96)):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=64,
                          tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg).eval()
        fp32_bytes = sum(p.numel() for p in m.parameters()) * 4
        physkern.quantize(m, ScalarConfig(bits=4, group_size=32), progress=False)
        d = save_quantized(m, tmp_path_factory.mktemp("big") / "q")
        cfg.save_pretrained(d / "fp32")  # the plain config, for the probe's fp32 build
        out += [d, fp32_bytes]
    return out[0], out[1], out[2]


def test_meta_loading_allocates_no_fp32_copy(big_saved):
    d, fp32_bytes, tiny = big_saved
    file_bytes = os.path.getsize(d / "model.safetensors")
    assert file_bytes < fp32_bytes / 5
    r = subprocess.run([sys.executable, "-c", PROBE, str(d), str(tiny)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # the probe sees a real fp32 build (so it would have seen the old loader's) ...
    assert m["fp32_build"] > 0.8 * fp32_bytes, m
    # ... and loading (physkern's, and transformers' through the HfQuantizer) adds about the
    # file (the tensors, plus file pages while they are read), not the fp32 model
    for who in ("physkern", "transformers"):
        assert m[who] < 0.5 * fp32_bytes, (who, m, file_bytes, fp32_bytes)
    print(m, file_bytes, fp32_bytes)
