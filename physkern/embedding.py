"""QuantizedEmbedding: a token lookup that reads a quantized [vocab, hidden] weight.

For a model whose input embedding and output head are tied (SmolLM2, GPT-2), one quantized
tensor serves both: the head is a QuantizedLinear (logits = codebook matmul with the final hidden
states) and the embedding reads the head's buffers, dequantizing only the rows it looks up. It
holds no tensor of its own, so the weight is stored once on disk and counted once in bits.
For an untied model the embedding owns its own quantized table (a QuantizedLinear used only as
storage, registered as the submodule `table`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """ids [...] int64 -> embeddings [..., embedding_dim] in `dtype`.

    source:  the QuantizedLinear holding the [num_embeddings, embedding_dim] weight: the tied
             output head (not registered here, so not saved twice), or the embedding's own table
    tied:    True when `source` is the output head (then this module has no buffers)
    dtype:   output dtype (the dtype the original embedding computed in)
    """

    def __init__(self, source: QuantizedLinear, tied: bool, dtype: torch.dtype = torch.float32,
                 padding_idx: Optional[int] = None):
        super().__init__()
        if not isinstance(source, QuantizedLinear):
            raise ValueError(f"source must be a QuantizedLinear, got {type(source).__name__}")
        self.num_embeddings = source.out_features
        self.embedding_dim = source.in_features
        self.tied = bool(tied)
        self.dtype = dtype
        self.padding_idx = padding_idx
        if self.tied:
            # A plain attribute, not a submodule: the head owns (and saves) the tensors; the
            # model's .to()/.cuda() move them through the head.
            self.__dict__["_head"] = source
        else:
            self.table = source

    @property
    def weight_source(self) -> QuantizedLinear:
        return self.__dict__["_head"] if self.tied else self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be int64/int32 token ids, got {ids.dtype}")
        qw = self.weight_source.quantized_weight()
        rows = qw.dequantize(self.dtype, rows=ids.reshape(-1))
        return rows.reshape(*ids.shape, self.embedding_dim)

    def layer_meta(self) -> dict:
        return {"tied": self.tied, "dtype": str(self.dtype).replace("torch.", ""),
                "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"{'reads the tied output head' if self.tied else 'own quantized table'}, "
                f"dtype={self.dtype}")
