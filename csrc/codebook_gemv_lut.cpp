// physkern._C: lookup-table GEMV for codebook weights with few rows of x (batch-1 decode).
//
//   physkern::codebook_gemv_lut_pack(Tensor packed, int in_features, int block_dim, int k,
//       int group_slices) -> Tensor
//   physkern::codebook_gemv_lut(Tensor x, Tensor lut_idx, Tensor codebooks, Tensor? scales,
//       Tensor? offsets, Tensor? bias, int in_features, int codebook_rows,
//       int group_slices) -> Tensor
//
// Same weights as physkern::codebook_matmul_cpu (physkern.quant.format.QuantizedWeight):
//   W[o, j] = scale[o, j / g] * sum_s C[s, o / codebook_rows, idx[s, o, j / d], j % d]
//             + offset[o, j / g]
// Instead of rebuilding W, per row m of x and per input slice b (d values) a table
//   P[m, s, c, b, k] = sum_j x[m, b * d + j] * C[s, c, k, j]          (K entries, fp32)
// is built once per call (M * S * n_cb * in * K multiply-adds), and then
//   y[m, o] = sum_groups scale[o, gi] * (sum_{s, b in gi} P[m, s, c(o), b, idx[s, o, b]])
//             + sum_gi offset[o, gi] * xsum[m, gi] + bias[o]
// is one table lookup and one add per d weights: no dequantisation, no multiply per weight.
//
// The lookups need the indices of 16 output rows for the same slice side by side, so the packed
// bit stream is re-laid out once (codebook_gemv_lut_pack, cached by the Python caller):
//   lut_idx uint8 [S, tiles, nq, 64], tiles = ceil(out / 16), one byte per index (K <= 64):
//   byte 4 * r + u of quad q of tile t = idx[s, 16 t + r, slice(4 q + u)]
// Slices are numbered per scale group and each group is padded to a multiple of 4 slices
// (group_slices = slices per group, g / d; nb when there are no scales): padded slice p of group
// gi is slice gi * group_slices + p (p < group_slices) or padding (index 0 of an all-zero table
// row). Rows past `out` are padding too (computed, never stored).
//
// Two layouts, by K:
//  - K <= 64: 16-row tiles as above. With AVX-512 the 16 lanes of a register are 16 output rows:
//    one 64-byte load holds 4 slices of 16 rows, a shift selects one slice, and the slice's
//    table row (K fp32 values, in registers) is looked up by register permutes: K <= 16 one
//    vpermps, K <= 32 one vpermi2ps, K <= 64 two and a blend on index bit 5. Up to 8 tiles
//    (128 rows) share each table row load.
//  - 64 < K <= 256 ("wide"): 64-row tiles, one 64-byte vector per slice holding its index for
//    each of the 64 rows (lut_idx [S, tiles, slices, 64]; groups need no padding). Table rows
//    are stored as 4 byte planes of 256 entries (byte j of each fp32 value); with AVX-512 VBMI
//    each plane is looked up for 64 rows at once by vpermi2b (two and a blend on bit 7 for
//    K > 128) and byte/word unpacks put the 4 planes back together into 64 exact fp32 values.
//    Several codebooks then need codebook_rows % 64 == 0.
// Other instruction sets run scalar loops (the same sums, exact up to fp32 rounding).
// Rows of tiles are spread over threads with at::parallel_for (only when each thread gets
// enough work: in practice the head, not the decoder layers of a 135M model). Per call the
// output and two small per-thread scale buffers are allocated; tables, x sums and fp32 copies of
// half-precision parameters live in thread-local buffers that only grow.
#include "op_checks.h"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "codebook_gemv_lut.h"
#include "codebook_matmul.h"

#if PHYSKERN_CBMM_X86
#include <immintrin.h>
#endif

namespace physkern {
namespace lutgemv {

struct LArgs {
  int64_t M, out, in, S, n_cb, K, Kp, d, nb, spg, spgp, G, nq, nbp, tiles, tiles_per_cb;
  bool wide;             // K > 64: 64-row tiles, byte-plane tables (see the top of this file)
  const uint8_t* idx;    // [S, tiles, nq, 64]
  const float* table;    // [M, S, n_cb, nbp, Kp]
  const void* scales;    // [out, G] or nullptr
  at::ScalarType scales_type;
  const void* offsets;   // [out, G] or nullptr
  at::ScalarType offsets_type;
  const float* xsum;     // [M, G] when offsets
  const float* bias;     // [out] or nullptr
  float* y;              // [M, out]
};

inline float to_f(const void* base, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kFloat: return static_cast<const float*>(base)[i];
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    default: return static_cast<float>(static_cast<const double*>(base)[i]);
  }
}

// Scales (or offsets) of tiles [t0, t0 + nt), transposed: dst[(r * G + gi) * 16 + l] =
// src[16 (t0 + r) + l, gi], 0 for rows past out.
template <class T>
inline void tile_params_t(const LArgs& a, const T* src, int64_t t0, int64_t nt, float* dst) {
  for (int64_t r = 0; r < nt; ++r)
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t o = 16 * (t0 + r) + l;
      for (int64_t gi = 0; gi < a.G; ++gi)
        dst[(r * a.G + gi) * 16 + l] = o < a.out ? static_cast<float>(src[o * a.G + gi]) : 0.0f;
    }
}

