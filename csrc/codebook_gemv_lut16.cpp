// physkern._C: the lookup-table GEMV with int16 tables, the decode fast path (few rows of x).
//
//   physkern::codebook_gemv_lut16(Tensor x, Tensor lut_idx, Tensor codebooks, Tensor? scales,
//       Tensor? offsets, Tensor? bias, int in_features, int codebook_rows,
//       int group_slices) -> Tensor
//   physkern::codebook_gemv_lut16_isa() -> str
//
// Same weights, arguments and sums as physkern::codebook_gemv_lut (csrc/codebook_gemv_lut.cpp),
// for any K <= 256, with lut_idx in the wide layout (codebook_gemv_lut_pack(..., wide=True):
// 64-row tiles, one index byte per row and slice). What differs is the tables. Per row m of x,
// stage s, codebook c and chunk of up to 8 consecutive slices of one scale group, the fp32 table
// entries P[p, k] = x[slice p] . C[k] (p in the chunk, k < K) become integers
//     sigma = max_{p,k} |P[p, k]| / 4095,   q[p, k] = round_half_even(P[p, k] * (4095 / max))
// so |q| <= 4095 and a chunk's sum of 8 lookups is exact in int16; the chunk then adds
// sigma * float(sum) to the row's fp32 accumulator. Every lookup is off by at most sigma / 2, i.e.
// 1.2e-4 of the chunk's largest entry (far below the weights' own quantization error); the
// decode benchmark records the effect on perplexity and generated tokens.
// Why it pays: with AVX-512 VBMI one vpermi2b looks up one byte of 64 rows' entries in a
// 128-entry plane, so per slice two lookups (low and high byte planes; K > 128: two more and two
// blends), two unpacks and two 16-bit adds serve 64 rows x d weights: about 3x fewer
// instructions than the fp32 tables' 16-lane vpermi2ps (plus a blend at K = 64), and half the
// table bytes. Without VBMI a scalar loop computes the same integers and the same fp32 sums in
// the same order (bit-identical; tests compare the two).
#include "codebook_gemv_lut.h"
#include "codebook_matmul.h"
#include "op_checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if PHYSKERN_CBMM_X86
#include <immintrin.h>
#endif

