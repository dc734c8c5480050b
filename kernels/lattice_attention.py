"""Lattice attention: causal softmax attention with the decay bias -(i - j)/xi, skipping what the
decay makes negligible.

    out[b, h, i] = sum_{j <= i} softmax_j(scale * q_i . k_j - (i - j) / xi_h) v_j

xi may differ per head; xi = inf is plain causal attention. The bias multiplies every attention
weight by exp(-(i - j)/xi) (ALiBi with slope 1/xi), so keys far behind a query carry little mass.

Truncation distance (why skipping is safe)
------------------------------------------
Let R bound the range of the scores of one query row: max_j s_ij - min_j s_ij <= R, and
r = exp(-1/xi). Keep the keys at distance d = i - j <= D, skip the rest. Then

    skipped / kept <= e^R * sum_{d > D} r^d / sum_{d <= D} r^d = e^R r^(D+1) / (1 - r^(D+1)),

and the skipped fraction of the softmax mass, skipped / (kept + skipped), is below that. It is
<= eps as soon as r^(D+1) <= eps / (e^R + eps), i.e.

    D(xi, eps, R) = ceil(xi * (R + ln(1/eps) + ln(1 + eps e^-R))) - 1.

If a fraction delta <= eps of the mass is dropped and the rest renormalised, every output coordinate
moves by at most 2 * delta * max_j |v_jc| (`error_bound`).

A bound R on the score range is hard to know in advance and a global one is loose (on the
packaged SmolLM2 the global Cauchy-Schwarz bound `score_range_bound` reaches ~200 nats). So by
default the plan applies the same argument block by block with data-derived, provable quantities (`_blockwise_start`): an upper
bound on the scores of each key tile (min of a Cauchy-Schwarz ball and a coordinate box around the
tile's keys) against the exact mass of each query's last block_n keys, times the decay; it skips
the longest prefix of far key tiles whose total is <= eps. A caller may instead assert a range
(`score_range=R`); then D(xi, eps, R) above is used, and the guarantee holds if the assertion does.

The plan (`lattice_plan`) gives, per (batch, head, query block), the first key tile to load: tiles
before it are never loaded. eps=None is the exact mode: every causal tile is visited.

Three implementations share the plan and are tested against each other:
  lattice_attention_reference  sdpa with the additive bias mask (O(n^2), the seeds' formulation)
  lattice_attention_banded     torch, chunks of queries attend to their band only: O(n * D)
  lattice_attention_triton     the Triton kernel (CUDA, or the interpreter in tests)

Queries may be fewer than keys (decoding with a cache): query row i then sits at absolute position
i + (n_kv - n_q) (bottom-right aligned causal mask, as flash attention does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency, but keep the torch paths usable
    triton = None
    tl = None
    HAS_TRITON = False

XiLike = Union[float, int, Sequence[float], torch.Tensor]

# Production tile sizes per head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# tests/test_lattice_compile.py compiles each for sm_80 and sm_90 and fails on register spills.
PRODUCTION_CONFIGS = {
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 2),
}
DEFAULT_BLOCK = 64  # key/query block of the plan when no kernel config applies


# ----------------------------------------------------------------------------------------------
# validation and the plan
# ----------------------------------------------------------------------------------------------

def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 eps: Optional[float]) -> None:
    """Shapes [batch, heads, n, head_dim]; k/v heads divide q heads (GQA); causal only."""
    if not causal:
        raise ValueError("causal: lattice attention is causal only (causal=True); the decay "
                         "bias -(i-j)/xi is defined on the causal half")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, n, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} dtype must be float16, bfloat16 or float32, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim mismatch: q has {q.shape[3]}, k/v have {k.shape[3]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"heads: q has {hq} heads, k/v have {hkv}; k/v heads must divide q "
                         f"heads (GQA: each k/v head serves q_heads/kv_heads query heads)")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"n: q has {q.shape[2]} positions but k/v only {k.shape[2]}; queries "
                         "must not outnumber keys")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if eps is not None and not (0.0 < float(eps) < 1.0):
        raise ValueError(f"eps must lie in (0, 1) (or be None for exact attention), got {eps}")


def xi_per_head(xi: XiLike, heads: int) -> torch.Tensor:
    """xi as a float64 tensor [heads] (CPU). A scalar applies to every head; inf = no decay."""
    t = torch.as_tensor(xi, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 1:
        t = t.expand(heads).clone()
    if t.numel() != heads:
        raise ValueError(f"xi must be a scalar or have one value per query head ({heads}), got "
                         f"{t.numel()} values")
    if torch.isnan(t).any() or (t <= 0).any():
        raise ValueError(f"xi must be > 0 (inf = no decay), got {t.tolist()}")
    return t


def truncation_distance(xi: float, eps: float, score_range: float) -> float:
    """D(xi, eps, R): keys farther than D behind a query hold < eps of its softmax mass when the
    row's scores span at most R (see module docstring). inf when xi is inf."""
    if not (0.0 < eps < 1.0):
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    if xi <= 0:
        raise ValueError(f"xi must be > 0, got {xi}")
    if math.isinf(xi) or math.isinf(score_range):
        return math.inf
    return max(0.0, math.ceil(xi * (score_range + math.log(1.0 / eps)
                                    + math.log1p(eps * math.exp(-score_range)))) - 1.0)