inline void tile_params(const LArgs& a, const void* src, at::ScalarType t, int64_t t0, int64_t nt,
                        float* dst) {
  switch (t) {
    case at::kFloat: return tile_params_t(a, static_cast<const float*>(src), t0, nt, dst);
    case at::kHalf: return tile_params_t(a, static_cast<const c10::Half*>(src), t0, nt, dst);
    case at::kBFloat16:
      return tile_params_t(a, static_cast<const c10::BFloat16*>(src), t0, nt, dst);
    default: return tile_params_t(a, static_cast<const double*>(src), t0, nt, dst);
  }
}

inline const float* table_row(const LArgs& a, int64_t m, int64_t s, int64_t c, int64_t p) {
  return a.table + (((m * a.S + s) * a.n_cb + c) * a.nbp + p) * a.Kp;
}

// Tiles [t0, t0 + nt) of codebook c, every row of x, one lane at a time.
void tiles_scalar(const LArgs& a, int64_t t0, int64_t nt, int64_t c, float* sc, float* of) {
  if (a.scales) tile_params(a, a.scales, a.scales_type, t0, nt, sc);
  if (a.offsets) tile_params(a, a.offsets, a.offsets_type, t0, nt, of);
  for (int64_t r = 0; r < nt; ++r) {
    const int64_t t = t0 + r;
    for (int64_t m = 0; m < a.M; ++m) {
      float tot[16] = {};
      for (int64_t gi = 0; gi < a.G; ++gi) {
        float acc[16] = {};
        for (int64_t s = 0; s < a.S; ++s) {
          const uint8_t* ib = a.idx + ((s * a.tiles + t) * a.nq + gi * (a.spgp / 4)) * 64;
          for (int64_t pp = 0; pp < a.spgp; ++pp) {
            const float* P = table_row(a, m, s, c, gi * a.spgp + pp);
            const uint8_t* q = ib + (pp / 4) * 64 + (pp % 4);
            for (int l = 0; l < 16; ++l) acc[l] += P[q[4 * l]];
          }
        }
        for (int l = 0; l < 16; ++l) {
          float v = a.scales ? acc[l] * sc[(r * a.G + gi) * 16 + l] + tot[l] : acc[l] + tot[l];
          if (a.offsets) v += of[(r * a.G + gi) * 16 + l] * a.xsum[m * a.G + gi];
          tot[l] = v;
        }
      }
      for (int l = 0; l < 16; ++l) {
        const int64_t o = 16 * t + l;
        if (o < a.out) a.y[m * a.out + o] = tot[l] + (a.bias ? a.bias[o] : 0.0f);
      }
    }
  }
}

// Wide layout (K > 64), tile t (64 rows), every row of x, one row at a time. Table rows are 4
// byte planes of 256 entries: entry k is the float with bytes P[k], P[256 + k], P[512 + k],
// P[768 + k].
void wide_scalar(const LArgs& a, int64_t t, int64_t c) {
  for (int64_t r = 0; r < 64; ++r) {
    const int64_t o = 64 * t + r;
    if (o >= a.out) break;
    for (int64_t m = 0; m < a.M; ++m) {
      float tot = 0.0f;
      for (int64_t gi = 0; gi < a.G; ++gi) {
        float acc = 0.0f;
        for (int64_t s = 0; s < a.S; ++s) {
          const uint8_t* ib = a.idx + ((s * a.tiles + t) * a.nq + gi * a.spg) * 64 + r;
          for (int64_t p = 0; p < a.spg; ++p) {
            const uint8_t* P =
                reinterpret_cast<const uint8_t*>(table_row(a, m, s, c, gi * a.spg + p));
            const uint32_t k = ib[p * 64];
            const uint32_t u = uint32_t(P[k]) | uint32_t(P[256 + k]) << 8 |
                               uint32_t(P[512 + k]) << 16 | uint32_t(P[768 + k]) << 24;
            float f;
            std::memcpy(&f, &u, 4);
            acc += f;
          }
        }
        float v = a.scales ? acc * to_f(a.scales, a.scales_type, o * a.G + gi) + tot : acc + tot;
        if (a.offsets) v += to_f(a.offsets, a.offsets_type, o * a.G + gi) * a.xsum[m * a.G + gi];
        tot = v;
      }
      a.y[m * a.out + o] = tot + (a.bias ? a.bias[o] : 0.0f);
    }
  }
}

// 256 floats -> 4 byte planes of 256 (dst may not alias src).
void to_planes_scalar(const float* src, uint8_t* dst) {
  for (int k = 0; k < 256; ++k) {
    uint32_t u;
    std::memcpy(&u, src + k, 4);
    for (int j = 0; j < 4; ++j) dst[256 * j + k] = static_cast<uint8_t>(u >> (8 * j));
  }
}