namespace physkern {
namespace lutgemv {
namespace {

constexpr int kChunk = 8;        // slices per int16 chunk
constexpr float kQMax = 4095.f;  // 8 * 4095 = 32760 < 32767

struct A16 {
  int64_t M, out, S, n_cb, Kq, spg, G, nch, nq, tiles;
  const uint8_t* idx;    // [S, tiles, nq = G * spg, 64]
  const uint8_t* table;  // [M, S, n_cb, G * spg, 2, Kq]: low / high byte planes of q
  const float* sigma;    // [M, S, n_cb, G, nch]
  const float* scales;   // fp32 [out, G] or nullptr
  const float* offsets;  // fp32 [out, G] or nullptr
  const float* xsum;     // [M, G] when offsets
  const float* bias;     // fp32 [out] or nullptr
  float* y;              // [M, out]
};

inline int64_t table_index(const A16& a, int64_t m, int64_t s, int64_t c, int64_t p) {
  return ((m * a.S + s) * a.n_cb + c) * a.G * a.spg + p;
}
inline const uint8_t* table_at(const A16& a, int64_t m, int64_t s, int64_t c, int64_t p) {
  return a.table + table_index(a, m, s, c, p) * 2 * a.Kq;
}
inline const float* sigma_at(const A16& a, int64_t m, int64_t s, int64_t c, int64_t gi) {
  return a.sigma + (((m * a.S + s) * a.n_cb + c) * a.G + gi) * a.nch;
}

// Row of the tile held by lane j of accumulator i (the order the byte unpacks leave them in:
// unpacklo/hi_epi8 interleave within 128-bit lanes, then each half widens to 16 int32).
inline int row16(int i, int j) {
  static constexpr int base[4] = {0, 32, 8, 40};
  return base[i] + j + (j >= 8 ? 8 : 0);
}

#if PHYSKERN_CBMM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
// GCC 12's _mm512_cvtepi32_epi8 reads an intentionally undefined register: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// q = round(r[k] * inv) for k < Kp rounded down to 16, split into byte planes; returns the count.
int64_t quantize_row_avx512(const float* r, int64_t Kp, float inv, uint8_t* lo, uint8_t* hi) {
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t k = 0;
  for (; k + 16 <= Kp; k += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(r + k), vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k),
                     _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
  }
  return k;
}
// max |v[i]| over i < n rounded down to 16 into *mx, NaN into *nan; returns the count.
int64_t max_abs_avx512(const float* v, int64_t n, float* mx, bool* nan) {
  __m512 m = _mm512_setzero_ps();
  __mmask16 un = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    un |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    m = _mm512_max_ps(_mm512_abs_ps(x), m);
  }
  *mx = std::max(*mx, _mm512_reduce_max_ps(m));
  *nan = *nan || un != 0;
  return i;
}
#pragma GCC pop_options
#endif

// Quantize a chunk's fp32 rows (n rows of Kp values, entries >= K are zero) into the two byte
// planes of each row (Kq bytes each) and return sigma. Scalar and AVX-512 give the same bytes:
// one fp32 multiply and round-half-even either way.
float quantize_chunk(const float* rows, int64_t n, int64_t Kp, int64_t Kq, uint8_t* dst) {
  float mx = 0.f;
  bool nan = false;
  int64_t i = 0;
#if PHYSKERN_CBMM_X86
  if (use_avx512()) i = max_abs_avx512(rows, n * Kp, &mx, &nan);
#endif
  for (; i < n * Kp; ++i) {
    nan = nan || std::isnan(rows[i]);
    mx = std::max(mx, std::fabs(rows[i]));
  }
  if (nan || !(mx > 0.f) || !std::isfinite(mx)) {
    // All zero: sigma 0. Non-finite x: sigma inf or NaN and zero planes, so the chunk adds NaN
    // (0 * inf) and the output shows it, as the fp32 tables would.
    std::memset(dst, 0, static_cast<size_t>(n * 2 * Kq));
    return nan ? std::numeric_limits<float>::quiet_NaN() : (std::isfinite(mx) ? 0.f : mx);
  }
  const float inv = kQMax / mx;
  for (int64_t p = 0; p < n; ++p) {
    const float* r = rows + p * Kp;
    uint8_t* lo = dst + p * 2 * Kq;
    uint8_t* hi = lo + Kq;
    int64_t k = 0;
#if PHYSKERN_CBMM_X86
    if (use_avx512()) k = quantize_row_avx512(r, Kp, inv, lo, hi);
#endif
    for (; k < Kp; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(r[k] * inv));
      lo[k] = static_cast<uint8_t>(q & 0xFF);
      hi[k] = static_cast<uint8_t>((q >> 8) & 0xFF);
    }
  }
  return mx / kQMax;
}

// Tile t (64 rows) of codebook c, every row of x, one row at a time.
void tile16_scalar(const A16& a, int64_t t, int64_t c) {
  for (int64_t r = 0; r < 64; ++r) {
    const int64_t o = 64 * t + r;
    if (o >= a.out) break;
    for (int64_t m = 0; m < a.M; ++m) {
      float tot = 0.f;
      for (int64_t gi = 0; gi < a.G; ++gi) {
        float acc = 0.f;
        for (int64_t s = 0; s < a.S; ++s) {
          const uint8_t* ib = a.idx + ((s * a.tiles + t) * a.nq + gi * a.spg) * 64 + r;
          const float* sg = sigma_at(a, m, s, c, gi);
          for (int64_t ch = 0; ch < a.nch; ++ch) {
            int32_t sum = 0;
            const int64_t p1 = std::min(a.spg, (ch + 1) * kChunk);
            for (int64_t p = ch * kChunk; p < p1; ++p) {
              const uint8_t* P = table_at(a, m, s, c, gi * a.spg + p);
              const uint32_t k = ib[p * 64];
              sum += static_cast<int16_t>(static_cast<uint16_t>(P[k] | (P[a.Kq + k] << 8)));
            }
            acc = std::fma(static_cast<float>(sum), sg[ch], acc);
          }
        }
        tot = a.scales ? std::fma(acc, a.scales[o * a.G + gi], tot) : tot + acc;
        if (a.offsets) tot = std::fma(a.offsets[o * a.G + gi], a.xsum[m * a.G + gi], tot);
      }
      a.y[m * a.out + o] = tot + (a.bias ? a.bias[o] : 0.f);
    }
  }
}

#if PHYSKERN_CBMM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma")

