"""save_quantized / load_quantized against crafted directories and interrupted saves (issue 15,
items 4-5).

Loading: every crafted directory (index >= K, inflated or non-positive sizes, dtype or shape
mismatch, missing or unexpected tensor, truncated safetensors, garbage JSON, unknown version)
fails with a ValueError naming the file (and the layer), before anything large is allocated.
Saving: never deletes what it did not write, keeps the directory's mode, refuses to replace a
model without overwrite=True, and a save killed midway leaves the previous model loadable.
"""
import copy
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from _crafted import edit_meta, fresh_copy, guard_allocations, load_fails

from physkern.api import quantize
from physkern.config import CodebookConfig
from physkern.layers import QuantizedLinear
from physkern.quant.packing import index_bits, pack_indices, unpack_indices
from physkern.serialization import (MARKER, load_quantized, save_quantized,
                                    validate_output_dir)

K = 5  # not a power of two: 3-bit indices can hold 5, 6, 7, which are out of range
CALIB = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
X1 = X[:1, :5]  # a few rows: the C++ decode path (M <= 32)
LAYER = "transformer.h.0.attn.c_attn"  # a quantized GPT-2 layer
ST = "model.safetensors"
GEN = "generation_config.json"  # written for models that generate (GPT-2, LLaMA)


def _quantized(model, k=K, block_dim=2):
    m = copy.deepcopy(model)
    quantize(m, CodebookConfig(k=k, block_dim=block_dim, scope="layer", iters=3),
             calibration=CALIB, progress=False)
    return m


