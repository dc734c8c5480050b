// Kernels of physkern::codebook_matmul's CPU implementation (csrc/codebook_matmul.cpp), one copy per instruction
// set. NOT a normal header: each csrc/codebook_matmul_isa_*.cpp includes it once, inside its own
// namespace (and `#pragma GCC target` region), with PHYSKERN_CBMM_ISA set to
//   0  baseline (the compiler's default target; 4-lane GCC vector extensions, scalar fp16)
//   1  AVX2 + FMA + F16C (8 lanes)
//   2  AVX-512 F/BW/VL/DQ + F16C (16 lanes)
// and csrc/codebook_matmul.cpp picks one copy at run time. Everything it needs (Args, the vector
// types, VF / VU16 / VI32, CbF32 / CbF16 / CbBF16, half_to_float, decoded_stride,
// PHYSKERN_CBMM_INLINE) comes from csrc/codebook_matmul.h.
//
// Entry points of each copy:
//   direct_rows(a, o_begin, o_end)  rows [o_begin, o_end) of y by decode-and-dot
//   lut_build(a, t_begin, t_end)    table items [t_begin, t_end) of the lookup-table path
//   lut_rows(a, o_begin, o_end)     rows [o_begin, o_end) of y by table lookups
//   dequant_rows(a, o_begin, o_end) rows [o_begin, o_end) of the dense float32 W (larger M)

// Lanes of the float vectors the kernels compute with (one native register).
constexpr int VW = PHYSKERN_CBMM_ISA >= 2 ? 16 : (PHYSKERN_CBMM_ISA == 1 ? 8 : 4);
typedef typename VF<VW>::t vfw;
typedef typename VI32<VW>::t viw;

template <int N>
PHYSKERN_CBMM_INLINE typename VF<N>::t ld_f32(const float* p) {
  typename VF<N>::t v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

PHYSKERN_CBMM_INLINE vfw ldx(const float* p) { return ld_f32<VW>(p); }

PHYSKERN_CBMM_INLINE void stx(float* p, vfw v) { __builtin_memcpy(p, &v, sizeof(v)); }

PHYSKERN_CBMM_INLINE float hsum(vfw v) {
#if PHYSKERN_CBMM_ISA >= 2
  const vf8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#elif PHYSKERN_CBMM_ISA == 1
  const vf4 q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const vf4 q = v;
#endif
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// ---- row conversions and index decoding ----------------------------------------------------

PHYSKERN_CBMM_INLINE float h2f(uint16_t h) {
#if PHYSKERN_CBMM_ISA >= 1
  return _cvtsh_ss(h);
#else
  return half_to_float(h);
#endif
}

// n values from element `offset` of a float32/float16/bfloat16/float64 buffer, as floats.
PHYSKERN_CBMM_INLINE void cvt_row(const void* base, at::ScalarType t, int64_t offset, int64_t n,
                                  float* dst) {
  if (t == at::kFloat) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
  } else if (t == at::kHalf) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
    int64_t i = 0;
#if PHYSKERN_CBMM_ISA >= 1
    for (; i + VW <= n; i += VW) {  // F16C, one register at a time
      typename VU16<VW>::t raw;
      __builtin_memcpy(&raw, p + i, sizeof(raw));
#if PHYSKERN_CBMM_ISA >= 2
      const vfw v = (vfw)_mm512_cvtph_ps((__m256i)raw);
#else
      const vfw v = (vfw)_mm256_cvtph_ps((__m128i)raw);
#endif
      __builtin_memcpy(dst + i, &v, sizeof(v));
    }
#endif
    for (; i < n; ++i) dst[i] = h2f(p[i]);
  } else if (t == at::kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(dst + i, &u, 4);
    }
  } else {
    const double* p = static_cast<const double*>(base) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
  }
}

// 32 indices of BITS bits fill exactly BITS words, so every shift is a compile-time constant.
template <int BITS>
PHYSKERN_CBMM_INLINE void decode_group(const uint32_t* w, uint16_t* dst) {
  constexpr uint32_t kMask = (1u << BITS) - 1u;
#pragma GCC unroll 32
  for (int i = 0; i < 32; ++i) {
    const int pos = i * BITS, wd = pos >> 5, sh = pos & 31;
    uint32_t v = w[wd] >> sh;
    if (sh + BITS > 32) v |= w[wd + 1] << (32 - sh);
    dst[i] = static_cast<uint16_t>(v & kMask);
  }
}

// round_up(nb, 32) indices of one row; the last, partial group comes from a zero-padded copy.
template <int BITS>
PHYSKERN_CBMM_INLINE void decode_bits(const uint32_t* w, int64_t words, int64_t nb, uint16_t* dst) {
  const int64_t full = std::min<int64_t>(nb / 32, words / BITS);
  for (int64_t gi = 0; gi < full; ++gi) decode_group<BITS>(w + gi * BITS, dst + gi * 32);
  if (full * 32 < nb) {
    uint32_t tmp[BITS] = {};
    const int64_t rest = words - full * BITS;
    for (int64_t i = 0; i < rest && i < BITS; ++i) tmp[i] = w[full * BITS + i];
    decode_group<BITS>(tmp, dst + full * 32);
  }
}

