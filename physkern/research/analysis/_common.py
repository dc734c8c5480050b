"""Helpers shared by the analyses in this package: weight types, decoder blocks, hidden states
and plotting setup. (Their command line, arguments and output paths: physkern.commands.analyze.)"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from ...linear import LinearLayer, decoder_linear_layers

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Short names a user may type for a weight type (LLaMA and GPT-2 naming).
TYPE_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj"}


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# weight types


def split_layer_name(name: str) -> tuple[Optional[int], str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); no index -> (None, name)."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end():]


def weight_groups(model: nn.Module) -> "OrderedDict[str, list[LinearLayer]]":
    """Decoder linear layers grouped by weight type, each list ordered by layer index.

    GPT-2 types: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; LLaMA: self_attn.q_proj, ...,
    mlp.down_proj. Every type must appear once per decoder block.
    """
    groups: "OrderedDict[str, list[tuple[int, LinearLayer]]]" = OrderedDict()
    for layer in decoder_linear_layers(model):
        idx, wtype = split_layer_name(layer.name)
        if idx is None:
            continue
        groups.setdefault(wtype, []).append((idx, layer))
    out: "OrderedDict[str, list[LinearLayer]]" = OrderedDict()
    for wtype, items in groups.items():
        items.sort(key=lambda t: t[0])
        out[wtype] = [l for _, l in items]
    if not out:
        raise ValueError("model: found no decoder linear layers with a layer index in their name")
    return out


def resolve_types(available: Sequence[str], requested: Optional[Sequence[str]]) -> list[str]:
    """Map user type names (full 'self_attn.q_proj', suffix 'q_proj', alias 'q') to types.

    Raises ValueError naming the allowed values for an unknown type.
    """
    if not requested:
        return list(available)
    out = []
    for name in requested:
        name = TYPE_ALIASES.get(name, name)
        matches = [t for t in available if t == name or t.endswith("." + name)]
        if len(matches) != 1:
            raise ValueError(f"weight type {name!r} is unknown for this model; allowed: "
                             f"{', '.join(available)} (or their last part, or q/k/v/o/gate/up/"
                             f"down for LLaMA)")
        out.append(matches[0])
    return out


def short_type(wtype: str) -> str:
    """'self_attn.q_proj' -> 'q_proj'; 'attn.c_attn' -> 'attn.c_attn' (GPT-2 needs the prefix)."""
    last = wtype.rsplit(".", 1)[-1]
    return last if last.endswith("_proj") and last != "c_proj" else wtype


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of a 2-D matrix.

    Computed as square roots of the eigenvalues of the smaller Gram matrix in float64, which is
    much faster than an SVD on CPU; the absolute error of sigma_i^2 is about
    1e-16 * sigma_max^2, far below any singular value these analyses look at.
    """
    import numpy as np
    w = weight.detach().double().cpu()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    # numpy's LAPACK call is ~10x cheaper than torch.linalg.eigvalsh on this CPU build
    eigs = np.linalg.eigvalsh(gram.numpy())[::-1].clip(min=0)
    return torch.from_numpy(np.sqrt(eigs).copy())


# ----------------------------------------------------------------------------------------------
# blocks and hidden states


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (LLaMA: model.layers, GPT-2: transformer.h)."""
    base = getattr(model, "base_model", model)
    for attr in ("layers", "h", "blocks"):
        blocks = getattr(base, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"model: cannot find the decoder blocks of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (LLaMA: model.norm, GPT-2: transformer.ln_f)."""
    base = getattr(model, "base_model", model)
    for attr in ("norm", "ln_f", "final_layernorm"):
        mod = getattr(base, attr, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"model: cannot find the final norm of {type(model).__name__}")


def block_output(out) -> torch.Tensor:
    """A block's hidden-state output, whether the block returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def all_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Hidden states at every depth for `input_ids` [batch, seq].

    Returns {"states": [L + 1] tensors [batch, seq, hidden] (0 = embedding output, l = output of
    block l, the last one before the final norm), "post_norm": [batch, seq, hidden] (final norm
    applied: what transformers reports as its last hidden state), "logits": [batch, seq, vocab]}.
    """
    captured = {}
    hook = final_norm(model).register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("pre", args[0]))
    try:
        out = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        hook.remove()
    states = list(out.hidden_states[:-1]) + [captured["pre"]]
    return {"states": states, "post_norm": out.hidden_states[-1], "logits": out.logits}
