"""Presets shipped in physkern/presets/*.json: loaded by name, equal to the bench recipes that
produced the README figures, and usable from `physkern quantize --preset NAME`."""
import json
import re
from pathlib import Path

import pytest
import torch

from physkern.cli import main
from physkern.recipe import PRESETS_DIR, load_preset, load_recipe, preset_names

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"3bit": "codebook_push.json:cb_mixed3_layer_ef_ft150_tiles256_cos",
           "2.5bit": "codebook_push.json:cb_k512_d4_layer_ef_ft100",
           "fast": "pareto.json:cb_k32_d2_layer_ef",
           "rtn4": "pareto.json:rtn4_g64"}


def test_presets_are_package_data():
    assert PRESETS_DIR.parent.name == "physkern"
    assert set(preset_names()) == set(SOURCES) | {"deploy", "3bit-whole"}
    setup = (ROOT / "setup.py").read_text()
    assert '"presets/*.json"' in setup and '"physkern.methods"' in setup


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_preset_is_the_recipe_that_produced_its_figures(name):
    preset = load_preset(name)
    src = load_recipe(ROOT / "bench" / "recipes" / SOURCES[name].split(":")[0],
                      SOURCES[name].split(":")[1])
    assert preset.config == src.config and preset.finetune == src.finetune
    assert preset.smooth is preset.prune is preset.lattice is None
    assert preset.embedding is None and preset.dense_dtype is None  # the lead measures these
    assert preset.calibration == {"windows": 32, "window": 1024}
    assert "physkern sweep quant" in preset.description and "perplexity" in preset.description
    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    assert raw["name"] == name and SOURCES[name].split(":")[1] in raw["note"]


def test_deploy_preset_is_its_bench_recipe():
    preset = load_preset("deploy")
    src = load_recipe(ROOT / "bench" / "recipes" / "whole_model.json", "deploy")
    assert (preset.config, preset.embedding, preset.dense_dtype) == \
        (src.config, src.embedding, src.dense_dtype)
    assert preset.embedding is not None and preset.dense_dtype == "bfloat16"
    assert preset.finetune is None  # make run finishes in minutes


def test_whole_model_3bit_preset_is_its_bench_recipe():
    """3bit-whole = whole_model.json's whole_mixed3_ft60_rot_head_k256_d2 (the figures in its
    description come from that recipe's sweep points)."""
    preset = load_preset("3bit-whole")
    src = load_recipe(ROOT / "bench" / "recipes" / "whole_model.json",
                      "whole_mixed3_ft60_rot_head_k256_d2")
    assert (preset.config, preset.embedding, preset.dense_dtype, preset.finetune) == \
        (src.config, src.embedding, src.dense_dtype, src.finetune)
    assert preset.config.rotation == "hadamard" and preset.embedding is not None
    assert preset.calibration == {"windows": 32, "window": 1024}
    raw = json.loads((PRESETS_DIR / "3bit-whole.json").read_text())
    assert raw["name"] == "3bit-whole" and "whole_mixed3_ft60_rot_head_k256_d2" in raw["note"]
    assert "physkern sweep quant" in raw["description"]


def test_make_run_uses_the_deploy_preset():
    from physkern.commands.run import default_recipe
    assert default_recipe() == load_preset("deploy").config


def _quantize(d, out, *extra):
    return main(["quantize", "--model", str(d / "model"), "--corpus", str(d / "corpus.txt"),
                 "--out", str(out), *extra])