def _tokenizer():
    """A word-level tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(95)}
    vocab["[UNK]"] = 95
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


@pytest.fixture(scope="module")
def q_gpt2(tiny_gpt2):
    return _quantized(tiny_gpt2)


@pytest.fixture(scope="module")
def saved(q_gpt2, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "q"
    save_quantized(q_gpt2, d)
    return d


@pytest.fixture
def crafted(saved, tmp_path):
    """A fresh copy of the saved model to tamper with."""
    return fresh_copy(saved, tmp_path)


def _edit_meta(d, fn):
    edit_meta(d, fn)


def _edit_tensors(d, fn):
    from safetensors import safe_open
    with safe_open(str(d / ST), "pt") as f:
        md = f.metadata()
    sd = {k: v.clone() for k, v in load_file(str(d / ST)).items()}
    fn(sd)
    save_file(sd, str(d / ST), metadata=md)




# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("fixture,k", [("tiny_gpt2", 5), ("tiny_llama", 12)])
def test_round_trip_logits_identical(fixture, k, request, tmp_path):
    model = _quantized(request.getfixturevalue(fixture), k=k)
    out = save_quantized(model, tmp_path / "q", tokenizer=_tokenizer())
    loaded, tok = load_quantized(out)
    assert tok is not None and tok("t1 t2")["input_ids"] == [1, 2]
    assert torch.equal(loaded(X).logits, model(X).logits)
    assert torch.equal(loaded(X1).logits, model(X1).logits)
    meta = json.loads((out / MARKER).read_text())
    assert set(meta["files"]) == {"config.json", GEN, ST, "tokenizer.json", "tokenizer_config.json"}


# ---- crafted directories -------------------------------------------------------------------

def test_index_out_of_range_rejected(crafted, q_gpt2):
    layer = q_gpt2.get_submodule(LAYER)
    bits, nb = index_bits(K), layer.in_features // layer.codebooks.shape[3]
    assert (1 << bits) > K  # 5..7 are representable

    def poison(sd):
        idx = unpack_indices(sd[f"{LAYER}.packed"], bits, nb)
        idx[0, 7, 3] = 7
        sd[f"{LAYER}.packed"] = pack_indices(idx, bits)
    _edit_tensors(crafted, poison)
    msg = load_fails(crafted, ST, f"layer {LAYER}", "index 7", "row 7", "block 3", "k = 5")
    assert "stage 0" in msg


def test_index_equal_to_k_rejected_even_for_k1(tiny_gpt2, tmp_path):
    """K = 1 stores 1-bit indices: index 1 is representable and out of range."""
    d = save_quantized(_quantized(tiny_gpt2, k=1), tmp_path / "k1")
    assert load_quantized(d)[0] is not None

    def poison(sd):
        p = sd[f"{LAYER}.packed"]
        p[0, 0, 0] = 1
    _edit_tensors(d, poison)
    load_fails(d, ST, f"layer {LAYER}", "index 1", "k = 1")


@pytest.mark.parametrize("field,value", [("k", 2**27), ("stages", 2**20),
                                         ("out_features", 2**27)])
def test_inflated_sizes_fail_fast_without_allocating(crafted, monkeypatch, field, value):
    layers = [LAYER, "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]

    def inflate(meta):
        for name in layers:
            meta["quantized_layers"][name][field] = value
            if field == "out_features":
                meta["quantized_layers"][name]["codebook_rows"] = value
    _edit_meta(crafted, inflate)
    guard_allocations(monkeypatch)
    t0 = time.perf_counter()
    msg = load_fails(crafted, MARKER if field != "stages" else ST, f"layer {LAYER}", field
                      if field != "stages" else "packed")
    assert time.perf_counter() - t0 < 30, msg


def test_inflated_stages_message(crafted):
    _edit_meta(crafted, lambda m: m["quantized_layers"][LAYER].update(stages=2**20))
    msg = load_fails(crafted, ST, f"layer {LAYER}", "packed has shape [1, 96, 2]",
                      f"{MARKER} implies [1048576, 96, 2]")
    assert msg.index("packed") < msg.index("implies")


@pytest.mark.parametrize("field,value,says", [
    ("in_features", -32, "in_features must be a positive integer"),
    ("out_features", 0, "out_features must be a positive integer"),
    ("block_dim", 0, "block_dim must be a positive integer"),
    ("k", 0, "k must be a positive integer"),
    ("k", 65537, "k must be in [1, 65536]"),
    ("stages", 1.0, "stages must be a positive integer"),
    ("scale_group", True, "scale_group must be a positive integer"),
    ("codebook_rows", 7, "codebook_rows (7) must divide out_features (96)"),
    ("block_dim", 3, "block_dim (3) must divide in_features (32)"),
    ("kind", "conv2d", "kind must be 'linear' or 'conv1d'"),
    ("codebook_dtype", "int8", "codebook_dtype must be one of"),
    ("codebook_dtype", None, "codebook_dtype must be one of"),
    ("scales_dtype", "complex64", "scales_dtype must be one of"),
])
def test_bad_layer_metadata(crafted, field, value, says):
    _edit_meta(crafted, lambda m: m["quantized_layers"][LAYER].update({field: value}))
    load_fails(crafted, MARKER, f"layer {LAYER}", says)


def test_layer_meta_must_match_the_model(crafted):
    _edit_meta(crafted, lambda m: m["quantized_layers"][LAYER].update(kind="linear"))
    load_fails(crafted, MARKER, f"layer {LAYER}", "do not match the model's conv1d")
    _edit_meta(crafted, lambda m: m["quantized_layers"].update(
        {"transformer.h.9.nothing": m["quantized_layers"][LAYER]},
        **{LAYER: {**m["quantized_layers"][LAYER], "kind": "conv1d"}}))
    load_fails(crafted, MARKER, "layer transformer.h.9.nothing", "no linear layer")


def test_dtype_mismatch(crafted):
    _edit_tensors(crafted, lambda sd: sd.update(
        {f"{LAYER}.codebooks": sd[f"{LAYER}.codebooks"].float()}))
    load_fails(crafted, ST, f"layer {LAYER}", "codebooks has dtype F32",
                f"{MARKER} implies float16")


def test_packed_dtype_mismatch(crafted):
    _edit_tensors(crafted, lambda sd: sd.update(
        {f"{LAYER}.packed": sd[f"{LAYER}.packed"].to(torch.int64)}))
    load_fails(crafted, ST, f"layer {LAYER}", "packed has dtype I64", "implies int32")


def test_shape_mismatch(crafted):
    _edit_tensors(crafted, lambda sd: sd.update(
        {f"{LAYER}.packed": sd[f"{LAYER}.packed"][:, :, :1].contiguous()}))
    load_fails(crafted, ST, f"layer {LAYER}", "packed has shape [1, 96, 1]",
                "implies [1, 96, 2]")


def test_unquantized_shape_mismatch(crafted):
    _edit_tensors(crafted, lambda sd: sd.update(
        {"transformer.wpe.weight": sd["transformer.wpe.weight"][:10].contiguous()}))
    load_fails(crafted, ST, "transformer.wpe.weight", "has shape [10, 32]",
                "config.json implies [64, 32]")


def test_missing_tensor(crafted):
    _edit_tensors(crafted, lambda sd: sd.pop(f"{LAYER}.scales"))
    load_fails(crafted, ST, f"layer {LAYER}", "scales is missing")


def test_missing_unquantized_tensor(crafted):
    _edit_tensors(crafted, lambda sd: sd.pop("transformer.ln_f.weight"))
    load_fails(crafted, ST, "missing tensors", "transformer.ln_f.weight")


def test_unexpected_tensor(crafted):
    _edit_tensors(crafted, lambda sd: sd.update({f"{LAYER}.offsets": torch.zeros(96, 1)}))
    load_fails(crafted, ST, "unexpected tensors", f"{LAYER}.offsets")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -64])
def test_truncated_safetensors(crafted, keep):
    data = (crafted / ST).read_bytes()
    (crafted / ST).write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    load_fails(crafted, ST)


def test_corrupt_safetensors_header(crafted):
    data = bytearray((crafted / ST).read_bytes())
    data[8:12] = b"\xff\xfe{["
    (crafted / ST).write_bytes(bytes(data))
    load_fails(crafted, ST, "header")


def test_missing_safetensors(crafted):
    (crafted / ST).unlink()
    load_fails(crafted, ST, "missing")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "\xff\xfe", '{"format_version": 1}'])
def test_garbage_json(crafted, text):
    (crafted / MARKER).write_bytes(text.encode("latin-1"))
    load_fails(crafted, MARKER)


@pytest.mark.parametrize("version", [3, 0, "1", None, 1.0, True])  # 2: factorized layers
def test_unknown_format_version(crafted, version):
    _edit_meta(crafted, lambda m: m.update(format_version=version))
    load_fails(crafted, MARKER, "format_version")


def test_garbage_tokenizer(q_gpt2, tmp_path):
    d = save_quantized(q_gpt2, tmp_path / "t", tokenizer=_tokenizer())
    (d / "tokenizer.json").write_text('{"model": 1}')
    load_fails(d, "tokenizer.json")


def test_garbage_config(crafted):
    (crafted / "config.json").write_text("{nope")
    load_fails(crafted, "config.json")


# ---- saving --------------------------------------------------------------------------------

def test_validate_output_dir(tmp_path, saved):
    assert validate_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "empty").mkdir()
    assert validate_output_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        validate_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="not a directory"):
        validate_output_dir(tmp_path / "f" / "sub")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="non-empty directory that is not a physkern model"):
        validate_output_dir(tmp_path / "user", overwrite=True)
    with pytest.raises(ValueError, match="--overwrite"):
        validate_output_dir(saved)
    assert validate_output_dir(saved, overwrite=True) == saved
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ValueError, match="not writable"):
                validate_output_dir(ro / "model")
        finally:
            ro.chmod(0o755)


def test_resave_needs_overwrite_and_keeps_user_files(q_gpt2, tmp_path):
    d = tmp_path / "D"
    save_quantized(q_gpt2, d, tokenizer=_tokenizer())
    d.chmod(0o755)
    (d / "notes.txt").write_text("mine")
    (d / "runs").mkdir()
    (d / "runs" / "log.json").write_text("{}")
    before = (d / ST).read_bytes()
    with pytest.raises(ValueError, match=r"overwrite=True \(--overwrite\)") as exc:
        save_quantized(q_gpt2, d)
    assert str(d) in str(exc.value)
    assert (d / ST).read_bytes() == before and (d / "tokenizer.json").exists()
    # re-save without a tokenizer: the old tokenizer files (listed by the old save) go away
    other = _quantized(q_gpt2.__class__(q_gpt2.config).eval(), k=3)
    save_quantized(other, d, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"
    assert (d / "runs" / "log.json").read_text() == "{}"
    assert (d.stat().st_mode & 0o777) == 0o755
    assert not (d / "tokenizer.json").exists() and not (d / "tokenizer_config.json").exists()
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["notes.txt", "runs", "config.json", GEN, ST, MARKER])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded, tok = load_quantized(d)
    assert tok is None and torch.equal(loaded(X).logits, other(X).logits)


def test_crafted_files_list_never_deletes_outside(q_gpt2, tmp_path):
    d = save_quantized(q_gpt2, tmp_path / "D")
    (tmp_path / "outside.txt").write_text("keep")
    (d / "keep.txt").write_text("keep")
    (d / "sub").mkdir()
    (d / "sub" / "keep.txt").write_text("keep")
    os.symlink(tmp_path, d / "link")
    evil = ["../outside.txt", str(tmp_path / "outside.txt"), "link/outside.txt", "sub",
            ".", "", MARKER, 7, None, "sub/../keep.txt"]
    _edit_meta(d, lambda m: m.update(files=m["files"] + evil))
    save_quantized(q_gpt2, d, overwrite=True)
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert (d / "keep.txt").exists() and (d / "sub" / "keep.txt").exists()
    assert load_quantized(d)[0] is not None


def test_non_model_directory_refused_never_deleted(q_gpt2, tmp_path):
    d = tmp_path / "user"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    for ow in (False, True):
        with pytest.raises(ValueError, match="not a physkern model"):
            save_quantized(q_gpt2, d, overwrite=ow)
    assert [p.name for p in d.iterdir()] == ["precious.txt"]


def test_new_dir_gets_umask_mode(q_gpt2, tmp_path):
    old = os.umask(0o022)
    try:
        d = save_quantized(q_gpt2, tmp_path / "a" / "new")
    finally:
        os.umask(old)
    assert (d.stat().st_mode & 0o777) == 0o755
    assert json.loads((d / MARKER).read_text())["files"] == ["config.json", GEN, ST]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name != "new"]


def test_empty_existing_dir_kept(q_gpt2, tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    d.chmod(0o750)
    ino = d.stat().st_ino
    save_quantized(q_gpt2, d)
    assert d.stat().st_ino == ino and (d.stat().st_mode & 0o777) == 0o750
    assert load_quantized(d)[0] is not None


def test_failed_save_leaves_previous_model(q_gpt2, tmp_path, monkeypatch):
    import safetensors.torch as st
    d = save_quantized(q_gpt2, tmp_path / "D")
    ref = q_gpt2(X).logits

    def boom(tensors, filename, *a, **kw):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(q_gpt2, d, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(q_gpt2, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    assert torch.equal(load_quantized(d)[0](X).logits, ref)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import safetensors.torch as st
    import physkern.serialization as ser
    from physkern.serialization import load_quantized, save_quantized
    d, where = sys.argv[1], sys.argv[2]
    model, _ = load_quantized(d)
    if where == "write":  # killed while writing the new tensors
        def killed(tensors, filename, *a, **kw):
            open(filename, "wb").write(b"\\0" * 100)
            os._exit(9)
        st.save_file = killed
    else:  # killed after the first file was swapped in (the marker already removed)
        real, calls = os.replace, []
        def killed(a, b):
            calls.append(1)
            if len(calls) == 2:
                os._exit(9)
            return real(a, b)
        ser.os.replace = killed
    save_quantized(model, d, overwrite=True)
""")


