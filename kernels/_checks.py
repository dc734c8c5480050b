"""Argument checks of the codebook-matmul storage format, shared by every path that reads it
(Triton launchers, the C++ ops' Python launchers, the torch references)."""
from __future__ import annotations

from typing import Optional

import torch

from .packing import index_bits, words_per_row


def check_matmul_inputs(x: torch.Tensor, packed: torch.Tensor, codebooks: torch.Tensor,
                        scales: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], in_features: int, codebook_rows: int,
                        scale_group: int) -> None:
    """Raise ValueError naming the argument when shapes or dtypes break the storage format."""
    if packed.dim() != 3 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32 [S, out, words], got {packed.dtype} {tuple(packed.shape)}")
    if codebooks.dim() != 4 or not codebooks.is_floating_point():
        raise ValueError(f"codebooks must be float [S, n_codebooks, K, d], got {codebooks.dtype} "
                         f"{tuple(codebooks.shape)}")
    stages, out = packed.shape[0], packed.shape[1]
    s2, n_cb, k, d = codebooks.shape
    if s2 != stages:
        raise ValueError(f"codebooks have {s2} stages, packed has {stages}")
    if in_features < 1 or in_features % d:
        raise ValueError(f"in_features ({in_features}) must be a positive multiple of block_dim ({d})")
    if codebook_rows < 1 or out % codebook_rows or n_cb != out // codebook_rows:
        raise ValueError(f"codebook_rows ({codebook_rows}) must divide out_features ({out}) into "
                         f"{n_cb} codebooks")
    want_words = words_per_row(in_features // d, index_bits(k))
    if packed.shape[2] != want_words:
        raise ValueError(f"packed has {packed.shape[2]} words per row, expected {want_words}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, expected in_features={in_features}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if scale_group < 1 or in_features % scale_group:
        raise ValueError(f"scale_group ({scale_group}) must divide in_features ({in_features})")
    if scales is not None and tuple(scales.shape) != (out, in_features // scale_group):
        raise ValueError(f"scales must be {(out, in_features // scale_group)}, got {tuple(scales.shape)}")
    if offsets is not None:
        if scales is None:
            raise ValueError("offsets need scales")
        if offsets.shape != scales.shape:
            raise ValueError(f"offsets must have the shape of scales {tuple(scales.shape)}, "
                             f"got {tuple(offsets.shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias must be [{out}], got {tuple(bias.shape)}")