def test_quantize_preset_records_the_whole_recipe(saved_tiny):
    out = saved_tiny / "fast"
    assert _quantize(saved_tiny, out, "--preset", "fast", "--calib-windows", "4",
                     "--calib-window", "64", "--seed", "2") == 0
    meta = json.loads((out / "physkern.json").read_text())
    whole = meta["whole_recipe"]
    assert whole["name"] == "fast" and whole["calibration"] == {"windows": 4, "window": 64}
    assert whole["config"] == load_preset("fast").config.to_dict()
    assert meta["recipe"] == {**whole["config"], "seed": 2}  # the config as run (seeded)
    assert meta["calibration"]["windows"] == 4 and meta["finetune"] is None


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "nope"], "no preset 'nope'; valid: 2.5bit, 3bit, 3bit-whole, deploy, fast, rtn4"),
    (["--preset", "fast", "--k", "16"], "--preset and the per-flag recipe are exclusive: drop --k"),
    (["--preset", "fast", "--method", "rtn"], "drop --method"),
    (["--preset", "fast", "--recipe", "x.json:y"], "--preset and --recipe are exclusive"),
    (["--embedding", "rtn:bits"], "--embedding: expected key=value"),
    (["--embedding", "rtn:bits=1"], "--embedding: bits must be"),
    (["--embedding", "rtn:layers=[\"x\"]"], "takes no `layers`"),
    (["--dense-dtype", "float8"], "invalid choice"),
])
def test_quantize_preset_and_embedding_errors(saved_tiny, capsys, argv, msg):
    out = saved_tiny / "bad"
    rc = _quantize(saved_tiny, out, "--calib-windows", "4", "--calib-window", "64", *argv)
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) <= 3, err
    assert not out.exists()


def test_quantize_with_dense_dtype(saved_tiny):
    from physkern.dense import dense_storage_dtype
    from physkern.serialization import load_quantized
    out = saved_tiny / "dense"
    assert _quantize(saved_tiny, out, "--method", "rtn", "--bits", "4", "--group-size", "16",
                     "--dense-dtype", "float16") == 0
    whole = json.loads((out / "physkern.json").read_text())["whole_recipe"]
    assert whole["dense_dtype"] == "float16" and whole["embedding"] is None
    model, _ = load_quantized(out)
    assert dense_storage_dtype(model) == torch.float16


def test_embedding_flag_sets_the_recipes_head_config(saved_tiny):
    """--embedding goes into the Recipe (apply_recipe quantizes the head with it: test_recipe);
    --dense-dtype float32 means no rounding."""
    import argparse

    from physkern.commands.quantize import add_finetune_args, add_recipe_args, recipe_from_args
    from physkern.config import CodebookConfig, ScalarConfig
    p = argparse.ArgumentParser()
    add_recipe_args(p)
    add_finetune_args(p)
    r = recipe_from_args(p.parse_args(["--preset", "rtn4", "--embedding",
                                       "rtn:bits=4,group_size=16", "--dense-dtype", "float32"]))
    assert r.embedding == ScalarConfig(bits=4, group_size=16) and r.dense_dtype is None
    assert r.config == load_preset("rtn4").config and r.name == "rtn4"
    r = recipe_from_args(p.parse_args(["--embedding", '{"method": "codebook", "k": 64, '
                                       '"block_dim": 4, "scope": "layer"}',
                                       "--dense-dtype", "bfloat16", "--finetune-steps", "5"]))
    assert r.embedding == CodebookConfig(k=64, block_dim=4, scope="layer")
    assert r.dense_dtype == "bfloat16" and r.finetune["steps"] == 5 and r.finetune["lr"] == 1e-3
    assert r.to_dict()["embedding"]["k"] == 64


def test_quantize_with_embedding_saves_the_head(saved_tiny):
    from physkern.quant.accounting import bits_report
    from physkern.serialization import load_quantized
    out = saved_tiny / "emb"
    assert _quantize(saved_tiny, out, "--method", "rtn", "--bits", "4", "--group-size", "16",
                     "--embedding", "rtn:bits=4,group_size=16", "--dense-dtype", "bfloat16") == 0
    meta = json.loads((out / "physkern.json").read_text())
    whole = meta["whole_recipe"]
    assert whole["embedding"]["method"] == "rtn" and whole["embedding"]["group_size"] == 16
    assert whole["dense_dtype"] == "bfloat16"
    assert meta["report"]["layers"][-1]["name"] == "lm_head"
    model, _ = load_quantized(out)
    assert re.search("lm_head", " ".join(bits_report(model).layers))
