"""The output head and the input embedding: finding them, calibrating the head, swapping both.

The head (lm_head) computes logits from the final hidden states; the embedding looks tokens up.
In tied models (SmolLM2, GPT-2) they are one [vocab, hidden] tensor, 21% of SmolLM2-135M's
parameters. physkern quantizes that tensor once, as the head sees it: the head's calibration
statistics are those of the final hidden states (its inputs), and the embedding then reads the
head's quantized rows (physkern.embedding.QuantizedEmbedding). Untied models get their embedding
quantized separately, without calibration (its "inputs" are one-hot token ids).

physkern.api.quantize drives this (it owns the quantizers); this module only finds, measures
and swaps, so it imports nothing of api.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .calib import Gram
from .embedding import QuantizedEmbedding
from .layers import QuantizedLinear
from .models import replace_layer
from .sequential import inputs_reaching


@dataclass
class HeadAndEmbedding:
    """Where a causal LM keeps its output head and input embedding.

    head_name / embedding_name: dotted module names; tied: one tensor serves both.
    """
    head_name: str
    embedding_name: str
    head: nn.Linear
    embedding: nn.Embedding
    tied: bool


def find_head_and_embedding(model: nn.Module) -> HeadAndEmbedding:
    """The output head (nn.Linear [vocab, hidden]) and input embedding of a transformers LM."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"embedding: the output head is a {type(head).__name__}, not an "
                         "nn.Linear (already quantized, or a model without a linear head)")
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"embedding: the input embedding is a {type(emb).__name__}, not an "
                         "nn.Embedding (already quantized?)")
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    tied = head.weight is emb.weight
    if not tied and tuple(head.weight.shape) != tuple(emb.weight.shape):
        raise ValueError(f"embedding: head {tuple(head.weight.shape)} and embedding "
                         f"{tuple(emb.weight.shape)} differ in shape")
    return HeadAndEmbedding(names[id(head)], names[id(emb)], head, emb, tied)


@torch.no_grad()
def head_input_gram(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> Gram:
    """X^T X of the head's inputs (the final hidden states) over calibration windows [n, seq].

    The forward stops at the head (physkern.sequential.inputs_reaching), so the [tokens, vocab]
    logits are never computed. Run it after the blocks are quantized: the head then sees the hidden states the
    quantized model produces, as every other layer did in physkern.sequential.
    """
    head = model.get_output_embeddings()
    gram = Gram(head.in_features)

    def accumulate(args, kwargs):
        x = (args[0] if args else kwargs["input"]).detach()
        gram.update(x.reshape(-1, x.shape[-1]).float())

    inputs_reaching(model, head, windows, accumulate, batch_size)
    if gram.count == 0:
        raise ValueError("calibration: no tokens reached the output head")
    return gram


def install_quantized_head(model: nn.Module, where: HeadAndEmbedding, head: QuantizedLinear,
                           embedding_table: Optional[QuantizedLinear] = None) -> None:
    """Swap in the quantized head and a QuantizedEmbedding.

    Tied: the embedding reads `head`'s buffers. Untied: `embedding_table` holds the embedding's
    own quantized [vocab, hidden] weight. The config stops asking transformers to tie the two
    (there is no `.weight` left to tie; the tie now lives in QuantizedEmbedding) and records it.
    """
    if where.tied and embedding_table is not None:
        raise ValueError("embedding_table is only for untied models")
    if not where.tied and embedding_table is None:
        raise ValueError("an untied model needs its embedding's own quantized table")
    dtype = where.embedding.weight.dtype
    emb = QuantizedEmbedding(head if where.tied else embedding_table, tied=where.tied,
                             dtype=dtype, padding_idx=where.embedding.padding_idx)
    replace_layer(model, where.head_name, head)
    replace_layer(model, where.embedding_name, emb)
    cfg = model.config
    cfg.physkern_tied_embedding = bool(where.tied)
    cfg.tie_word_embeddings = False
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text_cfg is not cfg:
        text_cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 caches the tie mapping
        model.all_tied_weights_keys = {}