#if PHYSKERN_CBMM_ISA >= 1
// Vector decoding: index i of a 32-index group (BITS words, held in one AVX-512 register or two
// AVX2 registers) is ((w[wd_i] >> sh_i) | (w[wd_i + 1] << (32 - sh_i))) & mask, with wd_i and
// sh_i compile-time constants per lane: two register permutes, two shifts, or, and per vector.
template <int BITS>
struct DecodeConsts {
  uint32_t wd[32], wd1[32], sh[32], rsh[32];
  constexpr DecodeConsts() : wd(), wd1(), sh(), rsh() {
    for (int i = 0; i < 32; ++i) {
      const int pos = i * BITS;
      wd[i] = static_cast<uint32_t>(pos >> 5);
      wd1[i] = static_cast<uint32_t>((pos >> 5) + 1);
      sh[i] = static_cast<uint32_t>(pos & 31);
      rsh[i] = static_cast<uint32_t>(31 - (pos & 31));
    }
  }
};
template <int BITS>
inline constexpr DecodeConsts<BITS> kDecodeConsts{};

typedef uint32_t vuw __attribute__((vector_size(VW * 4)));

PHYSKERN_CBMM_INLINE vuw ldu(const uint32_t* p) {
  vuw v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Up to n (< VW) words at p, zeros elsewhere; masked-off lanes are never read (no fault past the
// end of the tensor).
PHYSKERN_CBMM_INLINE vuw ldu_partial(const uint32_t* p, int64_t n) {
  if (n <= 0) return vuw{};
#if PHYSKERN_CBMM_ISA >= 2
  return (vuw)_mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1u), p);
#else
  vi16 lane;  // (only the first 8 lanes are used)
  for (int l = 0; l < 8; ++l) lane[l] = l < n ? -1 : 0;
  const __m256i mask = (__m256i)__builtin_shufflevector(lane, lane, 0, 1, 2, 3, 4, 5, 6, 7);
  return (vuw)_mm256_maskload_epi32(reinterpret_cast<const int*>(p), mask);
#endif
}

// w: the row's `words` words. Writes round_up(nb, 32) entries. The last groups load only the
// words that exist (masked loads), so nothing past the row is read and no copy is needed.
template <int BITS>
PHYSKERN_CBMM_INLINE void decode_vec(const uint32_t* w, int64_t words, int64_t nb, uint32_t* dst) {
  const DecodeConsts<BITS>& k = kDecodeConsts<BITS>;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  for (int64_t g0 = 0; g0 < nb; g0 += 32) {
    const uint32_t* gw = w + (g0 / 32) * BITS;
    const int64_t avail = words - (g0 / 32) * BITS;  // words left from gw on (>= 1)
#if PHYSKERN_CBMM_ISA >= 2
    const vuw W = avail >= 16 ? ldu(gw) : ldu_partial(gw, avail);
#else
    const vuw Wlo = avail >= 8 ? ldu(gw) : ldu_partial(gw, avail);
    const vuw Whi = avail >= 16 ? ldu(gw + 8) : ldu_partial(gw + 8, avail - 8);
#endif
    for (int h = 0; h < 32 / VW; ++h) {
      const vuw wd = ldu(k.wd + h * VW), sh = ldu(k.sh + h * VW);
#if PHYSKERN_CBMM_ISA >= 2
      const vuw lo = __builtin_shuffle(W, wd);
#else
      const vuw lo = __builtin_shuffle(Wlo, Whi, wd);
#endif
      vuw v;
      if constexpr (32 % BITS == 0) {  // no index straddles two words
        v = (lo >> sh) & kMask;
      } else {
        const vuw wd1 = ldu(k.wd1 + h * VW), rsh = ldu(k.rsh + h * VW);
#if PHYSKERN_CBMM_ISA >= 2
        const vuw hi = __builtin_shuffle(W, wd1);
#else
        const vuw hi = __builtin_shuffle(Wlo, Whi, wd1);
#endif
        v = ((lo >> sh) | ((hi << 1) << rsh)) & kMask;
      }
      __builtin_memcpy(dst + g0 + h * VW, &v, sizeof(v));
    }
  }
}
#endif