// R tiles [t0, t0 + R) of codebook c sharing each slice's table loads. KQ: plane length,
// 64 (one-register vpermb), 128 (two-register vpermi2b) or 256 (two of those and a blend on
// index bit 7).
template <int KQ, int R>
__attribute__((noinline)) void tiles16_vbmi(const A16& a, int64_t t0, int64_t c, float* sc,
                                            float* of) {
  for (int r = 0; r < R; ++r)
    for (int64_t gi = 0; gi < a.G; ++gi)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 16; ++j) {
          const int64_t o = 64 * (t0 + r) + row16(i, j);
          const int64_t at = ((r * a.G + gi) * 4 + i) * 16 + j;
          if (a.scales) sc[at] = o < a.out ? a.scales[o * a.G + gi] : 0.f;
          if (a.offsets) of[at] = o < a.out ? a.offsets[o * a.G + gi] : 0.f;
        }
  const int64_t tstride = a.nq * 64;
  for (int64_t m = 0; m < a.M; ++m) {
    __m512 tot[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) tot[r][i] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < a.G; ++gi) {
      __m512 acc[R][4];
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
      for (int64_t s = 0; s < a.S; ++s) {
        const uint8_t* ib = a.idx + ((s * a.tiles + t0) * a.nq + gi * a.spg) * 64;
        const uint8_t* P = table_at(a, m, s, c, gi * a.spg);
        const float* sg = sigma_at(a, m, s, c, gi);
        for (int64_t ch = 0; ch < a.nch; ++ch) {
          __m512i w[R][2];
          for (int r = 0; r < R; ++r) w[r][0] = w[r][1] = _mm512_setzero_si512();
          const int64_t p1 = std::min(a.spg, (ch + 1) * kChunk);
          for (int64_t p = ch * kChunk; p < p1; ++p) {
            const uint8_t* Pp = P + p * 2 * KQ;
            const uint8_t* ip = ib + p * 64;
            if constexpr (KQ == 64) {
              const __m512i L0 = _mm512_loadu_si512(Pp), H0 = _mm512_loadu_si512(Pp + 64);
              for (int r = 0; r < R; ++r) {
                const __m512i iv = _mm512_loadu_si512(ip + r * tstride);
                const __m512i lo = _mm512_permutexvar_epi8(iv, L0);
                const __m512i hi = _mm512_permutexvar_epi8(iv, H0);
                w[r][0] = _mm512_add_epi16(w[r][0], _mm512_unpacklo_epi8(lo, hi));
                w[r][1] = _mm512_add_epi16(w[r][1], _mm512_unpackhi_epi8(lo, hi));
              }
            } else if constexpr (KQ == 128) {
              const __m512i L0 = _mm512_loadu_si512(Pp), L1 = _mm512_loadu_si512(Pp + 64);
              const __m512i H0 = _mm512_loadu_si512(Pp + 128), H1 = _mm512_loadu_si512(Pp + 192);
              for (int r = 0; r < R; ++r) {
                const __m512i iv = _mm512_loadu_si512(ip + r * tstride);
                const __m512i lo = _mm512_permutex2var_epi8(L0, iv, L1);
                const __m512i hi = _mm512_permutex2var_epi8(H0, iv, H1);
                w[r][0] = _mm512_add_epi16(w[r][0], _mm512_unpacklo_epi8(lo, hi));
                w[r][1] = _mm512_add_epi16(w[r][1], _mm512_unpackhi_epi8(lo, hi));
              }
            } else {
              static_assert(KQ == 256, "KQ must be 64, 128 or 256");
              const __m512i L0 = _mm512_loadu_si512(Pp), L1 = _mm512_loadu_si512(Pp + 64);
              const __m512i L2 = _mm512_loadu_si512(Pp + 128), L3 = _mm512_loadu_si512(Pp + 192);
              const __m512i H0 = _mm512_loadu_si512(Pp + 256), H1 = _mm512_loadu_si512(Pp + 320);
              const __m512i H2 = _mm512_loadu_si512(Pp + 384), H3 = _mm512_loadu_si512(Pp + 448);
              for (int r = 0; r < R; ++r) {
                const __m512i iv = _mm512_loadu_si512(ip + r * tstride);
                const __mmask64 k7 = _mm512_movepi8_mask(iv);
                const __m512i lo = _mm512_mask_blend_epi8(k7, _mm512_permutex2var_epi8(L0, iv, L1),
                                                          _mm512_permutex2var_epi8(L2, iv, L3));
                const __m512i hi = _mm512_mask_blend_epi8(k7, _mm512_permutex2var_epi8(H0, iv, H1),
                                                          _mm512_permutex2var_epi8(H2, iv, H3));
                w[r][0] = _mm512_add_epi16(w[r][0], _mm512_unpacklo_epi8(lo, hi));
                w[r][1] = _mm512_add_epi16(w[r][1], _mm512_unpackhi_epi8(lo, hi));
              }
            }
          }
          const __m512 sv = _mm512_set1_ps(sg[ch]);
          for (int r = 0; r < R; ++r) {
            const __m256i h[4] = {_mm512_castsi512_si256(w[r][0]), _mm512_extracti64x4_epi64(w[r][0], 1),
                                  _mm512_castsi512_si256(w[r][1]), _mm512_extracti64x4_epi64(w[r][1], 1)};
            for (int i = 0; i < 4; ++i)
              acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(h[i])), sv,
                                          acc[r][i]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i) {
          const int64_t at = ((r * a.G + gi) * 4 + i) * 16;
          tot[r][i] = a.scales ? _mm512_fmadd_ps(acc[r][i], _mm512_loadu_ps(sc + at), tot[r][i])
                               : _mm512_add_ps(tot[r][i], acc[r][i]);
          if (a.offsets)
            tot[r][i] = _mm512_fmadd_ps(_mm512_loadu_ps(of + at),
                                        _mm512_set1_ps(a.xsum[m * a.G + gi]), tot[r][i]);
        }
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float res[4][16];
      for (int i = 0; i < 4; ++i) _mm512_store_ps(res[i], tot[r][i]);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 16; ++j) {
          const int64_t o = 64 * (t0 + r) + row16(i, j);
          if (o < a.out) a.y[m * a.out + o] = res[i][j] + (a.bias ? a.bias[o] : 0.f);
        }
    }
  }
}

