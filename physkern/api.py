"""`physkern.quantize(model, config, calibration)`: swap linear layers for QuantizedLinear.

Layers that need calibration are quantized block by block (physkern.sequential): the statistics
of block i's inputs come from the model whose blocks < i are already quantized, so each layer
sees (and, with error feedback, compensates) the error made before it.

Codebooks shared across layers (CodebookConfig scope="shared", physkern.shared_codebook) are
fitted first, over every layer of their group (from the full-precision model's weights and
calibration statistics); each layer is then quantized as above against its group's fixed codebook.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib import Gram, SecondMoment
from .config import AnyConfig
from .layers import QuantizedLinear
from .methods.registry import quantizer_for
from .models import LinearLayer, decoder_linear_layers, replace_layer
from .quant.accounting import bits_report, layer_bits
from .quant.format import QuantizedWeight


@dataclass
class LayerReport:
    name: str
    method: str
    bits_per_weight: float
    relative_weight_error: float
    relative_output_error: Optional[float]
    output_error_basis: str
    seconds: float
    config: dict = field(default_factory=dict)


@dataclass
class QuantizationReport:
    layers: list
    quantized_bits_per_weight: float
    model_bits_per_weight: float
    total_bytes: int
    seconds: float
    calibration_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'layer':44s} {'bits/w':>7s} {'rel W err':>9s} {'rel out err':>11s}"]
        for r in self.layers:
            oe = f"{r.relative_output_error:11.4f}" if r.relative_output_error is not None else " " * 11
            lines.append(f"{r.name:44s} {r.bits_per_weight:7.3f} {r.relative_weight_error:9.4f} {oe}")
        return "\n".join(lines)


def quantize_weight(weight: torch.Tensor, cfg: AnyConfig, m2: Optional[torch.Tensor] = None,
                    gram: Optional[torch.Tensor] = None, shared=None) -> QuantizedWeight:
    """Quantize one [out, in] weight under `cfg`.

    m2:   [in] E[x_j^2] of the layer's input (calibrated codebooks)
    gram: [in, in] X^T X of the layer's input (GPTQ / codebook error feedback)
    shared: the layer's fitted physkern.shared_codebook.SharedCodebook (scope="shared" only;
          passed to the quantizer as the keyword `shared`, so other methods never see it)
    The quantizer is the one registered for cfg's class (physkern.methods.registry).
    """
    extra = {} if shared is None else {"shared": shared}
    return quantizer_for(cfg)(weight, cfg, m2, gram, **extra)  # physkern.methods: one file each


def _errors(w: torch.Tensor, q: torch.Tensor, m2, gram):
    e = (q - w).float()
    rel_w = float(e.norm() / w.norm().clamp_min(1e-30))
    if gram is not None:
        g = gram.float().cpu()
        num = torch.einsum("oi,ij,oj->", e, g, e)
        den = torch.einsum("oi,ij,oj->", w, g, w)
        return rel_w, float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt()), "X^T X (exact)"
    if m2 is not None:
        m2 = m2.cpu()
        num = (e.pow(2) * m2[None]).sum()
        den = (w.pow(2) * m2[None]).sum()
        return rel_w, float((num / den.clamp_min(1e-30)).sqrt()), "diag E[x^2] (approximate)"
    return rel_w, None, "none (no calibration)"


def _quantize_one(model, layer: LinearLayer, cfg, m2=None, gram=None,
                  shared=None) -> LayerReport:
    t0 = time.perf_counter()
    w = layer.weight().detach().float()
    if not torch.isfinite(w).all():  # one message for every method, naming the layer
        raise ValueError(f"layer {layer.name}: weight has {int(w.isnan().sum())} NaN and "
                         f"{int(w.isinf().sum())} Inf values; cannot quantize it")
    for what, stat in (("E[x^2]", m2), ("X^T X", gram)):
        if stat is not None and not torch.isfinite(stat).all():
            raise ValueError(f"layer {layer.name}: the {what} statistics of its calibration "
                             "inputs have NaN or Inf values (non-finite activations)")
    qw = quantize_weight(w, cfg, m2, gram, shared)
    qlayer = QuantizedLinear(qw.to(w.device), layer.bias, layer.kind, recipe=cfg.to_dict())
    rel_w, rel_o, basis = _errors(w.cpu(), qw.dequantize().cpu(), m2, gram)
    replace_layer(model, layer.name, qlayer)
    share = 1 if shared is None else len(shared.layers)   # the codebook's share of its group
    return LayerReport(layer.name, cfg.method, layer_bits(qlayer, share)["bits_per_weight"], rel_w,
                       rel_o, basis, time.perf_counter() - t0,
                       {k: v for k, v in cfg.to_dict().items() if k not in ("layers", "overrides")})


def select_layers(model: nn.Module, config: AnyConfig,
                  allow_shared: bool = False) -> list[tuple[LinearLayer, AnyConfig]]:
    """[(layer, the config governing it)] of the decoder linear layers `config` selects.
    allow_shared: whether scope="shared" codebooks may be among them (only quantize() fits
    them over their groups; the streaming and distributed paths, which call this with the
    default, refuse them here, before any work)."""
    from .shared_codebook import is_shared
    candidates = decoder_linear_layers(model)
    chosen = [(l, config.for_layer(l.name)) for l in candidates if config.applies_to(l.name)]
    if not chosen:
        names = ", ".join(l.name for l in candidates[:6])
        raise ValueError(f"layers: patterns {config.layers!r} match no decoder linear layer "
                         f"(names look like: {names}, ...)")
    if not allow_shared and any(is_shared(c) for _, c in chosen):
        raise ValueError("config: scope='shared' codebooks are fitted over all layers of a "
                         "group before any is quantized, which only physkern.quantize in "
                         "memory does (`physkern quantize --in-memory`); this path quantizes "
                         "one block at a time")
    return chosen


def quantize(model: nn.Module, config: AnyConfig, calibration: Optional[torch.Tensor] = None,
             progress: bool = True, embedding: Optional[AnyConfig] = None) -> QuantizationReport:
    """Quantize the selected linear layers of `model` in place.

    config:      CodebookConfig, ScalarConfig or GPTQConfig (with `layers` patterns and
                 per-layer `overrides`)
    calibration: [n_windows, seq] token ids from calibration text (physkern.calibration_windows);
                 required when any selected layer's config needs calibration
    embedding:   optional config for the output head [vocab, hidden] and the input embedding
                 (physkern.head): tied models get one quantized tensor serving both, calibrated
                 on the final hidden states after the blocks are quantized; untied models get
                 the embedding quantized separately, without calibration. None: both stay dense.
    Returns a QuantizationReport (per-layer bits, relative weight and output error; the head,
    when quantized, is the last entry).
    """
    from .shared_codebook import fit_shared_codebooks, is_shared, plan_shared_groups
    t0 = time.perf_counter()
    chosen = select_layers(model, config, allow_shared=True)
    if embedding is not None:
        if embedding.layers is not None or embedding.overrides:
            raise ValueError("embedding: the head/embedding config takes no `layers` or "
                             "`overrides` (it applies to the output head and input embedding)")
        if is_shared(embedding):
            raise ValueError("embedding: scope='shared' shares a codebook among decoder layers; "
                             "the head/embedding takes scope 'row', 'group' or 'layer'")
        from .head import find_head_and_embedding
        find_head_and_embedding(model)  # fails before any work if there is none to quantize
    needs_calib = (any(c.needs_calibration for _, c in chosen)
                   or (embedding is not None and embedding.needs_calibration))
    reports = []
    if needs_calib:  # checked before any layer is touched
        if calibration is None:
            raise ValueError("calibration: this config needs calibration windows [n, seq] of "
                             "token ids; pass calibration=physkern.calibration_windows(tokenizer, "
                             "physkern.load_corpus())")
        if calibration.dim() != 2 or calibration.dtype != torch.long:
            raise ValueError(f"calibration must be a [n_windows, seq] int64 tensor, got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        _check_calibration_length(model, calibration)
    groups = plan_shared_groups(model, chosen)
    if needs_calib and groups:
        block_of_layers(model, chosen)   # every layer inside the blocks, before the fit
    # fitted before any layer changes: the pooled fit reads the full-precision model
    shared = fit_shared_codebooks(model, groups, calibration) if groups else {}
    bar = tqdm(total=len(chosen), desc="quantize", unit="layer", disable=not progress)
    try:  # closed on errors too, so an error message starts on its own line
        if not needs_calib:
            for layer, cfg in chosen:
                reports.append(_quantize_one(model, layer, cfg, shared=shared.get(layer.name)))
                bar.update()
            n_calib = 0
        else:
            reports = _quantize_sequential(model, chosen, calibration, bar, shared)
            n_calib = calibration.numel()
        if embedding is not None:
            reports.append(_quantize_head(model, embedding, calibration))
    finally:
        bar.close()
    rep = bits_report(model)
    return QuantizationReport(reports, rep.quantized_bits_per_weight, rep.model_bits_per_weight,
                              rep.total_bytes, time.perf_counter() - t0, n_calib)


def _quantize_head(model: nn.Module, cfg: AnyConfig,
                   calibration: Optional[torch.Tensor]) -> LayerReport:
    """The output head (and the tied or untied input embedding) under `cfg`; see physkern.head."""
    import dataclasses

    from .head import find_head_and_embedding, head_input_gram, install_quantized_head
    t0 = time.perf_counter()
    where = find_head_and_embedding(model)
    w = where.head.weight.detach().float()
    m2 = gram = None
    if cfg.needs_calibration:
        stats = head_input_gram(model, calibration)
        m2 = torch.diagonal(stats.value) / stats.count
        gram = stats.value if cfg.needs_hessian else None
    name = where.head_name
    for what, t in (("weight", w), ("E[x^2]", m2), ("X^T X", gram)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"layer {name}: its {what} has NaN or Inf values; cannot quantize it")
    qw = quantize_weight(w, cfg, m2, gram)
    head = QuantizedLinear(qw.to(w.device), where.head.bias, "linear", recipe=cfg.to_dict())
    table = None
    if not where.tied:
        # The embedding's inputs are one-hot token ids: no activation statistics to weight by.
        ecfg = cfg
        if cfg.method == "gptq":
            from .config import ScalarConfig
            ecfg = ScalarConfig(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric)
        elif cfg.method == "codebook" and cfg.calibrate:
            ecfg = dataclasses.replace(cfg, calibrate=False, error_feedback=False, refine_steps=0)
        ew = where.embedding.weight.detach().float()
        table = QuantizedLinear(quantize_weight(ew, ecfg).to(ew.device), None, "linear",
                                recipe=ecfg.to_dict())
    rel_w, rel_o, basis = _errors(w.cpu(), qw.dequantize().cpu(), m2, gram)
    install_quantized_head(model, where, head, table)
    return LayerReport(name, cfg.method, layer_bits(head)["bits_per_weight"], rel_w, rel_o, basis,
                       time.perf_counter() - t0,
                       {k: v for k, v in cfg.to_dict().items() if k not in ("layers", "overrides")})


def _check_calibration_length(model: nn.Module, calibration: torch.Tensor) -> None:
    """Windows must be non-empty and no longer than the model's context (GPT-2 would index past
    its position table; RoPE models would silently run beyond their trained length)."""
    from .models import model_context_length
    n, seq = calibration.shape
    if n < 1 or seq < 1:
        raise ValueError(f"calibration: needs at least one window of at least one token, got "
                         f"shape {tuple(calibration.shape)}")
    try:
        ctx = model_context_length(model)
    except ValueError:
        return  # the config does not say; nothing to check against
    if seq > ctx:
        raise ValueError(f"calibration: windows of {seq} tokens exceed the model context "
                         f"({ctx} tokens); use windows of at most {ctx} tokens")


def block_of_layers(model: nn.Module, chosen) -> dict[str, int]:
    """{layer name: index of the transformer block holding it} for the chosen layers; a layer
    outside the blocks is a ValueError (calibrated methods quantize block by block)."""
    from .sequential import iter_block_names
    block_of = {}
    prefixes = list(iter_block_names(model))
    for layer, cfg in chosen:
        owner = [i for i, p in prefixes if layer.name.startswith(p + ".")]
        if not owner:
            raise ValueError(f"layers: {layer.name!r} is outside the transformer blocks; "
                             "calibrated methods only quantize layers inside them")
        block_of[layer.name] = owner[0]
    return block_of


class BlockStats:
    """The input statistics of one block's layers; `take(name)` -> (m2 [in] or None, gram
    [in, in] or None) as fp32, computed when a layer is about to be quantized (so only one fp32
    copy exists at a time), and the fp64 accumulator of a Gram freed once every layer reading
    that input has taken it."""

    def __init__(self, stats: dict):
        self._stats = stats
        self._users: dict[int, int] = {}
        for st in stats.values():
            if st["gram"] is not None:
                self._users[id(st["gram"])] = self._users.get(id(st["gram"]), 0) + 1

    def take(self, name: str) -> tuple:
        st = self._stats.pop(name, None)
        if st is None:
            return None, None
        g = st["gram"]
        gram = g.value if g is not None else None
        m2 = st["m2"].value if st["m2"] is not None else (
            torch.diagonal(gram) / g.count if gram is not None else None)
        if g is not None:
            self._users[id(g)] -= 1
            if self._users[id(g)] == 0:
                g.xtx = None  # nobody reads this input's accumulator any more
        return m2, gram


def block_statistics(here, block: nn.Module, run) -> BlockStats:
    """The statistics (BlockStats: take(name) -> (m2, gram)) of the inputs each of `here`'s
    layers (list of (LinearLayer, config) inside `block`) sees while run() pushes the
    calibration batches through the block. Accumulations are fp32 products summed in fp64
    (physkern.calib), whatever the activations' dtype."""
    stats, hooks = {}, []
    batch_seen: dict[int, object] = {}

    def reset(_m, _a):
        batch_seen.clear()

    def make_hook(layer, cfg):
        def hook(_m, inputs):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            st = stats[layer.name]
            if cfg.needs_calibration and st.get("m2") is not None:
                st["m2"].update(x)
            if cfg.needs_hessian:
                # q/k/v (and gate/up) read the same tensor: one Gram serves them all.
                # batch_seen keeps the tensor alive, so its id cannot be reused meanwhile.
                key = id(inputs[0])
                if key in batch_seen:
                    if st["gram"] is None:
                        st["gram"] = batch_seen[key][1]
                    return
                if st["gram"] is None:
                    st["gram"] = Gram(x.shape[-1], device=x.device)
                batch_seen[key] = (inputs[0], st["gram"])
                st["gram"].update(x)
        return hook

    for layer, cfg in here:
        stats[layer.name] = {"m2": SecondMoment(layer.in_features) if cfg.needs_calibration
                             and not cfg.needs_hessian else None, "gram": None}
        if cfg.needs_calibration:
            hooks.append(layer.module.register_forward_pre_hook(make_hook(layer, cfg)))
    hooks.append(block.register_forward_pre_hook(reset))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    batch_seen.clear()
    return BlockStats(stats)


def _quantize_sequential(model, chosen, calibration, bar,
                         shared: Optional[dict] = None) -> list[LayerReport]:
    from .sequential import run_blocks_sequentially
    block_of = block_of_layers(model, chosen)
    reports = []

    def on_block(i, block, run):
        here = [(l, c) for l, c in chosen if block_of[l.name] == i]
        if not here:
            return
        stats = block_statistics(here, block, run)
        for layer, cfg in here:
            m2, gram = stats.take(layer.name)
            reports.append(_quantize_one(model, layer, cfg, m2, gram,
                                         (shared or {}).get(layer.name)))
            del m2, gram
            bar.update()

    run_blocks_sequentially(model, calibration, on_block)
    return reports