// One table row P[k] = sum_j xs[j] * ct[j * Kp + k], k < Kp (scalar). Fused multiply-adds in
// the AVX-512 copy's order, so both give the same bits (the int16 tables round these values).
void build_row_scalar(const float* xs, const float* ct, int64_t d, int64_t Kp, float* dst) {
  for (int64_t k = 0; k < Kp; ++k) dst[k] = xs[0] * ct[k];
  for (int64_t j = 1; j < d; ++j)
    for (int64_t k = 0; k < Kp; ++k) dst[k] = std::fma(xs[j], ct[j * Kp + k], dst[k]);
}

#if PHYSKERN_CBMM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12's _mm512_cvtepi32_epi8 & co. read an intentionally undefined register: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

void to_planes_avx512(const float* src, uint8_t* dst) {
  for (int q = 0; q < 16; ++q) {
    const __m512i v = _mm512_castps_si512(_mm512_loadu_ps(src + 16 * q));
    for (int j = 0; j < 4; ++j)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 256 * j + 16 * q),
                       _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8 * j)));
  }
}

#pragma GCC push_options
#pragma GCC target("avx512vbmi")
// Wide layout (K > 64, AVX-512 VBMI): tile t of 64 rows, every row of x. Per slice one 64-byte
// load holds the indices of the 64 rows; each of the 4 byte planes of the slice's table is looked
// up with vpermi2b (bits 0-6; HI: a second one for entries 128-255 and a blend on bit 7), and
// the planes are interleaved back into 4 x 16 floats by byte/word unpacks. Lane j of
// accumulator i is row 16 (j / 4) + 4 i + j % 4 of the tile.
template <bool HI>
__attribute__((noinline)) void wide_avx512(const LArgs& a, int64_t t, int64_t c, float* sc,
                                           float* of) {
  auto row_of = [](int i, int j) { return 16 * (j >> 2) + 4 * i + (j & 3); };
  for (int64_t gi = 0; gi < a.G; ++gi)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 16; ++j) {
        const int64_t o = 64 * t + row_of(i, j);
        const int64_t at = (gi * 4 + i) * 16 + j;
        if (a.scales) sc[at] = o < a.out ? to_f(a.scales, a.scales_type, o * a.G + gi) : 0.0f;
        if (a.offsets) of[at] = o < a.out ? to_f(a.offsets, a.offsets_type, o * a.G + gi) : 0.0f;
      }
  for (int64_t m = 0; m < a.M; ++m) {
    __m512 tot[4];
    for (int i = 0; i < 4; ++i) tot[i] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < a.G; ++gi) {
      __m512 acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t s = 0; s < a.S; ++s) {
        const uint8_t* ib = a.idx + ((s * a.tiles + t) * a.nq + gi * a.spg) * 64;
        const uint8_t* P = reinterpret_cast<const uint8_t*>(table_row(a, m, s, c, gi * a.spg));
        for (int64_t p = 0; p < a.spg; ++p, ib += 64, P += 1024) {
          const __m512i idx = _mm512_loadu_si512(reinterpret_cast<const void*>(ib));
          __m512i b[4];
          if constexpr (HI) {
            const __mmask64 k7 = _mm512_movepi8_mask(idx);
            for (int j = 0; j < 4; ++j) {
              const uint8_t* pl = P + 256 * j;
              const __m512i lo = _mm512_permutex2var_epi8(
                  _mm512_loadu_si512(pl), idx, _mm512_loadu_si512(pl + 64));
              const __m512i hi = _mm512_permutex2var_epi8(
                  _mm512_loadu_si512(pl + 128), idx, _mm512_loadu_si512(pl + 192));
              b[j] = _mm512_mask_blend_epi8(k7, lo, hi);
            }
          } else {
            for (int j = 0; j < 4; ++j) {
              const uint8_t* pl = P + 256 * j;
              b[j] = _mm512_permutex2var_epi8(_mm512_loadu_si512(pl), idx,
                                              _mm512_loadu_si512(pl + 64));
            }
          }
          const __m512i u0 = _mm512_unpacklo_epi8(b[0], b[1]), u1 = _mm512_unpackhi_epi8(b[0], b[1]);
          const __m512i u2 = _mm512_unpacklo_epi8(b[2], b[3]), u3 = _mm512_unpackhi_epi8(b[2], b[3]);
          acc[0] = _mm512_add_ps(acc[0], _mm512_castsi512_ps(_mm512_unpacklo_epi16(u0, u2)));
          acc[1] = _mm512_add_ps(acc[1], _mm512_castsi512_ps(_mm512_unpackhi_epi16(u0, u2)));
          acc[2] = _mm512_add_ps(acc[2], _mm512_castsi512_ps(_mm512_unpacklo_epi16(u1, u3)));
          acc[3] = _mm512_add_ps(acc[3], _mm512_castsi512_ps(_mm512_unpackhi_epi16(u1, u3)));
        }
      }
      for (int i = 0; i < 4; ++i) {
        const int64_t at = (gi * 4 + i) * 16;
        tot[i] = a.scales ? _mm512_fmadd_ps(acc[i], _mm512_loadu_ps(sc + at), tot[i])
                          : _mm512_add_ps(tot[i], acc[i]);
        if (a.offsets)
          tot[i] = _mm512_fmadd_ps(_mm512_loadu_ps(of + at),
                                   _mm512_set1_ps(a.xsum[m * a.G + gi]), tot[i]);
      }
    }
    alignas(64) float res[4][16];
    for (int i = 0; i < 4; ++i) _mm512_store_ps(res[i], tot[i]);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 16; ++j) {
        const int64_t o = 64 * t + row_of(i, j);
        if (o < a.out) a.y[m * a.out + o] = res[i][j] + (a.bias ? a.bias[o] : 0.0f);
      }
  }
}

