// physkern._C: streaming histogram op, schema + CPU kernel. Layout and edge rule: histogram.h.
//
// CPU strategy. Values are handled in blocks of kBlock: first their slots are computed (a
// branch-free loop that vectorizes; cloned for AVX-512 / AVX2 / baseline and picked at load
// time), then the slots are counted. Two parallel schemes (at::parallel_for):
//  - rows: each thread takes a contiguous range of x and counts into a private uint32 copy of
//    all histograms (4 interleaved copies when there is one histogram, so runs of equal values do
//    not serialize on one counter), merged into the int64 output under a lock when the thread
//    ends or before any private counter could reach 2^32;
//  - groups: when there are many large histograms (one per channel), each thread owns a range of
//    groups and counts straight into the int64 output: no copies, no merge, no races.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

// numpy rounds i * step and + lo separately; keep the compiler from fusing them into an FMA
// (it would on aarch64 by default, and in the AVX-512 clone below). no-trapping-math (we never
// read FP exception flags) lets GCC turn the selects in slot_of into vector blends.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include "histogram.h"

extern "C" {
// An importable, empty module: importing physkern._C registers the ops below with torch.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace physkern {

BinGeometry check_histogram_args(const at::Tensor& x, const at::Tensor& counts, double lo,
                                 double hi, int64_t* groups) {
  const auto xt = x.scalar_type();
  TORCH_CHECK_VALUE(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16 ||
                        xt == at::kDouble,
                    "histogram_update: x must be float16, bfloat16, float32 or float64, got ",
                    xt);
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kLong,
                    "histogram_update: counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.dim() >= 1,
                    "histogram_update: counts must have shape [*groups, bins + 3], got a 0-d "
                    "tensor");
  TORCH_CHECK_VALUE(counts.is_contiguous(), "histogram_update: counts must be contiguous");
  TORCH_CHECK_VALUE(x.device() == counts.device(),
                    "histogram_update: x and counts must be on the same device, got x on ",
                    x.device(), " and counts on ", counts.device());
  const int64_t slots = counts.size(-1);
  TORCH_CHECK_VALUE(slots >= 1 + kTailSlots,
                    "histogram_update: counts' last dimension must be bins + 3 with bins >= 1 "
                    "(bins, then below-lo, above-hi and NaN counters), got ", slots);
  TORCH_CHECK_VALUE(slots <= INT32_MAX, "histogram_update: bins must be < 2^31 - 3, got ",
                    slots - kTailSlots);
  const int64_t group_dims = counts.dim() - 1;
  TORCH_CHECK_VALUE(group_dims <= x.dim() &&
                        x.sizes().slice(x.dim() - group_dims) ==
                            counts.sizes().slice(0, group_dims),
                    "histogram_update: counts' leading dims ", counts.sizes().slice(0, group_dims),
                    " must equal the trailing dims of x ", x.sizes(),
                    " (x is [..., *groups], counts is [*groups, bins + 3])");
  TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo < hi,
                    "histogram_update: need finite lo < hi, got lo=", lo, ", hi=", hi);
  const double width = hi - lo;
  TORCH_CHECK_VALUE(std::isfinite(width), "histogram_update: hi - lo overflows: lo=", lo,
                    ", hi=", hi);
  const int64_t bins = slots - kTailSlots;
  const double step = width / static_cast<double>(bins);
  // Edges must be strictly increasing and the first guess within one bin of the answer.
  const double magnitude = std::max({std::fabs(lo), std::fabs(hi), width});
  TORCH_CHECK_VALUE(step > 16.0 * DBL_EPSILON * magnitude, "histogram_update: ", bins,
                    " bins are too many for the range [", lo, ", ", hi,
                    "] in float64: use fewer bins or a wider range");
  int64_t g = 1;
  for (int64_t d = 0; d < group_dims; ++d) g *= counts.size(d);
  *groups = g;
  BinGeometry geom;
  geom.lo = lo;
  geom.hi = hi;
  geom.step = step;
  geom.scale = static_cast<double>(bins) / width;
  geom.bins = static_cast<int32_t>(bins);
  return geom;
}

