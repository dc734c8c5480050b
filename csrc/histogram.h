// Streaming histograms for physkern._C: shared by the CPU (histogram.cpp) and CUDA
// (histogram_cuda.cu) kernels.
//
// Op (schema registered once, in histogram.cpp):
//   physkern::histogram_update(Tensor x, Tensor(a!) counts, float lo, float hi) -> ()
//
// Layout of `counts` (int64, contiguous): [*G, bins + 3]. The trailing dimension holds `bins`
// equal-width bins over [lo, hi] followed by three tail counters:
//   counts[..., bins + 0]  values below lo (including -inf)
//   counts[..., bins + 1]  values above hi (including +inf)
//   counts[..., bins + 2]  NaN (never binned)
// G = counts.shape[:-1] (possibly empty) must equal the trailing dims of x: x is [..., *G] and
// x[..., g] is added to histogram counts[g]. G = () gives one histogram of all of x; G = (C,)
// gives one histogram per channel of x [..., C].
//
// Edge rule = numpy.histogram(v, bins, range=(lo, hi)) on float64 values: edges
// e_i = fl(fl(i * step) + lo) with step = (hi - lo) / bins and e_bins = hi; bin i holds
// e_i <= v < e_{i+1}; the last bin also holds v == hi.
#pragma once

#include <cstdint>

#include <c10/macros/Macros.h>

namespace physkern {

constexpr int64_t kTailSlots = 3;  // below lo, above hi, NaN

// Everything a kernel needs to turn a value into a slot in [0, bins + 3).
struct BinGeometry {
  double lo;
  double hi;
  double step;   // (hi - lo) / bins: the edge spacing numpy.linspace uses
  double scale;  // bins / (hi - lo): first guess of the bin, corrected against the edges
  int32_t bins;
};

// i * step + lo rounded twice, never fused into one FMA (numpy computes the edges that way;
// a fused multiply-add would move some edges by one ulp).
C10_HOST_DEVICE inline double edge_at(int32_t i, const BinGeometry& g) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(__dmul_rn(static_cast<double>(i), g.step), g.lo);
#else
  return static_cast<double>(i) * g.step + g.lo;  // histogram.cpp is built with fp-contract=off
#endif
}

// Slot of one value: a bin in [0, bins), or bins (below lo), bins + 1 (above hi), bins + 2 (NaN).
// Written with selects only, so the CPU loop over it vectorizes.
C10_HOST_DEVICE inline int32_t slot_of(double v, const BinGeometry& g) {
  const int32_t last = g.bins - 1;
  double t = (v - g.lo) * g.scale;
  t = (t >= 0.0) ? t : 0.0;                        // also maps NaN to 0
  t = (t <= static_cast<double>(last)) ? t : static_cast<double>(last);
  int32_t i = static_cast<int32_t>(t);
  const double e_lo = edge_at(i, g);
  double e_hi = edge_at(i + 1, g);  // computed unconditionally so the loop vectorizes
  e_hi = (i == last) ? g.hi : e_hi;
  // The guess is within one bin of the answer; one correction step lands on it (as numpy).
  i = (v < e_lo) ? i - 1 : i;
  i = (v >= e_hi && i != last) ? i + 1 : i;
  const bool in_range = (v >= g.lo) && (v <= g.hi);
  const int32_t outside = (v < g.lo) ? g.bins : ((v > g.hi) ? g.bins + 1 : g.bins + 2);
  return in_range ? i : outside;
}

}  // namespace physkern

#include <ATen/core/Tensor.h>
namespace physkern {
// Validates the op's arguments (ValueError naming the argument) and returns the geometry.
// groups = prod(counts.shape[:-1]).
BinGeometry check_histogram_args(const at::Tensor& x, const at::Tensor& counts, double lo,
                                 double hi, int64_t* groups);
}  // namespace physkern
