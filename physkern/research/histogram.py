"""Streaming histograms (int64 counters) and activation entropy for calibration.

The work is done by the op `physkern::histogram_update(Tensor x, Tensor(a!) counts, float lo,
float hi) -> ()`, implemented in C++/CUDA (csrc/, module `physkern._C`). Where the extension could
not be built, a pure-torch implementation with the same schema and results is registered instead,
with a warning.

Layout of `counts` (int64, contiguous): [*G, bins + 3]
  counts[..., :bins]   equal-width bins over [lo, hi]
  counts[..., bins]    values below lo (including -inf)
  counts[..., bins+1]  values above hi (including +inf)
  counts[..., bins+2]  NaN (counted apart, never binned)
G = counts.shape[:-1] must equal the trailing dims of x: x is [..., *G] and x[..., g] goes to
histogram g (G = () is one histogram of all of x; G = (C,) is one per channel of x [..., C]).

Edge rule: identical to numpy.histogram(x.double(), bins, range=(lo, hi)): edges
e_i = i * step + lo in float64 (step = (hi - lo) / bins, each operation rounded, e_bins = hi),
bin i holds e_i <= v < e_{i+1}, the last bin also holds v == hi.

`StreamingHistogram` wraps one such counts tensor: update / merge / entropy, with lo/hi given, or
taken from the first update, or from a first pass (`FiniteRange`, `histogram_two_pass`).
`activation_entropy` measures the input entropy of every linear layer over calibration text with
physkern.calib's hooks (the allocators' entropy signal).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

# The op's schema. csrc/histogram.cpp registers it; the fallback below must register the very same
# one (tests/test_histogram.py compares them).
HISTOGRAM_UPDATE_SCHEMA = "(Tensor x, Tensor(a!) counts, float lo, float hi) -> ()"
OP_NAME = "physkern::histogram_update"
TAIL_SLOTS = 3  # below lo, above hi, NaN
BELOW, ABOVE, NAN = 0, 1, 2  # offsets of the tail counters after the bins
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FALLBACK_CHUNK = 1 << 22

EXTENSION_ERROR: Optional[BaseException] = None  # why physkern._C failed to load, if it did
_FALLBACK_OP = None


# ----------------------------------------------------------------------------------------------
# argument checks (shared by the fallback and the fake kernel; the C++ op has the same rules)


def check_histogram_args(x: torch.Tensor, counts: torch.Tensor, lo: float, hi: float
                         ) -> tuple[int, int]:
    """Validate histogram_update's arguments; returns (bins, groups). Raises ValueError."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"histogram_update: x must be float16, bfloat16, float32 or float64, "
                         f"got {x.dtype}")
    if counts.dtype != torch.int64:
        raise ValueError(f"histogram_update: counts must be int64, got {counts.dtype}")
    if counts.dim() < 1:
        raise ValueError("histogram_update: counts must have shape [*groups, bins + 3], got a "
                         "0-d tensor")
    if not counts.is_contiguous():
        raise ValueError("histogram_update: counts must be contiguous")
    if x.device != counts.device:
        raise ValueError(f"histogram_update: x and counts must be on the same device, got x on "
                         f"{x.device} and counts on {counts.device}")
    slots = counts.shape[-1]
    if slots < 1 + TAIL_SLOTS:
        raise ValueError(f"histogram_update: counts' last dimension must be bins + 3 with "
                         f"bins >= 1 (bins, then below-lo, above-hi and NaN counters), got "
                         f"{slots}")
    gdims = counts.dim() - 1
    if gdims > x.dim() or tuple(x.shape[x.dim() - gdims:]) != tuple(counts.shape[:gdims]):
        raise ValueError(f"histogram_update: counts' leading dims {list(counts.shape[:gdims])} "
                         f"must equal the trailing dims of x {list(x.shape)} (x is "
                         f"[..., *groups], counts is [*groups, bins + 3])")
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"histogram_update: need finite lo < hi, got lo={lo}, hi={hi}")
    width = hi - lo
    if not math.isfinite(width):
        raise ValueError(f"histogram_update: hi - lo overflows: lo={lo}, hi={hi}")
    bins = slots - TAIL_SLOTS
    if width / bins <= 16.0 * 2.0 ** -52 * max(abs(lo), abs(hi), width):
        raise ValueError(f"histogram_update: {bins} bins are too many for the range [{lo}, {hi}] "
                         f"in float64: use fewer bins or a wider range")
    return bins, math.prod(counts.shape[:gdims])


def bin_edges(bins: int, lo: float, hi: float, device=None) -> torch.Tensor:
    """[bins + 1] float64 edges, bit-identical to numpy.histogram's (np.linspace)."""
    step = (float(hi) - float(lo)) / bins
    edges = torch.arange(bins + 1, dtype=torch.float64, device=device) * step + float(lo)
    edges[-1] = float(hi)
    return edges