// One row of the packed bit stream -> dst[b] = idx[b] * mul + b * stride for b < nb (uint32
// element offsets: idx * d into a codebook, or b * Kp + idx into a lookup table), and 0 for
// b in [nb, round_up(nb, 32)). tmp: scratch of round_up(nb, 32) + 64 entries.
__attribute__((noinline)) void decode_offsets(const uint32_t* w, int64_t words, int bits,
                                              int64_t nb, uint32_t mul, uint32_t stride,
                                              uint16_t* tmp, uint32_t* dst) {
  const int64_t nbs = decoded_stride(nb);
  const bool shift_only = stride == 0 && mul != 0 && (mul & (mul - 1)) == 0;
  const int sh = shift_only ? __builtin_ctz(mul) : 0;
  // Byte-aligned indices with a power-of-two block dim: one pass.
  if ((bits == 8 || bits == 16) && shift_only) {
    if (bits == 8) {
      const uint8_t* by = reinterpret_cast<const uint8_t*>(w);
      for (int64_t b = 0; b < nb; ++b) dst[b] = uint32_t(by[b]) << sh;
    } else {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(w);
      for (int64_t b = 0; b < nb; ++b) dst[b] = uint32_t(h[b]) << sh;
    }
    for (int64_t b = nb; b < nbs; ++b) dst[b] = 0;
    return;
  }
  // 1. Raw indices into dst.
  if (bits == 8) {
    const uint8_t* by = reinterpret_cast<const uint8_t*>(w);
    for (int64_t b = 0; b < nb; ++b) dst[b] = by[b];
  } else if (bits == 16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(w);
    for (int64_t b = 0; b < nb; ++b) dst[b] = h[b];
  } else {
#if PHYSKERN_CBMM_ISA >= 1
    const uint32_t* wp = w;
    switch (bits) {
      case 1: decode_vec<1>(wp, words, nb, dst); break;
      case 2: decode_vec<2>(wp, words, nb, dst); break;
      case 3: decode_vec<3>(wp, words, nb, dst); break;
      case 4: decode_vec<4>(wp, words, nb, dst); break;
      case 5: decode_vec<5>(wp, words, nb, dst); break;
      case 6: decode_vec<6>(wp, words, nb, dst); break;
      case 7: decode_vec<7>(wp, words, nb, dst); break;
      case 9: decode_vec<9>(wp, words, nb, dst); break;
      case 10: decode_vec<10>(wp, words, nb, dst); break;
      case 11: decode_vec<11>(wp, words, nb, dst); break;
      case 12: decode_vec<12>(wp, words, nb, dst); break;
      case 13: decode_vec<13>(wp, words, nb, dst); break;
      case 14: decode_vec<14>(wp, words, nb, dst); break;
      default: decode_vec<15>(wp, words, nb, dst); break;
    }
#else
    switch (bits) {
      case 1: decode_bits<1>(w, words, nb, tmp); break;
      case 2: decode_bits<2>(w, words, nb, tmp); break;
      case 3: decode_bits<3>(w, words, nb, tmp); break;
      case 4: decode_bits<4>(w, words, nb, tmp); break;
      case 5: decode_bits<5>(w, words, nb, tmp); break;
      case 6: decode_bits<6>(w, words, nb, tmp); break;
      case 7: decode_bits<7>(w, words, nb, tmp); break;
      case 9: decode_bits<9>(w, words, nb, tmp); break;
      case 10: decode_bits<10>(w, words, nb, tmp); break;
      case 11: decode_bits<11>(w, words, nb, tmp); break;
      case 12: decode_bits<12>(w, words, nb, tmp); break;
      case 13: decode_bits<13>(w, words, nb, tmp); break;
      case 14: decode_bits<14>(w, words, nb, tmp); break;
      default: decode_bits<15>(w, words, nb, tmp); break;
    }
    for (int64_t b = 0; b < nb; ++b) dst[b] = tmp[b];
#endif
  }
  // 2. Offsets (a shift for the usual power-of-two block dims).
  if (shift_only) {
    if (sh != 0)
      for (int64_t b = 0; b < nb; ++b) dst[b] <<= sh;
  } else {
    for (int64_t b = 0; b < nb; ++b) dst[b] = dst[b] * mul + uint32_t(b) * stride;
  }
  for (int64_t b = nb; b < nbs; ++b) dst[b] = 0;
}

// ---- loads of stored codebook values ------------------------------------------------------------

