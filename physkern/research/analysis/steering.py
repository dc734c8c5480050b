"""Jacobian steering (after arXiv 2508.08492): the smallest change of one hidden state that makes a
target token more likely by a requested amount.

At block `layer` and the prompt's last position p, let h be the block's output and
f(delta) = ln p(target | prompt) when h is replaced by h + delta. We want

    min ||delta||  subject to  f(delta) = f(0) + gain.

First order: with g = grad f(0), the minimal-norm solution of g . delta = gain is
delta = gain g / ||g||^2. Iterating (each step: the minimal-norm point of the constraint
linearised at the current delta, delta <- [(f(0) + gain - f(delta) + g_k . delta) / ||g_k||^2] g_k)
reaches the non-linear target; its fixed points satisfy the optimality condition
delta || grad f(delta). The gradient-direction solution (delta = s g / ||g||, s found by
bisection so that f reaches the target exactly) is computed too, and the smaller feasible one
is returned, so the answer is never longer than the gradient-direction solution.

During generation the same delta is added at position p (greedy decoding, no KV cache: every step
re-runs the whole sequence with the hook in place).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ._common import block_output, decoder_blocks


def target_token_id(tokenizer, target: str) -> int:
    """The id of `target` if it is exactly one token; otherwise ValueError saying how it splits."""
    if not target:
        raise ValueError("target must be a non-empty string that is one token")
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"target {target!r} is {len(ids)} tokens, not one: {pieces} "
                         f"(ids {ids}); pick a single token, e.g. with or without a leading space")
    return int(ids[0])


def check_layer(model: nn.Module, layer: int) -> int:
    """Accepts 0..L-1 or a negative index from the end; returns the non-negative index."""
    n = len(decoder_blocks(model))
    if not -n <= layer < n:
        raise ValueError(f"layer must be in [0, {n - 1}] (or -{n}..-1), got {layer}")
    return layer % n


@contextmanager
def added_to_hidden(model: nn.Module, layer: int, position: int, delta: Optional[torch.Tensor]):
    """Within the block, block `layer`'s output at `position` gets `delta` [hidden] added."""
    if delta is None:
        yield
        return
    block = decoder_blocks(model)[layer]

    def hook(module, args, out):
        h = block_output(out)
        bump = torch.zeros_like(h)
        bump[:, position] = delta.to(h.dtype)
        h = h + bump
        return (h,) + tuple(out[1:]) if isinstance(out, (tuple, list)) else h

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def target_logprob(model: nn.Module, input_ids: torch.Tensor, layer: int, target_id: int,
                   delta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ln p(target | input_ids) at the last position, with delta added at (layer, last position).

    input_ids: [1, T]. Differentiable in delta.
    """
    with added_to_hidden(model, layer, input_ids.shape[1] - 1, delta):
        logits = model(input_ids=input_ids).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)[target_id]


def _value_and_grad(model, ids, layer, target_id, delta):
    d = delta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = target_logprob(model, ids, layer, target_id, d)
        (g,) = torch.autograd.grad(f, d)
    return float(f.detach()), g.detach()


def steering_delta(model: nn.Module, input_ids: torch.Tensor, layer: int, target_id: int,
                   gain: float, iterations: int = 20, tol: float = 1e-3) -> dict:
    """Minimal-norm delta raising ln p(target) by `gain` nats (see module docstring).

    input_ids: [1, T] or [T]. Returns {"delta": [hidden] tensor, "norm", "base_logprob",
    "steered_logprob", "achieved_gain", "method" ("iterated" | "gradient-direction"),
    "first_order_norm", "gradient_direction_norm", "iterations"}.
    """
    if gain <= 0:
        raise ValueError(f"gain (requested increase of ln p(target)) must be positive, got {gain}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    ids = input_ids.reshape(1, -1)
    if ids.shape[1] < 1:
        raise ValueError("prompt must not be empty")
    layer = check_layer(model, layer)
    hidden = model.config.hidden_size
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        zero = torch.zeros(hidden, dtype=torch.float32, device=ids.device)
        f0, g0 = _value_and_grad(model, ids, layer, target_id, zero)
        if float(g0.norm()) == 0:
            raise ValueError("ln p(target) does not depend on the hidden state at this layer")
        goal = f0 + gain
        first = gain * g0 / g0.double().norm().pow(2).float()

        # iterated minimal-norm projection onto the linearised constraint, damped: a step that
        # lands further from the goal than where it started is halved (up to 6 times)
        delta, f, its = first.clone(), None, 0
        f, g = _value_and_grad(model, ids, layer, target_id, delta)
        for its in range(1, iterations + 1):
            if abs(f - goal) <= tol:
                break
            gg = float(g.double().norm().pow(2))
            if gg == 0:
                break
            coef = (goal - f + float((g.double() * delta.double()).sum())) / gg
            step = (coef * g).float() - delta
            for _ in range(7):
                f_new, g_new = _value_and_grad(model, ids, layer, target_id, delta + step)
                if abs(f_new - goal) < abs(f - goal):
                    break
                step = step / 2
            else:
                break  # no step brings it closer: give up on this route
            delta, f, g = delta + step, f_new, g_new
        iterated_ok = abs(f - goal) <= tol

        # gradient-direction solution: f(s u) = goal, u = g0 / ||g0||, by bisection on s
        u = g0 / g0.norm()
        lo, hi = 0.0, max(float(first.norm()), 1e-6)
        with torch.no_grad():
            f_hi = float(target_logprob(model, ids, layer, target_id, hi * u))
            grow = 0
            while f_hi < goal and grow < 30:
                lo, hi = hi, hi * 2
                f_hi = float(target_logprob(model, ids, layer, target_id, hi * u))
                grow += 1
            line_ok = f_hi >= goal
            for _ in range(60):
                if not line_ok or hi - lo <= 1e-6 * hi:
                    break
                mid = (lo + hi) / 2
                if float(target_logprob(model, ids, layer, target_id, mid * u)) >= goal:
                    hi = mid
                else:
                    lo = mid
            line_delta = hi * u
            f_line = float(target_logprob(model, ids, layer, target_id, line_delta))
        line_ok = line_ok and abs(f_line - goal) <= tol

        cands = []
        if iterated_ok:
            cands.append(("iterated", delta, f))
        if line_ok:
            cands.append(("gradient-direction", line_delta, f_line))
        if not cands:
            reached = max([x for x in (f, f_line) if math.isfinite(x)], default=f0) - f0
            raise ValueError(f"could not raise ln p(target) by {gain} nats at layer {layer} "
                             f"(best reached {reached:.3f}); ask for less")
        method, best, f_best = min(cands, key=lambda c: float(c[1].norm()))
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return {"delta": best.detach(), "norm": float(best.norm()), "base_logprob": f0,
            "steered_logprob": f_best, "achieved_gain": f_best - f0, "method": method,
            "first_order_norm": float(first.norm()),
            "gradient_direction_norm": float(line_delta.norm()) if line_ok else math.nan,
            "iterated_norm": float(delta.norm()) if iterated_ok else math.nan,
            "iterations": its}


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    layer: Optional[int] = None, delta: Optional[torch.Tensor] = None,
                    position: Optional[int] = None) -> torch.Tensor:
    """Greedy continuation [1, T + max_new_tokens] with delta added at (layer, position)."""
    ids = input_ids.reshape(1, -1)
    with added_to_hidden(model, layer if layer is not None else 0,
                         position if position is not None else ids.shape[1] - 1, delta):
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids


def steer(model: nn.Module, tokenizer, prompt: str, target: str, layer: int, gain: float,
          max_new_tokens: int = 20, iterations: int = 20, tol: float = 1e-3,
          kinetic_scale: str = "none") -> dict:
    """Steer toward `target` and generate with and without the change.

    Returns the delta summary, both texts, and the energy (physkern.research.analysis.energy definition,
    last-layer pre-norm state) at the steered step and over the continuation, without and with
    steering.
    """
    from .energy import energy_terms
    if not prompt:
        raise ValueError("prompt must not be empty")
    target_id = target_token_id(tokenizer, target)
    layer = check_layer(model, layer)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    if ids.shape[1] == 0:
        raise ValueError(f"prompt {prompt!r} tokenises to no tokens")
    p = ids.shape[1] - 1
    sol = steering_delta(model, ids, layer, target_id, gain, iterations, tol)
    with torch.no_grad():
        h = block_output_at(model, ids, layer)[p]
    plain = greedy_generate(model, ids, max_new_tokens)
    steered = greedy_generate(model, ids, max_new_tokens, layer, sol["delta"], p)

    def energy(seq, delta):
        with added_to_hidden(model, layer, p, delta):
            t = energy_terms(model, seq[0], kinetic_scale=kinetic_scale)
        cont = t["E"][p:]
        return {"E_at_steered_step": float(t["E"][p]), "K_at_steered_step": float(t["K"][p]),
                "V_at_steered_step": float(t["V"][p]), "mean_E_continuation": float(cont.mean()),
                "cv_E_continuation": float(cont.std() / abs(cont.mean()))}

    with torch.no_grad():
        p_plain = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    out = {k: v for k, v in sol.items() if k != "delta"}
    out.update({
        "prompt": prompt, "target": target, "target_id": target_id, "layer": layer,
        "position": p, "gain_requested": gain, "hidden_norm": float(h.norm()),
        "relative_norm": sol["norm"] / float(h.norm()),
        "target_prob_before": float(p_plain[target_id]),
        "target_prob_after": math.exp(sol["steered_logprob"]),
        "text_plain": tokenizer.decode(plain[0, ids.shape[1]:]),
        "text_steered": tokenizer.decode(steered[0, ids.shape[1]:]),
        "energy_plain": energy(plain, None), "energy_steered": energy(steered, sol["delta"]),
        "max_new_tokens": max_new_tokens})
    return out


def block_output_at(model: nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Block `layer`'s output [T, hidden] for input_ids [1, T]."""
    grabbed = {}
    handle = decoder_blocks(model)[layer].register_forward_hook(
        lambda m, a, out: grabbed.__setitem__("h", block_output(out)))
    try:
        model(input_ids=input_ids)
    finally:
        handle.remove()
    return grabbed["h"][0]
