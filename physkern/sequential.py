"""Block-by-block calibration: inputs of block i come from the already-quantized blocks < i.

As in GPTQ's reference code, the inputs of the first transformer block are captured once (a
pre-hook records the hidden states and the keyword arguments the model passes: position
embeddings, masks, ...) and then pushed through one block at a time. Each block runs twice: once
with hooks that gather statistics of its linear layers' inputs, and once after its layers were
quantized, to produce the next block's inputs. Total cost: about two forward passes of the model
over the calibration windows, whatever the depth.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn


class _Captured(Exception):
    pass


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(prefix, blocks): the ModuleList of decoder blocks (GPT-2 transformer.h, LLaMA model.layers)."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len(module) > 0:
            return name, module
    raise ValueError("cannot find the model's list of transformer blocks")


@torch.no_grad()
def inputs_reaching(model: nn.Module, module: nn.Module, windows: torch.Tensor,
                    on_input: Callable[[tuple, dict], None], batch_size: int = 1) -> None:
    """Run `model` over windows [n, seq] in batches and call on_input(args, kwargs) with what
    each batch passes to `module`; the forward stops there (nothing after `module` runs)."""
    def grab(_module, args, kwargs):
        on_input(args, kwargs)
        raise _Captured

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[i:i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()


def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 1):
    """Hidden states entering block 0 for each batch of windows, and the kwargs the model passes.

    Returns (list of [b, seq, hidden] tensors, list of kwargs dicts).
    """
    _, blocks = transformer_blocks(model)
    hidden, kwargs_list = [], []

    def keep(args, kwargs):
        hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})

    inputs_reaching(model, blocks[0], windows, keep, batch_size)
    return hidden, kwargs_list


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_blocks_sequentially(model: nn.Module, windows: torch.Tensor,
                            on_block: Callable[[int, nn.Module, Callable[[], None]], None],
                            batch_size: int = 1) -> None:
    """Drive calibration block by block.

    on_block(i, block, run) is called for each block in order; calling run() pushes the current
    inputs through the block (the caller installs hooks around it to gather statistics). After
    on_block returns (the block's layers possibly replaced by quantized ones), the block runs once
    more to produce the inputs of block i+1.
    """
    _, blocks = transformer_blocks(model)
    hidden, kwargs_list = capture_block_inputs(model, windows, batch_size)

    for i, block in enumerate(blocks):
        def run(block=block):
            for h, kw in zip(hidden, kwargs_list):
                block(h, **kw)
        on_block(i, block, run)
        hidden = [_block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs_list)]


def iter_block_names(model: nn.Module) -> Iterator[tuple[int, str]]:
    prefix, blocks = transformer_blocks(model)
    for i in range(len(blocks)):
        yield i, f"{prefix}.{i}"
