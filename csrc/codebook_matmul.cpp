// physkern._C: the schema of physkern::codebook_matmul and its CPU implementation:
// y = x @ W^T + bias with W decoded from packed codebook indices.
//
//   physkern::codebook_matmul(Tensor x, Tensor packed, Tensor codebooks, Tensor? scales,
//       Tensor? offsets, Tensor? bias, int in_features, int codebook_rows, int scale_group)
//       -> Tensor
//   physkern::codebook_matmul_cpu_isa() -> str     the instruction set the kernels run with
//   physkern::_codebook_matmul_fused(..., int scale_group, str method) -> Tensor
//       internal: the fused kernel at any M with its method forced (tests and benchmarks;
//       no path of the package calls it)
//
// The schema is defined here, once. physkern/ops.py registers the rest from Python: the CUDA
// kernel (the Triton launcher), the fake (shape function) and the autograd formula. Without this
// extension physkern/ops.py defines the same schema itself, with a pure-torch CPU kernel.
//
// CPU implementation, by the rows M of x (x.numel() / in_features):
//  - M <= kFusedMaxM (decode): the fused kernel below, method "direct"; the dense W never exists.
//  - larger M (prefill): W is dequantized once into float32 [out, in] (dequant_rows, rows spread
//    over threads), then y = at::addmm(bias, x, W^T): one GEMM amortises the decode over the rows.
// physkern.kernels.codebook_matmul.codebook_matmul_small_m (the Python selector of the decode
// path) calls this CPU kernel directly below autograd, or the lookup-table GEMV
// physkern::codebook_gemv_lut (csrc/codebook_gemv_lut.cpp), where that pays.
//
// The storage format is physkern.quant.format.QuantizedWeight (the contract of
// kernels/codebook_matmul.py):
//   W[o, j] = scale[o, j / g] * sum_s C[s, o / codebook_rows, idx[s, o, j / d], j % d]
//             + offset[o, j / g]
// x [..., in] (any floating dtype, computed in float32), packed int32 [S, out, words] (a
// little-endian bit stream of ceil(log2 K)-bit indices per row), codebooks [S, n_cb, K, d]
// (float32 / float16 / bfloat16 read as stored; other dtypes converted), scales / offsets
// [out, in / g] or None, bias [out] or None. Returns y [..., out] in x's dtype (fp32 accumulation).
//
// The fused kernel has two methods, both exact up to fp32 rounding:
//  - "direct" (any scope, the one the op runs): per output row, decode its indices (vector
//    permutes and shifts) into element offsets, then walk the columns one register (VW = 16
//    lanes on AVX-512, 8 on AVX2, 4 baseline) at a time: the VW / d centroids of those columns
//    are loaded as stored and converted once (fp16 with F16C, bf16 by a shift), summed over
//    stages, and FMA'd into one accumulator per row of x (up to 8 rows of x share each weight
//    vector). With scale groups that are a multiple of VW columns the products of a group are
//    summed and scaled once at its end (unrolled for 2, 4 or 8 registers per group); other
//    groups scale per column. d = 1 with K <= 16 (scalar grids such as RTN 4-bit) looks the
//    weights up with register permutes (with 4-bit indices straight from the packed words). Rows are prepared 16 at a time (indices decoded, scales
//    converted; for row / small-group scope the block's codebooks are prefetched, as their reads
//    are data-dependent and the hardware prefetcher does not follow them), then computed by one
//    kernel call.
//  - "lut" (shared codebooks, scale_group % d == 0; chosen only on request): per row of x,
//    stage, codebook and block a table T[b, k] = <x_b, C_k> (M * S * n_cb * in * K
//    multiply-adds); then y[m, o] = sum_b scale[o, b] * T[b, idx[o, b]] with vector gathers. On
//    the machine this was written on (Zen 5) it is slower than "direct" in every benchmark case
//    (bench/bench_kernels.py records both, through _codebook_matmul_fused), so the op never
//    picks it.
// Offsets add offset[o, :] . xsum[m, :] (xsum: x summed per scale group). Rows of y are spread
// over threads with at::parallel_for.
//
// Kernels: csrc/codebook_matmul_kernels.h, compiled once per instruction set
// (csrc/codebook_matmul_isa_{baseline,avx2,avx512}.cpp); the best one the CPU supports is chosen
// once, or the one named by the environment variable PHYSKERN_CPU_ISA ("avx512", "avx2",
// "baseline"; the tests use it to check every copy on one machine).
#include "op_checks.h"
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "codebook_matmul.h"