template <class CB>
PHYSKERN_CBMM_INLINE float ld1(const typename CB::st* p) {
  if constexpr (CB::kind == 0) {
    return *p;
  } else if constexpr (CB::kind == 1) {
    return h2f(*p);
  } else {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
}

template <class V>
PHYSKERN_CBMM_INLINE auto cat4(V a, V b) { return __builtin_shufflevector(a, b, 0, 1, 2, 3); }
template <class V>
PHYSKERN_CBMM_INLINE auto cat8(V a, V b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
}
template <class V>
PHYSKERN_CBMM_INLINE auto cat16(V a, V b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
template <int N, class V>  // two N/2-lane vectors -> one N-lane vector
PHYSKERN_CBMM_INLINE auto catn(V a, V b) {
  if constexpr (N == 4) {
    return cat4(a, b);
  } else if constexpr (N == 8) {
    return cat8(a, b);
  } else {
    static_assert(N == 16, "catn: N must be 4, 8 or 16");
    return cat16(a, b);
  }
}

// N stored values as they are: a float vector (float32) or a uint16 vector (float16/bfloat16).
template <class CB, int N>
PHYSKERN_CBMM_INLINE auto ldn(const typename CB::st* p) {
  if constexpr (CB::kind == 0) {
    return ld_f32<N>(p);
  } else {
    typename VU16<N>::t v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
  }
}

// VW stored values -> VW floats (one conversion for the whole vector).
template <class CB, class V>
PHYSKERN_CBMM_INLINE vfw to_f32(V raw) {
  if constexpr (CB::kind == 0) {
    return raw;
  } else if constexpr (CB::kind == 2) {
    const viw i = __builtin_convertvector(raw, viw) << 16;
    return (vfw)i;
  } else {
#if PHYSKERN_CBMM_ISA >= 2
    return (vfw)_mm512_cvtph_ps((__m256i)raw);
#elif PHYSKERN_CBMM_ISA == 1
    return (vfw)_mm256_cvtph_ps((__m128i)raw);
#else
    vfw v;
    for (int i = 0; i < VW; ++i) v[i] = half_to_float(raw[i]);
    return v;
#endif
  }
}

// N consecutive stored values (N >= D) from the N / D blocks at element offsets off[0..].
// Offsets are read two at a time (one 64-bit load for a pair of blocks: loads are the scarce
// resource of this loop).
template <int N, int D, class CB>
PHYSKERN_CBMM_INLINE auto load_blocks(const typename CB::st* cb, const uint32_t* off) {
  if constexpr (N == 2 * D) {
    uint64_t pair;
    __builtin_memcpy(&pair, off, 8);
    return catn<N>(ldn<CB, D>(cb + static_cast<uint32_t>(pair)),
                   ldn<CB, D>(cb + static_cast<uint32_t>(pair >> 32)));
  } else {
    return catn<N>(load_blocks<N / 2, D, CB>(cb, off), load_blocks<N / 2, D, CB>(cb, off + N / 2 / D));
  }
}

// Weights of columns [st * VW, st * VW + VW) of one stage (element offsets off = idx * D).
// D = 1 with PERM: a register permute of the stage's (<= 16 entry) float codebook `tab`.
// D = 0: d = 1 with 4-bit indices and a <= 16 entry codebook (scalar grids such as RTN 4-bit),
// read straight from the packed words (off = the row's words, no decoding pass): the VW nibbles
// of the step are spread over the lanes by one permute and one shift; the register permute that
// looks them up only uses each lane's low 4 bits.
template <int D, bool PERM, class CB>
PHYSKERN_CBMM_INLINE vfw gather_w(const typename CB::st* cb, const uint32_t* off, int64_t st,
                                  const float* tab) {
  if constexpr (D == 0) {
    static_assert(PERM, "D == 0 is the nibble form of the permute lookup");
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(off) + st * (VW / 2);
#if PHYSKERN_CBMM_ISA >= 2
    uint64_t v;
    __builtin_memcpy(&v, bytes, 8);
    const vuw both = (vuw)_mm512_set1_epi64(static_cast<long long>(v));  // lo, hi, lo, hi, ...
    const vuw sel = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    const vuw sh = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
    const viw m = (viw)(__builtin_shuffle(both, sel) >> sh);
    return __builtin_shuffle(ld_f32<16>(tab), m);
#elif PHYSKERN_CBMM_ISA == 1
    uint32_t v;
    __builtin_memcpy(&v, bytes, 4);
    const vuw sh = {0, 4, 8, 12, 16, 20, 24, 28};
    const viw m = (viw)((vuw{} + v) >> sh);
    return __builtin_shuffle(ld_f32<8>(tab), ld_f32<8>(tab + 8), m);  // indices mod 16
#else
    vfw w;
    for (int i = 0; i < VW; ++i) w[i] = tab[(bytes[i / 2] >> (4 * (i % 2))) & 15];
    return w;
#endif
  } else if constexpr (D >= VW) {
    constexpr int64_t kSub = D / VW;  // vectors per block
    return to_f32<CB>(ldn<CB, VW>(cb + off[st / kSub] + (st % kSub) * VW));
  } else if constexpr (D >= 2) {
    return to_f32<CB>(load_blocks<VW, D, CB>(cb, off + st * (VW / D)));
  } else if constexpr (PERM) {
#if PHYSKERN_CBMM_ISA >= 1
    viw m;
    __builtin_memcpy(&m, off + st * VW, sizeof(m));
#if PHYSKERN_CBMM_ISA >= 2
    return __builtin_shuffle(ld_f32<16>(tab), m);
#else
    return __builtin_shuffle(ld_f32<8>(tab), ld_f32<8>(tab + 8), m);
#endif
#else
    vfw v;
    for (int i = 0; i < VW; ++i) v[i] = tab[off[st * VW + i]];
    return v;
#endif
  } else {
    vfw v;
    for (int i = 0; i < VW; ++i) v[i] = ld1<CB>(cb + off[st * VW + i]);
    return v;
  }
}

// ---- direct path: decode-and-dot -------------------------------------------------------------

struct RowCtx {            // one output row o of the direct path
  const void* const* cbp;  // [S] this row's codebook, per stage
  const float* tabs;       // [S][16] PERM tables (codebook entries, zero padded)
  const uint32_t* off;     // [S][nbs] element offsets idx * d (PERM: idx; D = 0: packed words)
  int64_t nbs;             // stride between stages in off (D = 0: out * words)
  const float* scg;        // [G] group scales of the row (GROUP mode) or nullptr
  const float* sce;        // [in] per-column scales (ELEM mode) or nullptr
};

// KS: the number of stages when known at compile time (1 or 2), else 0 (a.S).
template <int D, bool PERM, bool ELEM, int KS, class CB>
PHYSKERN_CBMM_INLINE vfw weights(const Args& a, const RowCtx& r, int64_t st) {
  using stt = typename CB::st;
  vfw w = gather_w<D, PERM, CB>(static_cast<const stt*>(r.cbp[0]), r.off, st, r.tabs);
  const int64_t S = KS > 0 ? KS : a.S;
  for (int64_t s = 1; s < S; ++s)
    w += gather_w<D, PERM, CB>(static_cast<const stt*>(r.cbp[s]), r.off + s * r.nbs, st,
                               r.tabs + s * 16);
  if constexpr (ELEM) w *= ldx(r.sce + st * VW);
  return w;
}

// For each of the nrows rows r of a block: res[i * res_stride + m] = sum over the first
// (in / VW) * VW columns of W[o_i, j] * x[m, j], m < MT (one call per block of rows: the call,
// its prologue and the tile setup are paid once per block, not per row).
// MODE -1 (ELEM): weights scaled per column (sce). MODE 0: no scales, or scale groups of a
// run-time number of steps (scg). MODE > 0: scale groups of exactly MODE steps (g == MODE * VW),
// unrolled. Within a group the products are summed, then scaled once at its end.
template <int D, bool PERM, int MT, int MODE, int KS, class CB>
__attribute__((noinline)) void direct_tile(const Args& a, const RowCtx* rows, int64_t nrows,
                                           const float* x, float* res, int64_t res_stride) {
  constexpr bool ELEM = MODE == -1;
  const int64_t in = a.in, steps = in / VW;
  for (int64_t i = 0; i < nrows; ++i) {
    const RowCtx& r = rows[i];
    const bool grouped = !ELEM && r.scg != nullptr;
    const int64_t spg = MODE > 0 ? MODE : (grouped ? a.g / VW : steps);
    vfw tot[MT];
    for (int m = 0; m < MT; ++m) tot[m] = vfw{};
    int64_t st = 0;
    const float* sg = r.scg;
    while (st < steps) {
      vfw a0[MT], a1[MT];
      for (int m = 0; m < MT; ++m) a0[m] = a1[m] = vfw{};
      if constexpr (MODE > 0) {
        for (int k = 0; k + 2 <= MODE; k += 2) {
          const vfw w0 = weights<D, PERM, ELEM, KS, CB>(a, r, st + k);
          const vfw w1 = weights<D, PERM, ELEM, KS, CB>(a, r, st + k + 1);
          for (int m = 0; m < MT; ++m) {
            a0[m] += w0 * ldx(x + m * in + (st + k) * VW);
            a1[m] += w1 * ldx(x + m * in + (st + k) * VW + VW);
          }
        }
        if constexpr (MODE % 2 == 1) {
          const vfw w0 = weights<D, PERM, ELEM, KS, CB>(a, r, st + MODE - 1);
          for (int m = 0; m < MT; ++m) a0[m] += w0 * ldx(x + m * in + (st + MODE - 1) * VW);
        }
        st += MODE;
      } else {
        const int64_t se = std::min(steps, st + spg);
        for (; st + 2 <= se; st += 2) {
          const vfw w0 = weights<D, PERM, ELEM, KS, CB>(a, r, st);
          const vfw w1 = weights<D, PERM, ELEM, KS, CB>(a, r, st + 1);
          for (int m = 0; m < MT; ++m) {
            a0[m] += w0 * ldx(x + m * in + st * VW);
            a1[m] += w1 * ldx(x + m * in + st * VW + VW);
          }
        }
        if (st < se) {
          const vfw w0 = weights<D, PERM, ELEM, KS, CB>(a, r, st);
          for (int m = 0; m < MT; ++m) a0[m] += w0 * ldx(x + m * in + st * VW);
          ++st;
        }
      }
      if (MODE > 0 || grouped) {
        const float sv = *sg++;
        for (int m = 0; m < MT; ++m) tot[m] += (a0[m] + a1[m]) * sv;
      } else {
        for (int m = 0; m < MT; ++m) tot[m] += a0[m] + a1[m];
      }
    }
    for (int m = 0; m < MT; ++m) res[i * res_stride + m] = hsum(tot[m]);
  }
}

// Any block dim, any scale group, columns [j0, j1): one weight at a time (tails, other d).
template <class CB>
PHYSKERN_CBMM_INLINE void generic_cols(const Args& a, const RowCtx& r, const float* scale_row,
                                       const float* x, int64_t mt, int64_t j0, int64_t j1,
                                       float* res) {
  using stt = typename CB::st;
  const int64_t d = a.d, in = a.in;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t b = j / d, e = j % d;
    float w = 0.0f;
    for (int64_t s = 0; s < a.S; ++s)
      w += ld1<CB>(static_cast<const stt*>(r.cbp[s]) + r.off[s * r.nbs + b] + e);
    if (scale_row != nullptr) w *= scale_row[j / a.g];
    for (int64_t m = 0; m < mt; ++m) res[m] += w * x[m * in + j];
  }
}

// A block of rows, all rows of x: tiles of 8 / 4 / 2 / 1 rows of x share each weight vector.
template <int D, bool PERM, int MODE, int KS, class CB>
PHYSKERN_CBMM_INLINE void direct_block_vec(const Args& a, const RowCtx* rows, int64_t nrows,
                                           float* res) {
  int64_t m0 = 0;
  while (m0 < a.M) {
    const int64_t left = a.M - m0;
    const float* x = a.x + m0 * a.in;
    float* rm = res + m0;
    // Unrolled scale groups only for single rows of x (decode); wider tiles amortise the group
    // overhead over their rows.
    constexpr int kWide = MODE > 0 ? 0 : MODE;
    if (left >= 8) {
      direct_tile<D, PERM, 8, kWide, 0, CB>(a, rows, nrows, x, rm, a.M);
      m0 += 8;
    } else if (left >= 4) {
      direct_tile<D, PERM, 4, kWide, 0, CB>(a, rows, nrows, x, rm, a.M);
      m0 += 4;
    } else if (left >= 2) {
      direct_tile<D, PERM, 2, kWide, 0, CB>(a, rows, nrows, x, rm, a.M);
      m0 += 2;
    } else {
      direct_tile<D, PERM, 1, MODE, KS, CB>(a, rows, nrows, x, rm, a.M);
      m0 += 1;
    }
  }
}

// mode: -1 per-column scales, 0 none / run-time groups, else steps per scale group. Stage counts
// 1 and 2 are compiled in for single rows of x (decode).
template <int D, bool PERM, int MODE, class CB>
PHYSKERN_CBMM_INLINE void direct_block_stages(const Args& a, const RowCtx* rows, int64_t nrows,
                                              float* res) {
  if (a.M == 1 && a.S == 1) {
    direct_block_vec<D, PERM, MODE, 1, CB>(a, rows, nrows, res);
  } else if (a.M == 1 && a.S == 2) {
    direct_block_vec<D, PERM, MODE, 2, CB>(a, rows, nrows, res);
  } else {
    direct_block_vec<D, PERM, MODE, 0, CB>(a, rows, nrows, res);
  }
}

template <int D, bool PERM, class CB>
PHYSKERN_CBMM_INLINE void direct_block_mode(const Args& a, const RowCtx* rows, int64_t nrows,
                                            int mode, float* res) {
  switch (mode) {
    case -1: direct_block_stages<D, PERM, -1, CB>(a, rows, nrows, res); break;
    case 2: direct_block_stages<D, PERM, 2, CB>(a, rows, nrows, res); break;
    case 4: direct_block_stages<D, PERM, 4, CB>(a, rows, nrows, res); break;
    case 8: direct_block_stages<D, PERM, 8, CB>(a, rows, nrows, res); break;
    default: direct_block_stages<D, PERM, 0, CB>(a, rows, nrows, res); break;
  }
}

// y[m, o] = res[m] + offsets[o] . xsum[m] + bias[o].
PHYSKERN_CBMM_INLINE void finish_row(const Args& a, int64_t o, const float* res,
                                     const float* offset_row) {
  for (int64_t m = 0; m < a.M; ++m) {
    float v = res[m];
    if (a.offsets) {
      const float* xs = a.xsum + m * a.G;
      float od = 0.0f;
      for (int64_t gi = 0; gi < a.G; ++gi) od += offset_row[gi] * xs[gi];
      v += od;
    }
    if (a.bias) v += a.bias[o];
    a.y[m * a.out + o] = v;
  }
}

// dst[j] = src[j / rep] for j < n * rep (no division in the loop).
PHYSKERN_CBMM_INLINE void repeat_each(const float* src, int64_t n, int64_t rep, float* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < rep; ++k) dst[i * rep + k] = src[i];
}

