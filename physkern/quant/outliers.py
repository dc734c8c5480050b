"""Sparse outliers: a few weights per row corrected exactly, on top of any quantized weight.

After a layer is quantized to Q (effective basis, rotation undone), its error E = W - Q is
largest in a few positions that matter most for the layer's output. We keep `n` corrections per
output row (a fixed count per row: no row pointers to store, and a dense [out, n] layout that a
kernel reads without indirection) and store them as a sparse S, so the layer computes

    y = x (Q + S)^T = x Q^T + x S^T,     S[r, columns[r, k]] = values[r, k]

Selection: per row, the n columns with the largest |E[r, j]| * sqrt(G[j, j]) (G = X^T X of the
layer's input, or E[x^2], or 1 without calibration). Values: with G, per row the least-squares
correction minimising the row's output error (e_r - s)^T G (e_r - s) over s supported on the
chosen columns, s_J = (G_JJ + lambda I)^-1 (G e_r)_J: never worse than no correction (s = 0 is
feasible; the damping keeps that true, see outlier_values). Without G the correction is the
error itself at those positions (exact weights there).

Bits: every stored bit counts: a column index per outlier (16 bits when in_features <= 32768,
else 32) and its value (16 bits, float16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def column_dtype(in_features: int) -> torch.dtype:
    """int16 while every column number fits, else int32 (the narrowest that holds them)."""
    return torch.int16 if in_features <= 2 ** 15 else torch.int32


@dataclass
class SparseOutliers:
    """n corrections per row of an [out, in] weight.

    columns: [out, n] int16/int32, distinct within a row, in [0, in_features)
    values:  [out, n] float16 (or bfloat16/float32), added to the weight at those positions
    """
    columns: torch.Tensor
    values: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.columns.shape[0]

    @property
    def per_row(self) -> int:
        return self.columns.shape[1]

    def validate(self) -> "SparseOutliers":
        """Check shapes, dtypes and column ranges (a loaded file is untrusted); ValueError
        naming the field."""
        if self.in_features < 1:
            raise ValueError(f"outliers: in_features must be >= 1, got {self.in_features}")
        if self.columns.dim() != 2 or self.columns.dtype not in (torch.int16, torch.int32):
            raise ValueError(f"outliers: columns must be a 2-D int16/int32 tensor [out, n], got "
                             f"{self.columns.dtype} {tuple(self.columns.shape)}")
        if self.columns.dtype != column_dtype(self.in_features):
            raise ValueError(f"outliers: columns must be {column_dtype(self.in_features)} for "
                             f"in_features={self.in_features}, got {self.columns.dtype}")
        if tuple(self.values.shape) != tuple(self.columns.shape):
            raise ValueError(f"outliers: values must have the shape of columns "
                             f"{tuple(self.columns.shape)}, got {tuple(self.values.shape)}")
        if self.values.dtype not in VALUE_DTYPES.values():
            raise ValueError(f"outliers: values must be one of {', '.join(VALUE_DTYPES)}, got "
                             f"{self.values.dtype}")
        if self.per_row > self.in_features:
            raise ValueError(f"outliers: {self.per_row} per row but rows hold only "
                             f"{self.in_features} weights")
        if self.columns.is_meta or self.values.is_meta:
            return self   # a skeleton being loaded: its values are checked once they are read
        if self.columns.numel():
            lo, hi = int(self.columns.min()), int(self.columns.max())
            if lo < 0 or hi >= self.in_features:
                raise ValueError(f"outliers: columns must lie in [0, {self.in_features}), got "
                                 f"[{lo}, {hi}]")
            srt = self.columns.long().sort(dim=1).values
            if (srt[:, 1:] == srt[:, :-1]).any():
                raise ValueError("outliers: a row lists the same column twice")
        if not torch.isfinite(self.values.float()).all():
            raise ValueError("outliers: values must be finite")
        return self

    def bits(self) -> int:
        """Stored bits: column indices and values."""
        return (self.columns.numel() * self.columns.element_size()
                + self.values.numel() * self.values.element_size()) * 8

    def to_dense(self, dtype: torch.dtype = torch.float32,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """S as a dense [out, in] tensor (zeros off the outlier positions); with rows (int64
        [n], any order) only those rows, [n, in] (an embedding lookup's few rows)."""
        cols, vals = self.columns, self.values
        if rows is not None:
            cols, vals = cols[rows], vals[rows]
        s = torch.zeros(cols.shape[0], self.in_features, dtype=dtype, device=vals.device)
        return s.scatter_(1, cols.long(), vals.to(dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x S^T: [..., in] -> [..., out] in x's dtype, reading only the outlier columns of x
        (a gather of out*n inputs, not an [out, in] product)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: last dimension must be in_features={self.in_features}, got "
                             f"{tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features)
        if self.per_row == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        picked = flat.index_select(1, self.columns.reshape(-1).long())   # [M, out*n]
        picked = picked.view(flat.shape[0], self.out_features, self.per_row)
        y = (picked * self.values.to(x.dtype)).sum(-1)
        return y.view(*x.shape[:-1], self.out_features)

    def to(self, device) -> "SparseOutliers":
        return SparseOutliers(self.columns.to(device), self.values.to(device), self.in_features)


def per_row_count(fraction: float, in_features: int) -> int:
    """Outliers per row for a fraction of each row's weights (rounded; 0 <= fraction < 1)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outliers: fraction must be in [0, 1), got {fraction}")
    return min(in_features, int(round(fraction * in_features)))


def select_columns(error: torch.Tensor, importance: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Per row, the n columns with the largest |error| * sqrt(importance) ([out, n] int64, in
    increasing column order). importance: [in] (diag of X^T X or E[x^2]) or None (all 1)."""
    score = error.abs().float()
    if importance is not None:
        score = score * importance.float().clamp_min(0).sqrt()[None]
    cols = score.topk(n, dim=1).indices
    return cols.sort(dim=1).values


def outlier_values(error: torch.Tensor, gram: Optional[torch.Tensor], columns: torch.Tensor,
                   percdamp: float = 0.01) -> torch.Tensor:
    """Corrections [out, n] float32 at `columns` [out, n] for an error E = W - Q [out, in].

    With gram G [in, in]: per row s = (G_JJ + lambda I)^-1 (G e_r)_J, lambda = percdamp * mean
    diag G. It never raises the row's error (e-s)^T G (e-s): with b = (G e)_J, A = G_JJ and
    M = (A + lambda I)^-1, the change is -2 b^T M b + b^T M A M b <= -b^T M b <= 0.
    Without gram: the error itself (the weights become exact there).
    """
    e = error.float()
    if gram is None:
        return e.gather(1, columns)
    # float64: the corrections are small differences of large products
    g = gram.double().to(e.device)
    lam = percdamp * float(g.diagonal().mean().clamp_min(1e-12))
    a = g[columns[:, :, None], columns[:, None, :]]                     # [out, n, n]
    a = a + lam * torch.eye(columns.shape[1], dtype=a.dtype, device=a.device)
    b = (e.double() @ g).gather(1, columns)                             # (G e_r)_J
    return torch.linalg.solve(a, b[..., None])[..., 0].float()


def fit_outliers(weight: torch.Tensor, quantized: torch.Tensor, n: int,
                 gram: Optional[torch.Tensor] = None, m2: Optional[torch.Tensor] = None,
                 value_dtype: str = "float16", percdamp: float = 0.01) -> SparseOutliers:
    """Sparse corrections for quantized Q [out, in] of weight W [out, in] (both in the effective
    basis the layer multiplies x by), n per row: columns by select_columns (importance diag G,
    else m2), values by outlier_values. Returns a validated SparseOutliers."""
    if weight.shape != quantized.shape or weight.dim() != 2:
        raise ValueError(f"weight and quantized must be the same [out, in] shape, got "
                         f"{tuple(weight.shape)} and {tuple(quantized.shape)}")
    out, inf = weight.shape
    if not 0 <= n <= inf:
        raise ValueError(f"outliers: n per row must be in [0, {inf}], got {n}")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"outliers: value_dtype must be one of {', '.join(VALUE_DTYPES)}, got "
                         f"{value_dtype!r}")
    error = (weight.float() - quantized.float())
    importance = gram.diagonal() if gram is not None else m2
    cols = select_columns(error, importance, n)
    vals = outlier_values(error, gram, cols, percdamp)
    return SparseOutliers(cols.to(column_dtype(inf)), vals.to(VALUE_DTYPES[value_dtype]),
                          inf).validate()