namespace physkern {
namespace cbmm {

Kernels pick_kernels() {
  const Kernels baseline = kernels_baseline();
#if PHYSKERN_CBMM_X86
  const Kernels avx2 = kernels_avx2();
  const Kernels avx512 = kernels_avx512();
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  const char* env = std::getenv("PHYSKERN_CPU_ISA");
  const std::string want = env ? env : "";
  if (want == "baseline") return baseline;
  if (want == "avx2" && has_avx2) return avx2;
  if (want == "avx512" && has_avx512) return avx512;
  if (has_avx512 && want != "avx2") return avx512;
  if (has_avx2) return avx2;
#endif
  return baseline;
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

constexpr double kParallelGrain = 1 << 18;  // work units (below) per thread, at least

// Work per output row of the direct path (arbitrary units ~ cycles), for the parallel grain:
// per VW columns and stage a gather (by block dim), plus one FMA per row of x, repeated for every
// tile of up to 8 rows of x; plus decoding the row's indices.
double direct_row_cost(int64_t M, int64_t S, int64_t in, int64_t d, int64_t K, int64_t nb) {
  double gather;
  switch (d) {
    case 16: gather = 1.0; break;
    case 8: gather = 1.5; break;
    case 4: gather = 2.5; break;
    case 2: gather = 4.5; break;
    case 1: gather = K <= 16 ? 1.2 : 16.0; break;
    default: gather = 24.0; break;  // one weight at a time
  }
  const double tiles = static_cast<double>((M + 7) / 8);
  return (static_cast<double>(in) / 16.0) * (S * gather * tiles + static_cast<double>(M)) +
         2.0 * S * nb;
}

// Rows of x up to which the op runs the fused kernel; above, dequantize + at::addmm. Measured on
// Zen 5 (1 thread, the five bench/bench_kernels.py recipes, three shapes): at M = 16 the fused
// kernel ran at 0.9-1.3x the time of a dense fp32 matmul where dequantize + matmul took 2-4x; at
// M = 32, 1.5-1.8x vs 1.6-2.8x. Beyond that one dequantisation is amortised over more rows.
// physkern.kernels.codebook_matmul.NATIVE_MAX_M mirrors it (tests/test_codebook_matmul_native.py
// checks that they agree).
constexpr int64_t kFusedMaxM = 32;

// The validated, CPU-ready operands of one call.
struct Operands {
  at::Tensor xf;  // x as float32 [M, in], contiguous
  at::Tensor pk, cb, sc, of, bs;
  std::vector<int64_t> out_shape;
  Args a{};
};

// Checks every argument (ValueError naming it) and fills Args; codebooks are converted to
// float32 when `cb_f32` (the dequantize path) or when the kernels do not read their dtype.
Operands prepare(const char* fn, const at::Tensor& x, const at::Tensor& packed,
                 const at::Tensor& codebooks, const std::optional<at::Tensor>& scales,
                 const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                 int64_t in_features, int64_t codebook_rows, int64_t scale_group, bool cb_f32) {
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.scalar_type() == at::kInt, fn,
                    "packed must be int32 [S, out, words], got ", packed.scalar_type(), " ",
                    packed.sizes());
  TORCH_CHECK_VALUE(codebooks.dim() == 4 && codebooks.is_floating_point(), fn,
                    "codebooks must be float [S, n_codebooks, K, d], got ",
                    codebooks.scalar_type(), " ", codebooks.sizes());
  TORCH_CHECK_VALUE(x.is_floating_point() && x.dim() >= 1, fn,
                    "x must be floating point [..., in_features], got ", x.scalar_type(), " ",
                    x.sizes());
  const int64_t S = packed.size(0), out = packed.size(1), words = packed.size(2);
  const int64_t n_cb = codebooks.size(1), K = codebooks.size(2), d = codebooks.size(3);
  TORCH_CHECK_VALUE(codebooks.size(0) == S, fn, "codebooks have ", codebooks.size(0),
                    " stages, packed has ", S);
  TORCH_CHECK_VALUE(S >= 1, fn, "need at least one stage");
  TORCH_CHECK_VALUE(K >= 1 && K <= 65536, fn, "K (codebook entries) must be in 1..65536, got ", K);
  TORCH_CHECK_VALUE(d >= 1 && in_features >= 1 && in_features % d == 0, fn, "in_features (",
                    in_features, ") must be a positive multiple of block_dim (", d, ")");
  TORCH_CHECK_VALUE(codebook_rows >= 1 && out % codebook_rows == 0 && n_cb == out / codebook_rows,
                    fn, "codebook_rows (", codebook_rows, ") must divide out_features (", out,
                    ") into ", n_cb, " codebooks");
  int bits = 1;
  while ((int64_t{1} << bits) < K) ++bits;
  const int64_t nb = in_features / d;
  TORCH_CHECK_VALUE(words == (nb * bits + 31) / 32, fn, "packed has ", words,
                    " words per row, expected ", (nb * bits + 31) / 32);
  TORCH_CHECK_VALUE(x.size(-1) == in_features, fn, "x has ", x.size(-1),
                    " features, expected in_features=", in_features);
  TORCH_CHECK_VALUE(scale_group >= 1 && in_features % scale_group == 0, fn, "scale_group (",
                    scale_group, ") must divide in_features (", in_features, ")");
  const int64_t G = in_features / scale_group;
  if (scales.has_value()) {
    TORCH_CHECK_VALUE(scales->is_floating_point() && scales->dim() == 2 && scales->size(0) == out &&
                          scales->size(1) == G,
                      fn, "scales must be float [", out, ", ", G, "], got ", scales->scalar_type(),
                      " ", scales->sizes());
  }
  check_affine_bias_cpu(fn, out, scales, offsets, bias, {&x, &packed, &codebooks});

  Operands r;
  r.xf = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  r.out_shape.assign(x.sizes().begin(), x.sizes().end());
  r.out_shape.back() = out;
  auto native_float = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
  };
  r.pk = packed.contiguous();
  // The baseline kernels convert float16 one value at a time (no F16C): convert the codebooks
  // once instead.
  const bool to_f32 = cb_f32 || !native_float(codebooks.scalar_type()) ||
                      (codebooks.scalar_type() == at::kHalf &&
                       std::string(kernels().name) == "baseline");
  r.cb = to_f32 ? codebooks.to(at::kFloat).contiguous() : codebooks.contiguous();
  auto prep_scale = [&](const std::optional<at::Tensor>& t) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    const bool ok = native_float(t->scalar_type()) || t->scalar_type() == at::kDouble;
    return ok ? t->contiguous() : t->to(at::kFloat).contiguous();
  };
  r.sc = prep_scale(scales);
  r.of = prep_scale(offsets);
  r.bs = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  Args& a = r.a;
  a.M = r.xf.size(0);
  a.out = out;
  a.in = in_features;
  a.S = S;
  a.n_cb = n_cb;
  a.K = K;
  a.Kp = (K + 15) / 16 * 16;
  a.d = d;
  a.nb = nb;
  a.words = words;
  a.bits = bits;
  a.nbs = decoded_stride(nb);
  a.codebook_rows = codebook_rows;
  a.g = scale_group;
  a.G = G;
  a.cb_kind = r.cb.scalar_type() == at::kFloat ? 0 : (r.cb.scalar_type() == at::kHalf ? 1 : 2);
  a.x = r.xf.const_data_ptr<float>();
  a.packed = reinterpret_cast<const uint32_t*>(r.pk.const_data_ptr<int32_t>());
  a.codebooks = r.cb.const_data_ptr();
  a.scales = r.sc.defined() ? r.sc.const_data_ptr() : nullptr;
  a.scales_type = r.sc.defined() ? r.sc.scalar_type() : at::kFloat;
  a.offsets = r.of.defined() ? r.of.const_data_ptr() : nullptr;
  a.offsets_type = r.of.defined() ? r.of.scalar_type() : at::kFloat;
  a.bias = r.bs.defined() ? r.bs.const_data_ptr<float>() : nullptr;
  return r;
}

