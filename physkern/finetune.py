"""End-to-end fine-tuning of codebooks and scales with the indices fixed (AQLM / GPTVQ style).

After `physkern.quantize` every chosen layer is a QuantizedLinear whose weight is

    W[r, j] = scale[r, j // g] * sum_s C[s, c(r), idx[s, r, j // d], j % d] + offset[r, j // g]

(physkern.quant.format). The packed indices idx are the bulk of the bits; the codebooks C,
scales and offsets are small and continuous. `finetune_quantized` trains those (and optionally
the norm weights) to match the full-precision teacher's next-token distributions,
KL(teacher || student), and writes them back in their stored dtypes: the indices, every storage
dtype and so the true bits (physkern.quant.accounting) are unchanged. Scalar RTN / GPTQ layers
are the same format (d = 1, integer codebook, per-group scales and offsets) and are trained the
same way.

Learning rate: Adam moves every parameter by about `lr` per step whatever its gradient's scale,
so `lr` is RELATIVE here: each tensor's step size is lr x its mean |value| at the start (offsets
that are all zero use their layer's mean |scale|, norm biases their norm's mean |weight|). One
lr then serves weight-sized codebooks, integer grids with tiny scales, and norm weights near 1.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import QuantizedEmbedding
from .layers import QuantizedLinear
from .quant.reconstruct import reconstruct


# ----------------------------------------------------------------------------------------------
# differentiable stand-ins


class _LayerCopy:
    """float32 trainable copies of one QuantizedLinear's codebooks / scales / offsets plus the
    fixed indices, rebuilding W [out, in] differentiably with physkern.quant.reconstruct."""

    def __init__(self, mod: QuantizedLinear):
        qw = mod.quantized_weight()
        # int32 halves the fixed indices' memory; reconstruct keeps their dtype
        self.idx = qw.indices().to(torch.int32)                              # [S, out, nb]
        self.mod, self.codebook_rows = mod, qw.codebook_rows
        self.codebooks = nn.Parameter(mod.codebooks.detach().float().clone())
        self.scales = None if mod.scales is None else \
            nn.Parameter(mod.scales.detach().float().clone())
        self.offsets = None if mod.offsets is None else \
            nn.Parameter(mod.offsets.detach().float().clone())

    def params(self) -> list[tuple[nn.Parameter, float]]:
        """[(parameter, magnitude)]: magnitude sets the parameter's relative learning rate."""
        mag = lambda t: float(t.detach().abs().mean())
        out = [(self.codebooks, mag(self.codebooks))]
        if self.scales is not None:
            out.append((self.scales, mag(self.scales)))
        if self.offsets is not None:  # offsets are in weight units, like the scale steps
            out.append((self.offsets, mag(self.offsets) or mag(self.scales)))
        return out

    def stored_weight(self) -> torch.Tensor:
        """Stored-basis Q [out, in] float32 from the trainable copies (differentiable, indices
        fixed); equals the effective weight unless the layer has an input rotation."""
        return reconstruct(self.idx, self.codebooks, self.scales, self.offsets,
                           codebook_rows=self.codebook_rows)

    def weight(self) -> torch.Tensor:
        """The effective W [out, in] float32 (Q R^T with an input rotation R; the table a
        quantized embedding reads)."""
        q = self.stored_weight()
        return q if self.mod.rotation is None else self.mod.rotation.unapply(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], the QuantizedLinear's function with the trainable copies:
        (x R) Q^T + b with an input rotation R, as QuantizedLinear.forward computes it."""
        if self.mod.rotation is not None:
            x = self.mod.rotation.apply(x)
        return F.linear(x, self.stored_weight().to(x.dtype), self.mod.bias)

    def write_back(self) -> None:
        """Store the trained values in the layer's buffers, rounded to their stored dtypes."""
        with torch.no_grad():
            self.mod.codebooks.copy_(self.codebooks)
            if self.scales is not None:
                self.mod.scales.copy_(self.scales)
            if self.offsets is not None:
                self.mod.offsets.copy_(self.offsets)


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")


