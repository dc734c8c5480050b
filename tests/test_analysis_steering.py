import copy

import pytest
import torch

from physkern.research.analysis.steering import (check_layer, greedy_generate, steering_delta,
                                        target_logprob, target_token_id)


@pytest.fixture(scope="module")
def sharp_llama(tiny_llama):
    """tiny_llama with 30x larger (tied) embeddings: its random logits are no longer nearly
    uniform, so ln p(target) can be raised by a few nats."""
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)
    return model


def _last_layer_logprob(model, ids, target, delta):
    """Independent: h of the last block at the last position, then final norm + lm_head."""
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True)
    grabbed = {}
    hook = model.model.norm.register_forward_pre_hook(
        lambda m, a: grabbed.__setitem__("h", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    del h
    hl = grabbed["h"][0, -1] + delta
    logits = model.lm_head(model.model.norm(hl[None]))[0]
    return float(torch.log_softmax(logits.double(), -1)[target])


def _gradient_direction_norm(model, ids, layer, target, gain):
    """Independent reference: bisection along the gradient at delta = 0 (own autograd hook)."""
    block = model.model.layers[layer]
    d = torch.zeros(model.config.hidden_size, requires_grad=True)

    def add(delta):
        def hook(m, a, out):
            h = out[0] if isinstance(out, tuple) else out
            h = torch.cat([h[:, :-1], (h[:, -1] + delta)[:, None]], dim=1)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        return block.register_forward_hook(hook)

    def f(delta):
        hk = add(delta)
        try:
            return torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)[target]
        finally:
            hk.remove()

    f0 = f(d)
    (g,) = torch.autograd.grad(f0, d)
    u = g / g.norm()
    lo, hi = 0.0, 1.0
    with torch.no_grad():
        while f(hi * u) < f0 + gain:
            lo, hi = hi, 2 * hi
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if f(mid * u) >= f0 + gain else (mid, hi)
    return hi


@pytest.mark.parametrize("layer", [0, 1])
def test_gain_reached_and_no_longer_than_gradient_direction(sharp_llama, layer):
    tiny_llama = sharp_llama
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (1, 7))
    target, gain = 17, 1.5
    sol = steering_delta(tiny_llama, ids, layer, target, gain, iterations=30, tol=1e-4)
    base = float(target_logprob(tiny_llama, ids, layer, target))
    steered = float(target_logprob(tiny_llama, ids, layer, target, sol["delta"]))
    assert steered - base == pytest.approx(gain, abs=1e-3)
    ref = _gradient_direction_norm(tiny_llama, ids, layer, target, gain)
    assert sol["norm"] <= ref * (1 + 1e-4)
    assert sol["gradient_direction_norm"] == pytest.approx(ref, rel=1e-3)
    if layer == 1:  # the last block: f is norm + lm_head of h + delta, written out in the test
        assert _last_layer_logprob(tiny_llama, ids, target, sol["delta"]) - \
            _last_layer_logprob(tiny_llama, ids, target, torch.zeros(32)) == \
            pytest.approx(gain, abs=1e-3)


def test_first_order_is_gain_over_gradient_norm(sharp_llama):
    tiny_llama = sharp_llama
    ids = torch.randint(0, 96, (1, 5))
    sol = steering_delta(tiny_llama, ids, 1, 3, 1e-3, iterations=1, tol=1.0)
    # tiny gain: first order is exact to second order; its norm is gain / ||g||
    d = torch.zeros(32, requires_grad=True)
    f = target_logprob(tiny_llama, ids, 1, 3, d)
    (g,) = torch.autograd.grad(f, d)
    assert sol["first_order_norm"] == pytest.approx(1e-3 / float(g.norm()), rel=1e-4)


def test_steered_generation_starts_with_target_when_gain_large(tiny_llama):
    tiny_llama = copy.deepcopy(tiny_llama)
    with torch.no_grad():  # 10x: the runner-up can just be lifted above the top token
        tiny_llama.model.embed_tokens.weight.mul_(10.0)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0, -1].double(), -1)
    second = int(logp.topk(2).indices[1])
    need = float(logp.max() - logp[second]) + 0.05  # makes the runner-up the argmax
    sol = steering_delta(tiny_llama, ids, 1, second, need, iterations=40, tol=1e-3)
    out = greedy_generate(tiny_llama, ids, 3, layer=1, delta=sol["delta"], position=5)
    plain = greedy_generate(tiny_llama, ids, 3)
    assert int(plain[0, 6]) != second
    assert out.shape == (1, 9) and int(out[0, 6]) == second
    assert torch.equal(out[:, :6], ids)


class _Tok:
    vocab = {"a": 1, "b": 2, " Paris": 3}

    def __call__(self, text, add_special_tokens=False):
        if text in self.vocab:
            return {"input_ids": [self.vocab[text]]}
        return {"input_ids": [self.vocab.get(c, 0) for c in text]}

    def convert_ids_to_tokens(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return [inv.get(i, "<unk>") for i in ids]


def test_bad_input_errors(tiny_llama):
    tok = _Tok()
    assert target_token_id(tok, " Paris") == 3
    with pytest.raises(ValueError, match=r"'ab' is 2 tokens, not one: \['a', 'b'\]"):
        target_token_id(tok, "ab")
    with pytest.raises(ValueError, match="non-empty"):
        target_token_id(tok, "")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\]"):
        check_layer(tiny_llama, 2)
    assert check_layer(tiny_llama, -1) == 1
    with pytest.raises(ValueError, match="gain"):
        steering_delta(tiny_llama, torch.tensor([[1, 2]]), 0, 3, -1.0)