#pragma GCC pop_options

void half_to_float_avx512(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

void build_row_avx512(const float* xs, const float* ct, int64_t d, int64_t Kp, float* dst) {
  for (int64_t k = 0; k < Kp; k += 16) {
    __m512 acc = _mm512_mul_ps(_mm512_set1_ps(xs[0]), _mm512_loadu_ps(ct + k));
    for (int64_t j = 1; j < d; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(xs[j]), _mm512_loadu_ps(ct + j * Kp + k), acc);
    _mm512_storeu_ps(dst + k, acc);
  }
}

// KV: 16 / 32 / 64 (register permutes for K <= KV) or 0 (gather, K <= 256). R tiles at once.
template <int KV, int R>
__attribute__((noinline)) void tiles_avx512(const LArgs& a, int64_t t0, int64_t c, float* sc,
                                            float* of) {
  if (a.scales) tile_params(a, a.scales, a.scales_type, t0, R, sc);
  if (a.offsets) tile_params(a, a.offsets, a.offsets_type, t0, R, of);
  const int64_t tstride = a.nq * 64, qpg = a.spgp / 4;
  for (int64_t m = 0; m < a.M; ++m) {
    __m512 tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < a.G; ++gi) {
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t s = 0; s < a.S; ++s) {
        const uint8_t* ib = a.idx + ((s * a.tiles + t0) * a.nq + gi * qpg) * 64;
        const float* P = table_row(a, m, s, c, gi * a.spgp);
        for (int64_t q = 0; q < qpg; ++q, ib += 64, P += 4 * a.Kp) {
          __m512i v[R];
          for (int r = 0; r < R; ++r)
            v[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(ib + r * tstride));
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) {
            const float* Pu = P + u * a.Kp;
            if constexpr (KV == 16) {
              const __m512 T0 = _mm512_loadu_ps(Pu);
              for (int r = 0; r < R; ++r) {
                const __m512i iv = _mm512_srli_epi32(v[r], 8 * u);
                acc[r] = _mm512_add_ps(acc[r], _mm512_permutexvar_ps(iv, T0));
              }
            } else if constexpr (KV == 32) {
              const __m512 T0 = _mm512_loadu_ps(Pu), T1 = _mm512_loadu_ps(Pu + 16);
              for (int r = 0; r < R; ++r) {
                const __m512i iv = _mm512_srli_epi32(v[r], 8 * u);
                acc[r] = _mm512_add_ps(acc[r], _mm512_permutex2var_ps(T0, iv, T1));
              }
            } else {
              static_assert(KV == 64, "KV must be 16, 32 or 64");
              const __m512 T0 = _mm512_loadu_ps(Pu), T1 = _mm512_loadu_ps(Pu + 16);
              const __m512 T2 = _mm512_loadu_ps(Pu + 32), T3 = _mm512_loadu_ps(Pu + 48);
              const __m512i bit5 = _mm512_set1_epi32(0x20 << (8 * u));
              for (int r = 0; r < R; ++r) {
                const __m512i iv = _mm512_srli_epi32(v[r], 8 * u);
                const __m512 lo = _mm512_permutex2var_ps(T0, iv, T1);
                const __m512 hi = _mm512_permutex2var_ps(T2, iv, T3);
                const __mmask16 k = _mm512_test_epi32_mask(v[r], bit5);
                acc[r] = _mm512_add_ps(acc[r], _mm512_mask_blend_ps(k, lo, hi));
              }
            }
          }
        }
      }
      if (a.scales) {
        for (int r = 0; r < R; ++r)
          tot[r] = _mm512_fmadd_ps(acc[r], _mm512_loadu_ps(sc + (r * a.G + gi) * 16), tot[r]);
      } else {
        for (int r = 0; r < R; ++r) tot[r] = _mm512_add_ps(tot[r], acc[r]);
      }
      if (a.offsets) {
        const __m512 xs = _mm512_set1_ps(a.xsum[m * a.G + gi]);
        for (int r = 0; r < R; ++r)
          tot[r] = _mm512_fmadd_ps(_mm512_loadu_ps(of + (r * a.G + gi) * 16), xs, tot[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t o = 16 * (t0 + r);
      const int64_t n = std::min<int64_t>(16, a.out - o);
      const __mmask16 k = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
      __m512 v = tot[r];
      if (a.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, a.bias + o));
      _mm512_mask_storeu_ps(a.y + m * a.out + o, k, v);
    }
  }
}