// Rows are prepared kBlockRows at a time (indices decoded, scales converted, codebooks of row /
// small-group scope prefetched: their reads are data-dependent, the hardware prefetcher does not
// follow them), then computed by one kernel call.
template <class CB>
PHYSKERN_CBMM_INLINE void direct_rows_t(const Args& a, int64_t o0, int64_t o1) {
  using stt = typename CB::st;
  constexpr int64_t kBlockRows = 16;
  const int64_t S = a.S, d = a.d, M = a.M, G = a.G, in = a.in, nbs = a.nbs;
  const bool vec = d == 1 || d == 2 || d == 4 || d == 8 || d == 16;
  const bool perm = d == 1 && a.K <= 16;
  // d = 1, 4-bit indices, no column tail: lookups read the packed words directly (D = 0).
  const bool nib = perm && a.bits == 4 && in % VW == 0;
  const bool elem = a.scales != nullptr && a.g % VW != 0;
  const int64_t spg = a.g / VW;
  const int mode = elem ? -1 : (a.scales && (spg == 2 || spg == 4 || spg == 8) ? int(spg) : 0);
  std::vector<uint16_t> tmp(static_cast<size_t>(nbs + 64));
  std::vector<uint32_t> off(static_cast<size_t>(kBlockRows * S * nbs));
  std::vector<const void*> cbp(static_cast<size_t>(kBlockRows * S));
  std::vector<float> tabs(static_cast<size_t>(perm ? kBlockRows * S * 16 : 0), 0.0f);
  std::vector<float> scale_rows(static_cast<size_t>(a.scales ? kBlockRows * G : 0));
  std::vector<float> offset_rows(static_cast<size_t>(a.offsets ? kBlockRows * G : 0));
  std::vector<float> sce(static_cast<size_t>(elem ? kBlockRows * in : 0));
  std::vector<float> res(static_cast<size_t>(kBlockRows * M));
  std::vector<RowCtx> ctx(static_cast<size_t>(kBlockRows));
  const stt* cb = static_cast<const stt*>(a.codebooks);
  const int64_t cb_bytes = a.K * d * static_cast<int64_t>(sizeof(stt));  // one codebook
  const bool prefetch = a.codebook_rows <= 4 && cb_bytes <= 8192;
  for (int64_t ob = o0; ob < o1; ob += kBlockRows) {
    const int64_t nrows = std::min(kBlockRows, o1 - ob);
    for (int64_t i = 0; i < nrows; ++i) {
      const int64_t o = ob + i, c = o / a.codebook_rows;
      const void** cp = cbp.data() + i * S;
      uint32_t* oi = off.data() + i * S * nbs;
      for (int64_t s = 0; s < S; ++s) {
        cp[s] = cb + ((s * a.n_cb + c) * a.K) * d;
        if (prefetch && (i == 0 || o % a.codebook_rows == 0)) {
          const char* p = static_cast<const char*>(cp[s]);
          for (int64_t q = 0; q < cb_bytes; q += 64) __builtin_prefetch(p + q);
        }
        if (!nib)
          decode_offsets(a.packed + (s * a.out + o) * a.words, a.words, a.bits, a.nb,
                         static_cast<uint32_t>(d), 0u, tmp.data(), oi + s * nbs);
      }
      float* ti = nullptr;
      if (perm && i > 0 && c == (o - 1) / a.codebook_rows) {
        ti = const_cast<float*>(ctx[i - 1].tabs);  // same codebook as the row before
      } else if (perm) {
        ti = tabs.data() + i * S * 16;
        for (int64_t s = 0; s < S; ++s)
          for (int64_t k = 0; k < a.K; ++k)
            ti[s * 16 + k] = ld1<CB>(static_cast<const stt*>(cp[s]) + k);
      }
      float* sr = a.scales ? scale_rows.data() + i * G : nullptr;
      float* se = elem ? sce.data() + i * in : nullptr;
      if (elem) {
        cvt_row(a.scales, a.scales_type, o * G, G, sr);
        repeat_each(sr, G, a.g, se);
      }
      if (nib) {  // the packed words themselves; stages are out * words apart
        ctx[i] = RowCtx{cp, ti, a.packed + o * a.words, a.out * a.words,
                        (a.scales && !elem) ? sr : nullptr, se};
      } else {
        ctx[i] = RowCtx{cp, ti, oi, nbs, (a.scales && !elem) ? sr : nullptr, se};
      }
    }
    // Scales / offsets of the whole block: consecutive rows are contiguous.
    if (a.scales && !elem) cvt_row(a.scales, a.scales_type, ob * G, nrows * G, scale_rows.data());
    if (a.offsets) cvt_row(a.offsets, a.offsets_type, ob * G, nrows * G, offset_rows.data());
    std::fill(res.begin(), res.end(), 0.0f);
    int64_t j_vec = 0;
    if (vec && in >= VW) {
      j_vec = (in / VW) * VW;
      switch (d) {
        case 16: direct_block_mode<16, false, CB>(a, ctx.data(), nrows, mode, res.data()); break;
        case 8: direct_block_mode<8, false, CB>(a, ctx.data(), nrows, mode, res.data()); break;
        case 4: direct_block_mode<4, false, CB>(a, ctx.data(), nrows, mode, res.data()); break;
        case 2: direct_block_mode<2, false, CB>(a, ctx.data(), nrows, mode, res.data()); break;
        default:
          if (nib) {
            direct_block_mode<0, true, CB>(a, ctx.data(), nrows, mode, res.data());
          } else if (perm) {
            direct_block_mode<1, true, CB>(a, ctx.data(), nrows, mode, res.data());
          } else {
            direct_block_mode<1, false, CB>(a, ctx.data(), nrows, mode, res.data());
          }
      }
    }
    for (int64_t i = 0; i < nrows; ++i) {
      if (j_vec < in)
        generic_cols<CB>(a, ctx[i], a.scales ? scale_rows.data() + i * G : nullptr, a.x, M,
                         j_vec, in, res.data() + i * M);
      finish_row(a, ob + i, res.data() + i * M,
                 a.offsets ? offset_rows.data() + i * G : nullptr);
    }
  }
}

