"""Matrix product operators (tensor trains) for weight matrices [out, in].

A weight W [out, in] with out = prod(o_k) and in = prod(i_k) over N cores is written as

    W[(a_1..a_N), (b_1..b_N)] = G_1[0, a_1, b_1, :] @ ... @ G_N[:, a_N, b_N, 0]

(row-major multi-indices on both sides), each core G_k of shape [r_{k-1}, o_k, i_k, r_k] with
r_0 = r_N = 1 and every bond r_k capped by the bond dimension chi.

- `factorize(n, cores)`: balanced integer factors of a dimension.
- `mpo_decompose(W, out_factors, in_factors, chi)`: TT-SVD (successive truncated SVDs of W
  reordered as [o_1, i_1, o_2, i_2, ...]).
- `dmrg_sweeps(W, cores, sweeps, H=None)`: alternating least squares, one core at a time, left to
  right then right to left, each local problem solved exactly (normal equations with a 1e-12
  relative ridge, in float64), minimising ||W - W_mpo||_F^2 or, with H [in, in] (the activation
  Gram X^T X), tr((W - W_mpo) H (W - W_mpo)^T). The orthogonality centre moves with the solved core
  (QR gauge moves, which leave W_mpo unchanged), so the environments are orthonormal and the local
  systems well conditioned. The objective is recorded after every sweep; an increase beyond float
  tolerance raises.
- `mpo_to_dense(cores, out_factors, in_factors)`: the reference contraction.
- `MPOLinear`: a drop-in for nn.Linear that stores the cores (fp16 by default) and contracts the
  input with them one core at a time, never forming W; counted by physkern.quant.accounting
  through `weight_numel()` / `storage_bits()`. For long inputs at large bonds the contraction
  costs more than forming W once per call (2 cores at chi 115 on a 1536 x 576 weight: ~8x the
  dense product per token), so mode "auto" (default) takes whichever path `flops()` says is
  cheaper; "contract" / "dense" force one (same function, tested equal).
- `chi_for_bits` / `bits_per_weight`: bond dimension <-> stored bits per weight.

Cost of one local solve: plain objective, a few einsums over W; with H, a dense system of size
n_k = r_{k-1} * i_k * r_k (shared by all o_k), O(n_k^3) -- meant for small bonds.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

_RIDGE = 1e-12
_REL_TOL = 1e-7


# ----------------------------------------------------------------------------------------------
# factorisation and bit budgets


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def factorize(n: int, cores: int) -> tuple[int, ...]:
    """`cores` integer factors of n, as balanced as possible, in non-increasing order.

    Chosen: the factorisation with the smallest largest factor; ties broken by the largest
    smallest factor. 576 -> (9, 8, 8); 1536 -> (16, 12, 8); 12 -> (3, 2, 2). A prime n (or any n
    with fewer prime factors than cores) is padded with 1s: 7 -> (7, 1, 1) -- documented choice,
    never an error. ValueError for n < 1 or cores < 1 (naming the argument).
    """
    _check_positive_int(n, "n")
    _check_positive_int(cores, "cores")
    best: Optional[tuple[int, ...]] = None

    def key(f):
        return (max(f), -min(f))

    def rec(rest: int, left: int, cap: int, acc: tuple[int, ...]):
        nonlocal best
        if left == 1:
            if rest <= cap:
                cand = acc + (rest,)
                if best is None or key(cand) < key(best):
                    best = cand
            return
        # non-increasing factors: the next one d <= cap, and d >= rest ** (1 / left) so that
        # the remaining factors (each <= d) can reach rest (one below, for float rounding:
        # a d too small finds no completion).
        lo = max(1, int(rest ** (1.0 / left)) - 1)
        for d in range(lo, min(cap, rest) + 1):
            if rest % d == 0:
                rec(rest // d, left - 1, d, acc + (d,))
                if not acc and best is not None:
                    return  # the first factor is the largest: the smallest feasible one wins

    rec(n, cores, n, ())
    assert best is not None and math.prod(best) == n
    return best


def _check_factors(out_factors: Sequence[int], in_factors: Sequence[int]):
    out_factors, in_factors = tuple(out_factors), tuple(in_factors)
    if not out_factors:
        raise ValueError("out_factors must hold at least one factor")
    if len(out_factors) != len(in_factors):
        raise ValueError(f"out_factors and in_factors must have as many factors (one pair per "
                         f"core), got {out_factors} and {in_factors}")
    for name, fs in (("out_factors", out_factors), ("in_factors", in_factors)):
        for f in fs:
            if isinstance(f, bool) or not isinstance(f, int) or f < 1:
                raise ValueError(f"{name} must be positive integers, got {fs}")
    return out_factors, in_factors


def max_bonds(out_factors: Sequence[int], in_factors: Sequence[int]) -> list[int]:
    """Largest useful bond r_k (k = 1..N-1): min of the unfolding's two sides."""
    sizes = [o * i for o, i in zip(out_factors, in_factors)]
    return [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]