template <int KV>
void run_avx512(const LArgs& a, int64_t t0, int64_t t1, int64_t c, float* sc, float* of) {
  int64_t t = t0;
  for (; t + 8 <= t1; t += 8) tiles_avx512<KV, 8>(a, t, c, sc, of);
  if (t + 4 <= t1) { tiles_avx512<KV, 4>(a, t, c, sc, of); t += 4; }
  if (t + 2 <= t1) { tiles_avx512<KV, 2>(a, t, c, sc, of); t += 2; }
  if (t < t1) tiles_avx512<KV, 1>(a, t, c, sc, of);
}

#pragma GCC pop_options
#endif  // PHYSKERN_CBMM_X86

bool use_avx512();

// t (float32 / float16 / bfloat16 / float64, contiguous) as float32: its own data when it is
// float32, else converted into buf (thread-local scratch of the caller; F16C with AVX-512).
const float* as_f32(const at::Tensor& t, std::vector<float>& buf) {
  if (!t.defined()) return nullptr;
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>();
  const int64_t n = t.numel();
  if (buf.size() < static_cast<size_t>(n)) buf.resize(static_cast<size_t>(n));
  float* dst = buf.data();
  if (t.scalar_type() == at::kHalf) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(t.const_data_ptr<c10::Half>());
#if PHYSKERN_CBMM_X86
    if (use_avx512()) {
      half_to_float_avx512(p, n, dst);
      return dst;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(c10::Half(p[i], c10::Half::from_bits()));
  } else if (t.scalar_type() == at::kBFloat16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(t.const_data_ptr<c10::BFloat16>());
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(dst + i, &u, 4);
    }
  } else {
    const double* p = t.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
  }
  return dst;
}

bool use_avx512() {
#if PHYSKERN_CBMM_X86
  static const bool yes = std::string(cbmm::kernels().name) == "avx512";
  return yes;
#else
  return false;
#endif
}

// The wide (K > 64) AVX-512 kernel also needs VBMI (byte permutes).
bool use_vbmi() {
#if PHYSKERN_CBMM_X86
  static const bool yes = use_avx512() && __builtin_cpu_supports("avx512vbmi");
  return yes;
#else
  return false;
#endif
}

// What the kernels run with: "avx512_vbmi" (every K vectorised), "avx512" (K <= 64
// vectorised, larger K scalar) or "scalar".
std::string codebook_gemv_lut_isa() {
  return use_vbmi() ? "avx512_vbmi" : (use_avx512() ? "avx512" : "scalar");
}

// Tiles [t0, t1) (any codebooks): split at codebook boundaries.
void run_tiles(const LArgs& a, int64_t t0, int64_t t1) {
  std::vector<float> sc(static_cast<size_t>(a.scales ? 8 * a.G * 16 : 0));
  std::vector<float> of(static_cast<size_t>(a.offsets ? 8 * a.G * 16 : 0));
  const bool avx = use_avx512(), vbmi = use_vbmi();
  while (t0 < t1) {
    const int64_t c = t0 / a.tiles_per_cb;
    const int64_t e = std::min(t1, (c + 1) * a.tiles_per_cb);
    if (a.wide) {
      for (int64_t t = t0; t < e; ++t) {
#if PHYSKERN_CBMM_X86
        if (vbmi) {
          if (a.K > 128) {
            wide_avx512<true>(a, t, c, sc.data(), of.data());
          } else {
            wide_avx512<false>(a, t, c, sc.data(), of.data());
          }
          continue;
        }
#endif
        wide_scalar(a, t, c);
      }
      t0 = e;
      continue;
    }
#if PHYSKERN_CBMM_X86
    if (avx) {
      switch (a.Kp) {
        case 16: run_avx512<16>(a, t0, e, c, sc.data(), of.data()); break;
        case 32: run_avx512<32>(a, t0, e, c, sc.data(), of.data()); break;
        default: run_avx512<64>(a, t0, e, c, sc.data(), of.data()); break;
      }
      t0 = e;
      continue;
    }
#endif
    (void)avx;
    (void)vbmi;
    for (int64_t t = t0; t < e; t += 8)
      tiles_scalar(a, t, std::min<int64_t>(8, e - t), c, sc.data(), of.data());
    t0 = e;
  }
}

Geometry geometry(const char* fn, int64_t S, int64_t out, int64_t in_features, int64_t d, int64_t k,
                  int64_t group_slices, bool force_wide) {
  TORCH_CHECK_VALUE(k >= 1 && k <= 256, fn, "k (codebook entries) must be in 1..256, got ", k);
  TORCH_CHECK_VALUE(d >= 1 && in_features >= 1 && in_features % d == 0, fn, "in_features (",
                    in_features, ") must be a positive multiple of block_dim (", d, ")");
  const int64_t nb = in_features / d;
  TORCH_CHECK_VALUE(group_slices >= 1 && nb % group_slices == 0, fn, "group_slices (",
                    group_slices, ") must divide in_features / block_dim (", nb, ")");
  Geometry g{};
  g.S = S;
  g.out = out;
  g.nb = nb;
  g.spg = group_slices;
  g.wide = k > 64 || force_wide;
  g.spgp = g.wide ? group_slices : (group_slices + 3) / 4 * 4;
  g.G = nb / group_slices;
  g.nbp = g.G * g.spgp;
  g.nq = g.wide ? g.nbp : g.nbp / 4;
  g.rows_per_tile = g.wide ? 64 : 16;
  g.tiles = (out + g.rows_per_tile - 1) / g.rows_per_tile;
  g.bits = index_bits(k);
  return g;
}