def histogram_update_torch(x: torch.Tensor, counts: torch.Tensor, lo: float, hi: float) -> None:
    """Pure-torch histogram_update (same layout, edge rule and errors as the C++ op).

    The fallback where physkern._C is missing, and an independent check of it in the tests.
    """
    bins, groups = check_histogram_args(x, counts, lo, hi)
    lo, hi = float(lo), float(hi)
    slots = bins + TAIL_SLOTS
    edges = bin_edges(bins, lo, hi, device=x.device)
    flat_counts = counts.view(-1)
    flat = x.detach().reshape(-1)
    for start in range(0, flat.numel(), _FALLBACK_CHUNK):
        v = flat[start:start + _FALLBACK_CHUNK].double()
        # numpy's algorithm: guess, then one correction step against the edges.
        guess = ((v - lo) / (hi - lo) * bins).nan_to_num(0.0).clamp(0, bins - 1).long()
        idx = guess - (v < edges[guess]).long()
        idx = idx + ((v >= edges[(idx + 1).clamp(max=bins)]) & (idx != bins - 1)).long()
        slot = torch.where(v < lo, bins, torch.where(v > hi, bins + 1, bins + 2))
        slot = torch.where((v >= lo) & (v <= hi), idx, slot)
        group = (torch.arange(v.numel(), device=x.device) + start) % groups
        flat_counts += torch.bincount(group * slots + slot, minlength=groups * slots)


def _register_fallback() -> None:
    global _FALLBACK_OP
    _FALLBACK_OP = torch.library.custom_op(
        OP_NAME, histogram_update_torch, mutates_args=("counts",),
        schema=HISTOGRAM_UPDATE_SCHEMA)


try:
    from .. import _C  # noqa: F401  (registers torch.ops.physkern.histogram_update)
except ImportError as exc:  # extension not built: same op, pure torch
    EXTENSION_ERROR = exc
    warnings.warn(f"physkern._C could not be loaded ({exc}); histograms use the pure-torch "
                  f"fallback (correct, slower). Rebuild with `make install`.", RuntimeWarning,
                  stacklevel=2)
    _register_fallback()


@torch.library.register_fake(OP_NAME)
def _histogram_update_fake(x, counts, lo, hi):
    check_histogram_args(x, counts, lo, hi)


def extension_available(device_type: str = "cpu") -> bool:
    """Whether the compiled op serves tensors of `device_type` ("cpu" or "cuda")."""
    if EXTENSION_ERROR is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)