void direct_rows(const Args& a, int64_t o0, int64_t o1) {
  switch (a.cb_kind) {
    case 0: direct_rows_t<CbF32>(a, o0, o1); break;
    case 1: direct_rows_t<CbF16>(a, o0, o1); break;
    default: direct_rows_t<CbBF16>(a, o0, o1); break;
  }
}

// ---- lookup-table path -----------------------------------------------------------------------
// Table item t = ((m * S + s) * n_cb + c) * nb + b holds Kp floats (Kp = K rounded up to 16):
//   T[t][k] = sum_j x[m, b * d + j] * C[s, c, k, j]   (k < K; zero padding up to Kp)
// from the transposed codebooks CT[(s * n_cb + c) * d + j][k] (zero padded to Kp).

void lut_build(const Args& a, int64_t t0, int64_t t1) {
  const int64_t d = a.d, Kp = a.Kp, nb = a.nb;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t % nb, msc = t / nb;     // msc = (m * S + s) * n_cb + c
    const int64_t sc = msc % (a.S * a.n_cb), m = msc / (a.S * a.n_cb);
    const float* xb = a.x + m * a.in + b * d;
    const float* ct = a.ct + sc * d * Kp;
    float* dst = a.table + t * Kp;
    int64_t k = 0;
    for (; k + 2 * VW <= Kp; k += 2 * VW) {
      vfw acc0 = ldx(ct + k) * xb[0], acc1 = ldx(ct + k + VW) * xb[0];
      for (int64_t j = 1; j < d; ++j) {
        acc0 += ldx(ct + j * Kp + k) * xb[j];
        acc1 += ldx(ct + j * Kp + k + VW) * xb[j];
      }
      stx(dst + k, acc0);
      stx(dst + k + VW, acc1);
    }
    for (; k < Kp; k += VW) {
      vfw acc0 = ldx(ct + k) * xb[0];
      for (int64_t j = 1; j < d; ++j) acc0 += ldx(ct + j * Kp + k) * xb[j];
      stx(dst + k, acc0);
    }
  }
}

