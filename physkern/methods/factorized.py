"""Factorization methods: layers REPLACED by a factorized module (MPO, truncated SVD), not quantized.

A quantization method (codebook.py, scalar.py, gptq.py) turns a weight into a QuantizedWeight
that physkern.api wraps in a QuantizedLinear. A factorization method instead swaps the layer for
its own module (physkern.research.mpo.MPOLinear, physkern.research.prune.LowRankLinear) that
the accounting counts through weight_numel() / storage_bits(). They have their own small
registry here (the quantizer registry maps configs to QuantizedWeight producers and stays that):

    @register_factorization(ItsConfig)
    def factorize_x(weight [out, in] float32, bias, cfg, gram [in, in] | None) -> nn.Module

A recipe's "factorize" key holds one such config (physkern.recipe); apply_recipe runs it after
pruning and before quantization, so a "config" quantizes the layers that are still dense (the
factorized modules are no longer nn.Linear, so layer selection skips them).

`heal_factorized` is the end-to-end healing of a model holding factorized modules: the same
KL(teacher || student) objective, relative Adam steps, seeded split and keep-if-better check as
physkern.finetune.finetune_quantized, training the factors/cores (in float32, written back in
their stored dtype) together with the codebooks/scales of any QuantizedLinear layers and the
norms.

Saving: physkern.serialization.save_quantized stores the modules' tensors (MPO cores
`<name>.cores.<k>`, low-rank factors `<name>.up` / `<name>.down`, `<name>.bias`) in the same
safetensors file(s) and each module's layout under "factorized_layers" in physkern.json and
config.json (the layouts live in physkern.serialization, beside QuantizedLinear's checks, which
must not import this module: it depends on the calibration and model-loading code);
`check_savable` says early whether every compressed module of a model can be saved.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import fields
from typing import Callable, Optional

import torch
from torch import nn

FACTORIZERS: dict[type, Callable] = {}     # config class -> factorizer
FACTORIZATION_CLASSES: dict[str, type] = {}  # config.method -> class
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def register_factorization(config_cls: type) -> Callable:
    """Decorator: `fn(weight, bias, cfg, gram) -> nn.Module` factorizes layers under config_cls
    (which has a unique string class attribute `method`)."""
    method = getattr(config_cls, "method", None)
    if not isinstance(method, str) or not method:
        raise TypeError(f"{config_cls.__name__} needs a class attribute `method` (a string)")
    if FACTORIZATION_CLASSES.get(method, config_cls) is not config_cls:
        raise ValueError(f"factorization {method!r} is already registered by "
                         f"{FACTORIZATION_CLASSES[method].__name__}")

    def decorator(fn: Callable) -> Callable:
        FACTORIZERS[config_cls] = fn
        FACTORIZATION_CLASSES[method] = config_cls
        return fn
    return decorator


def factorization_from_dict(d) -> object:
    """A factorization config from its JSON form {"method": "mpo" | "svd", ...}."""
    if not isinstance(d, dict):
        raise ValueError(f"factorize must be an object with a 'method' key, got {d!r}")
    d = dict(d)
    method = d.pop("method", None)
    if method not in FACTORIZATION_CLASSES:
        raise ValueError(f"factorize.method must be one of {sorted(FACTORIZATION_CLASSES)}, "
                         f"got {method!r}")
    cls = FACTORIZATION_CLASSES[method]
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {method} factorize keys {sorted(unknown)}; valid: "
                         f"{sorted(known)}")
    if d.get("overrides"):
        raise ValueError("factorize: overrides are not supported (use one config per recipe)")
    d.pop("overrides", None)
    return cls(**d)


def is_factorization(cfg) -> bool:
    return type(cfg) in FACTORIZERS


def factorized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MPOLinear / LowRankLinear in `model`."""
    from ..research.mpo import MPOLinear
    from ..research.prune import LowRankLinear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (MPOLinear, LowRankLinear))]


def check_savable(model: nn.Module) -> None:
    """ValueError naming the first compressed module that save_quantized cannot store: one that
    is not a QuantizedLinear / QuantizedEmbedding / MPOLinear / LowRankLinear, or a factorized
    module whose layout loading would refuse (physkern.serialization.check_factorized_meta).
    Writes nothing; save_quantized runs the same checks before writing."""
    from ..serialization import factorized_module_layouts, quantized_module_layouts
    quantized_module_layouts(model)
    factorized_module_layouts(model)