at::Tensor codebook_gemv_lut_pack(const at::Tensor& packed, int64_t in_features, int64_t block_dim,
                                  int64_t k, int64_t group_slices, bool wide) {
  const char* fn = "codebook_gemv_lut_pack: ";
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.scalar_type() == at::kInt && packed.device().is_cpu(),
                    fn, "packed must be a CPU int32 [S, out, words] tensor, got ",
                    packed.scalar_type(), " ", packed.sizes(), " on ", packed.device());
  const Geometry g = geometry(fn, packed.size(0), packed.size(1), in_features, block_dim, k,
                              group_slices, wide);
  const int64_t words = packed.size(2);
  TORCH_CHECK_VALUE(words == (g.nb * g.bits + 31) / 32, fn, "packed has ", words,
                    " words per row, expected ", (g.nb * g.bits + 31) / 32);
  const at::Tensor pk = packed.contiguous();
  at::Tensor res = at::zeros({g.S, g.tiles, g.nq, 64}, packed.options().dtype(at::kByte));
  const uint32_t* w = reinterpret_cast<const uint32_t*>(pk.const_data_ptr<int32_t>());
  uint8_t* dst = res.data_ptr<uint8_t>();
  const uint32_t mask = (1u << g.bits) - 1u;
  at::parallel_for(0, g.S * g.out, 64, [&](int64_t b, int64_t e) {
    for (int64_t so = b; so < e; ++so) {
      const int64_t s = so / g.out, o = so % g.out, t = o / g.rows_per_tile,
                    r = o % g.rows_per_tile;
      const uint32_t* row = w + so * words;
      uint8_t* tile = dst + (s * g.tiles + t) * g.nq * 64;
      for (int64_t bi = 0; bi < g.nb; ++bi) {
        const int64_t pos = bi * g.bits, wd = pos >> 5, sh = pos & 31;
        uint32_t v = row[wd] >> sh;
        if (sh + g.bits > 32) v |= row[wd + 1] << (32 - sh);
        const int64_t p = (bi / g.spg) * g.spgp + bi % g.spg;
        if (g.wide) {
          tile[p * 64 + r] = static_cast<uint8_t>(v & mask);
        } else {
          tile[(p / 4) * 64 + 4 * r + (p % 4)] = static_cast<uint8_t>(v & mask);
        }
      }
    }
  });
  return res;
}

// Work units (~ cycles) per thread at least before a second thread is woken.
constexpr double kGrainUnits = 1 << 16;