def bond_dims(out_factors: Sequence[int], in_factors: Sequence[int], chi: int) -> list[int]:
    """[r_0, ..., r_N] for bond dimension chi (r_0 = r_N = 1, r_k = min(chi, max_bonds))."""
    return [1] + [min(chi, m) for m in max_bonds(out_factors, in_factors)] + [1]


def core_numel(out_factors: Sequence[int], in_factors: Sequence[int], chi: int) -> int:
    """Stored values of an MPO at bond dimension chi (full-rank W: TT-SVD reaches every bond)."""
    out_factors, in_factors = _check_factors(out_factors, in_factors)
    _check_positive_int(chi, "chi")
    r = bond_dims(out_factors, in_factors, chi)
    return sum(r[k] * o * i * r[k + 1] for k, (o, i) in enumerate(zip(out_factors, in_factors)))


def bits_per_weight(out_factors: Sequence[int], in_factors: Sequence[int], chi: int,
                    dtype_bits: float = 16) -> float:
    """Stored bits of the cores per weight of W at bond dimension chi."""
    n = math.prod(out_factors) * math.prod(in_factors)
    return core_numel(out_factors, in_factors, chi) * dtype_bits / n


def chi_for_bits(out_factors: Sequence[int], in_factors: Sequence[int], target_bits: float,
                 dtype_bits: float = 16) -> int:
    """The largest chi whose cores (at dtype_bits each) fit target_bits per weight.

    Beyond the largest useful bond, chi changes nothing: the answer is capped there.
    ValueError when even chi = 1 does not fit.
    """
    out_factors, in_factors = _check_factors(out_factors, in_factors)
    if not (isinstance(target_bits, (int, float)) and target_bits > 0):
        raise ValueError(f"target_bits must be a positive number, got {target_bits!r}")
    if isinstance(dtype_bits, bool) or not isinstance(dtype_bits, (int, float)) or \
            not 0 < dtype_bits < math.inf:  # a float: a quantizer's bits per stored value
        raise ValueError(f"dtype_bits must be a positive number, got {dtype_bits!r}")
    top = max(max_bonds(out_factors, in_factors), default=1)
    if bits_per_weight(out_factors, in_factors, 1, dtype_bits) > target_bits:
        raise ValueError(f"target_bits={target_bits} is below the smallest MPO "
                         f"(chi=1: {bits_per_weight(out_factors, in_factors, 1, dtype_bits):.4g} "
                         f"bits/weight)")
    lo, hi = 1, top  # bits are non-decreasing in chi: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bits_per_weight(out_factors, in_factors, mid, dtype_bits) <= target_bits:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------------------------
# decomposition, contraction, sweeps


def _check_weight(W: torch.Tensor, out_factors, in_factors):
    out_factors, in_factors = _check_factors(out_factors, in_factors)
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor [out, in], got "
                         f"{getattr(W, 'shape', type(W).__name__)}")
    if W.shape[0] != math.prod(out_factors) or W.shape[1] != math.prod(in_factors):
        raise ValueError(f"W {tuple(W.shape)} does not match out_factors {out_factors} "
                         f"(product {math.prod(out_factors)}) and in_factors {in_factors} "
                         f"(product {math.prod(in_factors)})")
    return out_factors, in_factors