namespace {

constexpr int64_t kBlock = 1024;            // slots computed per pass before counting
constexpr int64_t kFlushEvery = 1LL << 31;  // private uint32 counters are merged before this

// Fast path for float32/float16/bfloat16 input (all exact in float32): the bin is guessed in
// float32 arithmetic, 16 lanes at a time, and kept only when it is provably the bin the float64
// edge rule gives: the guess t has |t - t_exact| <= delta bins, so a fractional part in
// (delta, 1 - delta) is at least delta away from every edge. Values closer to an edge (about
// 2 * delta of them, ~0.2% at 4096 bins over [-4, 4]) get slot -1 and are redone in float64 by
// the counting loop. Range tests are exact: lo_in/hi_in are lo/hi rounded inward to float32.
struct FloatGeometry {
  float lo, scale, lo_in, hi_in, max_t, delta;
  int32_t bins;
  bool usable;
};

FloatGeometry float_geometry(const BinGeometry& g) {
  FloatGeometry f{};
  f.bins = g.bins;
  f.lo = static_cast<float>(g.lo);
  f.scale = static_cast<float>(g.scale);
  f.lo_in = static_cast<float>(g.lo);
  if (static_cast<double>(f.lo_in) < g.lo) f.lo_in = std::nextafter(f.lo_in, INFINITY);
  f.hi_in = static_cast<float>(g.hi);
  if (static_cast<double>(f.hi_in) > g.hi) f.hi_in = std::nextafter(f.hi_in, -INFINITY);
  f.max_t = static_cast<float>(g.bins);
  // Rounding of lo, of x - lo and of the product (unit roundoff u = 2^-24 each), with a factor-2
  // margin that also covers the float64 edges' own rounding (~2^-53).
  const double u = std::ldexp(1.0, -24);
  const double delta = 2.0 * u * (std::fabs(g.lo) * g.scale + 4.0 * g.bins);
  f.delta = static_cast<float>(delta);
  f.usable = std::isfinite(f.lo) && std::isfinite(f.scale) && std::isfinite(f.lo_in) &&
             std::isfinite(f.hi_in) && f.lo_in <= f.hi_in && g.bins <= (1 << 22) &&
             delta < 0.05;
  return f;
}

// Slot in [0, bins + 3), or -1: "too near an edge, redo in float64". Selects only (vectorizes).
inline int32_t fast_slot_of(float v, const FloatGeometry& f) {
  float t = (v - f.lo) * f.scale;
  t = (t >= 0.f) ? t : 0.f;  // NaN -> 0 (NaN is sorted out below)
  t = (t <= f.max_t) ? t : f.max_t;
  const int32_t i = static_cast<int32_t>(t);
  const float frac = t - static_cast<float>(i);  // exact
  int32_t r = (frac > f.delta) ? i : -1;
  r = (frac < 1.f - f.delta) ? r : -1;
  r = (i < f.bins) ? r : -1;
  int32_t outside = (v > f.hi_in) ? f.bins + 1 : f.bins + 2;
  outside = (v < f.lo_in) ? f.bins : outside;
  r = (v >= f.lo_in) ? r : outside;
  r = (v <= f.hi_in) ? r : outside;
  return r;
}

template <typename T>
inline double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
inline double to_double<double>(double v) {
  return v;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PHYSKERN_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PHYSKERN_CLONES
#endif

// Slot loops, one function per dtype so each can be cloned per instruction set.
#define PHYSKERN_SLOT_LOOPS(NAME, scalar_t)                                                   \
  PHYSKERN_CLONES void exact_slots_##NAME(const scalar_t* x, int64_t n, BinGeometry g,       \
                                          int32_t* out) {                                   \
    for (int64_t k = 0; k < n; ++k) out[k] = slot_of(to_double(x[k]), g);                   \
  }                                                                                         \
  PHYSKERN_CLONES void fast_slots_##NAME(const scalar_t* x, int64_t n, FloatGeometry f,      \
                                         int32_t* out) {                                    \
    for (int64_t k = 0; k < n; ++k) out[k] = fast_slot_of(static_cast<float>(x[k]), f);     \
  }