// VW table entries tb[off[0 .. VW - 1]].
PHYSKERN_CBMM_INLINE vfw lookup(const float* tb, const uint32_t* off) {
#if PHYSKERN_CBMM_ISA >= 2
  return (vfw)_mm512_i32gather_ps(_mm512_loadu_si512(off), tb, 4);
#elif PHYSKERN_CBMM_ISA == 1
  return (vfw)_mm256_i32gather_ps(tb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off)), 4);
#else
  vfw v;
  for (int i = 0; i < VW; ++i) v[i] = tb[off[i]];
  return v;
#endif
}

// y[m, o] = sum_{s, b} scale[o, b * d / g] * T[m, s, c(o), b][idx[s, o, b]]
//           + offsets[o] . xsum[m] + bias[o]
// Rows are taken in tiles; blocks in chunks whose table slice stays in L1, so each chunk of the
// table is read for every row of the tile before the next chunk. Lookups go VW blocks at a time
// (a vector gather on AVX2 / AVX-512), each weighted by its block's scale.
void lut_rows(const Args& a, int64_t o0, int64_t o1) {
  constexpr int64_t kTile = 64;
  const int64_t S = a.S, M = a.M, G = a.G, nb = a.nb, Kp = a.Kp, nbs = a.nbs;
  const int64_t per_block_bytes = Kp * 4 * S * M;
  const int64_t chunk =
      std::max<int64_t>(1, (int64_t{24} << 10) / std::max<int64_t>(1, per_block_bytes * 16)) * 16;
  std::vector<uint16_t> tmp(static_cast<size_t>(nbs + 64));
  std::vector<uint32_t> off(static_cast<size_t>(kTile * S * nbs));
  std::vector<float> scb(static_cast<size_t>(a.scales ? kTile * nbs : 0));
  std::vector<float> scale_row(static_cast<size_t>(a.scales ? G : 0));
  std::vector<float> offset_row(static_cast<size_t>(a.offsets ? G : 0));
  std::vector<float> accv(static_cast<size_t>(kTile * M * VW));  // vector partial sums
  std::vector<float> tail(static_cast<size_t>(kTile * M));         // scalar partial sums
  std::vector<int64_t> cbr(static_cast<size_t>(kTile));            // codebook of each row
  std::vector<float> res(static_cast<size_t>(M));
  const int64_t per_m = S * a.n_cb * nb * Kp;     // table floats per row of x
  const int64_t per_s = a.n_cb * nb * Kp;
  const int64_t nbv = nb / VW * VW;
  for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
    const int64_t rows = std::min(kTile, o1 - t0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = t0 + r;
      cbr[r] = o / a.codebook_rows;
      for (int64_t s = 0; s < S; ++s)
        decode_offsets(a.packed + (s * a.out + o) * a.words, a.words, a.bits, nb, 1u,
                       static_cast<uint32_t>(Kp), tmp.data(), off.data() + (r * S + s) * nbs);
      if (a.scales) {  // g % d == 0 here: one scale per block
        cvt_row(a.scales, a.scales_type, o * G, G, scale_row.data());
        repeat_each(scale_row.data(), G, a.g / a.d, scb.data() + r * nbs);
      }
    }
    std::fill(accv.begin(), accv.end(), 0.0f);
    std::fill(tail.begin(), tail.end(), 0.0f);
    for (int64_t b0 = 0; b0 < nb; b0 += chunk) {
      const int64_t b1 = std::min(nb, b0 + chunk);
      const int64_t v1 = std::min(b1, nbv);        // vector part [b0, v1), scalar tail [v1, b1)
      for (int64_t r = 0; r < rows; ++r) {
        const uint32_t* orow = off.data() + r * S * nbs;
        const float* sb = a.scales ? scb.data() + r * nbs : nullptr;
        for (int64_t m = 0; m < M; ++m) {
          const float* tm = a.table + m * per_m + cbr[r] * nb * Kp;
          float* ap = accv.data() + (r * M + m) * VW;
          vfw av = ldx(ap);
          float tl = 0.0f;
          for (int64_t s = 0; s < S; ++s) {
            const float* tb = tm + s * per_s;
            const uint32_t* os = orow + s * nbs;
            if (sb) {
              for (int64_t b = b0; b < v1; b += VW) av += lookup(tb, os + b) * ldx(sb + b);
              for (int64_t b = std::max(b0, v1); b < b1; ++b) tl += tb[os[b]] * sb[b];
            } else {
              for (int64_t b = b0; b < v1; b += VW) av += lookup(tb, os + b);
              for (int64_t b = std::max(b0, v1); b < b1; ++b) tl += tb[os[b]];
            }
          }
          stx(ap, av);
          tail[r * M + m] += tl;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = t0 + r;
      for (int64_t m = 0; m < M; ++m)
        res[m] = hsum(ldx(accv.data() + (r * M + m) * VW)) + tail[r * M + m];
      if (a.offsets) cvt_row(a.offsets, a.offsets_type, o * G, G, offset_row.data());
      finish_row(a, o, res.data(), offset_row.data());
    }
  }
}

// ---- dequantization (the larger-M path: W once, then one at::addmm) -------------------------

// Rows [o0, o1) of W into a.w (float32 [out, in]): each block's centroids summed over the stages
// in stage order, times the row's group scale, plus its offset. The codebooks are float32 here
// (cb_kind 0: the caller converts them once, so the inner loops are plain float copies and adds
// that the compiler vectorises for the fixed block dims).
template <int D>
PHYSKERN_CBMM_INLINE void dequant_stage(const float* cb, const uint32_t* off, int64_t nb,
                                        int64_t d_rt, bool first, float* w) {
  const int64_t d = D > 0 ? D : d_rt;
  for (int64_t b = 0; b < nb; ++b) {
    const float* src = cb + off[b];
    float* dst = w + b * d;
    if (first) {
      for (int64_t j = 0; j < d; ++j) dst[j] = src[j];
    } else {
      for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
    }
  }
}

void dequant_rows(const Args& a, int64_t o0, int64_t o1) {
  const int64_t S = a.S, d = a.d, in = a.in, G = a.G, g = a.g, nbs = a.nbs;
  std::vector<uint16_t> tmp(static_cast<size_t>(nbs + 64));
  std::vector<uint32_t> off(static_cast<size_t>(nbs));
  std::vector<float> sc(static_cast<size_t>(a.scales ? G : 0));
  std::vector<float> of(static_cast<size_t>(a.offsets ? G : 0));
  const float* cb = static_cast<const float*>(a.codebooks);
  for (int64_t o = o0; o < o1; ++o) {
    float* w = a.w + o * in;
    const int64_t c = o / a.codebook_rows;
    for (int64_t s = 0; s < S; ++s) {
      decode_offsets(a.packed + (s * a.out + o) * a.words, a.words, a.bits, a.nb,
                     static_cast<uint32_t>(d), 0u, tmp.data(), off.data());
      const float* base = cb + (s * a.n_cb + c) * a.K * d;
      switch (d) {
        case 1: dequant_stage<1>(base, off.data(), a.nb, d, s == 0, w); break;
        case 2: dequant_stage<2>(base, off.data(), a.nb, d, s == 0, w); break;
        case 4: dequant_stage<4>(base, off.data(), a.nb, d, s == 0, w); break;
        case 8: dequant_stage<8>(base, off.data(), a.nb, d, s == 0, w); break;
        case 16: dequant_stage<16>(base, off.data(), a.nb, d, s == 0, w); break;
        default: dequant_stage<0>(base, off.data(), a.nb, d, s == 0, w); break;
      }
    }
    if (a.scales) {
      cvt_row(a.scales, a.scales_type, o * G, G, sc.data());
      if (a.offsets) cvt_row(a.offsets, a.offsets_type, o * G, G, of.data());
      for (int64_t gi = 0; gi < G; ++gi) {
        float* wg = w + gi * g;
        const float s = sc[gi];
        if (a.offsets) {
          const float t = of[gi];
          for (int64_t j = 0; j < g; ++j) wg[j] = wg[j] * s + t;
        } else {
          for (int64_t j = 0; j < g; ++j) wg[j] *= s;
        }
      }
    }
  }
}