def error_bound(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-coordinate bound on |exact - truncated| when < eps of the mass is skipped:
    2 * eps * max_j |v_jc|, shape [batch, kv_heads, 1, head_dim]."""
    return 2.0 * eps * v.detach().abs().float().amax(dim=2, keepdim=True)


def score_range_bound(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Provable per-row bound on the score range: 2 |scale| ||q_i|| max_j ||k_j - mean_j k||.

    q [B, Hq, n_q, d], k [B, Hkv, n_kv, d] -> float32 [B, Hq, n_q].
    """
    kf = k.detach().float()
    centred = kf - kf.mean(dim=2, keepdim=True)
    rho = centred.norm(dim=-1).amax(dim=2)                      # [B, Hkv]
    group = q.shape[1] // k.shape[1]
    rho = rho.repeat_interleave(group, dim=1)                   # [B, Hq]
    return 2.0 * abs(scale) * q.detach().float().norm(dim=-1) * rho[:, :, None]


@dataclass
class LatticePlan:
    """Which key blocks each query block reads.

    start_block: int32 [B, Hq, n_q_blocks], first key block to load (0 in exact mode)
    end_block:   int64 [n_q_blocks], one past the last causal key block
    distance:    float64 [B, Hq, n_q_blocks], the truncation distance D used (inf = none)
    """
    start_block: torch.Tensor
    end_block: torch.Tensor
    distance: torch.Tensor
    block_m: int
    block_n: int
    n_q: int
    n_kv: int

    @property
    def blocks_visited(self) -> int:
        return int((self.end_block[None, None, :] - self.start_block.long()).sum())

    @property
    def blocks_causal(self) -> int:
        """Key blocks a causal kernel without skipping reads."""
        b, h = self.start_block.shape[:2]
        return int(self.end_block.sum()) * b * h

    @property
    def fraction_visited(self) -> float:
        return self.blocks_visited / max(self.blocks_causal, 1)


def lattice_plan(q: torch.Tensor, k: torch.Tensor, xi: XiLike, eps: Optional[float],
                 scale: float, block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
                 score_range: Optional[float] = None) -> LatticePlan:
    """The block-skipping plan for q [B, Hq, n_q, d] against k [B, Hkv, n_kv, d].

    Default: the block-wise provable bound (`_blockwise_start`). With `score_range=R` asserted:
    D = D(xi_h, eps, R) and key tiles wholly before first_query_position - D are skipped.
    eps=None or xi=inf: exact (nothing skipped).
    """
    bsz, hq, n_q, _ = q.shape
    n_kv = k.shape[2]
    off = n_kv - n_q
    n_qb = max(1, -(-n_q // block_m))
    q_first = torch.arange(n_qb, dtype=torch.int64) * block_m + off           # absolute pos
    q_last = torch.clamp(torch.arange(n_qb, dtype=torch.int64) * block_m + block_m - 1,
                         max=max(n_q - 1, 0)) + off
    end_block = torch.div(q_last, block_n, rounding_mode="floor") + 1
    xi_h = xi_per_head(xi, hq)
    if eps is None or bool(torch.isinf(xi_h).all()):
        start = torch.zeros(bsz, hq, n_qb, dtype=torch.int32)
        dist = torch.full((bsz, hq, n_qb), math.inf, dtype=torch.float64)
        return LatticePlan(start, end_block, dist, block_m, block_n, n_q, n_kv)
    if not (0.0 < float(eps) < 1.0):
        raise ValueError(f"eps must lie in (0, 1) (or be None for exact attention), got {eps}")
    eps = float(eps)
    if score_range is None:
        start = _blockwise_start(q, k, xi_h, eps, scale, block_m, block_n, q_first)
        start = torch.minimum(start, (end_block - 1)[None, None, :]).to(torch.int32)
        dist = (q_first[None, None, :] - start.long() * block_n).double()
        dist = torch.where(start > 0, dist, torch.full_like(dist, math.inf))
        return LatticePlan(start, end_block, dist, block_m, block_n, n_q, n_kv)
    if not score_range >= 0:
        raise ValueError(f"score_range must be >= 0, got {score_range}")
    r_blk = torch.full((bsz, hq, n_qb), float(score_range), dtype=torch.float64)
    xi_b = xi_h[None, :, None]
    # D = ceil(xi * (R + ln(1/eps) + ln(1 + eps e^-R))) - 1, inf where xi is inf.
    dist = torch.ceil(xi_b * (r_blk + math.log(1.0 / eps) + torch.log1p(eps * torch.exp(-r_blk))))
    dist = torch.clamp(dist - 1.0, min=0.0)
    dist = torch.where(torch.isinf(xi_b).expand_as(dist), torch.full_like(dist, math.inf), dist)
    lo = (q_first[None, None, :].double() - dist).clamp(min=0.0)
    start = torch.div(lo, block_n, rounding_mode="floor")
    start = torch.minimum(start, (end_block - 1).double()[None, None, :]).to(torch.int32)
    return LatticePlan(start, end_block, dist, block_m, block_n, n_q, n_kv)


def _pad_rows(t: torch.Tensor, block: int) -> torch.Tensor:
    """Pad dim 2 to a multiple of `block` by repeating the last row (leaves block bounds intact)."""
    n = t.shape[2]
    total = max(1, -(-n // block)) * block
    if total == n:
        return t
    idx = torch.clamp(torch.arange(total, device=t.device), max=n - 1)
    return t[:, :, idx]


def _local_log_mass(qf: torch.Tensor, kf: torch.Tensor, inv: torch.Tensor, scale: float,
                    window: int, rows_per_step: int = 64) -> torch.Tensor:
    """log sum_{p_i - window <= j <= p_i} exp(s_ij - (p_i - j) inv_h) per query row: the exact
    mass of the keys just behind each query, which block skipping never drops (a lower bound on
    the kept mass). qf [B, Hq, n_q, d], kf [B, Hkv, n_kv, d] -> [B, Hq, n_q]."""
    bsz, hq, n_q, d = qf.shape
    hkv, n_kv = kf.shape[1], kf.shape[2]
    group = hq // hkv
    off = n_kv - n_q
    out = torch.empty(bsz, hq, n_q, device=qf.device)

    def bias(rows0: int, rows1: int, keys0: int, keys1: int) -> torch.Tensor:
        dist = ((torch.arange(rows0, rows1, device=qf.device) + off)[:, None]
                - torch.arange(keys0, keys1, device=qf.device)[None, :])
        b = -dist.float()[None] * inv[:, None, None]
        return b.masked_fill(((dist < 0) | (dist > window))[None], float("-inf"))

    # Interior steps share one bias pattern (distances depend on row - key only).
    common = bias(window - off, window - off + rows_per_step, 0, rows_per_step + window) \
        if n_q >= rows_per_step else None
    for r0 in range(0, n_q, rows_per_step):
        r1 = min(n_q, r0 + rows_per_step)
        k0, k1 = max(0, r0 + off - window), r1 + off
        qs = qf[:, :, r0:r1].view(bsz, hkv, group, r1 - r0, d)
        s = torch.matmul(qs * scale, kf[:, :, None, k0:k1].transpose(-1, -2))
        s = s.view(bsz, hq, r1 - r0, k1 - k0)
        full = common is not None and r1 - r0 == rows_per_step and k1 - k0 == rows_per_step + window
        s.add_(common if full else bias(r0, r1, k0, k1))
        out[:, :, r0:r1] = torch.logsumexp(s, dim=-1)
    return out


def _blockwise_start(q: torch.Tensor, k: torch.Tensor, xi_h: torch.Tensor, eps: float,
                     scale: float, block_m: int, block_n: int, q_first: torch.Tensor,
                     rows_per_step: int = 2048) -> torch.Tensor:
    """First key block to load per (batch, head, query block), from a provable per-block bound.

    Upper bound on scores. For query row i and key block kb, every score s_ij obeys both
      ball: s_ij <= scale q_i . c_kb + |scale| ||q_i|| rho_kb   (c_kb the block's mean key,
            rho_kb = max_j ||k_j - c_kb||; Cauchy-Schwarz), and
      box:  s_ij <= scale (q_i+ . kmax_kb + q_i- . kmin_kb)   (per-coordinate key extremes of the
            block, q+ / q- the positive / negative parts of scale * q_i),
    so U_i,kb = min(ball, box) bounds them. Lower bound on the kept mass: the exact mass of the
    row's own window of the last block_n keys, exp(W_i) = sum_{p_i - block_n <= j <= p_i}
    exp(s_ij - (p_i - j)/xi); only blocks wholly behind that window may be skipped. Then the
    skipped/kept ratio from blocks kb < start is at most
        sum_{kb < start} exp(U_i,kb - W_i) * sum_{j in kb} r^(p_i - j),   r = exp(-1/xi).
    We take the max over the rows of a query block for each kb (a sum of maxima bounds the max of
    sums), accumulate over kb from the far end, and skip the longest prefix whose bound is
    <= eps. As skipped/(kept + skipped) <= skipped/kept, < eps of each row's softmax mass is
    dropped. Cost O(n_q * (n_kv_blocks + 2 block_n) * d): small next to the attention itself.
    """
    bsz, hq, n_q, d = q.shape
    hkv, n_kv = k.shape[1], k.shape[2]
    group = hq // hkv
    off = n_kv - n_q
    n_qb = q_first.numel()
    n_kb = max(1, -(-n_kv // block_n))
    kf = _pad_rows(k.detach().float(), block_n).view(bsz, hkv, n_kb, block_n, d)
    centre = kf.mean(dim=3)                                             # [B, Hkv, n_kb, d]
    radius = (kf - centre[:, :, :, None]).norm(dim=-1).amax(dim=3)      # [B, Hkv, n_kb]
    kmax, kmin = kf.amax(dim=3), kf.amin(dim=3)
    inv = torch.where(torch.isinf(xi_h), torch.zeros_like(xi_h), 1.0 / xi_h).float()
    inv = inv.to(q.device)
    window = block_n
    qf = q.detach().float()
    kept = _local_log_mass(qf, k.detach().float(), inv, scale, window)  # [B, Hq, n_q]
    kb_last = (torch.arange(n_kb, device=q.device) * block_n + block_n - 1).float()
    # log sum_{t < block_n} r^t, per head (r = 1 when xi = inf: log block_n)
    r_pow = torch.exp(-inv * block_n)
    log_geom = torch.where(inv > 0, torch.log((1 - r_pow) / (-torch.expm1(-inv)).clamp(min=1e-30)),
                           torch.full_like(inv, math.log(block_n)))
    # log term(i, kb) = U_i,kb - W_i - (p_i - kb_last)/xi + log_geom
    #                 = U_i,kb + row_term_i + kb_term_kb
    pos = (torch.arange(n_q, device=q.device) + off).float()
    row_term = -(kept + pos[None, None, :] * inv[None, :, None])          # [B, Hq, n_q]
    kb_term = kb_last[None, :] * inv[:, None] + log_geom[:, None]        # [Hq, n_kb]
    # Rows padded to whole query blocks by repeating the last row (same bound, same position).
    qp = _pad_rows(qf * scale, block_m)                    # scale folded in: any sign of scale
    row_term = _pad_rows(row_term[:, :, :, None], block_m)[..., 0]
    n_rows = qp.shape[2]
    step = max(block_m, rows_per_step // block_m * block_m)
    worst = torch.empty(bsz, hq, n_qb, n_kb, device=q.device)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        qs = qp[:, :, r0:r1].view(bsz, hkv, group, r1 - r0, d)
        # ball: (s q).c + ||s q|| rho; box: relu(s q).kmax + min(s q, 0).kmin; in place
        upper = torch.matmul(qs, centre[:, :, None].transpose(-1, -2))     # [B,Hkv,G,R,kb]
        upper.addcmul_(qs.norm(dim=-1, keepdim=True), radius[:, :, None, None, :])
        box = torch.matmul(qs.clamp(min=0), kmax[:, :, None].transpose(-1, -2))
        box.add_(torch.matmul(qs.clamp(max=0), kmin[:, :, None].transpose(-1, -2)))
        torch.minimum(upper, box, out=upper)
        upper = upper.view(bsz, hq, r1 - r0, n_kb)
        upper.add_(row_term[:, :, r0:r1, None]).add_(kb_term[None, :, None, :])
        worst[:, :, r0 // block_m:r1 // block_m] = \
            upper.view(bsz, hq, (r1 - r0) // block_m, block_m, n_kb).amax(dim=3)
    # Only tiles wholly behind every row's window may be skipped; the block's first row is the
    # most restrictive one.
    behind = (q_first.to(q.device).float()[:, None] - kb_last[None, :]) > window
    worst.masked_fill_(~behind[None, None], float("inf"))
    cum = torch.logcumsumexp(worst, dim=-1)                              # far tiles first
    # A small margin absorbs float32 rounding of the terms above.
    start = (cum <= math.log(eps) - 1e-3).long().sum(dim=-1)             # a prefix (cum rises)
    start = torch.where(torch.isinf(xi_h).to(q.device)[None, :, None], torch.zeros_like(start),
                        start)
    return start.cpu()


# ----------------------------------------------------------------------------------------------
# torch implementations
# ----------------------------------------------------------------------------------------------

def lattice_bias(n_q: int, n_kv: int, xi: XiLike, heads: int, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """Additive mask [heads, n_q, n_kv]: -(i - j)/xi_h on the causal half, -inf above it."""
    xi_h = xi_per_head(xi, heads)
    inv = torch.where(torch.isinf(xi_h), torch.zeros_like(xi_h), 1.0 / xi_h).to(device, dtype)
    i = torch.arange(n_q, device=device)[:, None] + (n_kv - n_q)
    j = torch.arange(n_kv, device=device)[None, :]
    dist = (i - j).to(dtype)
    bias = -dist[None] * inv[:, None, None]
    return bias.masked_fill((j > i)[None], float("-inf"))


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def lattice_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xi: XiLike,
                                scale: Optional[float] = None) -> torch.Tensor:
    """sdpa with the additive bias mask, in float32: the O(n^2) ground truth. Returns q's dtype,
    shape [B, Hq, n_q, d]."""
    check_inputs(q, k, v, True, None)
    hq = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = lattice_bias(q.shape[2], k.shape[2], xi, hq, q.device, torch.float32)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), _expand_kv(k.float(), hq), _expand_kv(v.float(), hq),
        attn_mask=bias[None], scale=scale)
    return out.to(q.dtype)


def band_limits(plan: LatticePlan) -> list[tuple[int, int]]:
    """Key range [k0, k1) of each query chunk of the banded path: from the first query of the
    chunk minus the largest D over batch and heads (their union: more keys only add accuracy)
    to the last causal key of the chunk."""
    off = plan.n_kv - plan.n_q
    dmax = plan.distance.amax(dim=(0, 1)).tolist()
    limits = []
    for c, dist in enumerate(dmax):
        first = c * plan.block_m + off
        k0 = 0 if math.isinf(dist) else max(0, first - int(dist))
        last = min((c + 1) * plan.block_m, plan.n_q) - 1 + off
        limits.append((k0, last + 1))
    return limits


def lattice_attention_banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xi: XiLike,
                             eps: Optional[float] = None, scale: Optional[float] = None,
                             chunk: int = 256, score_range: Optional[float] = None,
                             plan: Optional[LatticePlan] = None) -> torch.Tensor:
    """Banded torch implementation: each chunk of `chunk` queries attends only to the keys the
    plan keeps (its band), so the cost is O(n * (D + chunk)) instead of O(n^2).

    GQA without copying k/v: q heads are grouped onto their k/v head. Softmax in float32.
    q [B, Hq, n_q, d], k/v [B, Hkv, n_kv, d] -> [B, Hq, n_q, d] in q's dtype.
    """
    check_inputs(q, k, v, True, eps)
    bsz, hq, n_q, d = q.shape
    hkv, n_kv = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if plan is None:
        plan = lattice_plan(q, k, xi, eps, scale, chunk, min(chunk, DEFAULT_BLOCK), score_range)
    if plan.block_m != chunk:
        raise ValueError("plan: the banded path needs a plan with block_m == chunk")
    limits = band_limits(plan)
    # One bias+mask tensor serves every chunk. Right-align each chunk's band on its last query:
    # for row a of a full chunk and band column b of a band of L keys, i - j = a + L - chunk - b
    # (a per-row constant shift of the bias would not change the softmax). So the bias of every
    # chunk is a slice master[:, chunk - rows:, Lmax - L:] of one [Hq, chunk, Lmax] tensor.
    l_max = max(k1 - k0 for k0, k1 in limits)
    xi_h = xi_per_head(xi, hq)
    inv = torch.where(torch.isinf(xi_h), torch.zeros_like(xi_h), 1.0 / xi_h)
    inv = inv.to(q.device, torch.float32)
    a = torch.arange(chunk, device=q.device)[:, None]
    t = torch.arange(l_max, device=q.device)[None, :]
    dist = (a + (l_max - chunk) - t).float()                                     # i - j
    master = (-dist[None] * inv[:, None, None]).masked_fill((dist < 0)[None], float("-inf"))
    work_dtype = torch.float32  # softmax statistics in float32 whatever the input dtype
    out = torch.empty_like(q)
    for c, (k0, k1) in enumerate(limits):
        q0, q1 = c * chunk, min((c + 1) * chunk, n_q)
        rows, band = q1 - q0, k1 - k0
        mask = master[:, chunk - rows:, l_max - band:]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, q0:q1].to(work_dtype), k[:, :, k0:k1].to(work_dtype),
            v[:, :, k0:k1].to(work_dtype), attn_mask=mask[None], scale=scale,
            enable_gqa=group > 1)
        out[:, :, q0:q1] = o.to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:
    @triton.jit
    def _lattice_block(acc, l_i, m_i, q, k_base, v_base, blk, ipos, slope, qk_scale_log2, n_kv,
                       offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       MASKED: tl.constexpr, IEEE_FP32: tl.constexpr):
        """One key block of the online softmax (base 2). MASKED: diagonal / ragged blocks."""
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            n_mask = offs_n < n_kv
            kt = tl.load(k_ptrs, mask=n_mask[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            kt = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            kt = tl.load(k_ptrs)
        if IEEE_FP32:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        # bias -(i - j)/xi in log2 units
        s = s * qk_scale_log2 - (ipos[:, None] - offs_n[None, :]).to(tl.float32) * slope
        if MASKED:
            s = tl.where((offs_n[None, :] <= ipos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            vb = tl.load(v_ptrs, mask=n_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            vb = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            vb = tl.load(v_ptrs)
        acc = acc * alpha[:, None]
        if IEEE_FP32:
            acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vb.dtype), vb, acc)
        return acc, l_i, m_new

    @triton.jit
    def _lattice_fwd_kernel(
        Q, K, V, Out, InvXi, StartBlock,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        n_q, n_kv, n_q_blocks, heads, group, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        """One program = BLOCK_M queries of one (batch, head). Key blocks [start, full_end) lie
        wholly on or below the diagonal of every row and inside n_kv: no masks there. Blocks
        [full_end, end) touch the diagonal or the end of the keys: masked."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        kvh = h // group
        off = n_kv - n_q
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn \
            + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
        slope = tl.load(InvXi + h) * 1.4426950408889634      # 0 for xi = inf
        ipos = offs_m + off                                  # absolute query positions
        start = tl.load(StartBlock + pid_bh * n_q_blocks + pid_m)
        q_first = pid_m * BLOCK_M + off
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, n_q - 1) + off
        end = last_row // BLOCK_N + 1
        full_end = tl.maximum((q_first + 1) // BLOCK_N, start)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for blk in range(start, full_end):
            acc, l_i, m_i = _lattice_block(acc, l_i, m_i, q, k_base, v_base, blk, ipos, slope,
                                           qk_scale_log2, n_kv, offs_d, stride_kn, stride_kd,
                                           stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D,
                                           False, IEEE_FP32)
        for blk in range(full_end, end):
            acc, l_i, m_i = _lattice_block(acc, l_i, m_i, q, k_base, v_base, blk, ipos, slope,
                                           qk_scale_log2, n_kv, offs_d, stride_kn, stride_kd,
                                           stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D,
                                           True, IEEE_FP32)
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_i[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on \
            + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM))


def kernel_config(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim."""
    if head_dim in PRODUCTION_CONFIGS:
        return PRODUCTION_CONFIGS[head_dim]
    return (64, 64, 4, 2) if head_dim <= 64 else (64, 32, 4, 2)


def lattice_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xi: XiLike,
                             eps: Optional[float] = None, scale: Optional[float] = None,
                             score_range: Optional[float] = None,
                             block_m: Optional[int] = None, block_n: Optional[int] = None,
                             plan: Optional[LatticePlan] = None) -> torch.Tensor:
    """The Triton kernel. q [B, Hq, n_q, d], k/v [B, Hkv, n_kv, d] -> [B, Hq, n_q, d].

    Any head_dim <= 256 (padded to a power of two inside the kernel), any n, GQA, per-head xi.
    block_m/block_n override the tile sizes (tests use 16 under the interpreter).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    check_inputs(q, k, v, True, eps)
    bsz, hq, n_q, d = q.shape
    hkv, n_kv = k.shape[1], k.shape[2]
    if d > 256:
        raise ValueError(f"head_dim must be <= 256 for the Triton kernel, got {d}")
    bm, bn, warps, stages = kernel_config(d)
    bm, bn = block_m or bm, block_n or bn
    scale = d ** -0.5 if scale is None else scale
    if plan is None:
        plan = lattice_plan(q, k, xi, eps, scale, bm, bn, score_range)
    if plan.block_m != bm or plan.block_n != bn:
        raise ValueError("plan: block sizes differ from the kernel's")
    xi_h = xi_per_head(xi, hq)
    inv_xi = torch.where(torch.isinf(xi_h), torch.zeros_like(xi_h), 1.0 / xi_h)
    inv_xi = inv_xi.to(device=q.device, dtype=torch.float32)
    start = plan.start_block.to(q.device, torch.int32).contiguous()
    out = torch.empty_like(q)
    n_qb = start.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    grid = (n_qb, bsz * hq)
    _lattice_fwd_kernel[grid](
        q, k, v, out, inv_xi, start,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        n_q, n_kv, n_qb, hq, hq // hkv, float(scale) * 1.4426950408889634,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, IEEE_FP32=(q.dtype == torch.float32),
        num_warps=warps, num_stages=stages)
    return out