LutCall prepare_lut_call(const char* fn, const at::Tensor& x, const at::Tensor& lut_idx,
                         const at::Tensor& codebooks, const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& offsets,
                         const std::optional<at::Tensor>& bias, int64_t in_features,
                         int64_t codebook_rows, int64_t group_slices, bool force_wide) {
  TORCH_CHECK_VALUE(codebooks.dim() == 4 && codebooks.is_floating_point(), fn,
                    "codebooks must be float [S, n_codebooks, K, d], got ",
                    codebooks.scalar_type(), " ", codebooks.sizes());
  TORCH_CHECK_VALUE(x.is_floating_point() && x.dim() >= 1, fn,
                    "x must be floating point [..., in_features], got ", x.scalar_type(), " ",
                    x.sizes());
  TORCH_CHECK_VALUE(lut_idx.dim() == 4 && lut_idx.scalar_type() == at::kByte &&
                        lut_idx.size(3) == 64 && lut_idx.is_contiguous(),
                    fn, "lut_idx must be contiguous uint8 [S, tiles, quads, 64] from "
                    "codebook_gemv_lut_pack, got ", lut_idx.scalar_type(), " ", lut_idx.sizes());
  LutCall c;
  c.S = codebooks.size(0);
  c.n_cb = codebooks.size(1);
  c.K = codebooks.size(2);
  c.d = codebooks.size(3);
  TORCH_CHECK_VALUE(codebook_rows >= 1, fn, "codebook_rows must be >= 1, got ", codebook_rows);
  c.out = c.n_cb * codebook_rows;
  const Geometry g = geometry(fn, c.S, c.out, in_features, c.d, c.K, group_slices, force_wide);
  c.g = g;
  TORCH_CHECK_VALUE(lut_idx.size(0) == c.S && lut_idx.size(1) == g.tiles &&
                        lut_idx.size(2) == g.nq,
                    fn, "lut_idx has shape ", lut_idx.sizes(), ", expected [", c.S, ", ", g.tiles,
                    ", ", g.nq, ", 64] for these codebooks and group_slices",
                    g.wide ? " (the wide layout: codebook_gemv_lut_pack(..., wide=True))" : "");
  TORCH_CHECK_VALUE(c.n_cb == 1 || codebook_rows % g.rows_per_tile == 0, fn, "codebook_rows (",
                    codebook_rows, ") must be a multiple of ", g.rows_per_tile,
                    " when there are several codebooks (", c.n_cb, ")");
  TORCH_CHECK_VALUE(x.size(-1) == in_features, fn, "x has ", x.size(-1),
                    " features, expected in_features=", in_features);
  if (scales.has_value()) {
    TORCH_CHECK_VALUE(scales->is_floating_point() && scales->dim() == 2 &&
                          scales->size(0) == c.out && scales->size(1) == g.G,
                      fn, "scales must be float [", c.out, ", ", g.G, "], got ",
                      scales->scalar_type(), " ", scales->sizes());
  } else {
    TORCH_CHECK_VALUE(g.G == 1, fn, "group_slices (", group_slices,
                      ") must be in_features / block_dim without scales");
  }
  check_affine_bias_cpu(fn, c.out, scales, offsets, bias, {&x, &lut_idx, &codebooks});
  c.tiles_per_cb = c.n_cb == 1 ? g.tiles : codebook_rows / g.rows_per_tile;

  // Decode calls pass contiguous fp32 x: used as it is (no reshape / conversion per call).
  c.x_dtype = x.scalar_type();
  c.x_f32 = c.x_dtype == at::kFloat;
  c.xf = c.x_f32 && x.is_contiguous() ? x
                                      : x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  c.M = x.numel() / in_features;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = c.out;
  c.y = at::empty(out_shape, x.options().dtype(at::kFloat));

  auto keep = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
  };
  auto prep = [&](const std::optional<at::Tensor>& t) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    return keep(t->scalar_type()) ? t->contiguous() : t->to(at::kFloat).contiguous();
  };
  c.sc = prep(scales);
  c.of = prep(offsets);
  c.bs = !bias.has_value() ? at::Tensor()
         : (bias->scalar_type() == at::kFloat && bias->is_contiguous()
                ? *bias : bias->to(at::kFloat).contiguous());
  c.cb = prep(codebooks);
  return c;
}

void transpose_codebooks(const at::Tensor& cb, int64_t S_ncb, int64_t K, int64_t d, int64_t Kp,
                         std::vector<float>& cbf_buf, float* ct) {
  const float* cbp = as_f32(cb, cbf_buf);
  for (int64_t sc_i = 0; sc_i < S_ncb; ++sc_i)
    for (int64_t j = 0; j < d; ++j) {
      float* row = ct + (sc_i * d + j) * Kp;
      for (int64_t kk = 0; kk < K; ++kk) row[kk] = cbp[(sc_i * K + kk) * d + j];
      for (int64_t kk = K; kk < Kp; ++kk) row[kk] = 0.0f;
    }
}

void build_table_row(const float* xs, const float* ct, int64_t d, int64_t Kp, float* dst) {
#if PHYSKERN_CBMM_X86
  if (use_avx512() && Kp % 16 == 0) {
    build_row_avx512(xs, ct, d, Kp, dst);
    return;
  }
#endif
  build_row_scalar(xs, ct, d, Kp, dst);
}

const float* group_sums(const float* x, int64_t M, int64_t in_features, int64_t G,
                        std::vector<float>& buf) {
  if (buf.size() < static_cast<size_t>(M * G)) buf.resize(static_cast<size_t>(M * G));
  const int64_t gsz = in_features / G;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      const float* p = x + m * in_features + gi * gsz;
      float s = 0.0f;
      for (int64_t j = 0; j < gsz; ++j) s += p[j];
      buf[m * G + gi] = s;
    }
  return buf.data();
}

double lut_grain_units() {
  static const double units = [] {
    const char* e = std::getenv("PHYSKERN_LUT_GRAIN");
    return e && *e ? std::atof(e) : kGrainUnits;
  }();
  return units;
}

