"""QuantizedWeight: the one storage format every physkern quantizer produces.

A weight W [out, in] is cut into blocks of `block_dim` consecutive input columns
(n_blocks = in / block_dim per row). Row r uses codebook c(r) = r // codebook_rows. With S
residual stages, scales and optional offsets:

    W[r, j] = scale[r, j // scale_group] * sum_s C[s, c(r), idx[s, r, j // d], j % d]
              + offset[r, j // scale_group]

- codebooks   [S, n_codebooks, K, d]   float16 by default (n_codebooks = out / codebook_rows)
- packed      [S, out, words]          int32 bit stream of idx (physkern.quant.packing)
- scales      [out, in / scale_group]  or None (then scale = 1)
- offsets     [out, in / scale_group]  or None (then offset = 0); needs scales

Scopes: "row" (codebook_rows = 1, the seeds), "group" (G consecutive rows share one codebook),
"layer" (codebook_rows = out). A scalar RTN grid is the special case d = 1, K = 2**bits,
layer scope, codebook = [0, 1, ..., K-1], with per-group scales and offsets (the affine map).

Optional input rotation (physkern.rotation, issue 19): with `rotation` = R set, the tensors above
hold the STORED-BASIS weight Q (a quantization of W R) and the layer computes y = (x R) Q^T, so
the effective weight is Q R^T. `dequantize()` returns that effective weight (what every generic
consumer, error report and the embedding lookup want); physkern.quant.reconstruct rebuilds Q.
R is described by (kind, seed, block) only: no stored tensor, no bits (accounting unchanged).

Optional shared codebook (physkern.shared_codebook, issue 19): with `shared` = a group name, the
weight has layer scope and `codebooks` [S, 1, K, d] is ONE tensor held by every layer of that
group (an nn.Parameter, so moving or fine-tuning the model keeps it one); it is stored once in a
saved file and counted once in bits (physkern.quant.accounting splits it over the group).

Optional sparse outliers (physkern.quant.outliers, issue 19): `outliers` = S, n corrections per
row in the EFFECTIVE basis (after any rotation), so the layer computes x (Q R^T + S)^T; their
column indices and values are stored and counted like every other tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..rotation import Rotation
from .outliers import SparseOutliers
from .packing import index_bits, unpack_indices, words_per_row
from .reconstruct import reconstruct

SCOPES = ("row", "group", "layer")


@dataclass
class QuantizedWeight:
    packed: torch.Tensor
    codebooks: torch.Tensor
    scales: Optional[torch.Tensor]
    offsets: Optional[torch.Tensor]
    in_features: int
    out_features: int
    codebook_rows: int
    scale_group: int
    rotation: Optional[Rotation] = None   # input rotation R (see the module docstring)
    shared: Optional[str] = None          # shared-codebook group name (module docstring)
    outliers: Optional[SparseOutliers] = None   # sparse corrections S (module docstring)

    # ---- derived shape facts -------------------------------------------------------------
    @property
    def stages(self) -> int:
        return self.codebooks.shape[0]

    @property
    def k(self) -> int:
        return self.codebooks.shape[2]

    @property
    def block_dim(self) -> int:
        return self.codebooks.shape[3]

    @property
    def n_blocks(self) -> int:
        return self.in_features // self.block_dim

    @property
    def bits(self) -> int:
        return index_bits(self.k)

    @property
    def scope(self) -> str:
        if self.codebook_rows == 1:
            return "row"
        if self.codebook_rows == self.out_features:
            return "layer"
        return "group"

    def validate(self) -> "QuantizedWeight":
        """Check every shape and dtype against the format; raise ValueError naming the field."""
        out, inf = self.out_features, self.in_features
        if self.codebooks.dim() != 4:
            raise ValueError(f"codebooks must be [S, n_codebooks, K, d], got {tuple(self.codebooks.shape)}")
        s, n_cb, k, d = self.codebooks.shape
        if inf % d:
            raise ValueError(f"in_features ({inf}) must be divisible by block_dim ({d})")
        if self.codebook_rows < 1 or out % self.codebook_rows:
            raise ValueError(f"codebook_rows ({self.codebook_rows}) must divide out_features ({out})")
        if n_cb != out // self.codebook_rows:
            raise ValueError(f"codebooks hold {n_cb} codebooks, expected {out // self.codebook_rows}")
        want = (s, out, words_per_row(inf // d, index_bits(k)))
        if tuple(self.packed.shape) != want or self.packed.dtype != torch.int32:
            raise ValueError(f"packed must be int32 {want}, got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        if self.scale_group < 1 or inf % self.scale_group:
            raise ValueError(f"scale_group ({self.scale_group}) must divide in_features ({inf})")
        if self.scales is not None and tuple(self.scales.shape) != (out, inf // self.scale_group):
            raise ValueError(f"scales must be {(out, inf // self.scale_group)}, got "
                             f"{tuple(self.scales.shape)}")
        if self.offsets is not None:
            if self.scales is None:
                raise ValueError("offsets need scales")
            if self.offsets.shape != self.scales.shape:
                raise ValueError("offsets must have the shape of scales")
        if self.rotation is not None:
            if not isinstance(self.rotation, Rotation):
                raise ValueError(f"rotation must be a physkern.rotation.Rotation or None, got "
                                 f"{type(self.rotation).__name__}")
            if self.rotation.n != inf:
                raise ValueError(f"rotation is over {self.rotation.n} features, in_features is "
                                 f"{inf}")
        if self.shared is not None:
            if not isinstance(self.shared, str) or not self.shared:
                raise ValueError(f"shared must be None or a non-empty group name, got "
                                 f"{self.shared!r}")
            if n_cb != 1:
                raise ValueError(f"a shared codebook has layer scope (one codebook), got "
                                 f"{n_cb} codebooks")
        if self.outliers is not None:
            if not isinstance(self.outliers, SparseOutliers):
                raise ValueError(f"outliers must be a physkern.quant.outliers.SparseOutliers or "
                                 f"None, got {type(self.outliers).__name__}")
            if (self.outliers.out_features, self.outliers.in_features) != (out, inf):
                raise ValueError(f"outliers are for a [{self.outliers.out_features}, "
                                 f"{self.outliers.in_features}] weight, this one is [{out}, {inf}]")
            self.outliers.validate()
        return self

    def indices(self) -> torch.Tensor:
        """Unpacked indices [S, out, n_blocks] int64."""
        return unpack_indices(self.packed, self.bits, self.n_blocks)

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The effective W [out, in] in `dtype`: physkern.quant.reconstruct.reconstruct's
        stored-basis Q, times R^T when the weight carries a rotation R (y = x W^T either way).

        rows: optional int64 row numbers [n] (any order, repeats allowed): then only those rows
        are rebuilt, W[rows] [n, in] (what a quantized embedding lookup needs).
        """
        packed, scales, offsets = self.packed, self.scales, self.offsets
        row_ids = None   # all rows
        if rows is not None:
            if rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"rows must be a 1-d int64/int32 tensor, got {rows.dtype} "
                                 f"{tuple(rows.shape)}")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.out_features):
                raise ValueError(f"rows must lie in [0, {self.out_features}), got "
                                 f"[{int(rows.min())}, {int(rows.max())}]")
            rows = rows.to(device=packed.device, dtype=torch.int64)
            packed, row_ids = packed[:, rows], rows
            scales = None if scales is None else scales[rows]
            offsets = None if offsets is None else offsets[rows]
        q = reconstruct(unpack_indices(packed, self.bits, self.n_blocks), self.codebooks,
                        scales, offsets, codebook_rows=self.codebook_rows, rows=row_ids,
                        dtype=dtype)
        q = q if self.rotation is None else self.rotation.unapply(q)
        if self.outliers is not None:
            q = q + self.outliers.to_dense(dtype, rows).to(q.device)
        return q

    def to(self, device) -> "QuantizedWeight":
        """The same weight on `device`. A shared codebook is one tensor for its whole group:
        move it once (physkern.shared_codebook does), never per layer, so it must be there."""
        mv = lambda t: None if t is None else t.to(device)
        if self.shared is not None and mv(self.codebooks) is not self.codebooks:
            raise ValueError(f"device: the shared codebook of group {self.shared!r} is on "
                             f"{self.codebooks.device}, not {device}; move the group's tensor "
                             "once (a per-layer copy would no longer be shared)")
        return QuantizedWeight(mv(self.packed), mv(self.codebooks), mv(self.scales),
                               mv(self.offsets), self.in_features, self.out_features,
                               self.codebook_rows, self.scale_group, self.rotation, self.shared,
                               None if self.outliers is None else self.outliers.to(device))