class Trainable:
    """What `differentiable_quantized` yields: the layer copies, the norm parameters and notes."""

    def __init__(self):
        self.layers: list[_LayerCopy] = []
        # (norm module, parameter name, original parameter, trainable float32 copy)
        self.norms: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        self.notes: list[str] = []

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups with lr x magnitude per tensor (see module docstring)."""
        groups = [(p, m) for layer in self.layers for p, m in layer.params()]
        mag = lambda t: float(t.detach().abs().float().mean())
        # a zero-initialised norm bias borrows its norm weight's magnitude
        weight_mag = {id(mod): mag(orig) for mod, name, orig, _ in self.norms if name == "weight"}
        for mod, name, orig, copy in self.norms:
            groups.append((copy, mag(orig) or weight_mag.get(id(mod), 1.0) or 1.0))
        return [{"params": [p], "lr": lr * max(m, 1e-12)} for p, m in groups]

    def parameters(self) -> list[nn.Parameter]:
        return [g["params"][0] for g in self.param_groups(1.0)]


@contextmanager
def differentiable_quantized(model: nn.Module, train_norms: bool = True,
                             write_back: bool = True) -> Iterator[Trainable]:
    """Make `model` trainable in its quantized parameters for the duration of the block.

    Every QuantizedLinear's forward becomes F.linear with W rebuilt from float32 copies of its
    codebooks / scales / offsets (indices fixed); with train_norms, every float32 norm weight
    and bias (LayerNorm, *RMSNorm) is swapped for a trainable float32 copy. All other
    parameters have requires_grad False inside the block. On a normal exit with write_back the
    trained values are written into the original buffers / parameters rounded to their dtypes;
    on an exception (or write_back=False) the model is left exactly as it was.
    """
    t = Trainable()
    t.layers = [_LayerCopy(m) for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not t.layers:
        raise ValueError("model: no QuantizedLinear layers to fine-tune (run physkern.quantize "
                         "first)")
    if train_norms:
        for mod in model.modules():
            if not _is_norm(mod):
                continue
            for name, p in list(mod.named_parameters(recurse=False)):
                if p.dtype != torch.float32:
                    # a float32 copy inside a bf16/fp16 norm would change the model's dtypes
                    t.notes.append(f"norm {type(mod).__name__}.{name} stored as {p.dtype}: not "
                                   "trained")
                    continue
                t.norms.append((mod, name, p, nn.Parameter(p.detach().clone())))
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    # A quantized embedding reads its source layer's table (the tied head, or its own): it
    # looks rows up in the same trainable W, so both roles of a tied tensor are trained.
    copies = {id(layer.mod): layer for layer in t.layers}
    embeddings = [m for m in model.modules() if isinstance(m, QuantizedEmbedding)
                  and id(m.weight_source) in copies]
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for layer in t.layers:
            layer.mod.forward = layer.forward       # instance attribute shadows the class's
        for emb in embeddings:
            src = copies[id(emb.weight_source)]
            emb.forward = lambda ids, src=src, emb=emb: F.embedding(ids, src.weight().to(emb.dtype))
        for mod, name, _, copy in t.norms:
            mod._parameters[name] = copy
        yield t
        if write_back:
            with torch.no_grad():
                for layer in t.layers:
                    layer.write_back()
                for _, _, orig, copy in t.norms:
                    orig.copy_(copy)
    finally:
        for layer in t.layers:
            layer.mod.__dict__.pop("forward", None)
        for emb in embeddings:
            emb.__dict__.pop("forward", None)
        for mod, name, orig, _ in t.norms:
            mod._parameters[name] = orig
        for p, flag in grad_flags:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------
# loss


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, per token.

    teacher_logits, student_logits: [B, T, V] -> [B, T] (float32, nats).
    """
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor,
            batch_size: int = 1) -> float:
    """Token-averaged KL(teacher || student) over windows [n, seq] of token ids (no gradient)."""
    total, count = 0.0, 0
    dev = next(student.parameters()).device
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(dev)
        kl = token_kl(_logits(teacher, ids), _logits(student, ids))
        total += float(kl.sum())
        count += kl.numel()
    return total / count


# ----------------------------------------------------------------------------------------------
# training


SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiplier of the base lr at 0-based `step` of `steps` (see finetune_quantized)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _snapshot(model: nn.Module, train_norms: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(live tensor, stored copy)] of everything fine-tuning may change (for the restore)."""
    out = []
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            out += [(t, t.detach().clone()) for t in (m.codebooks, m.scales, m.offsets)
                    if t is not None]
        elif train_norms and _is_norm(m):
            out += [(p, p.detach().clone()) for p in m.parameters(recurse=False)]
    return out


def check_training_args(calibration: torch.Tensor, steps: int, lr: float, batch_size: int,
                        holdout: int, schedule: str) -> None:
    """The argument checks of a KL training run (finetune_quantized and any trainer that
    shares its protocol): ValueError naming the argument."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or \
            calibration.dtype.is_floating_point or calibration.dtype.is_complex or \
            calibration.dtype == torch.bool:
        raise ValueError("calibration must be a 2-D integer tensor [n_windows, seq] of token ids, "
                         f"got {getattr(calibration, 'dtype', type(calibration).__name__)} "
                         f"{tuple(getattr(calibration, 'shape', ()))}")
    n = calibration.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0) or \
            math.isinf(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 1 <= holdout < n:
        raise ValueError(f"holdout must be an integer in [1, n_windows - 1] = [1, {n - 1}] (the "
                         f"keep-if-better check needs held-out windows, training needs the "
                         f"rest), got {holdout!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
            not 1 <= batch_size <= n - holdout:
        raise ValueError(f"batch_size must be an integer in [1, training windows = "
                         f"{n - holdout}], got {batch_size!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def holdout_split(calibration: torch.Tensor, holdout: int, seed: int):
    """The seeded split of calibration windows: (generator, permutation, train windows, held-out
    windows); the generator goes on to draw the training epochs' orders (kl_steps)."""
    n = calibration.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return gen, perm, calibration[perm[:n - holdout]], calibration[perm[n - holdout:]]


def kl_steps(model: nn.Module, teacher: nn.Module, train: torch.Tensor, param_groups: list,
             steps: int, batch_size: int, schedule: str, gen: torch.Generator,
             on_step=None) -> list[float]:
    """Adam on the token-averaged KL(teacher || student) over `param_groups` (with their lr),
    `batch_size` training windows per step in seeded epoch orders drawn from gen, lr x
    lr_factor(schedule). Stops early at a non-finite loss (the caller's keep-if-better check
    restores). on_step(step, loss) after each step. Run it with gradients enabled; returns the
    loss curve."""
    dev = next(model.parameters()).device
    opt = torch.optim.Adam(param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(schedule, t, steps))
    order: list[int] = []
    curve: list[float] = []
    for step in range(steps):
        if len(order) < batch_size:  # a fresh seeded epoch order when one runs out
            order += torch.randperm(train.shape[0], generator=gen).tolist()
        ids = train[order[:batch_size]].to(dev)
        del order[:batch_size]
        with torch.no_grad():
            t_logits = _logits(teacher, ids)
        loss = token_kl(t_logits, _logits(model, ids)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, curve[-1])
        if not math.isfinite(curve[-1]):
            break
    return curve


def finetune_quantized(model: nn.Module, teacher: nn.Module, calibration: torch.Tensor,
                       steps: int = 100, lr: float = 1e-3, batch_size: int = 1, seed: int = 0,
                       holdout: int = 2, progress: bool = True,
                       train_norms: bool = True, schedule: str = "constant") -> dict:
    """Fine-tune the codebooks, scales, offsets (and norms) of a quantized `model` in place.

    model:       quantized student (QuantizedLinear layers); packed indices never change
    teacher:     the full-precision model (same tokenizer, same device), run under no_grad
    calibration: [n_windows, seq] integer token ids from calibration text. A seeded shuffle
                 splits them: the last `holdout` (>= 1) windows are held out, the rest train
    steps, lr:   Adam steps on the token-averaged KL(teacher || student); lr is relative
                 (module docstring)
    batch_size:  training windows per step (<= the training windows)
    schedule:    "constant" (lr every step) or "cosine" (lr x (1 + cos(pi t / steps)) / 2 at
                 step t: large steps first, small ones to settle at the end)
    Keep-if-better: the trained values are kept only if the held-out KL, measured with the
    stored (rounded) values through the normal forward, went down; else the originals are
    restored. Both models are run in eval mode; their modes are restored afterwards.

    Returns {"steps", "lr", "lr_relative", "schedule", "batch_size", "seed", "train_norms",
    "train_windows", "holdout_windows", "holdout_indices" (rows of calibration), "window",
    "trained_parameters", "quantized_layers",
    "norm_tensors", "holdout_kl_before", "holdout_kl_after" (of the trained values, even when
    they were not kept), "kept", "note", "seconds", "loss_curve" [steps run]}.
    """
    check_training_args(calibration, steps, lr, batch_size, holdout, schedule)
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("model: no QuantizedLinear layers to fine-tune (run physkern.quantize "
                         "first)")

    t0 = time.perf_counter()
    modes = (model.training, teacher.training)
    model.eval()
    teacher.eval()
    gen, perm, train, held = holdout_split(calibration, holdout, seed)
    snapshot = _snapshot(model, train_norms)
    try:
        before = mean_kl(model, teacher, held, batch_size)
        with differentiable_quantized(model, train_norms) as tr, torch.enable_grad():
            n_params = sum(p.numel() for p in tr.parameters())
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=steps, desc="finetune", unit="step")

            def on_step(step: int, kl: float) -> None:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(kl=f"{kl:.4g}")

            curve = kl_steps(model, teacher, train, tr.param_groups(float(lr)), steps,
                             batch_size, schedule, gen, on_step)
            if bar is not None:
                bar.close()
            notes = list(tr.notes)
            n_layers, n_norms = len(tr.layers), len(tr.norms)
        after = mean_kl(model, teacher, held, batch_size)   # stored (rounded) values
        kept = after < before                               # False for NaN too
        if not kept:
            with torch.no_grad():
                for live, orig in snapshot:
                    live.copy_(orig)
            notes.append(f"holdout KL did not improve ({before:.6g} -> {after:.6g}): original "
                         "codebooks, scales, offsets and norms restored")
        else:
            notes.append(f"holdout KL {before:.6g} -> {after:.6g}: trained values kept")
    finally:
        model.train(modes[0])
        teacher.train(modes[1])
    return {"steps": len(curve), "lr": float(lr), "lr_relative": True, "schedule": schedule,
            "batch_size": batch_size,
            "seed": seed, "train_norms": train_norms, "train_windows": int(train.shape[0]),
            "holdout_windows": holdout, "holdout_indices": perm[len(train):].tolist(),
            "window": int(calibration.shape[1]),
            "trained_parameters": n_params, "quantized_layers": n_layers,
            "norm_tensors": n_norms, "holdout_kl_before": before, "holdout_kl_after": after,
            "kept": kept, "note": "; ".join(notes), "seconds": time.perf_counter() - t0,
            "loss_curve": curve}