PHYSKERN_SLOT_LOOPS(float, float)
PHYSKERN_SLOT_LOOPS(half, c10::Half)
PHYSKERN_SLOT_LOOPS(bfloat16, c10::BFloat16)

PHYSKERN_CLONES void exact_slots_double(const double* x, int64_t n, BinGeometry g,
                                        int32_t* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = slot_of(x[k], g);
}

// Slots of x[0, n) into out: the float32 fast path where it applies, float64 otherwise.
struct Slotter {
  BinGeometry exact;
  FloatGeometry fast;
  void operator()(const float* x, int64_t n, int32_t* out) const {
    fast.usable ? fast_slots_float(x, n, fast, out) : exact_slots_float(x, n, exact, out);
  }
  void operator()(const c10::Half* x, int64_t n, int32_t* out) const {
    fast.usable ? fast_slots_half(x, n, fast, out) : exact_slots_half(x, n, exact, out);
  }
  void operator()(const c10::BFloat16* x, int64_t n, int32_t* out) const {
    fast.usable ? fast_slots_bfloat16(x, n, fast, out)
                : exact_slots_bfloat16(x, n, exact, out);
  }
  void operator()(const double* x, int64_t n, int32_t* out) const {
    exact_slots_double(x, n, exact, out);
  }
};

template <typename scalar_t>
inline int32_t resolve(int32_t s, const scalar_t* x, const BinGeometry& g) {
  return s >= 0 ? s : slot_of(to_double(*x), g);
}

// One histogram; `copies` (1, 2 or 4) interleaved private copies in hist ([copies, slots]) so
// that runs of equal values do not serialize on one counter.
template <typename scalar_t>
inline void count_single(const int32_t* s, const scalar_t* x, int64_t n, int64_t slots,
                         int copies, const BinGeometry& g, uint32_t* hist) {
  uint32_t* h0 = hist;
  uint32_t* h1 = copies >= 2 ? hist + slots : hist;
  uint32_t* h2 = copies >= 4 ? hist + 2 * slots : h0;
  uint32_t* h3 = copies >= 4 ? hist + 3 * slots : h1;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    int32_t a = s[k], b = s[k + 1], c = s[k + 2], d = s[k + 3];
    if ((a | b | c | d) < 0) {
      a = resolve(a, x + k, g);
      b = resolve(b, x + k + 1, g);
      c = resolve(c, x + k + 2, g);
      d = resolve(d, x + k + 3, g);
    }
    ++h0[a];
    ++h1[b];
    ++h2[c];
    ++h3[d];
  }
  for (; k < n; ++k) ++h0[resolve(s[k], x + k, g)];
}

// Values x[first .. first + n) of a [rows, groups] array: value k goes to group (first+k) % groups.
template <typename scalar_t, typename acc_t>
inline void count_groups(const int32_t* s, const scalar_t* x, int64_t n, int64_t first_group,
                         int64_t groups, int64_t slots, const BinGeometry& g, acc_t* hist) {
  int64_t group = first_group;
  for (int64_t k = 0; k < n; ++k) {
    ++hist[group * slots + resolve(s[k], x + k, g)];
    if (++group == groups) group = 0;
  }
}