def mpo_decompose(W: torch.Tensor, out_factors: Sequence[int], in_factors: Sequence[int],
                  chi: int) -> list[torch.Tensor]:
    """TT-SVD of W [out, in] into cores [r_{k-1}, o_k, i_k, r_k], every bond at most chi.

    Computed in float64; the cores come back in W's float dtype (float32 for integer/half input).
    """
    out_factors, in_factors = _check_weight(W, out_factors, in_factors)
    _check_positive_int(chi, "chi")
    n = len(out_factors)
    dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    t = W.detach().to(torch.float64).reshape(*out_factors, *in_factors)
    t = t.permute(*[p for k in range(n) for p in (k, n + k)])  # [o1, i1, o2, i2, ...]
    cores, r = [], 1
    rest = t.reshape(1, -1)
    for k in range(n - 1):
        ok, ik = out_factors[k], in_factors[k]
        mat = rest.reshape(r * ok * ik, -1)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        keep = min(chi, S.numel())
        cores.append(U[:, :keep].reshape(r, ok, ik, keep).to(dtype))
        rest = S[:keep, None] * Vh[:keep]
        r = keep
    cores.append(rest.reshape(r, out_factors[-1], in_factors[-1], 1).to(dtype))
    return cores


def _factors_of(cores: Sequence[torch.Tensor]):
    if not cores:
        raise ValueError("cores must hold at least one core")
    for k, g in enumerate(cores):
        if g.dim() != 4:
            raise ValueError(f"cores[{k}] must be [r_prev, o, i, r_next], got {tuple(g.shape)}")
        if k and cores[k - 1].shape[3] != g.shape[0]:
            raise ValueError(f"cores[{k - 1}] and cores[{k}] bonds differ: "
                             f"{cores[k - 1].shape[3]} vs {g.shape[0]}")
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError("the first core's left bond and the last core's right bond must be 1")
    return tuple(int(g.shape[1]) for g in cores), tuple(int(g.shape[2]) for g in cores)


def mpo_to_dense(cores: Sequence[torch.Tensor], out_factors: Optional[Sequence[int]] = None,
                 in_factors: Optional[Sequence[int]] = None) -> torch.Tensor:
    """W [out, in] from the cores (reference contraction; factors default to the cores' own)."""
    of, inf = _factors_of(cores)
    if out_factors is not None and tuple(out_factors) != of:
        raise ValueError(f"out_factors {tuple(out_factors)} do not match the cores' {of}")
    if in_factors is not None and tuple(in_factors) != inf:
        raise ValueError(f"in_factors {tuple(in_factors)} do not match the cores' {inf}")
    env = _left_env(cores, len(cores))  # [out, in, 1]
    return env[:, :, 0]


def _left_env(cores, k):
    """Cores [0, k) contracted: [prod o_<k, prod i_<k, r_k] (row-major multi-indices)."""
    g0 = cores[0]
    env = torch.ones(1, 1, 1, dtype=g0.dtype, device=g0.device)
    for g in cores[:k]:
        a, o, i, b = g.shape
        env = torch.einsum("xpa,aoib->xopib", env, g)
        env = env.reshape(env.shape[0] * o, env.shape[2] * i, b)
    return env


def _right_env(cores, k):
    """Cores (k, N) contracted: [r_k, prod o_>k, prod i_>k]."""
    g0 = cores[-1]
    env = torch.ones(1, 1, 1, dtype=g0.dtype, device=g0.device)
    for g in reversed(cores[k + 1:]):
        a, o, i, b = g.shape
        env = torch.einsum("aoib,byq->aoyiq", g, env)
        env = env.reshape(a, o * env.shape[2], i * env.shape[4])
    return env


def mpo_objective(W: torch.Tensor, cores: Sequence[torch.Tensor],
                  H: Optional[torch.Tensor] = None) -> float:
    """||W - W_mpo||_F^2, or tr((W - W_mpo) H (W - W_mpo)^T) with H [in, in]."""
    E = W.detach().to(torch.float64) - mpo_to_dense([g.to(torch.float64) for g in cores])
    if H is None:
        return float((E * E).sum())
    return float(((E @ H.to(torch.float64)) * E).sum())


