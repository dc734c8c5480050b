"""The one place that counts bits.

Every stored bit counts: packed indices at their stored width (int32 words, row padding
included), codebooks, scales and offsets at their dtype. Two figures:

- bits/weight over the quantized layers: (indices + codebooks + scales + offsets) / weights
  those layers replace. Biases are not weights of the matrix and are left out here.
- bits/weight over the whole model: every tensor the saved model stores (embeddings, norms,
  biases, unquantized layers at their dtype, tied tensors once) / parameters of the original
  model (each quantized layer counts as its out*in weights).

Compressed modules other than QuantizedLinear (e.g. low-rank factors) join by exposing
`weight_numel()` (how many weights they stand for) and `storage_bits()` (a dict of named bit
counts of the tensors that replace those weights). They count in the first figure beside the
quantized layers (their bits over the out*in weights they replace) and in the whole-model figure
(their tensors at their dtype; the parameters of the original model keep out*in for them). Each
entry of `BitsReport.layers` carries a `kind` ("quantized" for QuantizedLinear, else the module's
class name, e.g. "LowRankLinear"); `BitsReport.by_kind()` splits the first figure by kind.

Dense tensors (norms, biases, position embeddings: everything not quantized) are stored at the
model's dense storage dtype when one is set (`physkern.dense.set_dense_storage_dtype`: fp16 or
bf16, recorded as `config.physkern_dense_dtype`), and counted at that width, as the file holds them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from ..dense import dense_storage_dtype, is_dense


def tensor_bits(t) -> int:
    return 0 if t is None else t.numel() * t.element_size() * 8


def dense_storage_bits(model: nn.Module) -> Optional[int]:
    """Bits per value of the dense (unquantized) float tensors on disk, or None (as in memory)."""
    dtype = dense_storage_dtype(model)
    return None if dtype is None else torch.finfo(dtype).bits


def layer_bits(layer) -> dict:
    """Bit counts of one QuantizedLinear."""
    qw = layer.quantized_weight()
    parts = {"indices": tensor_bits(layer.packed), "codebooks": tensor_bits(layer.codebooks),
             "scales": tensor_bits(layer.scales), "offsets": tensor_bits(layer.offsets)}
    n = layer.in_features * layer.out_features
    total = sum(parts.values())
    return {**parts, "bias": tensor_bits(layer.bias), "weights": n, "total_bits": total,
            "bits_per_weight": total / n,
            "seeds_formula_bits_per_weight": qw.stages * math.log2(qw.k) / qw.block_dim,
            "k": qw.k, "block_dim": qw.block_dim, "scope": qw.scope, "stages": qw.stages}


def _is_compressed(m: nn.Module) -> bool:
    return hasattr(m, "weight_numel") and hasattr(m, "storage_bits")


def _is_quantized_linear(m: nn.Module) -> bool:
    """A QuantizedLinear, recognised by what it stores (physkern.layers imports this module, so
    this module does not import physkern.layers back)."""
    return callable(getattr(m, "quantized_weight", None)) and hasattr(m, "packed")


@dataclass
class BitsReport:
    quantized_bits_per_weight: float
    model_bits_per_weight: float
    quantized_weights: int
    quantized_bits: int
    model_parameters: int
    model_bits: int
    total_bytes: int
    layers: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def by_kind(self) -> dict:
        """{kind: {"layers", "weights", "bits", "bits_per_weight"}} over the compressed layers,
        kind "quantized" (QuantizedLinear) or a compressed module's class name."""
        out: dict = {}
        for info in self.layers.values():
            d = out.setdefault(info["kind"], {"layers": 0, "weights": 0, "bits": 0})
            d["layers"] += 1
            d["weights"] += info["weights"]
            d["bits"] += info["total_bits"]
        for d in out.values():
            d["bits_per_weight"] = d["bits"] / d["weights"]
        return out

    def summary(self) -> str:
        return (f"{self.quantized_bits_per_weight:.3f} bits/weight over {len(self.layers)} "
                f"quantized layers ({self.quantized_weights:,} weights); "
                f"{self.model_bits_per_weight:.3f} bits/parameter over the whole model "
                f"({self.model_parameters:,} parameters, {self.total_bytes / 2**20:.2f} MiB)")


def bits_report(model: nn.Module) -> BitsReport:
    """True bits of `model` as it would be saved (see module docstring)."""
    layers, q_weights, q_bits = {}, 0, 0
    compressed_prefixes = []
    for name, m in model.named_modules():
        if _is_quantized_linear(m):
            info = {**layer_bits(m), "kind": "quantized"}
        elif _is_compressed(m):
            parts = m.storage_bits()
            n = m.weight_numel()
            info = {**parts, "weights": n, "total_bits": sum(parts.values()),
                    "bits_per_weight": sum(parts.values()) / n, "kind": type(m).__name__}
        else:
            continue
        layers[name] = info
        q_weights += info["weights"]
        q_bits += info["total_bits"]
        compressed_prefixes.append(name + ".")
    # Whole model: every stored tensor once (ties share storage), in its stored dtype.
    seen, model_bits, other_params = set(), 0, 0
    dense_bits = dense_storage_bits(model)
    for key, t in model.state_dict(keep_vars=True).items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ptr in seen:
            continue
        seen.add(ptr)
        dense = not any(key.startswith(p) for p in compressed_prefixes)
        if dense_bits is not None and is_dense(key, t):
            model_bits += t.numel() * min(dense_bits, t.element_size() * 8)
        else:
            model_bits += tensor_bits(t)
        if dense:
            other_params += t.numel()
        elif key.endswith(".bias"):
            other_params += t.numel()
    n_params = other_params + q_weights
    return BitsReport(
        quantized_bits_per_weight=q_bits / q_weights if q_weights else float("nan"),
        model_bits_per_weight=model_bits / n_params, quantized_weights=q_weights,
        quantized_bits=q_bits, model_parameters=n_params, model_bits=model_bits,
        total_bytes=model_bits // 8, layers=layers)