template <typename scalar_t>
void update_rows(const scalar_t* x, int64_t numel, int64_t groups, int64_t slots,
                 const Slotter& slotter, int64_t* out) {
  // Private copies of a single histogram: as many as fit in ~32 KiB of L1.
  int copies = 1;
  if (groups == 1) copies = slots * 4 * 4 <= 32768 ? 4 : (slots * 4 * 2 <= 40960 ? 2 : 1);
  const int64_t private_size = copies * groups * slots;
  std::mutex merge_mutex;
  at::parallel_for(0, numel, 1 << 16, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local(private_size, 0);
    std::vector<int32_t> s(kBlock);
    int64_t pending = 0;
    auto flush = [&]() {
      std::lock_guard<std::mutex> lock(merge_mutex);
      for (int c = 0; c < copies; ++c) {
        const uint32_t* h = local.data() + c * groups * slots;
        for (int64_t i = 0; i < groups * slots; ++i) out[i] += h[i];
      }
      std::fill(local.begin(), local.end(), 0u);
      pending = 0;
    };
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t n = std::min(kBlock, end - b);
      slotter(x + b, n, s.data());
      if (groups == 1) {
        count_single(s.data(), x + b, n, slots, copies, slotter.exact, local.data());
      } else {
        count_groups(s.data(), x + b, n, b % groups, groups, slots, slotter.exact,
                     local.data());
      }
      pending += n;
      if (pending >= kFlushEvery - kBlock) flush();
    }
    if (pending > 0) flush();
  });
}

template <typename scalar_t>
void update_groups(const scalar_t* x, int64_t numel, int64_t groups, int64_t slots,
                   const Slotter& slotter, int64_t* out) {
  const int64_t rows = numel / groups;
  at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
    std::vector<int32_t> s(kBlock);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = g_begin; g < g_end; g += kBlock) {
        const int64_t n = std::min(kBlock, g_end - g);
        const scalar_t* xr = x + r * groups + g;
        slotter(xr, n, s.data());
        int64_t* h = out + g * slots;
        for (int64_t k = 0; k < n; ++k) ++h[k * slots + resolve(s[k], xr + k, slotter.exact)];
      }
    }
  });
}

template <typename scalar_t>
void update_cpu(const scalar_t* x, int64_t numel, int64_t groups, int64_t slots,
                const Slotter& slotter, int64_t* out) {
  const int64_t threads = at::get_num_threads();
  // Private copies of many big histograms cost memory and merge time; with enough groups to
  // keep every thread busy, give each thread its own groups instead.
  const bool by_groups =
      groups >= 4 * threads && groups * slots >= (1 << 18) && numel / groups >= 16;
  if (by_groups) {
    update_groups(x, numel, groups, slots, slotter, out);
  } else {
    update_rows(x, numel, groups, slots, slotter, out);
  }
}

void histogram_update_cpu(const at::Tensor& x, at::Tensor& counts, double lo, double hi) {
  int64_t groups = 1;
  const BinGeometry geom = check_histogram_args(x, counts, lo, hi, &groups);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "histogram_update: x must be on CPU here, got ",
                    x.device());
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const at::Tensor xc = x.contiguous();
  const int64_t slots = counts.size(-1);
  const Slotter slotter{geom, float_geometry(geom)};
  int64_t* out = counts.data_ptr<int64_t>();
  switch (xc.scalar_type()) {
    case at::kFloat:
      update_cpu(xc.const_data_ptr<float>(), numel, groups, slots, slotter, out);
      break;
    case at::kDouble:
      update_cpu(xc.const_data_ptr<double>(), numel, groups, slots, slotter, out);
      break;
    case at::kHalf:
      update_cpu(xc.const_data_ptr<c10::Half>(), numel, groups, slots, slotter, out);
      break;
    case at::kBFloat16:
      update_cpu(xc.const_data_ptr<c10::BFloat16>(), numel, groups, slots, slotter, out);
      break;
    default:
      TORCH_CHECK_VALUE(false, "histogram_update: unsupported dtype ", xc.scalar_type());
  }
}

}  // namespace

// The schema lives here and only here. FRAGMENT: other physkern ops may share the namespace.
TORCH_LIBRARY_FRAGMENT(physkern, m) {
  m.def("histogram_update(Tensor x, Tensor(a!) counts, float lo, float hi) -> ()");
}

TORCH_LIBRARY_IMPL(physkern, CPU, m) {
  m.impl("histogram_update", &histogram_update_cpu);
}

}  // namespace physkern
