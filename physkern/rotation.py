"""Input-side incoherence rotations (issue 19 item 1): seeded, exactly orthogonal, stored as a seed.

A layer y = x W^T is quantized as Q ~ W R with an orthogonal R [in, in] and computes

    y = (x R) Q^T        (effective weight Q R^T; with Q = W R exactly, y = x W^T exactly)

The rotation spreads outlier input channels (and heavy-tailed weight columns) over a block of
coordinates, so the rotated weight is closer to Gaussian and a layer codebook fits it better.

The rotation ("hadamard"): R = P . D . blockdiag(H_b, ..., H_b)

- P  the permutation matrix P[i, perm[i]] = 1 of a seeded random permutation perm of range(n)
- D  diag(signs), seeded random signs +-1
- H_b  the Sylvester Hadamard matrix of order b divided by sqrt(b) (symmetric, orthogonal);
       b = `block`, a power of two dividing n (default: the largest power of two <= 64 dividing
       n; 576 = 9 x 64, 1536 = 24 x 64 give b = 64, whose entries +-1/8 are exact in every float
       format)

perm and signs come from torch.rand on a CPU torch.Generator seeded with `seed`, in float64
(perm = stable argsort of n uniforms, then signs = n uniforms < 0.5): torch's CPU Mersenne
Twister stream, the same on every machine. Nothing but (kind, seed, block) is stored, so a
rotation costs no stored bits (physkern.quant.accounting counts none, correctly).

Applying it never forms R: x R = ((x[..., inv_perm] * signs) viewed as [..., n / b, b]) @ H_b,
i.e. a gather, a scale and one [b, b] matmul: n (b + 2) multiply-adds per input row, versus
n x out for the layer itself (b = 64 against out >= 576 on the packaged model: <= 1/9 of it).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .hadamard_op import hadamard_rotate, native_rotate_available

KINDS = ("hadamard",)
MAX_BLOCK = 64
MAX_SEED = 2 ** 63 - 1  # = physkern.methods._base.MAX_SEED (torch.Generator's signed 64 bits)


def default_block(n: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two <= max_block that divides n (1 when n is odd)."""
    if type(n) is not int or n < 1:
        raise ValueError(f"n (in_features) must be a positive integer, got {n!r}")
    b = 1
    while b * 2 <= max_block and n % (b * 2) == 0:
        b *= 2
    return b


