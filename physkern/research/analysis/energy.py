"""Token-to-token "energy" of a language model (after arXiv 2508.08492, seeds 003/004).

For a text x_0..x_{T-1} and the last-layer hidden states h_t (before the final norm by default,
`state="post_norm"` for after), per position t = 0..T-2:

    kinetic    K_t = 1/2 ||h_{t+1} - h_t||^2 / s        (s = 1, or the hidden size with
                                                        kinetic_scale="dim")
    potential  V_t = -ln p(x_{t+1} | x_<=t)             (log point perplexity, nats)
    energy     E_t = K_t + V_t

Only the paper's abstract and a summary are available, not its exact normalisation: this is the
definition used here, and both the hidden state and the kinetic scale are options. Conservation
is measured by the coefficient of variation CV = std / |mean| (population std over positions) of
E, and of K and V alone; the kinetic/potential ratio is mean K / mean V. Positions can be
dropped from the start (`skip_first`): LLaMA-family models park a huge activation on the first
token, which makes K_0 an outlier.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ._common import all_hidden_states, pyplot

STATES = ("pre_norm", "post_norm")
KINETIC_SCALES = ("none", "dim")


def check_options(state: str, kinetic_scale: str) -> None:
    """ValueError unless state is in STATES and kinetic_scale in KINETIC_SCALES."""
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    if kinetic_scale not in KINETIC_SCALES:
        raise ValueError(f"kinetic_scale must be one of {', '.join(KINETIC_SCALES)}, "
                         f"got {kinetic_scale!r}")


@torch.no_grad()
def energy_terms(model: nn.Module, input_ids: torch.Tensor, state: str = "pre_norm",
                 kinetic_scale: str = "none") -> dict[str, np.ndarray]:
    """K, V, E per position for one text.

    input_ids: [T] or [1, T] token ids, T >= 2. Returns {"K", "V", "E"}: float64 arrays [T - 1],
    entry t for the step from position t to t + 1.
    """
    check_options(state, kinetic_scale)
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"input_ids: need one text of at least 2 tokens, got shape "
                         f"{tuple(input_ids.shape)} (an empty or one-token text has no steps)")
    hs = all_hidden_states(model, ids)
    h = (hs["states"][-1] if state == "pre_norm" else hs["post_norm"])[0].double()
    k = 0.5 * (h[1:] - h[:-1]).pow(2).sum(-1)
    if kinetic_scale == "dim":
        k = k / h.shape[-1]
    logp = torch.log_softmax(hs["logits"][0, :-1].double(), dim=-1)
    v = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    k, v = k.cpu().numpy(), v.cpu().numpy()
    return {"K": k, "V": v, "E": k + v}


def coefficient_of_variation(x: np.ndarray) -> float:
    """std / |mean| with the population std (ddof 0)."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.std() / abs(x.mean()))


def energy_statistics(terms: dict[str, np.ndarray], skip_first: int = 0) -> dict[str, float]:
    """CV of E, K, V; their means; mean K / mean V. Drops the first `skip_first` steps."""
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    n = terms["E"].size
    if n - skip_first < 2:
        raise ValueError(f"skip_first={skip_first} leaves fewer than 2 of {n} steps")
    t = {k: v[skip_first:] for k, v in terms.items()}
    return {"cv_E": coefficient_of_variation(t["E"]), "cv_K": coefficient_of_variation(t["K"]),
            "cv_V": coefficient_of_variation(t["V"]), "mean_E": float(t["E"].mean()),
            "mean_K": float(t["K"].mean()), "mean_V": float(t["V"].mean()),
            "kinetic_over_potential": float(t["K"].mean() / t["V"].mean())}


def energy_over_texts(model: nn.Module, texts: torch.Tensor, state: str = "pre_norm",
                      kinetic_scale: str = "none", skip_first: int = 0) -> dict:
    """Statistics per text (rows of texts [n, T]) and their mean over texts."""
    per_text = [energy_statistics(energy_terms(model, row, state, kinetic_scale), skip_first)
                for row in texts]
    mean = {k: float(np.mean([p[k] for p in per_text])) for k in per_text[0]}
    return {"mean": mean, "per_text": per_text}


def random_reinit(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with fresh random weights (transformers' own initialisation)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(model.config)
    return fresh.to(next(model.parameters()).device).eval()


def plot_energy(example: dict, summary: dict, path) -> None:
    """Left: K, V, E along one text for the pretrained and one random model; right: CVs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, (label, terms) in zip(axes[:2], example.items()):
        x = np.arange(terms["E"].size)
        for key, style in (("K", "-"), ("V", "-"), ("E", "k--")):
            ax.plot(x, terms[key], style, lw=0.9, label=key)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{label}: one text")
        ax.set_xlabel("position t")
        ax.legend(fontsize=8)
    ax = axes[2]
    names = list(summary)
    keys = ("cv_E", "cv_K", "cv_V")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(keys)) + i * width, [summary[name][k] for k in keys], width,
               label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(["CV of E", "CV of K", "CV of V"])
    ax.set_yscale("log")
    ax.set_title("coefficient of variation over positions (mean over texts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
