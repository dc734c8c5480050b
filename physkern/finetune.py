"""End-to-end fine-tuning of codebooks and scales with the indices fixed (AQLM / GPTVQ style),
optionally with discrete code updates in between (PV-tuning style; below).

After `physkern.quantize` every chosen layer is a QuantizedLinear whose weight is

    W[r, j] = scale[r, j // g] * sum_s C[s, c(r), idx[s, r, j // d], j % d] + offset[r, j // g]

(physkern.quant.format). The packed indices idx are the bulk of the bits; the codebooks C,
scales and offsets are small and continuous. `finetune_quantized` trains those (and optionally
the norm weights) to match the full-precision teacher's next-token distributions,
KL(teacher || student), and writes them back in their stored dtypes: the indices (unless code
updates are on), every storage dtype and so the true bits (physkern.quant.accounting) are
unchanged. Scalar RTN / GPTQ layers
are the same format (d = 1, integer codebook, per-group scales and offsets) and are trained the
same way.

Learning rate: Adam moves every parameter by about `lr` per step whatever its gradient's scale,
so `lr` is RELATIVE here: each tensor's step size is lr x its mean |value| at the start (offsets
that are all zero use their layer's mean |scale|, norm biases their norm's mean |weight|). One
lr then serves weight-sized codebooks, integer grids with tiny scales, and norm weights near 1.

Discrete code updates (optional, `code_update_every` > 0; PV-tuning style): every that many
steps the codes (indices) of a seeded `code_update_fraction` of each layer's block columns are
re-assigned under the current trainable codebooks / scales to lower that layer's output error
tr((W - Q) H (W - Q)^T), W being the teacher's weight of the same name and H = X^T X / N its
inputs on the training windows (physkern.quant.code_update: the objective never goes up); then
the continuous steps go on. The index bit width is unchanged, so the bits are too. The held-out
keep-if-better check covers the codes: when it fails the original packed indices are restored.
It needs the teacher's layers to be the targets the quantized layers approximate (not so after
SmoothQuant or a factorization, which physkern.recipe refuses with code updates).
With `code_update_objective` = "linearized" the updates minimise instead PV-tuning's
linearisation of the END-TO-END loss at the current codes, <G, Q' - Q> + 1/(2 eta) tr((Q' - Q)
H (Q' - Q)^T), G = dKL/dQ (physkern.weight_grads, summed over a few training windows) and eta
set so the unconstrained move is `code_update_step` x |Q| (physkern.quant.code_update.
linearized_target): the codes follow the loss the codebooks are trained on, not the layer's own
error, which pulled the other way (docs/RESULTS.md, "Discrete code updates").

Shared codebooks (physkern.shared_codebook): the layers holding one codebook tensor get ONE
trainable copy of it (one Adam parameter, whose gradient sums over every layer of the group),
written back once into that one tensor, so it stays shared.
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
from .linear import linear_layers
from .quant.code_update import CodeUpdate, linearized_target, update_codes
from .quant.packing import index_bits, pack_indices
from .quant.reconstruct import reconstruct
from .weight_grads import stored_weight_grads


# ----------------------------------------------------------------------------------------------
# differentiable stand-ins


class _LayerCopy:
    """float32 trainable copies of one QuantizedLinear's codebooks / scales / offsets plus the
    fixed indices, rebuilding W [out, in] differentiably with physkern.quant.reconstruct."""

    def __init__(self, mod: QuantizedLinear, codebooks: "nn.Parameter | None" = None):
        """codebooks: the trainable copy to use (a shared codebook's one copy for its whole
        group); None = a copy of this layer's own."""
        qw = mod.quantized_weight()
        # int32 halves the fixed indices' memory; reconstruct keeps their dtype
        self.idx = qw.indices().to(torch.int32)                              # [S, out, nb]
        self.mod, self.codebook_rows = mod, qw.codebook_rows
        self.codes_changed = False     # set by a code update: write_back then repacks idx
        self.codebooks = codebooks if codebooks is not None else \
            nn.Parameter(mod.codebooks.detach().float().clone())
        self.scales = None if mod.scales is None else \
            nn.Parameter(mod.scales.detach().float().clone())
        self.offsets = None if mod.offsets is None else \
            nn.Parameter(mod.offsets.detach().float().clone())

    def stored_shape(self) -> tuple[int, int]:
        """[out, in] of the layer's weight."""
        return self.mod.out_features, self.mod.in_features

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
        """The effective W [out, in] float32 (Q R^T with an input rotation R, + the layer's
        sparse outliers S, kept fixed; the table a quantized embedding reads)."""
        q = self.stored_weight()
        q = q if self.mod.rotation is None else self.mod.rotation.unapply(q)
        outliers = self.mod.outliers()
        return q if outliers is None else q + outliers.to_dense(q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], the QuantizedLinear's function with the trainable copies:
        (x R) Q^T + b (+ x S^T with sparse outliers S, fixed), as QuantizedLinear.forward
        computes it."""
        x_in = x
        if self.mod.rotation is not None:
            x = self.mod.rotation.apply(x)
        y = F.linear(x, self.stored_weight().to(x.dtype), self.mod.bias)
        outliers = self.mod.outliers()
        return y if outliers is None else y + outliers.apply(x_in)

    def write_back(self) -> None:
        """Store the trained values in the layer's buffers, rounded to their stored dtypes (and
        the codes, repacked, when a code update changed them)."""
        with torch.no_grad():
            if self.codes_changed:   # in place: bumps the version the index caches check
                self.mod.packed.copy_(pack_indices(self.idx, index_bits(self.codebooks.shape[2])))
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
        """Adam groups with lr x magnitude per tensor (see module docstring); a shared
        codebook's one copy once."""
        groups, seen = [], set()
        for layer in self.layers:
            for p, m in layer.params():
                if id(p) not in seen:
                    seen.add(id(p))
                    groups.append((p, m))
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
    shared: dict = {}   # id of a shared codebook tensor -> its one trainable copy
    for m in model.modules():
        if not isinstance(m, QuantizedLinear):
            continue
        copy = None
        if m.shared_codebook is not None:
            copy = shared.get(id(m.codebooks))
            if copy is None:
                copy = shared[id(m.codebooks)] = nn.Parameter(m.codebooks.detach().float().clone())
        t.layers.append(_LayerCopy(m, copy))
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
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            # packed too: code updates change it (a cheap copy: ~bits/32 of the weight); a
            # shared codebook once, not once per layer of its group
            tensors = [t for t in (m.packed, m.codebooks, m.scales, m.offsets)
                       if t is not None and id(t) not in seen]
            seen.update(id(t) for t in tensors)
            out += [(t, t.detach().clone()) for t in tensors]
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