template <int KQ>
void run16_vbmi(const A16& a, int64_t t0, int64_t t1, int64_t c, float* sc, float* of) {
  int64_t t = t0;
  for (; t + 2 <= t1; t += 2) tiles16_vbmi<KQ, 2>(a, t, c, sc, of);
  if (t < t1) tiles16_vbmi<KQ, 1>(a, t, c, sc, of);
}

#pragma GCC pop_options
#endif  // PHYSKERN_CBMM_X86

// Tiles [t0, t1) (any codebooks): split at codebook boundaries.
void run16(const A16& a, int64_t t0, int64_t t1, int64_t tiles_per_cb) {
  std::vector<float> sc(static_cast<size_t>(a.scales ? 2 * a.G * 64 : 0));
  std::vector<float> of(static_cast<size_t>(a.offsets ? 2 * a.G * 64 : 0));
  while (t0 < t1) {
    const int64_t c = t0 / tiles_per_cb;
    const int64_t e = std::min(t1, (c + 1) * tiles_per_cb);
#if PHYSKERN_CBMM_X86
    if (use_vbmi()) {
      switch (a.Kq) {
        case 64: run16_vbmi<64>(a, t0, e, c, sc.data(), of.data()); break;
        case 128: run16_vbmi<128>(a, t0, e, c, sc.data(), of.data()); break;
        default: run16_vbmi<256>(a, t0, e, c, sc.data(), of.data()); break;
      }
      t0 = e;
      continue;
    }
#endif
    for (int64_t t = t0; t < e; ++t) tile16_scalar(a, t, c);
    t0 = e;
  }
}

}  // namespace

std::string codebook_gemv_lut16_isa() { return use_vbmi() ? "avx512_vbmi" : "scalar"; }

