"""MPO cores and low-rank factors stored quantized: QuantizedFactor, QuantizedMPOLinear,
QuantizedLowRankLinear (what a recipe's `"factorize": {..., "quantize": {...}}` builds through
physkern.methods.factor_quant; issue 21.2).

Each stored factor is a `QuantizedFactor`: the same QuantizedWeight storage format as a
QuantizedLinear (packed indices, codebooks, scales, offsets; physkern.quant.format), of the
factor viewed as a 2-D matrix:

    MPO core  [r_left, o, i, r_right]  ->  [r_left * o, i * r_right]
    low-rank  up [out, r] / down [r, in]  ->  themselves

The core view is its row-major memory unchanged (no permute): rows are (left bond, output
index), and a codebook block of d consecutive values runs along the right bond (then the input
index), so row scales follow the left bond, which is where TT-SVD's singular values sit.

`QuantizedMPOLinear` / `QuantizedLowRankLinear` are MPOLinear / LowRankLinear whose factors are
QuantizedFactors: the forward dequantizes the factors (float32, a few hundred thousand values
per layer) and contracts them exactly as the float module does, never forming W unless
MPOLinear's mode picks the dense path. The accounting sees every stored bit through
storage_bits() (indices, codebooks, scales, offsets per factor); physkern.serialization stores
the factors' buffers under `<layer>.cores.<k>.packed` etc. with a per-factor layout. This module
imports no quantizer (physkern.serialization reads it; the quantizing side is in methods/).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .mpo import MPOLinear
from .prune import LowRankLinear

# The per-factor layout fields (physkern.serialization stores one such object per factor).
LAYOUT_INTS = ("stages", "k", "block_dim", "codebook_rows", "scale_group")
LAYOUT_DTYPES = ("codebook_dtype", "scales_dtype", "offsets_dtype")


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view [rows, cols] a factor of `shape` is quantized as: a 4-D MPO core
    [a, o, i, b] -> [a * o, i * b]; a 2-D factor is itself."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        return shape[0] * shape[1], shape[2] * shape[3]
    if len(shape) == 2:
        return shape
    raise ValueError(f"a factor must be a 4-D MPO core or a 2-D low-rank factor, got shape "
                     f"{list(shape)}")


class QuantizedFactor(nn.Module):
    """One factor stored as a QuantizedWeight of its 2-D view (matrix_shape).

    Buffers packed / codebooks / scales / offsets, named as QuantizedLinear's (so
    physkern.dense and the loader treat them as quantized buffers, stored exactly). Not a
    layer: no forward, and deliberately no `quantized_weight()` / `storage_bits()` (the
    accounting counts it through its owner, not as a layer of its own).
    """

    def __init__(self, qw, shape: Sequence[int]):
        super().__init__()
        qw.validate()
        self.shape = torch.Size(int(s) for s in shape)
        rows, cols = matrix_shape(self.shape)
        if (qw.out_features, qw.in_features) != (rows, cols):
            raise ValueError(f"quantized weight [{qw.out_features}, {qw.in_features}] is not the "
                             f"2-D view [{rows}, {cols}] of a factor {list(self.shape)}")
        if qw.rotation is not None:
            raise ValueError("quantized factors do not store rotations")
        self.out_features, self.in_features = rows, cols  # names physkern.serialization's
        self.codebook_rows, self.scale_group = qw.codebook_rows, qw.scale_group  # checks read
        self.register_buffer("packed", qw.packed)
        self.register_buffer("codebooks", qw.codebooks)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("offsets", qw.offsets)

    @classmethod
    def empty(cls, layout: dict, shape: Sequence[int]) -> "QuantizedFactor":
        """Zero-filled buffers for a checked layout (physkern.serialization builds it on the meta
        device after checking the sizes against the file)."""
        from ..quant.format import QuantizedWeight
        from ..quant.packing import index_bits, words_per_row
        rows, cols = matrix_shape(shape)
        dt = lambda n: getattr(torch, n)
        s, k, d = layout["stages"], layout["k"], layout["block_dim"]
        n_sc = (rows, cols // layout["scale_group"])
        qw = QuantizedWeight(
            torch.zeros(s, rows, words_per_row(cols // d, index_bits(k)), dtype=torch.int32),
            torch.zeros(s, rows // layout["codebook_rows"], k, d,
                        dtype=dt(layout["codebook_dtype"])),
            torch.ones(n_sc, dtype=dt(layout["scales_dtype"])) if layout["scales_dtype"] else None,
            torch.zeros(n_sc, dtype=dt(layout["offsets_dtype"])) if layout["offsets_dtype"]
            else None, cols, rows, layout["codebook_rows"], layout["scale_group"])
        return cls(qw, shape)

    def qweight(self):
        from ..quant.format import QuantizedWeight
        return QuantizedWeight(self.packed, self.codebooks, self.scales, self.offsets,
                               self.in_features, self.out_features, self.codebook_rows,
                               self.scale_group)

    def layout(self) -> dict:
        """What rebuilds the buffers (the factor's shape comes from its owner's layout)."""
        name = lambda t: None if t is None else str(t.dtype).replace("torch.", "")
        return {"stages": int(self.codebooks.shape[0]), "k": int(self.codebooks.shape[2]),
                "block_dim": int(self.codebooks.shape[3]), "codebook_rows": self.codebook_rows,
                "scale_group": self.scale_group, "codebook_dtype": name(self.codebooks),
                "scales_dtype": name(self.scales), "offsets_dtype": name(self.offsets)}

    def dequantize(self) -> torch.Tensor:
        """The factor in float32, in its own shape (differentiable in codebooks / scales /
        offsets, which healing trains)."""
        return self.qweight().dequantize(torch.float32).reshape(self.shape)

    def bits(self) -> dict:
        """Stored bits by part, each tensor at its stored width (packing's int32 words)."""
        tb = lambda t: 0 if t is None else t.numel() * t.element_size() * 8
        return {"indices": tb(self.packed), "codebooks": tb(self.codebooks),
                "scales": tb(self.scales), "offsets": tb(self.offsets)}

    def extra_repr(self) -> str:
        lay = self.layout()
        return (f"shape={list(self.shape)}, k={lay['k']}, d={lay['block_dim']}, "
                f"stages={lay['stages']}")


def _factor_bits(prefix: str, q: QuantizedFactor) -> dict:
    return {f"{prefix}.{part}": b for part, b in q.bits().items() if b}


class QuantizedMPOLinear(MPOLinear):
    """MPOLinear whose cores are QuantizedFactors (`cores`: an nn.ModuleList); same forward
    (contraction or, per MPOLinear.mode, W formed from the dequantized cores)."""

    def __init__(self, qcores: Sequence[QuantizedFactor], bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        for k, q in enumerate(qcores):
            if not isinstance(q, QuantizedFactor) or len(q.shape) != 4:
                raise ValueError(f"cores[{k}] must be a QuantizedFactor of a 4-D core")
        from .mpo import _factors_of, set_features_and_bias
        self.out_factors, self.in_factors = _factors_of(
            [torch.empty(q.shape, device="meta") for q in qcores])
        self.cores = nn.ModuleList(qcores)
        set_features_and_bias(self, bias)

    def core_tensors(self) -> list[torch.Tensor]:
        return [q.dequantize() for q in self.cores]

    def storage_bits(self) -> dict:
        out = {}
        for k, q in enumerate(self.cores):
            out.update(_factor_bits(f"core{k}", q))
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"out_factors={self.out_factors}, in_factors={self.in_factors}, "
                f"bonds={[int(q.shape[3]) for q in self.cores][:-1]}, quantized cores "
                f"{self.cores[0].extra_repr()}, bias={self.bias is not None}")


class QuantizedLowRankLinear(LowRankLinear):
    """LowRankLinear whose factors up [out, r] and down [r, in] are QuantizedFactors."""

    def __init__(self, up: QuantizedFactor, down: QuantizedFactor,
                 bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        if not (isinstance(up, QuantizedFactor) and isinstance(down, QuantizedFactor)) or \
                len(up.shape) != 2 or len(down.shape) != 2 or up.shape[1] != down.shape[0]:
            raise ValueError("factors must be QuantizedFactors of up [out, r] and down [r, in]")
        self.up, self.down = up, down
        self.out_features, self.rank = int(up.shape[0]), int(up.shape[1])
        self.in_features = int(down.shape[1])
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be [{self.out_features}], got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.float() @ self.down.dequantize().t()) @ self.up.dequantize().t()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype) if x.is_floating_point() else y

    def weight(self) -> torch.Tensor:
        return self.up.dequantize() @ self.down.dequantize()

    def storage_bits(self) -> dict:
        return {**_factor_bits("up", self.up), **_factor_bits("down", self.down)}