def _input_grams(model: nn.Module, layers, calibration: torch.Tensor) -> dict:
    """{layer name: X^T X [in, in] float32} of each layer's input over the calibration windows
    (one pass of the model as it is: full precision when factorization runs first)."""
    from ..calib import Gram
    grams, hooks, shared = {}, [], {}

    def make(name):
        def hook(_m, inputs):
            x = inputs[0].detach()
            key = id(inputs[0])  # gate/up (q/k/v) read the same tensor: one Gram serves both
            if key in shared:
                grams.setdefault(name, shared[key][1])
                return
            g = grams.setdefault(name, Gram(x.shape[-1]))
            shared[key] = (inputs[0], g)
            g.update(x.reshape(-1, x.shape[-1]))
        return hook

    for l in layers:
        hooks.append(l.module.register_forward_pre_hook(make(l.name)))
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in range(calibration.shape[0]):
                shared.clear()
                model(input_ids=calibration[i:i + 1].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: g.value for n, g in grams.items()}


def apply_factorization(model: nn.Module, cfg, calibration: Optional[torch.Tensor] = None,
                        progress: bool = False) -> dict:
    """Replace the decoder linear layers `cfg.layers` selects by factorized modules, in place.

    calibration: [n, seq] token ids from calibration text, required when cfg.needs_calibration
    (activation-weighted objectives: the Gram X^T X of each layer's input, from the model as
    given). Returns {"spec", "layers": [{"name", "bits_per_weight", "relative_weight_error",
    "relative_output_error" (X^T X-weighted, with calibration), ...}], "bits_per_weight" (over
    the factorized weights), "weights", "seconds"}.
    """
    from ..models import decoder_linear_layers, replace_layer
    if not is_factorization(cfg):
        raise ValueError(f"factorize: expected a factorization config "
                         f"({', '.join(sorted(FACTORIZATION_CLASSES))}), got {type(cfg).__name__}")
    t0 = time.perf_counter()
    candidates = decoder_linear_layers(model)
    chosen = [l for l in candidates if cfg.applies_to(l.name)]
    if not chosen:
        raise ValueError(f"factorize.layers: patterns {cfg.layers!r} match no decoder linear "
                         f"layer (names look like: {', '.join(l.name for l in candidates[:4])})")
    grams = {}
    if cfg.needs_calibration:
        if calibration is None:
            raise ValueError(f"factorize: {cfg.method} with weighted=true needs calibration "
                             "windows (token ids from calibration text)")
        grams = _input_grams(model, chosen, calibration)
    fn = FACTORIZERS[type(cfg)]
    rows, n_w, n_bits = [], 0, 0
    for i, l in enumerate(chosen):
        t1 = time.perf_counter()
        w = l.weight().detach().float()
        g = grams.get(l.name)
        mod = fn(w, None if l.bias is None else l.bias.detach(), cfg, g)
        extra = {}
        if getattr(cfg, "quantize", None) is not None:  # the factors quantized in turn
            from .factor_quant import quantize_factors
            e0 = (mod.weight().detach().float() - w).double()
            extra = {"relative_weight_error_float": float(e0.norm() / w.double().norm()),
                     "bits_per_weight_float": sum(mod.storage_bits().values()) / w.numel()}
            mod = quantize_factors(mod, cfg.quantize)
        parts = mod.storage_bits()
        bits = sum(parts.values())
        e = (mod.weight().detach().float() - w).double()
        row = {"name": l.name, "bits_per_weight": bits / (w.numel()),
               "relative_weight_error": float(e.norm() / w.double().norm()),
               **getattr(mod, "factorization_info", {}), **extra,
               "seconds": time.perf_counter() - t1}
        if g is not None:
            gd = g.double()
            row["relative_output_error"] = float(
                (((e @ gd) * e).sum() / ((w.double() @ gd) * w.double()).sum()).clamp_min(0)
                .sqrt())
        rows.append(row)
        n_w += w.numel()
        n_bits += bits
        replace_layer(model, l.name, mod)
        if progress:
            print(f"factorize {i + 1}/{len(chosen)} {l.name}: {row['bits_per_weight']:.3f} "
                  f"bits/w, rel err {row['relative_weight_error']:.4f}", flush=True)
    return {"spec": cfg.to_dict(), "layers": rows, "bits_per_weight": n_bits / n_w,
            "weights": n_w, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# healing


def _factor_tensors(mod: nn.Module) -> list[tuple[object, str]]:
    """(container, key) of each trainable factor of a factorized module: the float cores /
    factors, or, for quantized ones (physkern.methods.factor_quant), each QuantizedFactor's
    codebooks, scales and offsets (indices fixed, as physkern.finetune does)."""
    from ..research.mpo import MPOLinear
    from ..research.quantized_factors import QuantizedFactor
    if isinstance(mod, MPOLinear):
        slots = [(mod.cores, str(k)) for k in range(len(mod.cores))]
    else:
        slots = [(mod, "up"), (mod, "down")]
    out = []
    for c, k in slots:
        q = c[int(k)] if isinstance(c, (nn.ModuleList, nn.ParameterList)) else getattr(c, k)
        if isinstance(q, QuantizedFactor):
            out += [(q, b) for b in ("codebooks", "scales", "offsets") if q._buffers[b] is not None]
        else:
            out.append((c, k))
    return out


def _slot(c, k) -> torch.Tensor:
    """The tensor in slot (container, key) of _factor_tensors."""
    if isinstance(c, nn.ParameterList):
        return c[int(k)]
    return c._buffers[k] if k in c._buffers else c._parameters[k]


def heal_factorized(model: nn.Module, teacher: nn.Module, calibration: torch.Tensor,
                    steps: int = 100, lr: float = 1e-3, batch_size: int = 1, seed: int = 0,
                    holdout: int = 2, progress: bool = True, train_norms: bool = True,
                    schedule: str = "constant") -> dict:
    """End-to-end healing of a model with factorized modules (and optionally QuantizedLinear).

    Same arguments, objective (token-averaged KL(teacher || student)), relative learning rate,
    seeded train/holdout split and keep-if-better rule as physkern.finetune.finetune_quantized;
    trains every MPOLinear core and LowRankLinear factor (float32 copies, written back in their
    stored dtype, so the true bits do not change; for quantized factors their codebooks, scales
    and offsets, indices fixed), every QuantizedLinear's codebooks / scales /
    offsets (through physkern.finetune.differentiable_quantized) and, with train_norms, the
    float32 norm weights. Returns finetune_quantized's report keys plus "factorized_layers".
    """
    from ..finetune import (SCHEDULES, _is_norm, differentiable_quantized, holdout_split,
                            kl_steps, mean_kl)
    from ..layers import QuantizedLinear
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or \
            calibration.dtype.is_floating_point:
        raise ValueError("calibration must be a 2-D integer tensor [n_windows, seq] of token ids")
    n = calibration.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < n:
        raise ValueError(f"holdout must be an integer in [1, {n - 1}], got {holdout!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n - holdout:
        raise ValueError(f"batch_size must be an integer in [1, {n - holdout}], got "
                         f"{batch_size!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    facs = factorized_modules(model)
    if not facs:
        raise ValueError("model: no factorized (MPO / low-rank) layers to heal")
    has_q = any(isinstance(m, QuantizedLinear) for m in model.modules())
    t0 = time.perf_counter()
    modes = (model.training, teacher.training)
    model.eval()
    teacher.eval()
    gen, perm, train, held = holdout_split(calibration, holdout, seed)
    # originals (stored tensors) of everything trained: restored when the holdout KL rises
    slots = [(c, k) for _, m in facs for c, k in _factor_tensors(m)]
    stored = [_slot(c, k) for c, k in slots]
    own_norms = []  # norms trained here (without quantized layers, finetune's context is unused)
    if train_norms and not has_q:
        for mod in model.modules():
            if _is_norm(mod):
                own_norms += [p for p in mod.parameters(recurse=False) if p.dtype == torch.float32]
    norm_orig = [p.detach().clone() for p in own_norms]
    factor_orig = [t.detach().clone() for t in stored]
    q_snapshot = [(t, t.detach().clone()) for m in model.modules()
                  if isinstance(m, QuantizedLinear)
                  for t in (m.codebooks, m.scales, m.offsets) if t is not None]
    if has_q and train_norms:
        q_snapshot += [(p, p.detach().clone()) for m in model.modules() if _is_norm(m)
                       for p in m.parameters(recurse=False)]
    curve: list[float] = []
    notes: list[str] = []

    def put(c, k, p):
        if isinstance(c, nn.ParameterList):
            c[int(k)] = p
        elif k in c._buffers:  # a quantized factor's codebooks / scales / offsets
            c._buffers[k] = p
        else:
            c._parameters[k] = p

    def restore():
        with torch.no_grad():
            for (c, k), t, orig in zip(slots, stored, factor_orig):
                t.copy_(orig)
                put(c, k, t)
            for p, orig in zip(own_norms, norm_orig):
                p.copy_(orig)
            for live, orig in q_snapshot:
                live.copy_(orig)

    try:
        before = mean_kl(model, teacher, held, batch_size)
        with ExitStack() as stack:
            groups = []
            all_flags = [(p, p.requires_grad) for p in model.parameters()]
            stack.callback(lambda: [p.requires_grad_(f) for p, f in all_flags])
            for p, _ in all_flags:  # only what is trained below gets gradients
                p.requires_grad_(False)
            if has_q:
                tr = stack.enter_context(differentiable_quantized(model, train_norms))
                groups += tr.param_groups(float(lr))
                notes += tr.notes
            # the stored tensors go back in place whatever happens inside the block
            stack.callback(lambda: [put(c, k, t) for (c, k), t in zip(slots, stored)])
            train_copies = []
            for (c, k), orig in zip(slots, stored):
                p = nn.Parameter(orig.detach().float().clone())
                put(c, k, p)
                train_copies.append(p)
                groups.append({"params": [p],
                               "lr": lr * max(float(orig.detach().float().abs().mean()), 1e-12)})
            for p in own_norms:
                p.requires_grad_(True)
                groups.append({"params": [p],
                               "lr": lr * max(float(p.detach().abs().mean()), 1e-12)})
            stack.enter_context(torch.enable_grad())
            n_params = sum(g["params"][0].numel() for g in groups)
            t_log = [time.perf_counter()]

            def log(step: int, loss: float) -> None:
                if progress and (time.perf_counter() - t_log[0] > 30 or step == steps - 1):
                    print(f"heal step {step + 1}/{steps}: kl {loss:.4g}", flush=True)
                    t_log[0] = time.perf_counter()

            curve += kl_steps(model, teacher, train, groups, steps, batch_size, schedule, gen,
                              on_step=log)
            with torch.no_grad():  # trained values into the stored tensors, in their dtypes
                for t, p in zip(stored, train_copies):
                    t.copy_(p.detach().to(t.dtype))
        after = mean_kl(model, teacher, held, batch_size)   # stored (rounded) values
        kept = after < before                               # False for NaN too
        if kept:
            notes.append(f"holdout KL {before:.6g} -> {after:.6g}: trained values kept")
        else:
            restore()
            notes.append(f"holdout KL did not improve ({before:.6g} -> {after:.6g}): original "
                         "factors, codebooks, scales and norms restored")
    except BaseException:
        restore()
        raise
    finally:
        model.train(modes[0])
        teacher.train(modes[1])
    return {"steps": len(curve), "lr": float(lr), "lr_relative": True, "schedule": schedule,
            "batch_size": batch_size, "seed": seed, "train_norms": train_norms,
            "train_windows": int(train.shape[0]), "holdout_windows": holdout,
            "holdout_indices": perm[n - holdout:].tolist(), "window": int(calibration.shape[1]),
            "trained_parameters": n_params, "factorized_layers": len(facs),
            "quantized_layers": sum(isinstance(m, QuantizedLinear) for m in model.modules()),
            "holdout_kl_before": before, "holdout_kl_after": after, "kept": kept,
            "note": "; ".join(notes), "seconds": time.perf_counter() - t0, "loss_curve": curve}