// The fused kernel (decode-and-dot, or the lookup-table method) for any M.
at::Tensor fused(const char* fn, Operands& r, bool use_lut, c10::ScalarType out_dtype) {
  Args& a = r.a;
  const int64_t M = a.M, out = a.out, in_features = a.in, S = a.S, n_cb = a.n_cb, K = a.K,
                d = a.d, nb = a.nb, G = a.G, scale_group = a.g;
  at::Tensor y = at::empty({M, out}, r.xf.options());
  if (M == 0 || out == 0) return y.reshape(r.out_shape).to(out_dtype);
  a.y = y.data_ptr<float>();
  const Kernels& kn = kernels();

  std::vector<float> xsum;
  if (a.offsets) {
    xsum.assign(static_cast<size_t>(M * G), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t gi = 0; gi < G; ++gi) {
        const float* p = a.x + m * in_features + gi * scale_group;
        float s = 0.0f;
        for (int64_t j = 0; j < scale_group; ++j) s += p[j];
        xsum[m * G + gi] = s;
      }
    a.xsum = xsum.data();
  }

  if (use_lut) {
    TORCH_CHECK_VALUE(!a.scales || scale_group % d == 0, fn, "method='lut' needs scale_group (",
                      scale_group, ") to be a multiple of block_dim (", d, ")");
    const int64_t table_floats = M * S * n_cb * nb * a.Kp;
    std::vector<float> ct(static_cast<size_t>(S * n_cb * d * a.Kp), 0.0f);
    std::vector<float> tmp(static_cast<size_t>(K * d));
    for (int64_t sc_i = 0; sc_i < S * n_cb; ++sc_i) {
      load_row_f32(a.codebooks, r.cb.scalar_type(), sc_i * K * d, K * d, tmp.data());
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < d; ++j) ct[(sc_i * d + j) * a.Kp + k] = tmp[k * d + j];
    }
    at::Tensor table = at::empty({table_floats}, r.xf.options());
    a.ct = ct.data();
    a.table = table.data_ptr<float>();
    const int64_t items = M * S * n_cb * nb;
    const int64_t build_grain = std::max<int64_t>(1, static_cast<int64_t>(kParallelGrain) / (a.Kp * d));
    at::parallel_for(0, items, build_grain,
                     [&](int64_t b, int64_t e) { kn.lut_build(a, b, e); });
    const int64_t row_grain =
        std::max<int64_t>(64, static_cast<int64_t>(kParallelGrain) / std::max<int64_t>(1, 2 * M * S * nb));
    at::parallel_for(0, out, row_grain, [&](int64_t b, int64_t e) { kn.lut_rows(a, b, e); });
  } else {
    // At least ~2^18 units (~25 us) per thread: below that, waking a second thread costs more
    // than it saves. (Measured on 2 idle cores: a 3072x768 or 1536x576 layer at M = 1 runs
    // 1.4-2x faster on 2 threads than on 1. On cores busy with other work any parallel region,
    // dense matmuls' included, can wait a scheduler time slice for its second thread.)
    const double per_row = direct_row_cost(M, S, in_features, d, K, nb);
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kParallelGrain / per_row));
    at::parallel_for(0, out, grain, [&](int64_t b, int64_t e) { kn.direct_rows(a, b, e); });
  }
  return y.reshape(r.out_shape).to(out_dtype);
}

