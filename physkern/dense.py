"""The dense (unquantized) tensors of a quantized model: stored at 16 bits, computed in another dtype.

What stays dense after quantization (norms, biases, position embeddings, any layer left out) is
small but, stored in fp32, it is not nothing; a deployed model stores it at 16 bits. The storage
dtype and the computation dtype are separate choices: `set_dense_storage_dtype(model, bf16)`
rounds every dense float tensor to bf16 *in place, keeping its dtype* (so the model computes as
before, in fp32 say, on values that bf16 represents exactly), and records the choice as
`config.physkern_dense_dtype`. Saving then writes those tensors in bf16 without losing anything,
the accounting counts them at 16 bits, and loading casts them to the computation dtype. What was
evaluated in memory is exactly what the file holds.

Quantized buffers (packed indices, codebooks, scales, offsets) keep their own dtypes.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANTIZED_BUFFERS = ("packed", "codebooks", "scales", "offsets", "outlier_columns",
                     "outlier_values")


def is_dense(key: str, t: torch.Tensor) -> bool:
    """Whether state-dict entry `key` is a dense float tensor (not a quantized buffer)."""
    return t.is_floating_point() and key.rpartition(".")[2] not in QUANTIZED_BUFFERS


def dense_tensor_names(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict key, tensor) of every float tensor that is not a quantized buffer."""
    for key, t in model.state_dict(keep_vars=True).items():
        if is_dense(key, t):
            yield key, t


def set_dense_storage_dtype(model: nn.Module, dtype: str | torch.dtype) -> None:
    """Round the model's dense float tensors to `dtype` (fp16/bf16; fp32 = no rounding) in place,
    keeping their in-memory dtype, and record `dtype` as the storage dtype."""
    name = str(dtype).replace("torch.", "")
    if name not in DENSE_DTYPES:
        raise ValueError(f"dtype: dense storage dtype must be one of {sorted(DENSE_DTYPES)}, "
                         f"got {dtype!r}")
    target = DENSE_DTYPES[name]
    with torch.no_grad():
        for key, t in dense_tensor_names(model):
            if torch.finfo(t.dtype).bits <= torch.finfo(target).bits:
                continue
            rounded = t.to(target)
            if not torch.isfinite(rounded[torch.isfinite(t)]).all():
                raise ValueError(f"dtype: tensor {key} has values beyond {name}'s range; "
                                 "store the dense tensors as float32 or bfloat16")
            t.copy_(rounded.to(t.dtype))
    model.config.physkern_dense_dtype = name


def dense_storage_dtype(model: nn.Module) -> torch.dtype | None:
    """The recorded dense storage dtype, or None when none was set."""
    name = getattr(getattr(model, "config", None), "physkern_dense_dtype", None)
    return None if name is None else DENSE_DTYPES[name]
