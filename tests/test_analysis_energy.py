import numpy as np
import pytest
import torch
import torch.nn.functional as F

from physkern.research.analysis.energy import (energy_over_texts, energy_statistics, energy_terms,
                                      random_reinit)


def _direct(model, ids, blocks, post_norm=False, scale=1.0):
    """K, V, E written out: last block's output by a forward hook, V by cross entropy."""
    grabbed = {}
    hook = blocks[-1].register_forward_hook(
        lambda m, a, out: grabbed.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True)
    hook.remove()
    h = out.hidden_states[-1][0] if post_norm else grabbed["h"][0]
    h = h.double()
    k = torch.stack([0.5 * ((h[t + 1] - h[t]) ** 2).sum() for t in range(len(ids) - 1)]) / scale
    v = F.cross_entropy(out.logits[0, :-1].double(), ids[1:], reduction="none")
    return k.numpy(), v.numpy()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_energy_equals_direct_computation(arch, tiny_llama, tiny_gpt2):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    ids = torch.randint(0, 96, (20,))
    for post in (False, True):
        got = energy_terms(model, ids, state="post_norm" if post else "pre_norm")
        k, v = _direct(model, ids, blocks, post_norm=post)
        np.testing.assert_allclose(got["K"], k, rtol=1e-5)
        np.testing.assert_allclose(got["V"], v, rtol=1e-5)
        np.testing.assert_allclose(got["E"], k + v, rtol=1e-5)
    got = energy_terms(model, ids, kinetic_scale="dim")
    k, _ = _direct(model, ids, blocks, scale=32.0)
    np.testing.assert_allclose(got["K"], k, rtol=1e-5)


def test_statistics_direct():
    terms = {"K": np.array([1.0, 2.0, 3.0, 10.0]), "V": np.array([4.0, 3.0, 2.0, 1.0])}
    terms["E"] = terms["K"] + terms["V"]
    s = energy_statistics(terms)
    e = terms["E"]
    assert s["cv_E"] == pytest.approx(np.std(e) / np.mean(e))
    assert s["kinetic_over_potential"] == pytest.approx(16 / 10)
    s1 = energy_statistics(terms, skip_first=1)
    assert s1["mean_K"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="skip_first"):
        energy_statistics(terms, skip_first=3)


def test_empty_or_one_token_text_is_an_error(tiny_llama):
    for ids in (torch.tensor([], dtype=torch.long), torch.tensor([5])):
        with pytest.raises(ValueError, match="at least 2 tokens"):
            energy_terms(tiny_llama, ids)
    with pytest.raises(ValueError, match="state must be one of"):
        energy_terms(tiny_llama, torch.tensor([1, 2, 3]), state="middle")


def test_random_reinit_same_architecture(tiny_llama):
    rnd = random_reinit(tiny_llama, 5)  # the fixture itself was built under seed 0
    assert type(rnd) is type(tiny_llama)
    assert not torch.equal(rnd.model.layers[0].mlp.up_proj.weight,
                           tiny_llama.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(random_reinit(tiny_llama, 5).model.layers[0].mlp.up_proj.weight,
                               rnd.model.layers[0].mlp.up_proj.weight)
    res = energy_over_texts(rnd, torch.randint(0, 96, (2, 10)))
    assert len(res["per_text"]) == 2 and np.isfinite(res["mean"]["cv_E"])