def _solve_spd(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    n = M.shape[0]
    lam = _RIDGE * max(float(torch.diagonal(M).sum()) / n, 1e-300)
    return torch.linalg.solve(M + lam * torch.eye(n, dtype=M.dtype, device=M.device), B)


def _local_solve(W6, WH6, H6, L, R):
    """The core minimising the objective with the other cores fixed (exact least squares).

    W6: W as [OL, o, OR, IL, i, IR]; WH6: W @ H the same way (None without H); H6: H as
    [IL, i, IR, IL, i, IR] (None without H); L [OL, IL, a], R [b, OR, IR].
    """
    a, b = L.shape[2], R.shape[0]
    o, i = W6.shape[1], W6.shape[4]
    if H6 is None:
        B = torch.einsum("xpa,xoypiq,byq->aoib", L, W6, R)
        GL = torch.einsum("xpa,xpc->ac", L, L)
        GR = torch.einsum("byq,dyq->bd", R, R)
        B = _solve_spd(GL, B.reshape(a, -1)).reshape(a, o, i, b)
        B = _solve_spd(GR, B.reshape(-1, b).t()).t()
        return B.reshape(a, o, i, b)
    GL = torch.einsum("xpa,xPA->paPA", L, L)
    GR = torch.einsum("byq,cyr->bqcr", R, R)
    T = torch.einsum("paPA,piqPIQ->aiqAIQ", GL, H6)
    M = torch.einsum("aiqAIQ,bqBQ->aibAIB", T, GR).reshape(a * i * b, a * i * b)
    rhs = torch.einsum("xpa,xoypiq,byq->aibo", L, WH6, R).reshape(a * i * b, o)
    g = _solve_spd(M, rhs).reshape(a, i, b, o)
    return g.permute(0, 3, 1, 2).contiguous()


def _move_right(cores, k):
    """Left-orthonormalise core k (QR), pushing R into core k+1; W_mpo unchanged."""
    g = cores[k]
    a, o, i, b = g.shape
    Q, Rm = torch.linalg.qr(g.reshape(a * o * i, b))
    cores[k] = Q.reshape(a, o, i, Q.shape[1])
    cores[k + 1] = torch.einsum("cb,boid->coid", Rm, cores[k + 1])


def _move_left(cores, k):
    """Right-orthonormalise core k (QR of its transpose), pushing into core k-1."""
    g = cores[k]
    a, o, i, b = g.shape
    Q, Rm = torch.linalg.qr(g.reshape(a, o * i * b).t())
    cores[k] = Q.t().reshape(Q.shape[1], o, i, b)
    cores[k - 1] = torch.einsum("xoia,ca->xoic", cores[k - 1], Rm)


def dmrg_sweeps(W: torch.Tensor, cores: Sequence[torch.Tensor], sweeps: int,
                H: Optional[torch.Tensor] = None):
    """ALS sweeps on the cores (bonds fixed by the cores given); returns (cores, objectives).

    One sweep re-solves every core left to right, then every core right to left, each exactly
    (least squares with the others fixed). objectives[0] is the objective of the cores given,
    objectives[s] the objective after sweep s; RuntimeError if one rises beyond float tolerance.
    H: [in, in] symmetric positive (semi)definite Gram for the activation-weighted objective.
    Computed in float64; the cores come back in the dtype of cores[0] (float32/float64).
    """
    out_factors, in_factors = _factors_of(cores)
    _check_weight(W, out_factors, in_factors)
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be a non-negative integer, got {sweeps!r}")
    n_in = W.shape[1]
    if H is not None and (not isinstance(H, torch.Tensor) or tuple(H.shape) != (n_in, n_in)):
        raise ValueError(f"H must be a [{n_in}, {n_in}] tensor (the Gram of the layer's inputs), "
                         f"got {getattr(H, 'shape', type(H).__name__)}")
    out_dtype = cores[0].dtype if cores[0].dtype in (torch.float32, torch.float64) \
        else torch.float32
    W64 = W.detach().to(torch.float64)
    H64 = None if H is None else (0.5 * (H + H.t())).detach().to(torch.float64)
    WH = None if H64 is None else W64 @ H64
    cs = [g.detach().to(torch.float64).clone() for g in cores]
    n = len(cs)
    objectives = [mpo_objective(W64, cs, H64)]
    scale = objectives[0] + (float((W64 * W64).sum()) if H64 is None
                             else float(((W64 @ H64) * W64).sum()))

    def shaped(t, k):
        if t is None:
            return None
        OL, IL = math.prod(out_factors[:k]), math.prod(in_factors[:k])
        OR, IR = math.prod(out_factors[k + 1:]), math.prod(in_factors[k + 1:])
        return t.reshape(OL, out_factors[k], OR, IL, in_factors[k], IR)

    def h6(k):
        if H64 is None:
            return None
        IL, IR = math.prod(in_factors[:k]), math.prod(in_factors[k + 1:])
        return H64.reshape(IL, in_factors[k], IR, IL, in_factors[k], IR)

    def solve(k):
        cs[k] = _local_solve(shaped(W64, k), shaped(WH, k), h6(k), _left_env(cs, k),
                             _right_env(cs, k))

    for k in range(n - 1, 0, -1):  # centre on core 0: cores 1..N-1 right-orthonormal
        _move_left(cs, k)
    for _ in range(sweeps):
        for k in range(n):
            solve(k)
            if k < n - 1:
                _move_right(cs, k)
        for k in range(n - 1, -1, -1):
            solve(k)
            if k > 0:
                _move_left(cs, k)
        obj = mpo_objective(W64, cs, H64)
        if obj > objectives[-1] + _REL_TOL * scale:
            raise RuntimeError(f"DMRG sweep raised the objective: {objectives[-1]:.6g} -> "
                               f"{obj:.6g}")
        objectives.append(obj)
    return [g.to(out_dtype) for g in cs], objectives


# ----------------------------------------------------------------------------------------------
# the module


def set_features_and_bias(module: nn.Module, bias: Optional[torch.Tensor]) -> None:
    """module.out_features / in_features from its out_factors / in_factors, and its frozen bias
    (checked to be [out_features]); shared by MPOLinear and its quantized-core subclass."""
    module.out_features = math.prod(module.out_factors)
    module.in_features = math.prod(module.in_factors)
    if bias is not None and tuple(bias.shape) != (module.out_features,):
        raise ValueError(f"bias must be [{module.out_features}], got {tuple(bias.shape)}")
    module.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                         requires_grad=False)


