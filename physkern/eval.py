"""Perplexity, exactly: token-weighted mean NLL over a fixed token stream, two protocols.

- non-overlapping windows (the GPT-2 / Hugging Face protocol): the stream is cut into windows of
  `window` tokens; each window scores every token but its first (which has no context there).
- sliding window with `stride`: windows start every `stride` tokens; each window scores only the
  tokens no earlier window scored, so every token but the very first is scored exactly once.
  stride == window gives the non-overlapping protocol.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .provenance import provenance, write_json


@dataclass
class WindowPlan:
    """One forward pass: model sees tokens[begin:end], scores target positions [score_from, end)."""
    begin: int
    end: int
    score_from: int


def plan_windows(n_tokens: int, window: int, stride: Optional[int] = None) -> list[WindowPlan]:
    """The windows of either protocol over a stream of `n_tokens` tokens.

    stride None or == window: non-overlapping windows. stride < window: sliding windows.
    """
    if window <= 1:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    stride = window if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if stride > window:
        raise ValueError(f"stride ({stride}) must not exceed window ({window}): tokens between "
                         "windows would never be scored")
    if n_tokens < 2:
        raise ValueError(f"tokens: need at least 2 tokens to score, got {n_tokens}")
    plans, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        score_from = max(begin + 1, prev_end)
        if end > score_from:
            plans.append(WindowPlan(begin, end, score_from))
        prev_end = end
        if end >= n_tokens:
            break
        begin += stride
    return plans


@dataclass
class PerplexityResult:
    """Perplexity and everything needed to reproduce it."""
    perplexity: float
    mean_nll: float
    tokens_scored: int
    tokens_input: int
    windows: int
    protocol: str
    window: int
    stride: int
    model: str = ""
    corpus: str = ""
    dtype: str = ""
    device: str = ""
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    versions: dict = field(default_factory=dict)
    command: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path) -> None:
        write_json(path, self.to_dict())


@torch.no_grad()
def token_nll(model: nn.Module, tokens: torch.Tensor, window: int, stride: Optional[int] = None,
              batch_size: int = 1, progress: bool = True,
              window_sums: Optional[list] = None) -> tuple[torch.Tensor, list[WindowPlan]]:
    """Summed NLL (float64 scalar) and the window plan for a 1-D token stream.

    window_sums: when a list is given, each window's summed NLL (a float, plan order) is appended
    to it, so that the perplexity of any leading run of windows can be derived afterwards.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    plans = plan_windows(tokens.numel(), window, stride)
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    # Batch windows of equal length together; only the last may be shorter.
    groups: list[list[WindowPlan]] = []
    for p in plans:
        if groups and len(groups[-1]) < batch_size and \
                (groups[-1][0].end - groups[-1][0].begin) == (p.end - p.begin):
            groups[-1].append(p)
        else:
            groups.append([p])
    bar = tqdm(total=sum(p.end - p.score_from for p in plans), unit="tok", desc="perplexity",
               disable=not progress, leave=False)
    for group in groups:
        ids = torch.stack([tokens[p.begin:p.end] for p in group]).to(device)
        logits = model(input_ids=ids).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # nll[b, t] predicts ids[b, t+1]
        for row, p in enumerate(group):
            first = p.score_from - p.begin - 1
            window_nll = nll[row, first:].double().sum().cpu()
            total += window_nll
            if window_sums is not None:
                window_sums.append(float(window_nll))
            bar.update(p.end - p.score_from)
    bar.close()
    return total, plans


def perplexity(model: nn.Module, tokens: torch.Tensor, window: int, stride: Optional[int] = None,
               batch_size: int = 1, progress: bool = True, model_name: str = "",
               corpus_name: str = "") -> PerplexityResult:
    """Perplexity of `model` on the 1-D token stream `tokens` (see module docstring).

    Returns a PerplexityResult with exact token counts and provenance.
    """
    device = next(model.parameters()).device
    start = time.perf_counter()
    sums: list[float] = []
    total, plans = token_nll(model, tokens, window, stride, batch_size, progress, sums)
    seconds = time.perf_counter() - start
    scored = sum(p.end - p.score_from for p in plans)
    mean = float(total) / scored
    stride_eff = window if stride is None else stride
    prov = provenance(device)
    return PerplexityResult(
        perplexity=math.exp(mean), mean_nll=mean, tokens_scored=scored,
        tokens_input=int(tokens.numel()), windows=len(plans),
        protocol="non-overlapping" if stride_eff == window else "sliding",
        window=window, stride=stride_eff, model=model_name, corpus=corpus_name,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        device=prov["device"], seconds=seconds, tokens_per_second=scored / max(seconds, 1e-9),
        versions=prov["versions"], command=prov["command"],
        extra={"window_nll": sums, "window_scored": [p.end - p.score_from for p in plans]})


def prefix_perplexity(result: PerplexityResult, n_tokens: int) -> Optional[dict]:
    """The perplexity the same protocol gives on the first `n_tokens` tokens of the stream,
    derived from `result`'s per-window NLL sums (no new forward pass).

    Exact only when the windows of the shorter stream are the leading windows of the longer one:
    non-overlapping windows (stride == window) with `n_tokens` a multiple of the window. Returns
    None when that does not hold or the stream was not longer than n_tokens; else a dict with
    perplexity, mean_nll, tokens_scored, windows.
    """
    if (result.stride != result.window or n_tokens % result.window
            or n_tokens >= result.tokens_input or "window_nll" not in result.extra):
        return None
    n = n_tokens // result.window
    sums, scored = result.extra["window_nll"][:n], result.extra["window_scored"][:n]
    mean = sum(sums) / sum(scored)
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens_scored": sum(scored),
            "windows": n}