def hadamard_matrix(b: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester Hadamard matrix [b, b] / sqrt(b) (b a power of two): symmetric, orthogonal."""
    if type(b) is not int or b < 1 or b & (b - 1):
        raise ValueError(f"block must be a power of two >= 1, got {b!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(b)).to(dtype)


@dataclass(frozen=True)
class Rotation:
    """An orthogonal R [n, n] described by (kind, seed, block); see the module docstring.

    apply(x)   = x R     x [..., n]  (a layer's input)
    unapply(y) = y R^T   y [..., n]  (rows of a stored-basis weight -> the effective weight)
    """
    kind: str
    seed: int
    block: int
    n: int

    def __post_init__(self):
        check_rotation_fields(self.kind, self.seed, self.block, self.n)

    @classmethod
    def make(cls, kind: str, n: int, seed: int, block: Optional[int] = None) -> "Rotation":
        """The rotation of `kind` for n input features (block=None: default_block(n))."""
        return cls(kind, seed, default_block(n) if block is None else block, n)

    # ---- storage -----------------------------------------------------------------------------
    def to_meta(self) -> dict:
        """JSON form stored in a layer's layout (n is the layer's in_features)."""
        return {"kind": self.kind, "seed": self.seed, "block": self.block}

    @classmethod
    def from_meta(cls, meta, n: int) -> Optional["Rotation"]:
        """Inverse of to_meta for a layer with n input features; None -> None. Raises
        ValueError naming the field for anything else than {kind, seed, block} of valid values."""
        if meta is None:
            return None
        if not isinstance(meta, dict):
            raise ValueError(f"rotation must be an object {{kind, seed, block}} or null, got "
                             f"{type(meta).__name__}")
        unknown = set(meta) - {"kind", "seed", "block"}
        if unknown:
            raise ValueError(f"rotation has unknown keys {sorted(unknown)}; valid: "
                             "['block', 'kind', 'seed']")
        return cls(meta.get("kind"), meta.get("seed"), meta.get("block"), n)

    # ---- the matrix's parts ------------------------------------------------------------------
    def perm_signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm int64 [n], signs float64 [n] of +-1), drawn on a CPU generator from seed."""
        return _perm_signs(self.n, self.seed)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R [n, n] formed densely (tests, analysis; the forward never forms it)."""
        perm, signs = self.perm_signs()
        p = torch.eye(self.n, dtype=torch.float64)[perm]                      # P[i, perm[i]] = 1
        h = torch.block_diag(*([hadamard_matrix(self.block)] * (self.n // self.block)))
        return (p @ torch.diag(signs) @ h).to(dtype)

    def _parts(self, device, dtype):
        return _parts(self.n, self.seed, self.block, torch.device(device), dtype)

    # ---- application -------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x R for x [..., n] (computed in x's dtype; no dense R).

        Under no_grad (not inference_mode, whose tensors have no version counter), the rotation
        of the tensor rotated last by the same rotation is reused (q/k/v and gate/up read one x
        and share the config's seed: one rotation instead of three / two per block). Float32 CPU
        inputs of at most NATIVE_MAX_ROWS rows without a gradient (decode) take the C++ op
        physkern::hadamard_rotate (fast Walsh-Hadamard butterflies), CUDA inputs without a
        gradient the Triton kernel of kernels/hadamard_rotate.py; other single rows a two-op
        path with the signs folded into per-block Hadamards; the rest a gather, a scale and a
        block product. Every path multiplies by the same exact +-1/sqrt(b) entries (b = 4^k) or
        sums the same terms, so they differ only in float summation order."""
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation over {self.n} features applied to x with last dimension "
                             f"{x.shape[-1]}")
        # inference tensors keep no version counter, so a write into x could not be seen
        reuse = (not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                 and not x.is_inference()
                 and not torch.compiler.is_compiling())
        if reuse:
            hit = _last_applied.get(self, x)
            if hit is not None:
                return hit
        if _native_ok(x):         # float32 CPU, no gradient: one C++ op (fast Walsh-Hadamard)
            inv, _, signs, _ = self._parts(x.device, x.dtype)
            y = hadamard_rotate(x, inv, signs, self.block)
        elif _triton_ok(x, self.block):  # CUDA, no gradient: one Triton launch
            from physkern.kernels.hadamard_rotate import hadamard_rotate_triton

            inv, _, signs, h = self._parts(x.device, torch.float32)
            y = hadamard_rotate_triton(x, inv, signs, h)
        elif x.numel() == self.n:  # one row: gather, then one batched product with signed blocks
            inv, signed = _signed_blocks(self.n, self.seed, self.block, x.device, x.dtype)
            nb = self.n // self.block
            y = torch.bmm(x.reshape(1, self.n).index_select(1, inv).view(nb, 1, self.block),
                          signed).reshape(x.shape)
        else:
            inv, _, signs, h = self._parts(x.device, x.dtype)
            shape = x.shape
            xs = x.index_select(-1, inv) * signs
            y = (xs.reshape(*shape[:-1], self.n // self.block, self.block) @ h).reshape(shape)
        if reuse:
            _last_applied.put(self, x, y)
        return y

    def unapply(self, y: torch.Tensor) -> torch.Tensor:
        """y R^T for y [..., n]: R^T = blockdiag(H_b) D P^T (H_b symmetric)."""
        if y.shape[-1] != self.n:
            raise ValueError(f"rotation over {self.n} features applied to y with last dimension "
                             f"{y.shape[-1]}")
        _, perm, signs, h = self._parts(y.device, y.dtype)
        shape = y.shape
        z = (y.reshape(*shape[:-1], self.n // self.block, self.block) @ h).reshape(shape)
        return (z * signs).index_select(-1, perm)

    def rotate_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """R^T G R for G [n, n] (the X^T X of rotated inputs x R)."""
        return self.apply(self.apply(gram).mT.contiguous()).mT.contiguous()


# Rows up to which x R takes the C++ op. It saves dispatches (one op instead of two: 3.9 us
# against 6.3 us for a 576-wide decode row at one thread, bench/bench_rotation.py); from about 8
# rows on, the torch form's [rows, 64] x [64, 64] GEMM beats the op's scalar butterfly passes,
# so prefill and evaluation windows keep it.
NATIVE_MAX_ROWS = 4


def _native_ok(x: torch.Tensor) -> bool:
    """Whether x R may take physkern::hadamard_rotate: a float32 CPU tensor of at most
    NATIVE_MAX_ROWS rows, no gradient to record, not traced, and the op built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and x.numel() <= NATIVE_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling() and native_rotate_available())


def _triton_ok(x: torch.Tensor, block: int) -> bool:
    """Whether x R may take the Triton kernel (kernels/hadamard_rotate.py): a CUDA tensor, no
    gradient to record, not traced, block >= 16 (tl.dot's smallest K)."""
    return (x.is_cuda and block >= 16 and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling())


def check_rotation_fields(kind, seed, block, n) -> None:
    """Raise ValueError naming the field unless (kind, seed, block, n) describe a rotation."""
    if kind not in KINDS:
        raise ValueError(f"rotation kind must be one of {KINDS}, got {kind!r}")
    if type(n) is not int or n < 1:
        raise ValueError(f"rotation n (in_features) must be a positive integer, got {n!r}")
    if type(seed) is not int or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"rotation seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if type(block) is not int or block < 1 or block & (block - 1) or block > n or n % block:
        raise ValueError(f"rotation block must be a power of two dividing in_features ({n}), "
                         f"got {block!r}")


@functools.lru_cache(maxsize=64)
def _perm_signs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # cached: never inference tensors (fine-tuning reuses them)
        return _draw(n, seed)


def _draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.argsort(torch.rand(n, generator=g, dtype=torch.float64), stable=True)
    signs = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return perm, signs.to(torch.float64)


@functools.lru_cache(maxsize=256)
def _parts(n: int, seed: int, block: int, device: torch.device, dtype: torch.dtype):
    """(inv_perm, perm, signs, H_b) on device, signs/H in dtype; cached (decode calls apply
    once per layer per token)."""
    perm, signs = _perm_signs(n, seed)
    with torch.inference_mode(False):
        inv = torch.argsort(perm)
        return (inv.to(device), perm.to(device), signs.to(device=device, dtype=dtype),
            hadamard_matrix(block, dtype).to(device))


@functools.lru_cache(maxsize=256)
def _signed_blocks(n: int, seed: int, block: int, device: torch.device, dtype: torch.dtype):
    """(inv_perm, D_j H_b for every block j as [n / b, b, b]): the one-row path's operands."""
    inv, _, signs, h = _parts(n, seed, block, device, dtype)
    with torch.inference_mode(False):
        return inv, (signs.view(n // block, block, 1) * h).contiguous()


class _LastApplied:
    """The last (rotation, x, x R) computed without autograd. A hit needs the very same tensor
    object (held here, so its id cannot be reused), unchanged since (its version counter) and
    an output nobody wrote into; anything else recomputes."""

    def __init__(self):
        self.entry = None

    def get(self, rotation: "Rotation", x: torch.Tensor) -> Optional[torch.Tensor]:
        e = self.entry
        if (e is not None and e[1] is x and e[2] == x._version and e[0] == rotation
                and e[4] == e[3]._version):
            return e[3]
        return None

    def put(self, rotation: "Rotation", x: torch.Tensor, y: torch.Tensor) -> None:
        self.entry = (rotation, x, x._version, y, y._version)

    def clear(self) -> None:
        self.entry = None


_last_applied = _LastApplied()


def rotate_problem(weight: torch.Tensor, m2: Optional[torch.Tensor], gram: Optional[torch.Tensor],
                   rotation: Rotation) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                                Optional[torch.Tensor]]:
    """A layer's quantization problem in the rotated basis (what every quantizer with a
    rotation option calls before quantizing, then attaches `rotation` to its result).

    weight [out, in] -> W R;  gram [in, in] (X^T X) -> R^T G R (float64 inside);
    m2 [in] (E[x^2] = diag(G) / count) -> diag(R^T G R) / count, the count recovered as
    sum diag(G) / sum m2, so it needs gram: m2 without gram raises ValueError (the diagonal of
    the rotated statistics is not a function of the diagonal alone).
    """
    if m2 is not None and gram is None:
        raise ValueError("gram: a rotation with calibrated importance m2 needs the full X^T X "
                         "(the config's needs_hessian must be True)")
    w_r = rotation.apply(weight.double()).to(weight.dtype)
    if gram is None:
        return w_r, None, None
    g = gram.double()
    g_r = rotation.rotate_gram(g)
    g_r = 0.5 * (g_r + g_r.mT)       # exactly symmetric (rounding of the two passes)
    m2_r = None
    if m2 is not None:
        total = float(torch.diagonal(g).sum())
        count = total / float(m2.double().sum()) if total > 0 else 1.0
        m2_r = (torch.diagonal(g_r) / count).to(m2.dtype)
    return w_r, m2_r, g_r.to(gram.dtype)


def config_rotation(cfg, in_features: int) -> Optional[Rotation]:
    """The input rotation a quantizer config asks for: None for cfg.rotation == "none", else
    Rotation.make(cfg.rotation, in_features, seed) with seed = cfg.rotation_seed where the
    config has one (RTN, GPTQ), else cfg.seed (codebooks: the k-means seed)."""
    kind = getattr(cfg, "rotation", "none")
    if kind == "none":
        return None
    seed = getattr(cfg, "rotation_seed", None)
    return Rotation.make(kind, in_features, cfg.seed if seed is None else seed)


def check_config_rotation(cfg) -> None:
    """Validate a config's `rotation` field (ValueError naming it and the allowed values)."""
    allowed = ("none",) + KINDS
    if cfg.rotation not in allowed:
        raise ValueError(f"rotation must be one of {allowed}, got {cfg.rotation!r}")


def config_dict_without_default_rotation(d: dict) -> dict:
    """A config's to_dict() without `rotation` (and `rotation_seed`) when it is "none":
    unrotated configs keep the dicts they had before the fields existed (saved recipes, sweep
    point keys that resume)."""
    if d.get("rotation") == "none":
        d = {k: v for k, v in d.items() if k not in ("rotation", "rotation_seed")}
    return d
