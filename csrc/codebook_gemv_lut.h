// Shared by the two lookup-table GEMV ops (csrc/codebook_gemv_lut.cpp: fp32 tables, exact up to
// fp32 rounding; csrc/codebook_gemv_lut16.cpp: int16 tables, the decode fast path): the index
// layout's geometry, argument checks and per-call preparation, ISA queries.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace physkern {
namespace lutgemv {

inline int index_bits(int64_t k) {
  int bits = 1;
  while ((int64_t{1} << bits) < k) ++bits;
  return bits;
}

// The re-laid-out index tensor lut_idx [S, tiles, nq, 64] (codebook_gemv_lut_pack):
//   narrow (K <= 64, not forced wide): 16-row tiles, 4 slices per 64-byte quad, groups padded to
//   a multiple of 4 slices;
//   wide: 64-row tiles, one 64-byte vector per slice (byte r = row r of the tile), no padding.
struct Geometry {
  int64_t S, out, nb, spg, spgp, G, nq, nbp, tiles, rows_per_tile;
  int bits;
  bool wide;
};

Geometry geometry(const char* fn, int64_t S, int64_t out, int64_t in_features, int64_t d,
                  int64_t k, int64_t group_slices, bool force_wide);

// One call's checked and converted inputs (checks name the offending argument).
struct LutCall {
  Geometry g;
  int64_t M, S, n_cb, K, d, out, tiles_per_cb;
  bool x_f32;         // x was fp32 (the result stays fp32; else it is converted back)
  at::Tensor xf;      // x as contiguous fp32 [..., in]
  at::Tensor y;       // fp32 output [..., out]
  at::Tensor sc, of;  // scales / offsets (fp32/fp16/bf16/fp64, contiguous) or undefined
  at::Tensor bs;      // bias as contiguous fp32 or undefined
  at::Tensor cb;      // codebooks (fp32/fp16/bf16/fp64, contiguous)
  at::ScalarType x_dtype;
  at::Tensor result() const { return x_f32 ? y : y.to(x_dtype); }
};

LutCall prepare_lut_call(const char* fn, const at::Tensor& x, const at::Tensor& lut_idx,
                         const at::Tensor& codebooks, const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& offsets,
                         const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t codebook_rows, int64_t group_slices, bool force_wide);

// t (float32 / float16 / bfloat16 / float64, contiguous) as float32: its own data when it is
// float32, else converted into buf (thread-local scratch of the caller; F16C with AVX-512).
const float* as_f32(const at::Tensor& t, std::vector<float>& buf);

// Codebooks [S * n_cb, K, d] (any float dtype) transposed into ct [S * n_cb, d, Kp] fp32, zero
// past K, so that a table row is Kp / 16 vector FMAs per input of the slice.
void transpose_codebooks(const at::Tensor& cb, int64_t S_ncb, int64_t K, int64_t d, int64_t Kp,
                         std::vector<float>& cbf_buf, float* ct);

// One table row P[k] = sum_j xs[j] * ct[j * Kp + k], k < Kp (AVX-512 when available).
void build_table_row(const float* xs, const float* ct, int64_t d, int64_t Kp, float* dst);

// Sums of x [M, in] over each of G equal input groups -> buf [M, G] (the offsets' term).
const float* group_sums(const float* x, int64_t M, int64_t in_features, int64_t G,
                        std::vector<float>& buf);

bool use_avx512();
bool use_vbmi();

// Work units (~ cycles) per thread at least before a second thread is woken; PHYSKERN_LUT_GRAIN
// overrides it (benchmarks: the break-even depends on how busy the other cores are).
double lut_grain_units();

}  // namespace lutgemv
}  // namespace physkern