class MPOLinear(nn.Module):
    """y = x @ W_mpo^T + bias, W_mpo never formed: x is contracted with the cores one at a time.

    cores: [r_{k-1}, o_k, i_k, r_k] stored at `dtype` (fp16 default), computed in fp32.
    bias: [out] or None (kept at its dtype; a dense tensor, not a weight of the matrix).
    """

    def __init__(self, cores: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float16):
        super().__init__()
        self.out_factors, self.in_factors = _factors_of(cores)
        self.cores = nn.ParameterList(
            [nn.Parameter(g.detach().to(dtype).contiguous(), requires_grad=False) for g in cores])
        set_features_and_bias(self, bias)

    @classmethod
    def from_linear(cls, linear, chi: int, cores: int = 3, sweeps: int = 2,
                    H: Optional[torch.Tensor] = None, out_factors: Optional[Sequence[int]] = None,
                    in_factors: Optional[Sequence[int]] = None,
                    dtype: torch.dtype = torch.float16) -> "MPOLinear":
        """TT-SVD at bond dimension chi, then `sweeps` ALS sweeps (H-weighted when H is given).

        linear: an nn.Linear, a physkern LinearLayer (nn.Linear or GPT-2 Conv1D), or a weight
        tensor [out, in]. Factors default to factorize(out/in, cores).
        """
        if isinstance(linear, torch.Tensor):
            W, bias = linear, None
        elif isinstance(linear, nn.Linear):
            W, bias = linear.weight, linear.bias
        elif callable(getattr(linear, "weight", None)) and hasattr(linear, "bias"):
            W, bias = linear.weight(), linear.bias  # LinearLayer: canonical [out, in]
        else:
            raise ValueError(f"linear must be an nn.Linear, a LinearLayer or a weight tensor, "
                             f"got {type(linear).__name__}")
        if W.dim() != 2:
            raise ValueError(f"linear's weight must be 2-D [out, in], got {tuple(W.shape)}")
        _check_positive_int(cores, "cores")
        of = tuple(out_factors) if out_factors is not None else factorize(W.shape[0], cores)
        inf = tuple(in_factors) if in_factors is not None else factorize(W.shape[1], cores)
        gs = mpo_decompose(W.detach().float(), of, inf, chi)
        if sweeps:
            gs, _ = dmrg_sweeps(W.detach().float(), gs, sweeps, H=H)
        return cls(gs, None if bias is None else bias.detach(), dtype=dtype)

    @property
    def chi(self) -> int:
        return max(int(g.shape[3]) for g in self.cores)

    # "contract": always contract x with the cores (never forms W); "dense": form W from the
    # cores for each call and multiply (same function; cheaper for long inputs when the bond is
    # large: see flops()); "auto": whichever flops() says is cheaper for the call's token count.
    MODES = ("auto", "contract", "dense")
    mode: str = "auto"

    def flops(self, tokens: int) -> dict:
        """Multiply-adds of one call on `tokens` input rows: {"contract", "dense"} (the dense
        path counts forming W from the cores plus the [tokens, in] x [in, out] product)."""
        contract = form = 0
        O, IL = 1, 1
        rest = self.in_features
        for g in self.cores:
            r, o, i, s = g.shape
            rest //= i
            contract += tokens * O * rest * r * o * i * s
            form += O * IL * r * o * i * s
            O, IL = O * o, IL * i
        return {"contract": contract, "dense": form + tokens * self.in_features *
                self.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be {self.in_features}, "
                             f"got {tuple(x.shape)}")
        if self.mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {self.mode!r}")
        lead = x.shape[:-1]
        mode = self.mode
        if mode == "auto":
            f = self.flops(x.numel() // self.in_features)
            mode = "dense" if f["dense"] < f["contract"] else "contract"
        if mode == "dense":
            y = torch.nn.functional.linear(x.float(), self.weight(),
                                           None if self.bias is None else self.bias.float())
            return y.to(x.dtype) if x.is_floating_point() else y
        t = x.reshape(-1, 1, self.in_features, 1).float()  # [B, O_done, I_rest, r]
        for g in self.core_tensors():
            r, o, i, s = g.shape
            B, O = t.shape[0], t.shape[1]
            t = t.reshape(B, O, i, t.shape[2] // i, r)
            t = torch.einsum("bOjmr,rojs->bOoms", t, g)
            t = t.reshape(B, O * o, t.shape[3], s)
        y = t.reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype) if x.is_floating_point() else y

    def core_tensors(self) -> list[torch.Tensor]:
        """The cores as the forward computes with them (fp32; a subclass storing quantized
        cores, physkern.methods.factor_quant, returns them dequantized)."""
        return [g.float() for g in self.cores]

    def weight(self) -> torch.Tensor:
        """The [out, in] weight this layer computes with (materialised, fp32; for checks)."""
        return mpo_to_dense(self.core_tensors())

    # the accounting interface (physkern.quant.accounting)
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def storage_bits(self) -> dict:
        return {f"core{k}": g.numel() * g.element_size() * 8 for k, g in enumerate(self.cores)}

    def bits_per_weight(self) -> float:
        return sum(self.storage_bits().values()) / self.weight_numel()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"out_factors={self.out_factors}, in_factors={self.in_factors}, "
                f"bonds={[int(g.shape[3]) for g in self.cores][:-1]}, "
                f"dtype={self.cores[0].dtype}, bias={self.bias is not None}")