// Larger M: W dequantized once (float32 [out, in]), then y = x W^T + b by one at::addmm; the
// same arithmetic as the pure-torch path of physkern.kernels.codebook_matmul (fp32 throughout).
// bfloat16 x is the caller asking for a bfloat16 GEMM (physkern.ops.set_prefill_dtype): W is
// rounded to bfloat16 once and the product runs on bf16 inputs with fp32 accumulation (oneDNN
// on AVX-512 BF16: about twice the fp32 GEMM's rate), y in bfloat16.
at::Tensor dequant_matmul(Operands& r, const at::Tensor& x, c10::ScalarType out_dtype) {
  Args& a = r.a;
  at::Tensor w = at::empty({a.out, a.in}, r.xf.options());
  if (a.out > 0) {
    a.w = w.data_ptr<float>();
    // Per row: S passes of d-float copies / adds over `in` columns, plus the index decode.
    const double per_row = static_cast<double>(a.S) * (static_cast<double>(a.in) + 2.0 * a.nb);
    const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(kParallelGrain / per_row));
    const Kernels& kn = kernels();
    at::parallel_for(0, a.out, grain, [&](int64_t b, int64_t e) { kn.dequant_rows(a, b, e); });
  }
  if (out_dtype == at::kBFloat16) {
    const at::Tensor xb = x.reshape({-1, a.in}).contiguous();
    const at::Tensor wb = w.to(at::kBFloat16);
    at::Tensor y = r.bs.defined() ? at::addmm(r.bs.to(at::kBFloat16), xb, wb.t())
                                  : at::mm(xb, wb.t());
    return y.reshape(r.out_shape);
  }
  at::Tensor y = r.bs.defined() ? at::addmm(r.bs, r.xf, w.t()) : at::mm(r.xf, w.t());
  return y.reshape(r.out_shape).to(out_dtype);
}

