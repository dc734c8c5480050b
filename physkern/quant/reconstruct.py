"""reconstruct(): the one function that rebuilds a dense weight from the stored format.

    W[r, j] = scale[r, j // g] * sum_s C[s, c(r), idx[s, r, j // d], j % d] + offset[r, j // g]

(physkern.quant.format, with c(r) = r // codebook_rows and g = in / scales.shape[1]). Every
Python place that needs W uses it: QuantizedWeight.dequantize (and through it the layers'
reference path and the quantized embedding's row lookup), the codebook refinement
(physkern.quant.codebook.refine_codebooks) and fine-tuning (physkern.finetune). It is plain
torch and differentiable w.r.t. codebooks, scales and offsets (the indices are fixed); the
gather is one embedding lookup per stage into the flat [n_codebooks * K, d] table, whose
backward is a cheap index_add. The kernels (kernels/) keep their own independent reference.

It rebuilds the STORED-BASIS weight only: for a weight with an input rotation R
(physkern.rotation) that is Q, and the layer computes y = (x R) Q^T; callers that need the
effective weight Q R^T apply `rotation.unapply` (QuantizedWeight.dequantize does) or rotate x
(fine-tuning's layer copies, like QuantizedLinear's forward).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def reconstruct(indices: torch.Tensor, codebooks: torch.Tensor,
                scales: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                *, codebook_rows: int, rows: Optional[torch.Tensor] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dense W [n, in] from unpacked indices, codebooks and optional scales / offsets.

    indices:   [S, n, n_blocks] integer (int64 or int32), the codebook entry of each block.
    codebooks: [S, n_codebooks, K, d]; in = n_blocks * d.
    scales:    [n, G] or None (scale 1); G must divide in (scale_group = in / G).
    offsets:   [n, G] or None (offset 0); needs scales.
    codebook_rows: consecutive rows sharing one codebook (1 = row scope, out = layer scope).
    rows:      int64 [n], the row numbers of the n rows given (default 0..n-1), used only to
               find each row's codebook: pass it when indices/scales/offsets hold a subset of
               the rows (as a quantized embedding's lookup does).
    dtype:     the computation and result dtype (default: the codebooks' dtype); codebooks,
               scales and offsets are cast to it (a differentiable cast).
    """
    if indices.dim() != 3 or codebooks.dim() != 4:
        raise ValueError(f"indices must be [S, n, n_blocks] and codebooks [S, n_codebooks, K, d], "
                         f"got {tuple(indices.shape)} and {tuple(codebooks.shape)}")
    s, n_cb, k, d = codebooks.shape
    _, n, nb = indices.shape
    if indices.shape[0] != s:
        raise ValueError(f"indices hold {indices.shape[0]} stages, codebooks {s}")
    if offsets is not None and scales is None:
        raise ValueError("offsets need scales")
    dtype = dtype or codebooks.dtype
    cb = codebooks.to(dtype)
    # flat row of each block in the [n_codebooks * K, d] table (keeps the indices' int dtype);
    # one shared codebook (layer scope, scalar grids): the indices already are those rows
    flat = indices
    if n_cb > 1:
        row_ids = (torch.arange(n, device=indices.device) if rows is None
                   else rows.to(device=indices.device, dtype=torch.int64))
        base = ((row_ids // codebook_rows) * k).to(indices.dtype)
        flat = indices + base[None, :, None]                             # [S, n, nb]
    w = F.embedding(flat[0], cb[0].reshape(n_cb * k, d))                 # [n, nb, d]
    for i in range(1, s):  # S is 1-3: a loop over stages, not rows
        w = w + F.embedding(flat[i], cb[i].reshape(n_cb * k, d))
    inf = nb * d
    if scales is None:
        return w.reshape(n, inf)
    g = scales.shape[1]                                                  # groups per row
    if tuple(scales.shape) != (n, g) or inf % g:
        raise ValueError(f"scales must be [{n}, G] with G dividing {inf}, got "
                         f"{tuple(scales.shape)}")
    w = w.reshape(n, g, inf // g) * scales.to(dtype)[:, :, None]
    if offsets is not None:
        w = w + offsets.to(dtype)[:, :, None]
    return w.reshape(n, inf)
