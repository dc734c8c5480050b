"""SmoothQuant migration: outputs unchanged before quantization; scales follow the formula."""
import copy

import pytest
import torch

from physkern.calib import collect_statistics
from physkern.models import linear_layers
from physkern.smoothquant import (AbsMax, apply_smoothing, collect_activation_max,
                                  smooth_model, smoothing_groups, smoothing_scales)


def _windows(vocab=96, n=3, seq=16):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


def _perturb_norms(model):
    """Random init has norm weights 1 and biases 0; make them generic so the test means more."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, _ in smoothing_groups(model):
            norm = model.get_submodule(name)
            norm.weight.mul_(0.5 + torch.rand(norm.weight.shape, generator=g))
            if getattr(norm, "bias", None) is not None:
                norm.bias.add_(0.1 * torch.randn(norm.bias.shape, generator=g))


@pytest.mark.parametrize("fixture,n_groups", [("tiny_gpt2", 4), ("tiny_llama", 4)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothing_keeps_outputs(fixture, n_groups, alpha, request):
    model = copy.deepcopy(request.getfixturevalue(fixture))
    _perturb_norms(model)
    ids = _windows()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    w_before = {l.name: l.weight().detach().clone() for l in linear_layers(model)}
    scales = smooth_model(model, ids, alpha=alpha)
    assert len(scales) == n_groups
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=0), float((after - before).abs().max())
    # The weights really changed: columns scaled by s.
    for norm, lins in smoothing_groups(model):
        s = scales[norm]
        assert not torch.allclose(s, torch.ones_like(s))
        for l in lins:
            assert torch.allclose(l.weight(), w_before[l.name] * s[None, :], rtol=1e-6)


def test_scales_follow_formula_and_flatten_activations(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2)
    _perturb_norms(model)
    ids = _windows()
    act = collect_activation_max(model, ids)
    groups = smoothing_groups(model)
    # Reference maxima straight from the hooks and a hand-written formula.
    for norm, lins in groups:
        w = torch.cat([l.weight().detach() for l in lins], 0)
        ref = act[norm] ** 0.5 / w.abs().amax(0) ** 0.5
        assert torch.allclose(smoothing_scales(act[norm], [w], 0.5), ref, rtol=1e-6)
    # alpha = 1: s = max|X_j|, so every smoothed input channel has max |x_j| = 1.
    apply_smoothing(model, act, 1.0)
    first = [lins[0] for _, lins in groups]
    stats = collect_statistics(model, ids, {"m": lambda l: AbsMax(l.in_features)}, first,
                               progress=False)
    for l in first:
        assert torch.allclose(stats[l.name]["m"].value, torch.ones(l.in_features), atol=1e-4)


def test_llama_groups(tiny_llama):
    names = {n: [l.name for l in ls] for n, ls in smoothing_groups(tiny_llama)}
    assert names["model.layers.0.input_layernorm"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj"]
    assert names["model.layers.1.post_attention_layernorm"] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", True])
def test_bad_alpha(alpha, tiny_gpt2):
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(copy.deepcopy(tiny_gpt2), _windows(), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(torch.ones(4), [torch.ones(2, 4)], alpha)


def test_missing_groups_and_unsupported_norm(tiny_gpt2):
    model = copy.deepcopy(tiny_gpt2)
    with pytest.raises(ValueError, match="act_max lacks"):
        apply_smoothing(model, {}, 0.5)

    class OnePlusNorm(torch.nn.Module):    # Gemma-style: (1 + weight) * x
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(n))

        def forward(self, x):
            return x * (1 + self.weight)

    model.transformer.h[1].ln_2 = OnePlusNorm(32)   # the last group
    act = {n: torch.rand(32) + 0.5 for n, _ in smoothing_groups(model)}
    w_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be absorbed"):
        apply_smoothing(model, act, 0.5)
    # Refused before touching anything.
    assert all(torch.equal(v, w_before[k]) for k, v in model.state_dict().items())