@pytest.mark.parametrize("where", ["write", "swap"])
def test_killed_save_recovers(q_gpt2, tmp_path, where):
    d = save_quantized(q_gpt2, tmp_path / "D", tokenizer=_tokenizer())
    (d / "notes.txt").write_text("mine")
    ref = q_gpt2(X).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(d), where], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    leftovers = [p for p in d.iterdir() if p.name.startswith(".physkern.partial-")]
    assert len(leftovers) == 1
    if where == "write":  # the previous model is intact
        assert torch.equal(load_quantized(d)[0](X).logits, ref)
    else:  # half swapped: never taken for a model, but recognised as physkern's
        with pytest.raises(ValueError, match="not a physkern quantized model"):
            load_quantized(d)
        with pytest.raises(ValueError, match="interrupted physkern save.*--overwrite"):
            validate_output_dir(d)
    save_quantized(q_gpt2, d, overwrite=True)  # no tokenizer this time
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["notes.txt", "config.json", GEN, ST, MARKER])  # leftovers, old tokenizer files gone
    assert not [p for p in tmp_path.iterdir() if p.name != "D"]
    assert torch.equal(load_quantized(d)[0](X).logits, ref)


def test_layers_empty_builds_what_layer_meta_describes(q_gpt2):
    layer = q_gpt2.get_submodule(LAYER)
    e = QuantizedLinear.empty(layer.layer_meta())
    for n in ("packed", "codebooks", "scales", "bias"):
        assert getattr(e, n).shape == getattr(layer, n).shape
        assert getattr(e, n).dtype == getattr(layer, n).dtype
