"""Bit-packing of codebook indices: a little-endian bit stream per row, in int32 words.

Index b of a row occupies bits [b*bits, (b+1)*bits) of that row's stream; bit i of the stream is
bit (i % 32) of word i // 32. An index may straddle two words. Each row starts on a fresh word,
so a row of n indices takes ceil(n * bits / 32) words: the only waste is the tail of each row,
and the accounting counts it (it counts stored words, not ideal bits).

This is the layout the codebook-matmul kernel reads directly.
"""
from __future__ import annotations

import math

import torch


def index_bits(k: int) -> int:
    """Stored bits per index for a codebook of k entries: ceil(log2 k), at least 1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return max(1, math.ceil(math.log2(k)))


def words_per_row(n_indices: int, bits: int) -> int:
    """int32 words one row of `n_indices` indices of `bits` bits occupies."""
    return (n_indices * bits + 31) // 32


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices [..., n] (each < 2**bits) into int32 words [..., words_per_row(n, bits)]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= (1 << bits)):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for {bits}-bit packing, got range "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    n = indices.shape[-1]
    n_words = words_per_row(n, bits)
    v = indices.to(torch.int64)
    pos = torch.arange(n, device=v.device, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    lead = v.shape[:-1]
    lo = (v << shift) & 0xFFFFFFFF
    # The part that spills into the next word (zero when the index fits).
    spill = torch.where(shift + bits > 32, v >> (32 - shift).clamp(max=63), torch.zeros_like(v))
    words = torch.zeros(*lead, n_words + 1, dtype=torch.int64, device=v.device)
    words.scatter_add_(-1, word.expand(*lead, n), lo)
    words.scatter_add_(-1, (word + 1).expand(*lead, n), spill)
    words = words[..., :n_words]
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)  # reinterpret as int32
    return words.to(torch.int32)


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_indices: int32 words [..., W] -> int64 indices [..., n]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32, got {packed.dtype}")
    if packed.shape[-1] != words_per_row(n, bits):
        raise ValueError(f"packed has {packed.shape[-1]} words per row, expected "
                         f"{words_per_row(n, bits)} for {n} indices of {bits} bits")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)
    pos = torch.arange(n, device=w.device, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    lead = w.shape[:-1]
    w0 = w.gather(-1, word.expand(*lead, n))
    w1 = w.gather(-1, (word + 1).expand(*lead, n))
    return ((w0 >> shift) | (w1 << (32 - shift))) & ((1 << bits) - 1)