def histogram_update(x: torch.Tensor, counts: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Add the values of x [..., *G] to counts [*G, bins + 3] (int64, in place); returns counts."""
    torch.ops.physkern.histogram_update(x, counts, float(lo), float(hi))
    return counts


# ----------------------------------------------------------------------------------------------
# entropy


def entropy_from_counts(cells: torch.Tensor, unit: str = "bits",
                        correction: Optional[str] = "miller-madow") -> torch.Tensor:
    """Entropy of histograms cells [..., m] (counts) -> [...] float64.

    H = log N - (1/N) sum_i c_i log c_i (plug-in), N = sum_i c_i; with correction="miller-madow"
    plus (m_nonzero - 1) / (2N) nats. Empty histograms (N = 0) give NaN.
    unit: "bits" or "nats".
    """
    if unit not in ("bits", "nats"):
        raise ValueError(f"unit must be 'bits' or 'nats', got {unit!r}")
    if correction not in (None, "miller-madow"):
        raise ValueError(f"correction must be None or 'miller-madow', got {correction!r}")
    c = cells.double()
    n = c.sum(-1)
    p = c / n.unsqueeze(-1)
    h = -torch.special.xlogy(p, p).sum(-1)  # = log N - sum c log c / N, without cancellation
    if correction == "miller-madow":
        h = h + ((c > 0).sum(-1).double() - 1) / (2 * n)
    h = torch.where(n > 0, h, torch.full_like(h, math.nan))
    return h / math.log(2) if unit == "bits" else h


# ----------------------------------------------------------------------------------------------
# streaming histogram


class FiniteRange:
    """Running min and max of the finite values seen (first pass of a two-pass histogram)."""

    def __init__(self):
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None
        self.count = 0  # finite values seen

    def update(self, x: torch.Tensor) -> None:
        v = x.detach()
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            return
        lo, hi = float(v.min()), float(v.max())
        self.lo = lo if self.lo is None else min(self.lo, lo)
        self.hi = hi if self.hi is None else max(self.hi, hi)
        self.count += v.numel()

    def range(self) -> tuple[float, float]:
        """(lo, hi) for a histogram; a single value v is widened to v -/+ 1e-3 * max(|v|, 1)."""
        if self.lo is None:
            raise ValueError("FiniteRange saw no finite values: no range to pick")
        return widen(self.lo, self.hi)

    def histogram(self, bins: int, shape: Sequence[int] = (),
                  device: str | torch.device = "cpu") -> "StreamingHistogram":
        lo, hi = self.range()
        return StreamingHistogram(bins, lo, hi, shape=shape, device=device)


def widen(lo: float, hi: float) -> tuple[float, float]:
    """lo == hi (one distinct value) -> a small range around it; otherwise unchanged."""
    if lo < hi:
        return lo, hi
    pad = 1e-3 * max(abs(lo), 1.0)
    return lo - pad, hi + pad


class StreamingHistogram:
    """Histograms with int64 counters over `bins` equal-width bins of [lo, hi], updated in chunks.

    bins: number of bins (>= 1). lo, hi: the range; both None = take it from the first update
    (min and max of its finite values; later values outside it land in the below/above counters).
    shape: G, the histograms' shape: update(x) takes x [..., *G]; () is a single histogram, (C,)
    one per channel. Values outside [lo, hi] are counted in `below`/`above`, NaN in `nan`.
    """

    def __init__(self, bins: int, lo: Optional[float] = None, hi: Optional[float] = None,
                 shape: Sequence[int] = (), device: str | torch.device = "cpu"):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
        if (lo is None) != (hi is None):
            raise ValueError(f"give both lo and hi, or neither (range from the first update); "
                             f"got lo={lo}, hi={hi}")
        self.bins = bins
        self.shape = tuple(int(s) for s in shape)
        if any(s < 1 for s in self.shape):
            raise ValueError(f"shape must have positive sizes, got {self.shape}")
        self.lo: Optional[float] = None
        self.hi: Optional[float] = None
        # raw: [*shape, bins + 3]; see the module docstring for the layout.
        self.raw = torch.zeros(*self.shape, bins + TAIL_SLOTS, dtype=torch.int64, device=device)
        if lo is not None:
            self._set_range(float(lo), float(hi))

    def _set_range(self, lo: float, hi: float) -> None:
        check_histogram_args(self.raw.new_empty((0,) + self.shape, dtype=torch.float32),
                             self.raw, lo, hi)
        self.lo, self.hi = lo, hi

    # -- counting ------------------------------------------------------------------------------

    def update(self, x: torch.Tensor) -> "StreamingHistogram":
        """Add x [..., *shape] (float16/bfloat16/float32/float64, on this histogram's device)."""
        if self.lo is None:
            rng = FiniteRange()
            rng.update(x)
            if rng.lo is None:
                # Only NaN/inf so far: they land in the tail counters whatever the range.
                histogram_update(x, self.raw, 0.0, 1.0)
                return self
            self._set_range(*rng.range())
        histogram_update(x, self.raw, self.lo, self.hi)
        return self

    def merge(self, other: "StreamingHistogram") -> "StreamingHistogram":
        """Add other's counts into this one (same bins, shape, and range). Returns self."""
        if not isinstance(other, StreamingHistogram):
            raise ValueError(f"merge needs a StreamingHistogram, got {type(other).__name__}")
        if other.bins != self.bins or other.shape != self.shape:
            raise ValueError(f"merge: bins/shape differ: ({self.bins}, {self.shape}) vs "
                             f"({other.bins}, {other.shape})")
        if self.lo is None and other.lo is not None:
            self._set_range(other.lo, other.hi)
        elif other.lo is not None and (other.lo, other.hi) != (self.lo, self.hi):
            raise ValueError(f"merge: ranges differ: [{self.lo}, {self.hi}] vs "
                             f"[{other.lo}, {other.hi}]")
        self.raw += other.raw.to(self.raw.device)
        return self

    # -- views ---------------------------------------------------------------------------------

    @property
    def counts(self) -> torch.Tensor:
        """[*shape, bins] int64 counts of the bins (a view)."""
        return self.raw[..., :self.bins]

    @property
    def below(self) -> torch.Tensor:
        """[*shape] values below lo (including -inf)."""
        return self.raw[..., self.bins + BELOW]

    @property
    def above(self) -> torch.Tensor:
        """[*shape] values above hi (including +inf)."""
        return self.raw[..., self.bins + ABOVE]

    @property
    def nan(self) -> torch.Tensor:
        """[*shape] NaN values seen (never binned)."""
        return self.raw[..., self.bins + NAN]

    @property
    def total(self) -> torch.Tensor:
        """[*shape] all values seen, NaN included."""
        return self.raw.sum(-1)

    @property
    def edges(self) -> torch.Tensor:
        """[bins + 1] float64 bin edges (numpy.histogram's)."""
        if self.lo is None:
            raise ValueError("the histogram has no range yet (no finite value seen)")
        return bin_edges(self.bins, self.lo, self.hi)

    def entropy(self, unit: str = "bits", correction: Optional[str] = "miller-madow",
                include_outside: bool = True) -> torch.Tensor:
        """[*shape] float64 entropy of each histogram (NaN where it is empty).

        Cells: the bins, plus the below/above counters as two more cells when include_outside
        (values outside the range are outcomes too). NaN values never count.
        H = log N - (1/N) sum c log c; "miller-madow" adds (m - 1)/(2N) nats, m = non-empty cells.
        """
        cells = self.raw[..., :self.bins + 2] if include_outside else self.counts
        return entropy_from_counts(cells, unit=unit, correction=correction)

    def __repr__(self) -> str:
        return (f"StreamingHistogram(bins={self.bins}, lo={self.lo}, hi={self.hi}, "
                f"shape={self.shape}, total={int(self.raw.sum())})")


def histogram_two_pass(chunks: Callable[[], Iterable[torch.Tensor]], bins: int,
                       shape: Sequence[int] = (), device: str | torch.device = "cpu"
                       ) -> StreamingHistogram:
    """Two passes over the data: finite min/max first, then the histogram over that range.

    chunks: called twice; each call returns an iterable of tensors [..., *shape].
    """
    rng = FiniteRange()
    for x in chunks():
        rng.update(x)
    hist = rng.histogram(bins, shape, device=device)
    for x in chunks():
        hist.update(x)
    return hist


# ----------------------------------------------------------------------------------------------
# calibration: entropy of every linear layer's input


class ActivationHistograms:
    """physkern.calib statistic: histograms of a layer's input x [tokens, in_features].

    `layer`: one histogram of all values; `channels`: one per input feature (per_channel=True),
    over the same range (so channel entropies compare at equal bin width).
    """

    def __init__(self, bins: int, lo: float, hi: float, in_features: int,
                 per_channel: bool = True, device: str | torch.device = "cpu"):
        self.layer = StreamingHistogram(bins, lo, hi, device=device)
        self.channels = (StreamingHistogram(bins, lo, hi, shape=(in_features,), device=device)
                         if per_channel else None)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(self.layer.raw.device)
        self.layer.update(x)
        if self.channels is not None:
            self.channels.update(x)


@dataclass
class LayerEntropy:
    """Activation entropy of one linear layer's input (bits unless stated)."""
    name: str
    entropy: float                     # Miller-Madow estimate, one histogram of all values
    entropy_plugin: float              # plug-in estimate (no correction)
    lo: float
    hi: float
    bins: int
    values: int                        # values histogrammed (NaN excluded)
    nan: int
    outside: int                       # values outside [lo, hi] (second pass only)
    channel_entropy: Optional[torch.Tensor] = field(default=None, repr=False)  # [in_features]


def activation_entropy(model: torch.nn.Module, windows: torch.Tensor, bins: int = 256,
                       per_channel: bool = True, layers=None, batch_size: int = 1,
                       progress: bool = False, unit: str = "bits") -> dict[str, LayerEntropy]:
    """Entropy of every (decoder) linear layer's input over calibration windows [n, seq].

    Two passes through the model (physkern.calib.collect_statistics): the finite min/max of each
    layer's input, then histograms with `bins` bins over that range, per layer and per input
    channel. Returns {layer name: LayerEntropy}; allocators read `.entropy`.
    """
    from ..calib import collect_statistics
    from ..models import decoder_linear_layers

    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    layers = list(layers) if layers is not None else decoder_linear_layers(model)
    ranges = collect_statistics(model, windows, {"range": lambda l: FiniteRange()}, layers,
                                batch_size=batch_size, progress=progress)
    limits = {}
    for l in layers:
        rng = ranges[l.name]["range"]
        if rng.lo is None:
            raise ValueError(f"layer {l.name}: its input has no finite values")
        limits[l.name] = rng.range()
    device = next(model.parameters()).device  # histograms live where the activations are
    stats = collect_statistics(
        model, windows,
        {"hist": lambda l: ActivationHistograms(bins, *limits[l.name], l.in_features,
                                                per_channel, device)},
        layers, batch_size=batch_size, progress=progress)
    out = {}
    for l in layers:
        h: ActivationHistograms = stats[l.name]["hist"]
        lo, hi = limits[l.name]
        out[l.name] = LayerEntropy(
            name=l.name,
            entropy=float(h.layer.entropy(unit, "miller-madow")),
            entropy_plugin=float(h.layer.entropy(unit, None)),
            lo=lo, hi=hi, bins=bins,
            values=int(h.layer.raw[:bins + 2].sum()),
            nan=int(h.layer.nan),
            outside=int(h.layer.below + h.layer.above),
            channel_entropy=(h.channels.entropy(unit, "miller-madow").cpu()
                             if h.channels is not None else None))
    return out