at::Tensor codebook_gemv_lut(const at::Tensor& x, const at::Tensor& lut_idx,
                             const at::Tensor& codebooks, const std::optional<at::Tensor>& scales,
                             const std::optional<at::Tensor>& offsets,
                             const std::optional<at::Tensor>& bias, int64_t in_features,
                             int64_t codebook_rows, int64_t group_slices) {
  const LutCall c = prepare_lut_call("codebook_gemv_lut: ", x, lut_idx, codebooks, scales,
                                     offsets, bias, in_features, codebook_rows, group_slices,
                                     /*force_wide=*/false);
  const Geometry& g = c.g;
  const int64_t M = c.M, S = c.S, n_cb = c.n_cb, K = c.K, d = c.d, out = c.out;
  if (M == 0 || out == 0) return c.result();

  LArgs a{};
  a.M = M;
  a.out = out;
  a.in = in_features;
  a.S = S;
  a.n_cb = n_cb;
  a.K = K;
  a.Kp = K <= 16 ? 16 : (K <= 32 ? 32 : (K <= 64 ? 64 : 256));
  a.wide = g.wide;
  a.d = d;
  a.nb = g.nb;
  a.spg = g.spg;
  a.spgp = g.spgp;
  a.G = g.G;
  a.nq = g.nq;
  a.nbp = g.nbp;
  a.tiles = g.tiles;
  a.tiles_per_cb = c.tiles_per_cb;
  a.idx = lut_idx.const_data_ptr<uint8_t>();
  // Thread-local scratch that only grows: fp32 copies of half-precision parameters, transposed
  // codebooks, tables, x sums.
  thread_local std::vector<float> sc_buf, of_buf, cbf_buf, ct_buf, table_buf, xsum_buf;
  a.scales = as_f32(c.sc, sc_buf);
  a.scales_type = at::kFloat;
  a.offsets = as_f32(c.of, of_buf);
  a.offsets_type = at::kFloat;
  a.bias = c.bs.defined() ? c.bs.const_data_ptr<float>() : nullptr;
  a.y = c.y.data_ptr<float>();

  const int64_t Kp = a.Kp;
  const size_t ct_n = static_cast<size_t>(S * n_cb * d * Kp);
  const size_t table_n = static_cast<size_t>(M * S * n_cb * g.nbp * Kp);
  if (ct_buf.size() < ct_n) ct_buf.resize(ct_n);
  if (table_buf.size() < table_n) table_buf.resize(table_n);
  float* ct = ct_buf.data();
  transpose_codebooks(c.cb, S * n_cb, K, d, Kp, cbf_buf, ct);
  const at::Tensor& xf = c.xf;
  float* table = table_buf.data();
  const float* xp = xf.const_data_ptr<float>();
  const bool avx = use_avx512();
  // Table rows: (m, s, c, p); padded slices are zero rows.
  const int64_t rows_total = M * S * n_cb * g.nbp;
  auto build = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t p = i % g.nbp, msc = i / g.nbp;
      const int64_t scb = msc % (S * n_cb), m = msc / (S * n_cb);
      float* dst = table + i * Kp;
      const int64_t gi = p / g.spgp, pj = p % g.spgp;
      if (pj >= g.spg) {
        std::memset(dst, 0, sizeof(float) * Kp);
        continue;
      }
      const float* xs = xp + m * in_features + (gi * g.spg + pj) * d;
      const float* ctp = ct + scb * d * Kp;
      alignas(64) float tmp[256];
      float* row = g.wide ? tmp : dst;
#if PHYSKERN_CBMM_X86
      if (avx) {
        build_row_avx512(xs, ctp, d, Kp, row);
        if (g.wide) to_planes_avx512(row, reinterpret_cast<uint8_t*>(dst));
        continue;
      }
#endif
      build_row_scalar(xs, ctp, d, Kp, row);
      if (g.wide) to_planes_scalar(row, reinterpret_cast<uint8_t*>(dst));
    }
  };
  (void)avx;
  const double build_units = static_cast<double>(rows_total) * Kp * d / 16.0;
  if (build_units > 4 * lut_grain_units()) {
    at::parallel_for(0, rows_total, std::max<int64_t>(1, rows_total / 64), build);
  } else {
    build(0, rows_total);
  }
  a.table = table;
  if (a.offsets) a.xsum = group_sums(xp, M, in_features, g.G, xsum_buf);

  // Work per tile: a lookup step (permutes, ~1-2 cycles; gather ~4) per padded slice and stage.
  const double per_lookup = g.wide ? 8.0 : (Kp <= 32 ? 1.0 : 2.0);
  const double per_tile = static_cast<double>(M * S * g.nbp) * per_lookup + 16.0 * g.G;
  const int64_t grain =
      std::max<int64_t>(8, static_cast<int64_t>(lut_grain_units() / per_tile) / 8 * 8);
  if (g.tiles <= grain) {
    run_tiles(a, 0, g.tiles);
  } else {
    at::parallel_for(0, g.tiles, grain, [&](int64_t b, int64_t e) { run_tiles(a, b, e); });
  }
  return c.result();
}

}  // namespace lutgemv
}  // namespace physkern

TORCH_LIBRARY_FRAGMENT(physkern, m) {
  m.def(
      "codebook_gemv_lut_pack(Tensor packed, int in_features, int block_dim, int k, "
      "int group_slices, bool wide=False) -> Tensor");
  m.def("codebook_gemv_lut_isa() -> str", &physkern::lutgemv::codebook_gemv_lut_isa);
  m.def(
      "codebook_gemv_lut(Tensor x, Tensor lut_idx, Tensor codebooks, Tensor? scales, "
      "Tensor? offsets, Tensor? bias, int in_features, int codebook_rows, "
      "int group_slices) -> Tensor");
}

TORCH_LIBRARY_IMPL(physkern, CPU, m) {
  m.impl("codebook_gemv_lut_pack", &physkern::lutgemv::codebook_gemv_lut_pack);
  m.impl("codebook_gemv_lut", &physkern::lutgemv::codebook_gemv_lut);
}
