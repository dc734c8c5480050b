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

import argparse
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...provenance import provenance, write_json
from ._common import add_output_args, all_hidden_states, output_path, pyplot

STATES = ("pre_norm", "post_norm")
KINETIC_SCALES = ("none", "dim")


def _check(state: str, kinetic_scale: str) -> None:
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
    _check(state, kinetic_scale)
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


# ----------------------------------------------------------------------------------------------
# CLI


def register_analysis(sub) -> None:
    from ...commands._common import add_model_corpus_args
    p = sub.add_parser("energy", help="kinetic + point-perplexity 'energy' and its conservation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_corpus_args(p)
    p.add_argument("--texts", type=int, default=4, help="texts (windows of evaluation text)")
    p.add_argument("--length", type=int, default=256, help="tokens per text (default 256)")
    p.add_argument("--state", choices=STATES, default="pre_norm",
                   help="last-layer hidden state before (default) or after the final norm")
    p.add_argument("--kinetic-scale", choices=KINETIC_SCALES, default="none",
                   help="divide K by 1 (none, default) or by the hidden size (dim)")
    p.add_argument("--skip-first", type=int, default=0,
                   help="drop this many steps at the start of each text (default 0)")
    p.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="seeds of randomly re-initialised models of the same architecture")
    add_output_args(p, "energy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...data import evaluation_tokens, load_corpus
    from ...models import load_model, resolve_model_name
    _check(args.state, args.kinetic_scale)
    if args.texts <= 0 or args.length < 2:
        raise ValueError(f"texts must be >= 1 and length >= 2, got {args.texts}, {args.length}")
    if args.skip_first < 0 or args.skip_first > args.length - 3:
        raise ValueError(f"skip-first must be in [0, length - 3], got {args.skip_first}")
    corpus = load_corpus(args.corpus)
    model, tok = load_model(args.model, device=args.device)
    ids = evaluation_tokens(tok, corpus, args.texts * args.length)
    texts = ids.view(args.texts, args.length).to(args.device)
    opts = dict(state=args.state, kinetic_scale=args.kinetic_scale)
    results = {"pretrained": energy_over_texts(model, texts, skip_first=args.skip_first, **opts)}
    # the same with the first step dropped, to show how much the first token's jump weighs
    alt_skip = 1 if args.skip_first == 0 else 0
    alt = {"pretrained": energy_over_texts(model, texts, skip_first=alt_skip, **opts)["mean"]}
    example = {"pretrained": energy_terms(model, texts[0], **opts)}
    for seed in args.random_seeds:
        rnd = random_reinit(model, seed)
        name = f"random seed {seed}"
        results[name] = energy_over_texts(rnd, texts, skip_first=args.skip_first, **opts)
        alt[name] = energy_over_texts(rnd, texts, skip_first=alt_skip, **opts)["mean"]
        if len(example) == 1:
            example[name] = energy_terms(rnd, texts[0], **opts)
        del rnd
    print(f"{'model':<16}{'CV(E)':>9}{'CV(K)':>9}{'CV(V)':>9}{'mean K':>12}{'mean V':>9}"
          f"{'K/V':>12}   (skip_first={args.skip_first})")
    for name, r in results.items():
        m = r["mean"]
        print(f"{name:<16}{m['cv_E']:>9.3f}{m['cv_K']:>9.3f}{m['cv_V']:>9.3f}{m['mean_K']:>12.5g}"
              f"{m['mean_V']:>9.3f}{m['kinetic_over_potential']:>12.5g}")
    print(f"with skip_first={alt_skip}:")
    for name, m in alt.items():
        print(f"{name:<16}{m['cv_E']:>9.3f}{m['cv_K']:>9.3f}{m['cv_V']:>9.3f}{m['mean_K']:>12.5g}"
              f"{m['mean_V']:>9.3f}{m['kinetic_over_potential']:>12.5g}")
    payload = {"analysis": "energy", "model": resolve_model_name(args.model),
               "corpus": corpus.describe(), "texts": args.texts, "length": args.length,
               "definition": {"K": "0.5*||h_{t+1}-h_t||^2" + (" / hidden_size"
                                                              if args.kinetic_scale == "dim" else ""),
                              "V": "-ln p(x_{t+1}|x_<=t) (nats)", "E": "K + V",
                              "state": args.state, "cv": "population std / |mean| over positions",
                              "skip_first": args.skip_first,
                              "random": "transformers from_config init, torch.manual_seed(seed)"},
               "results": results, f"mean_with_skip_first_{alt_skip}": alt,
               "provenance": provenance(args.device)}
    js = output_path(args, ".json")
    write_json(js, payload)
    plot_energy(example, {k: v["mean"] for k, v in results.items()}, output_path(args, ".png"))
    print(f"wrote {js}, {output_path(args, '.png')}")
    return 0