at::Tensor codebook_gemv_lut16(const at::Tensor& x, const at::Tensor& lut_idx,
                               const at::Tensor& codebooks, const std::optional<at::Tensor>& scales,
                               const std::optional<at::Tensor>& offsets,
                               const std::optional<at::Tensor>& bias, int64_t in_features,
                               int64_t codebook_rows, int64_t group_slices) {
  const LutCall c = prepare_lut_call("codebook_gemv_lut16: ", x, lut_idx, codebooks, scales,
                                     offsets, bias, in_features, codebook_rows, group_slices,
                                     /*force_wide=*/true);
  const Geometry& g = c.g;
  const int64_t M = c.M, S = c.S, n_cb = c.n_cb, K = c.K, d = c.d;
  if (M == 0 || c.out == 0) return c.result();

  A16 a{};
  a.M = M;
  a.out = c.out;
  a.S = S;
  a.n_cb = n_cb;
  a.Kq = K <= 64 ? 64 : (K <= 128 ? 128 : 256);
  a.spg = g.spg;
  a.G = g.G;
  a.nch = (g.spg + kChunk - 1) / kChunk;
  a.nq = g.nq;
  a.tiles = g.tiles;
  a.idx = lut_idx.const_data_ptr<uint8_t>();
  const int64_t Kp = (K + 15) / 16 * 16;  // fp32 table row length before quantization

  // Thread-local scratch that only grows (see codebook_gemv_lut).
  thread_local std::vector<float> sc_buf, of_buf, cbf_buf, ct_buf, sigma_buf, xsum_buf;
  thread_local std::vector<uint8_t> table_buf;
  a.scales = as_f32(c.sc, sc_buf);
  a.offsets = as_f32(c.of, of_buf);
  a.bias = c.bs.defined() ? c.bs.const_data_ptr<float>() : nullptr;
  a.y = c.y.data_ptr<float>();
  const size_t ct_n = static_cast<size_t>(S * n_cb * d * Kp);
  if (ct_buf.size() < ct_n) ct_buf.resize(ct_n);
  transpose_codebooks(c.cb, S * n_cb, K, d, Kp, cbf_buf, ct_buf.data());
  const size_t table_n = static_cast<size_t>(M * S * n_cb * g.nbp * 2 * a.Kq);
  const size_t sigma_n = static_cast<size_t>(M * S * n_cb * g.G * a.nch);
  if (table_buf.size() < table_n) table_buf.resize(table_n);
  if (sigma_buf.size() < sigma_n) sigma_buf.resize(sigma_n);
  const float* ct = ct_buf.data();
  const float* xp = c.xf.const_data_ptr<float>();
  uint8_t* table = table_buf.data();
  float* sigma = sigma_buf.data();

  // Chunks (m, s, c, gi, ch): fp32 rows of up to 8 slices, then their integer planes.
  const int64_t chunks = static_cast<int64_t>(sigma_n);
  auto build = [&](int64_t b, int64_t e) {
    alignas(64) float rows[kChunk * 256];
    for (int64_t i = b; i < e; ++i) {
      const int64_t ch = i % a.nch, gi = (i / a.nch) % g.G, scb = (i / (a.nch * g.G)) % (S * n_cb),
                    m = i / (a.nch * g.G * S * n_cb);
      const int64_t p0 = ch * kChunk, n = std::min(g.spg, p0 + kChunk) - p0;
      for (int64_t p = 0; p < n; ++p)
        build_table_row(xp + m * in_features + (gi * g.spg + p0 + p) * d, ct + scb * d * Kp, d,
                        Kp, rows + p * Kp);
      const int64_t row0 = (m * S * n_cb + scb) * g.nbp + gi * g.spg + p0;
      sigma[i] = quantize_chunk(rows, n, Kp, a.Kq, table + row0 * 2 * a.Kq);
    }
  };
  const double build_units = static_cast<double>(M * S * n_cb * g.nbp) * Kp * (d + 1) / 16.0;
  if (build_units > 4 * lut_grain_units()) {
    at::parallel_for(0, chunks, std::max<int64_t>(1, chunks / 32), build);
  } else {
    build(0, chunks);
  }
  a.table = table;
  a.sigma = sigma;
  if (a.offsets) a.xsum = group_sums(xp, M, in_features, g.G, xsum_buf);

  // Work per tile: ~3.5 cycles per slice (K <= 128; ~6 above) and row of x, plus the epilogue.
  const double per_tile = static_cast<double>(M * S * g.nbp) * (a.Kq > 128 ? 6.0 : 3.5) +
                          64.0 * g.G * M;
  const int64_t grain =
      std::max<int64_t>(2, static_cast<int64_t>(lut_grain_units() / per_tile) / 2 * 2);
  if (g.tiles <= grain) {
    run16(a, 0, g.tiles, c.tiles_per_cb);
  } else {
    at::parallel_for(0, g.tiles, grain,
                     [&](int64_t b, int64_t e) { run16(a, b, e, c.tiles_per_cb); });
  }
  return c.result();
}

}  // namespace lutgemv
}  // namespace physkern

TORCH_LIBRARY_FRAGMENT(physkern, m) {
  m.def("codebook_gemv_lut16_isa() -> str", &physkern::lutgemv::codebook_gemv_lut16_isa);
  m.def(
      "codebook_gemv_lut16(Tensor x, Tensor lut_idx, Tensor codebooks, Tensor? scales, "
      "Tensor? offsets, Tensor? bias, int in_features, int codebook_rows, "
      "int group_slices) -> Tensor");
}

TORCH_LIBRARY_IMPL(physkern, CPU, m) {
  m.impl("codebook_gemv_lut16", &physkern::lutgemv::codebook_gemv_lut16);
}
