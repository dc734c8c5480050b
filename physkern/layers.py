"""QuantizedLinear: a drop-in replacement for nn.Linear and GPT-2's Conv1D.

It stores a QuantizedWeight (packed indices, codebooks, optional scales/offsets) as buffers and
computes y = x W^T + b through physkern.ops.codebook_matmul: the Triton kernel on CUDA tensors,
a vectorised torch path on CPU. Both GPT-2 Conv1D (x @ W[in, out]) and nn.Linear
(x @ W[out, in]^T) compute the same function of x, so one module serves both; `kind` records
which one it replaced.

With an input rotation R (physkern.rotation; qw.rotation, stored as a seed in layer_meta()) the
buffers hold the stored-basis Q and forward computes (x R) Q^T: the rotation is applied to x
(permute, signs, [b, b] Hadamard blocks) before the codebook op.

With a shared codebook (qw.shared = the group's name; physkern.shared_codebook) `codebooks` is
registered as a PARAMETER (requires_grad False), the very nn.Parameter every layer of the group
holds, instead of a buffer: Module.to() / half() move a parameter in place (param.data = ...),
so the layers keep one tensor, where per-module buffers would each get a copy. The state-dict
key is the same either way ("<layer>.codebooks").

With sparse outliers (qw.outliers; physkern.quant.outliers) two more buffers hold their column
indices and values ([out, n] each) and forward adds x S^T, read from the UNROTATED x (S is in the
effective basis); layer_meta records {"per_row", "columns_dtype", "values_dtype"}.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops import codebook_linear
from .quant.format import QuantizedWeight
from .quant.outliers import SparseOutliers
from .quant.packing import words_per_row
from .rotation import Rotation


class QuantizedLinear(nn.Module):
    """y = x @ dequantize()^T + bias, with the weight kept quantized.

    Shapes: x [..., in_features] -> y [..., out_features]; output dtype = x dtype.
    """

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                 kind: str = "linear", recipe: Optional[dict] = None):
        super().__init__()
        qw.validate()
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"kind must be 'linear' or 'conv1d', got {kind!r}")
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.codebook_rows = qw.codebook_rows
        self.scale_group = qw.scale_group
        self.kind = kind
        self.rotation: Optional[Rotation] = qw.rotation
        self.shared_codebook: Optional[str] = qw.shared
        self.recipe = dict(recipe or {})
        self.register_buffer("packed", qw.packed)
        if qw.shared is not None:
            self.register_parameter("codebooks", shared_codebook_parameter(qw.codebooks))
        else:
            self.register_buffer("codebooks", qw.codebooks)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("offsets", qw.offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        out_l = qw.outliers
        self.register_buffer("outlier_columns", None if out_l is None else out_l.columns)
        self.register_buffer("outlier_values", None if out_l is None else out_l.values)

    @classmethod
    def empty(cls, meta: dict) -> "QuantizedLinear":
        """A zero-filled layer with the buffers described by `layer_meta()` (for loading).

        Allocates what `meta` says without bounding it: for a file from elsewhere, check the
        layout first (physkern.serialization.load_quantized checks every size and dtype against
        the safetensors header before calling this, and the indices after loading)."""
        dt = lambda n: getattr(torch, n)
        s, out, inf = meta["stages"], meta["out_features"], meta["in_features"]
        # validated before anything is allocated (ValueError naming the field)
        rotation = Rotation.from_meta(meta.get("rotation"), inf)
        k, d = meta["k"], meta["block_dim"]
        from .quant.packing import index_bits
        packed = torch.zeros(s, out, words_per_row(inf // d, index_bits(k)), dtype=torch.int32)
        cbs = torch.zeros(s, out // meta["codebook_rows"], k, d, dtype=dt(meta["codebook_dtype"]))
        n_sc = (out, inf // meta["scale_group"])
        scales = torch.ones(n_sc, dtype=dt(meta["scales_dtype"])) if meta["scales_dtype"] else None
        offsets = torch.zeros(n_sc, dtype=dt(meta["offsets_dtype"])) if meta["offsets_dtype"] else None
        bias = torch.zeros(out, dtype=dt(meta["bias_dtype"])) if meta["bias_dtype"] else None
        outliers = None
        if meta.get("outliers") is not None:   # layout checked by physkern.serialization
            o = meta["outliers"]
            n = o["per_row"]
            outliers = SparseOutliers(
                # distinct columns per row, so that the empty layer is a valid one
                torch.arange(n, dtype=dt(o["columns_dtype"]))[None].repeat(out, 1),
                torch.zeros(out, n, dtype=dt(o["values_dtype"])), inf)
        qw = QuantizedWeight(packed, cbs, scales, offsets, inf, out, meta["codebook_rows"],
                             meta["scale_group"], rotation, meta.get("shared_codebook"),
                             outliers)
        return cls(qw, bias, meta["kind"], meta.get("recipe"))

    def layer_meta(self) -> dict:
        """Everything needed to rebuild this layer's buffers (saved next to the tensors)."""
        name = lambda t: None if t is None else str(t.dtype).replace("torch.", "")
        qw = self.quantized_weight()
        meta = {"kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "stages": qw.stages, "k": qw.k,
                "block_dim": qw.block_dim, "codebook_rows": self.codebook_rows,
                "scale_group": self.scale_group, "codebook_dtype": name(self.codebooks),
                "scales_dtype": name(self.scales), "offsets_dtype": name(self.offsets),
                "bias_dtype": name(self.bias), "recipe": self.recipe}
        if self.rotation is not None:  # absent (not null) without one: older files unchanged
            meta["rotation"] = self.rotation.to_meta()
        if self.shared_codebook is not None:   # likewise absent without one
            meta["shared_codebook"] = self.shared_codebook
        if self.outlier_columns is not None:  # likewise
            meta["outliers"] = {"per_row": self.outlier_columns.shape[1],
                                "columns_dtype": name(self.outlier_columns),
                                "values_dtype": name(self.outlier_values)}
        return meta

    def outliers(self) -> Optional[SparseOutliers]:
        """The sparse corrections S (views of the buffers), or None."""
        if self.outlier_columns is None:
            return None
        return SparseOutliers(self.outlier_columns, self.outlier_values, self.in_features)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.packed, self.codebooks, self.scales, self.offsets,
                               self.in_features, self.out_features, self.codebook_rows,
                               self.scale_group, self.rotation, self.shared_codebook,
                               self.outliers())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight this layer computes with, [out_features, in_features] (with a
        rotation R: Q R^T, so that forward(x) = x @ dequantize()^T + bias)."""
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers go to the op as they are: no QuantizedWeight per call (decode runs this
        # 210 times a token on the packaged model, so per-call Python work adds up).
        x_in = x
        if self.rotation is not None:
            x = self.rotation.apply(x)
        y = codebook_linear(x, self.packed, self.codebooks, self.scales, self.offsets,
                            self.bias, self.in_features, self.codebook_rows, self.scale_group)
        if self.outlier_columns is not None:
            y = y + self.outliers().apply(x_in)
        return y

    def extra_repr(self) -> str:
        qw = self.quantized_weight()
        from .quant.accounting import layer_bits
        bits = layer_bits(self)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"k={qw.k}, d={qw.block_dim}, scope={qw.scope}, stages={qw.stages}, "
                + (f"shared_codebook={self.shared_codebook}, " if self.shared_codebook else "") +
                f"bias={self.bias is not None}, replaces={self.kind}, "
                + (f"outliers={self.outlier_columns.shape[1]}/row, "
                   if self.outlier_columns is not None else "")
                + (f"rotation={self.rotation.kind}(seed={self.rotation.seed}, "
                   f"block={self.rotation.block}), " if self.rotation is not None else "") +
                (f"bits/weight={bits['bits_per_weight']:.3f}" if not self.shared_codebook else
                 f"bits/weight={(bits['total_bits'] - bits['codebooks']) / bits['weights']:.3f}"
                 " + the shared codebook's share"))


def shared_codebook_parameter(codebooks: torch.Tensor) -> nn.Parameter:
    """`codebooks` as the parameter a shared-codebook layer registers: itself when it already is
    an nn.Parameter (so every layer of the group holds that one object), else a new one without
    gradient (then the caller must hand this same object to every other layer of the group)."""
    if isinstance(codebooks, nn.Parameter):
        return codebooks
    return nn.Parameter(codebooks, requires_grad=False)