// physkern::codebook_matmul, CPU kernel.
at::Tensor codebook_matmul(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& codebooks, const std::optional<at::Tensor>& scales,
                           const std::optional<at::Tensor>& offsets,
                           const std::optional<at::Tensor>& bias, int64_t in_features,
                           int64_t codebook_rows, int64_t scale_group) {
  const char* fn = "codebook_matmul: ";
  // Rows of x, from the shape alone (prepare checks x.size(-1) == in_features).
  const int64_t rows = in_features > 0 && x.dim() >= 1 && x.size(-1) == in_features
                           ? x.numel() / in_features
                           : 0;
  const bool small = rows <= kFusedMaxM;
  Operands r = prepare(fn, x, packed, codebooks, scales, offsets, bias, in_features,
                       codebook_rows, scale_group, /*cb_f32=*/!small);
  return small ? fused(fn, r, false, x.scalar_type()) : dequant_matmul(r, x, x.scalar_type());
}

// physkern::_codebook_matmul_fused: the fused kernel at any M, method "direct" (what the op
// runs for M <= kFusedMaxM; "auto" is the same) or "lut". For tests and benchmarks only.
at::Tensor codebook_matmul_fused(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& codebooks,
                                 const std::optional<at::Tensor>& scales,
                                 const std::optional<at::Tensor>& offsets,
                                 const std::optional<at::Tensor>& bias, int64_t in_features,
                                 int64_t codebook_rows, int64_t scale_group,
                                 c10::string_view method) {
  const char* fn = "_codebook_matmul_fused: ";
  TORCH_CHECK_VALUE(method == "auto" || method == "lut" || method == "direct", fn,
                    "method must be 'auto', 'lut' or 'direct', got '", std::string(method), "'");
  Operands r = prepare(fn, x, packed, codebooks, scales, offsets, bias, in_features,
                       codebook_rows, scale_group, /*cb_f32=*/false);
  return fused(fn, r, method == "lut", x.scalar_type());
}

std::string codebook_matmul_cpu_isa() { return kernels().name; }

}  // namespace cbmm
}  // namespace physkern

TORCH_LIBRARY_FRAGMENT(physkern, m) {
  // The one definition of the op's schema (physkern/ops.py repeats it, character for character,
  // only when this extension is missing).
  m.def(
      "codebook_matmul(Tensor x, Tensor packed, Tensor codebooks, Tensor? scales, "
      "Tensor? offsets, Tensor? bias, int in_features, int codebook_rows, int scale_group) "
      "-> Tensor");
  m.def(
      "_codebook_matmul_fused(Tensor x, Tensor packed, Tensor codebooks, Tensor? scales, "
      "Tensor? offsets, Tensor? bias, int in_features, int codebook_rows, int scale_group, "
      "str method=\"direct\") -> Tensor");
  m.def("codebook_matmul_cpu_isa() -> str", &physkern::cbmm::codebook_matmul_cpu_isa);
}

TORCH_LIBRARY_IMPL(physkern, CPU, m) {
  m.impl("codebook_matmul", &physkern::cbmm::codebook_matmul);
  m.impl("_codebook_matmul_fused", &physkern::cbmm::codebook_matmul_fused);
}