# ----------------------------------------------------------------------------------------------
# discrete code updates (module docstring)


CODE_UPDATE_OBJECTIVES = ("layer", "linearized")
# windows whose summed gradient a linearised update follows (fewer if training has fewer)
LINEARIZED_GRAD_WINDOWS = 4


def check_code_update_args(every, fraction, steps: int, objective: str = "layer",
                           step: float = 0.05) -> None:
    """code_update_every: integer >= 0 (0 = off), < steps when on (so that at least one update
    runs and continuous steps follow it); code_update_fraction: number in (0, 1];
    code_update_objective: one of CODE_UPDATE_OBJECTIVES; code_update_step: number > 0 (the
    linearised update's move relative to |Q|)."""
    if objective not in CODE_UPDATE_OBJECTIVES:
        raise ValueError(f"code_update_objective must be one of "
                         f"{', '.join(CODE_UPDATE_OBJECTIVES)}, got {objective!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or \
            not 0 < step < math.inf:
        raise ValueError(f"code_update_step must be a finite number > 0 (the linearised "
                         f"update's move relative to |Q|), got {step!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"code_update_every must be an integer >= 0 (steps between code "
                         f"updates; 0 = off), got {every!r}")
    if every and not every < steps:
        raise ValueError(f"code_update_every must be < steps = {steps} (updates run before steps "
                         f"every, 2*every, ... < steps; none would run), got {every!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0 < fraction <= 1:
        raise ValueError(f"code_update_fraction must be a number in (0, 1] (the share of each "
                         f"layer's block columns re-assigned per update), got {fraction!r}")


def _input_grams(teacher: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """{name: E[x x^T] [in, in] float32 (CPU)} of each named teacher module's input over
    windows [n, seq]. Layers that read the very same tensor (q/k/v, gate/up: consecutive hooked
    calls) share one accumulator and one result tensor."""
    acc: dict[str, torch.Tensor] = {}       # owner -> float64 sum of x^T x
    owner: dict[str, str] = {}              # layer -> the layer whose sum holds its Gram
    count: dict[str, int] = {}
    last: list = [None, None]               # (tensor, owner) of the previous hooked call

    def make_hook(name: str):
        def hook(_mod, inputs):
            x = inputs[0]
            own = last[1] if last[0] is x else name
            if owner.setdefault(name, own) != own:
                raise RuntimeError(f"internal error: {name}'s input sharing changed between "
                                   "windows")
            if own == name:
                xf = x.detach().reshape(-1, x.shape[-1]).float()
                acc[name] = acc.get(name, 0) + (xf.T @ xf).double().cpu()
                count[name] = count.get(name, 0) + xf.shape[0]
                last[0], last[1] = x, name
        return hook

    hooks = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    dev = next(teacher.parameters()).device
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                teacher(input_ids=windows[i:i + batch_size].to(dev), use_cache=False)
                last[0] = last[1] = None    # releases the held tensor between windows
    finally:
        for h in hooks:
            h.remove()
    mean = {n: (a / count[n]).float() for n, a in acc.items()}
    return {n: mean[o] for n, o in owner.items()}


class _CodeUpdater:
    """The code updates of one fine-tuning run: each eligible layer copy's target (the teacher
    weight of the same name, in the copy's stored basis) and input Gram, the seeded generator of
    block columns, and the record of every update."""

    def __init__(self, model: nn.Module, teacher: nn.Module, tr: "Trainable",
                 train: torch.Tensor, fraction: float, seed: int, batch_size: int):
        t0 = time.perf_counter()
        self.fraction = float(fraction)
        # a generator of its own: the training windows' order is the same with updates on or off
        self.gen = torch.Generator().manual_seed(seed)
        self.skipped: dict[str, str] = {}
        self.records: list[dict] = []
        names = {id(m): n for n, m in model.named_modules()}
        sources = {id(m.weight_source) for m in model.modules()
                   if isinstance(m, QuantizedEmbedding)}
        teacher_lin = {l.name: l for l in linear_layers(teacher)}
        chosen = []
        for layer in tr.layers:
            name = names[id(layer.mod)]
            lin = teacher_lin.get(name)
            if id(layer.mod) in sources:   # its objective would ignore the embedding role
                self.skipped[name] = "also the quantized embedding's table"
            elif lin is None or tuple(lin.weight().shape) != tuple(layer.stored_shape()):
                self.skipped[name] = "no teacher linear layer of that name and shape"
            else:
                chosen.append((name, layer, lin))
        grams = _input_grams(teacher, {n: lin.module for n, _, lin in chosen}, train,
                             batch_size) if chosen else {}
        self.layers = [(n, layer, *self._stored_basis(layer, lin.weight(), grams[n]))
                       for n, layer, lin in chosen]
        self.gram_seconds = time.perf_counter() - t0

    @staticmethod
    def _stored_basis(layer: "_LayerCopy", w: torch.Tensor, h: torch.Tensor):
        """(target W, Gram H) in the layer's stored basis: W R and R^T H R with a rotation R."""
        rot = layer.mod.rotation
        w = w.detach()
        outliers = layer.mod.outliers()
        if outliers is not None:   # Q approximates W - S: the outliers are kept as they are
            w = w - outliers.to_dense(w.dtype).to(w.device)
        if rot is None:
            return w, h
        return rot.apply(w.double()).float(), rot.rotate_gram(h.double()).float()

    def __call__(self, step: int) -> None:
        """Update the codes of every eligible layer copy (after `step` continuous steps)."""
        t0 = time.perf_counter()
        total = {"objective_before": 0.0, "objective_after": 0.0, "blocks_visited": 0,
                 "codes_visited": 0, "codes_changed": 0, "rows_kept": 0}
        for _, layer, w, h in self.layers:
            res = self._update(layer, w, h)
            for key, v in res.summary().items():
                total[key] += v
        self.records.append({"step": step, "layers": len(self.layers), **total,
                             "seconds": time.perf_counter() - t0})

    def _update(self, layer: "_LayerCopy", w: torch.Tensor, h: torch.Tensor) -> CodeUpdate:
        dev = layer.idx.device
        detach = lambda t: None if t is None else t.detach()
        with torch.no_grad():
            res = update_codes(layer.idx, layer.codebooks.detach(), detach(layer.scales),
                               detach(layer.offsets), codebook_rows=layer.codebook_rows,
                               weight=w.to(dev), gram=h.to(dev), fraction=self.fraction,
                               generator=self.gen)
            if res.changed:
                layer.idx.copy_(res.indices)
                layer.codes_changed = True
        return res

    what = "layer objective"

    def note(self) -> str:
        """One line for the run's note: when, how many codes moved, the objective's course."""
        if not self.records:
            return "no code update ran (training stopped early)"
        r = self.records
        return (f"code updates before steps {[u['step'] for u in r]} on {len(self.layers)} "
                f"layers: {sum(u['codes_changed'] for u in r)} codes changed, {self.what} "
                + ", ".join(f"{u['objective_before']:.4g} -> {u['objective_after']:.4g}"
                            for u in r))

    def report(self) -> dict:
        return {"code_update_layers": len(self.layers), "code_update_skipped": self.skipped,
                "code_update_gram_seconds": self.gram_seconds, "code_updates": self.records}


class _LinearizedCodeUpdater(_CodeUpdater):
    """Code updates on the end-to-end KL's gradient (module docstring): the same layers, Grams
    and block draws as _CodeUpdater; at each update the gradient dKL/dQ of every layer over
    LINEARIZED_GRAD_WINDOWS seeded training windows, then per layer update_codes towards
    linearized_target's T under the damped Gram. The records' objectives are the quadratic
    tr((T - Q) M (T - Q)^T) that update_codes lowers (2 eta x the linearised loss + const)."""

    what = "linearised objective"

    def __init__(self, model, teacher, tr, train, fraction, seed, batch_size, step: float):
        super().__init__(model, teacher, tr, train, fraction, seed, batch_size)
        self.model, self.teacher, self.train, self.step = model, teacher, train, float(step)
        self.windows = min(LINEARIZED_GRAD_WINDOWS, train.shape[0])

    def __call__(self, step: int) -> None:
        t0 = time.perf_counter()
        pick = torch.randperm(self.train.shape[0], generator=self.gen)[:self.windows]
        grads: dict = {}
        mods = {n: layer.mod for n, layer, _, _ in self.layers}
        dev = next(self.model.parameters()).device
        for i in pick.tolist():
            ids = self.train[i:i + 1].to(dev)
            with torch.no_grad():
                t_logits = _logits(self.teacher, ids)
            g = stored_weight_grads(mods, lambda: token_kl(t_logits, _logits(self.model, ids))
                                    .mean() / self.windows)
            for n, v in g.items():
                grads[n] = grads[n] + v if n in grads else v
        total = {"objective_before": 0.0, "objective_after": 0.0, "blocks_visited": 0,
                 "codes_visited": 0, "codes_changed": 0, "rows_kept": 0}
        etas = []
        for name, layer, _, h in self.layers:
            with torch.no_grad():
                q = layer.stored_weight().detach()
            target, metric, eta = linearized_target(q, grads[name].to(q.device), self.step,
                                                    gram=h.to(q.device))
            etas.append(eta)
            res = self._update(layer, target, metric)
            for key, v in res.summary().items():
                total[key] += v
        self.records.append({"step": step, "layers": len(self.layers), **total,
                             "gradient_windows": len(pick), "eta_median":
                             float(torch.tensor(etas).median()) if etas else None,
                             "seconds": time.perf_counter() - t0})


def finetune_quantized(model: nn.Module, teacher: nn.Module, calibration: torch.Tensor,
                       steps: int = 100, lr: float = 1e-3, batch_size: int = 1, seed: int = 0,
                       holdout: int = 2, progress: bool = True,
                       train_norms: bool = True, schedule: str = "constant",
                       code_update_every: int = 0, code_update_fraction: float = 0.1,
                       code_update_objective: str = "layer",
                       code_update_step: float = 0.05) -> dict:
    """Fine-tune the codebooks, scales, offsets (and norms) of a quantized `model` in place.

    model:       quantized student (QuantizedLinear layers); packed indices change only with
                 code updates (code_update_every > 0), their bit width never
    teacher:     the full-precision model (same tokenizer, same device), run under no_grad
    calibration: [n_windows, seq] integer token ids from calibration text. A seeded shuffle
                 splits them: the last `holdout` (>= 1) windows are held out, the rest train
    steps, lr:   Adam steps on the token-averaged KL(teacher || student); lr is relative
                 (module docstring)
    batch_size:  training windows per step (<= the training windows)
    schedule:    "constant" (lr every step) or "cosine" (lr x (1 + cos(pi t / steps)) / 2 at
                 step t: large steps first, small ones to settle at the end)
    code_update_every: 0 (default: indices fixed) or k in [1, steps): before steps k, 2k, ...
                 the codes of a seeded code_update_fraction (in (0, 1]) of each layer's block
                 columns are re-assigned to lower its output error vs the teacher layer of the
                 same name (module docstring; seeded by `seed` on a generator of its own, so the
                 training windows' order does not depend on it). Layers that are also a
                 quantized embedding's table, or have no teacher layer of their name and shape,
                 keep their codes. The teacher's input Grams are taken once, on the training
                 windows (never the held-out ones).
    code_update_objective: "layer" (the layer's own output error, above) or "linearized" (the
                 end-to-end KL linearised at the current codes; module docstring) with
                 code_update_step (> 0) its move relative to |Q|.
    Keep-if-better: the trained values (codes included) are kept only if the held-out KL,
    measured with the stored (rounded) values through the normal forward, went down; else the
    originals are restored. Both models are run in eval mode; their modes are restored
    afterwards.

    Returns {"steps", "lr", "lr_relative", "schedule", "batch_size", "seed", "train_norms",
    "train_windows", "holdout_windows", "holdout_indices" (rows of calibration), "window",
    "trained_parameters", "quantized_layers",
    "norm_tensors", "holdout_kl_before", "holdout_kl_after" (of the trained values, even when
    they were not kept), "kept", "note", "seconds", "loss_curve" [steps run],
    "code_update_every", "code_update_fraction", "code_updates" [one record per update: "step"
    (continuous steps before it), "layers", "objective_before" / "objective_after" (sums over
    the layers of tr((W - Q) H (W - Q)^T), H = E[x x^T]), "blocks_visited", "codes_visited",
    "codes_changed", "rows_kept", "seconds"], "codes_changed" (stored codes that differ from
    the original ones at the end: 0 when not kept)} and, with code updates on,
    "code_update_layers", "code_update_skipped" {name: why}, "code_update_gram_seconds";
    with the linearised objective also "code_update_objective", "code_update_step", and per
    record "gradient_windows", "eta_median" (its objectives: tr((T - Q) M (T - Q)^T)).
    """
    check_training_args(calibration, steps, lr, batch_size, holdout, schedule)
    check_code_update_args(code_update_every, code_update_fraction, steps,
                           code_update_objective, code_update_step)
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
            updater = None
            if code_update_every:   # the teacher's Grams first (one pass over train)
                updater = _CodeUpdater(model, teacher, tr, train, code_update_fraction, seed,
                                       batch_size) if code_update_objective == "layer" else \
                    _LinearizedCodeUpdater(model, teacher, tr, train, code_update_fraction, seed,
                                           batch_size, code_update_step)
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=steps, desc="finetune", unit="step")

            def on_step(step: int, kl: float) -> None:
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(kl=f"{kl:.4g}")
                done = step + 1     # continuous steps so far; an update only if more follow
                if updater is not None and done % code_update_every == 0 and done < steps \
                        and math.isfinite(kl):
                    updater(done)

            curve = kl_steps(model, teacher, train, tr.param_groups(float(lr)), steps,
                             batch_size, schedule, gen, on_step)
            if bar is not None:
                bar.close()
            notes = list(tr.notes)
            if updater is not None:
                notes.append(updater.note())
            n_layers, n_norms = len(tr.layers), len(tr.norms)
            # before the write-back, the layers' packed buffers still hold the original codes
            changed = sum(int((l.idx != l.mod.quantized_weight().indices()).sum())
                          for l in tr.layers if l.codes_changed)
        after = mean_kl(model, teacher, held, batch_size)   # stored (rounded) values
        kept = after < before                               # False for NaN too
        if not kept:
            changed = 0
            with torch.no_grad():
                for live, orig in snapshot:
                    live.copy_(orig)
            notes.append(f"holdout KL did not improve ({before:.6g} -> {after:.6g}): original "
                         "codes, codebooks, scales, offsets and norms restored")
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
            "loss_curve": curve, "code_update_every": code_update_every,
            "code_update_fraction": float(code_update_fraction),
            **({"code_update_objective": code_update_objective,
                "code_update_step": float(code_update_step)}
               if code_update_objective != "layer" else {}),
            "code_updates": [] if updater is None else updater.records,
            "codes_changed": changed,
            **({} if updater is None else {k: v for k, v in updater.report().items()
                                           if k != "code_updates"})}
