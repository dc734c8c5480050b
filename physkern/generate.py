"""Greedy generation with prefill and decode timed separately (batch 1).

A plain loop over model(...) with a DynamicCache, so the timing is ours and nothing is hidden:
  prefill = the first forward over the whole prompt (+ argmax of its last logits: new token 1)
  decode  = every later single-token forward (+ argmax): new tokens 2..N, i.e. N-1 steps
Both are measured with time.perf_counter around the forward and the argmax (`.item()` waits for
the device, so on CUDA the time includes the kernels). Tokenization and detokenization are not
timed.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn


@dataclass
class GenerationResult:
    """What generate_timed returns; rates are tokens per second of the timed part."""
    text: str                          # the new tokens decoded (special tokens skipped)
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int]               # the new token ids, in order
    prefill_seconds: float             # first forward over the prompt
    decode_seconds: float              # sum of the N-1 single-token steps
    decode_step_seconds: list[float] = field(default_factory=list)
    stopped_at_eos: bool = False
    threads: int = 0
    device: str = "cpu"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else math.nan

    @property
    def decode_steps(self) -> int:
        return len(self.decode_step_seconds)

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second (N-1 steps for N new tokens; nan when N <= 1)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else math.nan

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else math.nan

    def to_dict(self, with_steps: bool = False) -> dict:
        d = asdict(self)
        if not with_steps:
            d.pop("decode_step_seconds")
        d.update(prefill_tokens_per_second=self.prefill_tokens_per_second,
                 decode_tokens_per_second=self.decode_tokens_per_second,
                 decode_ms_per_token=self.decode_ms_per_token, decode_steps=self.decode_steps)
        return d


@contextlib.contextmanager
def num_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the body with torch.set_num_threads(threads) (None: leave as is), then restore."""
    if threads is None:
        yield
        return
    if threads <= 0:
        raise ValueError(f"threads must be a positive integer, got {threads}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int], torch.Tensor],
                  device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Prompt text or token ids -> input ids [1, T] int64 on `device`; ValueError if empty."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt: empty; give some text to continue")
        if tokenizer is None:
            raise ValueError("prompt: text needs a tokenizer (the model directory has none); "
                             "pass token ids instead")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"prompt: token ids must be [T] or [1, T] (batch 1), got "
                             f"{tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("prompt: no tokens")
    return ids.to(device)


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


# no_grad, as transformers' generate: inference_mode's tensors carry no version counter, which
# the rotation's shared-input reuse (physkern.rotation) needs to see that x is unchanged
@torch.no_grad()
def generate_timed(model: nn.Module, tokenizer, prompt: Union[str, Sequence[int], torch.Tensor],
                   max_new_tokens: int = 64, stop_at_eos: bool = True,
                   threads: Optional[int] = None, warmup: bool = False) -> GenerationResult:
    """Greedy generation of up to `max_new_tokens` tokens after `prompt`, batch 1.

    model:    a causal LM (transformers, optionally with physkern QuantizedLinear layers)
    prompt:   text (tokenized with `tokenizer`) or token ids [T] / [1, T]
    stop_at_eos: stop after the model's EOS token (as model.generate does); False generates
              exactly max_new_tokens (what a benchmark wants)
    threads:  torch CPU threads for the call (restored afterwards); None leaves them as they are
    warmup:   first run the same prompt for 2 new tokens untimed, so one-off costs (index
              unpacking caches, allocator growth, lazy init) stay out of the figures
    Returns a GenerationResult with the text, token ids and prefill/decode timings.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    from transformers import DynamicCache
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, device)
    ctx = getattr(model.config, "max_position_embeddings", None) or \
        getattr(model.config, "n_positions", None)
    if ctx and ids.shape[1] + max_new_tokens > ctx:
        raise ValueError(f"max_new_tokens: prompt ({ids.shape[1]} tokens) + {max_new_tokens} new "
                         f"tokens exceed the model context ({ctx})")
    eos = _eos_ids(model, tokenizer) if stop_at_eos else set()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with num_threads(threads):
        if warmup:
            generate_timed(model, tokenizer, ids, min(2, max_new_tokens), stop_at_eos=False)
        cache = DynamicCache(config=model.config)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - t0
        new = [token]
        steps: list[float] = []
        step_input = torch.empty(1, 1, dtype=torch.long, device=device)
        while len(new) < max_new_tokens and token not in eos:
            step_input.fill_(token)
            t0 = time.perf_counter()
            out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - t0)
            new.append(token)
        used_threads = torch.get_num_threads()
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(text=text, prompt_tokens=int(ids.shape[1]), new_tokens=len(new),
                            token_ids=new, prefill_seconds=prefill, decode_seconds=sum(steps),
                            decode_step_seconds=steps, stopped_at_eos=new[-1] in eos,
                            threads=used_threads, device=str(device))
