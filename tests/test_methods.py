"""physkern.methods: one file per method, its config and its quantizer in a registry."""
import argparse
from dataclasses import dataclass

import pytest
import torch

import physkern
from physkern import config as config_module
from physkern.api import quantize_weight
from physkern.methods import (CONFIG_CLASSES, QUANTIZERS, CodebookConfig, GPTQConfig,
                              ScalarConfig, quantizer_for, register_method)
from physkern.methods._base import _Selectable


def test_configs_stay_importable_from_the_old_places():
    assert config_module.CodebookConfig is CodebookConfig is physkern.CodebookConfig
    assert config_module.ScalarConfig is ScalarConfig is physkern.ScalarConfig
    assert config_module.GPTQConfig is GPTQConfig is physkern.GPTQConfig
    assert config_module.CONFIG_CLASSES is CONFIG_CLASSES


def test_every_method_has_a_registered_quantizer_in_its_own_file():
    assert set(CONFIG_CLASSES) == {"codebook", "rtn", "gptq"}
    for method, cls in CONFIG_CLASSES.items():
        fn = QUANTIZERS[cls]
        assert fn.__module__ == cls.__module__ == f"physkern.methods.{cls.__module__.split('.')[-1]}"
        assert quantizer_for(cls()) is fn


def test_each_config_declares_the_statistics_it_needs():
    assert (ScalarConfig().needs_calibration, ScalarConfig().needs_hessian) == (False, False)
    assert (GPTQConfig().needs_calibration, GPTQConfig().needs_hessian) == (True, True)
    assert CodebookConfig(calibrate=False).needs_calibration is False
    assert CodebookConfig().needs_hessian is False
    assert CodebookConfig(error_feedback=True).needs_hessian is True


def test_quantize_weight_dispatches_through_the_registry():
    @dataclass
    class HalfConfig(_Selectable):
        layers: object = None
        overrides: dict = None
        method = "test_half"
        needs_calibration = False
        needs_hessian = False

    seen = []

    @register_method(HalfConfig)
    def quantize_half(weight, cfg, m2, gram):
        seen.append((tuple(weight.shape), m2, gram))
        return quantize_weight(weight, ScalarConfig(bits=8))
    try:
        w = torch.randn(4, 8)
        qw = quantize_weight(w, HalfConfig())
        assert seen == [((4, 8), None, None)]
        torch.testing.assert_close(qw.dequantize(), quantize_weight(w, ScalarConfig(bits=8))
                                   .dequantize())
        with pytest.raises(ValueError, match="already registered"):
            register_method(type("Other", (), {"method": "test_half"}))
    finally:
        QUANTIZERS.pop(HalfConfig, None)
        CONFIG_CLASSES.pop("test_half", None)


def test_unregistered_config_is_a_clear_error():
    class Loose:
        method = "loose"
    with pytest.raises(ValueError, match="no quantization method registered for Loose"):
        quantize_weight(torch.randn(2, 4), Loose())


@pytest.mark.parametrize("cfg", [
    CodebookConfig(k=8, block_dim=2, scope="layer", error_feedback=True, refine_steps=3),
    GPTQConfig(bits=3, group_size=16), ScalarConfig(bits=4, group_size=16)])
def test_storage_probe_stores_the_same_bits(cfg):
    from physkern.research.alloc import option_bits
    from physkern.layers import QuantizedLinear
    from physkern.quant.accounting import layer_bits
    probe = cfg.storage_probe()
    assert not probe.needs_calibration
    w = torch.randn(16, 32)
    gram = (lambda x: x.T @ x)(torch.randn(64, 32))
    qw = quantize_weight(w, cfg, torch.diagonal(gram) / 64, gram)
    assert option_bits(cfg, 16, 32) == int(layer_bits(QuantizedLinear(qw))["total_bits"])


@pytest.mark.parametrize("method,want", [
    ("codebook", CodebookConfig(k=16, block_dim=2, scope="layer", error_feedback=True, seed=3,
                                layers=["*.mlp.*"])),
    ("rtn", ScalarConfig(bits=3, group_size=16, layers=["*.mlp.*"])),
    ("gptq", GPTQConfig(bits=3, group_size=16, act_order=True, layers=["*.mlp.*"])),
])
def test_cli_flags_build_each_methods_config(method, want):
    from physkern.commands.quantize import add_recipe_args, config_from_args
    p = argparse.ArgumentParser()
    add_recipe_args(p)
    args = p.parse_args(["--method", method, "--k", "16", "--block-dim", "2", "--bits", "3",
                         "--group-size", "16", "--act-order", "--seed", "3",
                         "--layers", "*.mlp.*"])
    assert config_from_args(args) == want
