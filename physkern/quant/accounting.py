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

Shared codebooks (physkern.shared_codebook): one codebook tensor held by every layer of a group
is counted ONCE. In the whole-model figure it is one stored tensor like any other (the file holds
it once). In the first figure each layer of the group is attributed an even share of it,
bits / n_layers (so a layer's "codebooks" and "total_bits" may be fractional), while
`quantized_bits` adds the group's integer bits exactly once; `BitsReport.shared_codebooks` lists
{group: {"bits", "layers"}}. The group is the set of QuantizedLinear layers holding the very
same codebooks tensor (by storage, as the file deduplicates it); they must agree on its name.

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


def layer_bits(layer, share: int = 1) -> dict:
    """Bit counts of one QuantizedLinear. share: how many layers hold its codebooks tensor (a
    shared codebook, module docstring): the layer is attributed codebook bits / share."""
    qw = layer.quantized_weight()
    if type(share) is not int or share < 1:
        raise ValueError(f"share must be a positive integer (layers holding the codebook), got "
                         f"{share!r}")
    cb = tensor_bits(layer.codebooks)
    parts = {"indices": tensor_bits(layer.packed), "codebooks": cb if share == 1 else cb / share,
             "scales": tensor_bits(layer.scales), "offsets": tensor_bits(layer.offsets)}
    columns = getattr(layer, "outlier_columns", None)
    if columns is not None:   # sparse outliers: column indices and values (absent without)
        parts["outliers"] = tensor_bits(columns) + tensor_bits(layer.outlier_values)
    n = layer.in_features * layer.out_features
    total = sum(parts.values())
    shared = getattr(layer, "shared_codebook", None)
    return {**parts, "bias": tensor_bits(layer.bias), "weights": n, "total_bits": total,
            "bits_per_weight": total / n,
            "seeds_formula_bits_per_weight": qw.stages * math.log2(qw.k) / qw.block_dim,
            "k": qw.k, "block_dim": qw.block_dim, "scope": qw.scope, "stages": qw.stages,
            **({"shared_codebook": shared, "codebook_share": share} if shared else {})}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def shared_codebook_groups(model: nn.Module) -> dict[str, dict]:
    """{group name: {"layers": [names], "bits": stored bits of its codebook once}} of the
    QuantizedLinear layers with a shared codebook (physkern.shared_codebook). ValueError when
    layers naming one group hold different tensors, or one tensor carries two names."""
    groups: dict[str, dict] = {}
    by_storage: dict[tuple, str] = {}
    for name, m in model.named_modules():
        group = getattr(m, "shared_codebook", None) if _is_quantized_linear(m) else None
        if group is None:
            continue
        key = _storage_key(m.codebooks)
        g = groups.setdefault(group, {"layers": [], "bits": tensor_bits(m.codebooks),
                                      "_key": key})
        if g["_key"] != key or by_storage.setdefault(key, group) != group:
            raise ValueError(f"layer {name}: shared codebook group {group!r} must be one tensor "
                             "held by all of its layers (and no other group's)")
        g["layers"].append(name)
    for g in groups.values():
        del g["_key"]
    return groups


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
    shared_codebooks: dict = field(default_factory=dict)   # {group: {"layers", "bits"}}

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
    shared = shared_codebook_groups(model)
    for name, m in model.named_modules():
        if _is_quantized_linear(m):
            group = getattr(m, "shared_codebook", None)
            share = len(shared[group]["layers"]) if group is not None else 1
            info = {**layer_bits(m, share), "kind": "quantized"}
        elif _is_compressed(m):
            parts = m.storage_bits()
            n = m.weight_numel()
            info = {**parts, "weights": n, "total_bits": sum(parts.values()),
                    "bits_per_weight": sum(parts.values()) / n, "kind": type(m).__name__}
        else:
            continue
        layers[name] = info
        q_weights += info["weights"]
        # a shared codebook's bits are added once per group below, exactly
        q_bits += (info["indices"] + info["scales"] + info["offsets"] + info.get("outliers", 0)
                   if "shared_codebook" in info else info["total_bits"])
        compressed_prefixes.append(name + ".")
    q_bits += sum(g["bits"] for g in shared.values())
    # Whole model: every stored tensor once (ties share storage), in its stored dtype.
    seen, model_bits, other_params = set(), 0, 0
    dense_bits = dense_storage_bits(model)
    for key, t in model.state_dict(keep_vars=True).items():
        ptr = _storage_key(t)
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
        total_bytes=model_bits // 8, layers=layers, shared_codebooks=shared)
