// Shared definitions of physkern::codebook_matmul's CPU implementation (csrc/codebook_matmul.cpp) and its
// per-instruction-set kernels (csrc/codebook_matmul_isa_*.cpp, each compiling
// csrc/codebook_matmul_kernels.h for one instruction set; separate files so they build in
// parallel).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PHYSKERN_CBMM_X86 1
#include <immintrin.h>
#else
#define PHYSKERN_CBMM_X86 0
#endif

#define PHYSKERN_CBMM_INLINE inline __attribute__((always_inline))

namespace physkern {
namespace cbmm {

typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf2 __attribute__((vector_size(8)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint16_t vu16x16 __attribute__((vector_size(32)));

template <int N> struct VF;
template <> struct VF<16> { typedef vf16 t; };
template <> struct VF<8> { typedef vf8 t; };
template <> struct VF<4> { typedef vf4 t; };
template <> struct VF<2> { typedef vf2 t; };

template <int N> struct VU16;  // N x uint16
template <> struct VU16<16> { typedef uint16_t t __attribute__((vector_size(32))); };
template <> struct VU16<8> { typedef uint16_t t __attribute__((vector_size(16))); };
template <> struct VU16<4> { typedef uint16_t t __attribute__((vector_size(8))); };
template <> struct VU16<2> { typedef uint16_t t __attribute__((vector_size(4))); };
template <int N> struct VI32;  // N x int32
template <> struct VI32<16> { typedef int32_t t __attribute__((vector_size(64))); };
template <> struct VI32<8> { typedef int32_t t __attribute__((vector_size(32))); };
template <> struct VI32<4> { typedef int32_t t __attribute__((vector_size(16))); };
template <> struct VI32<2> { typedef int32_t t __attribute__((vector_size(8))); };

// Codebook element types: storage type and kind (0 float32, 1 float16, 2 bfloat16).
struct CbF32 { typedef float st; static constexpr int kind = 0; };
struct CbF16 { typedef uint16_t st; static constexpr int kind = 1; };
struct CbBF16 { typedef uint16_t st; static constexpr int kind = 2; };

struct Args {
  int64_t M, out, in, S, n_cb, K, Kp, d, nb, nbs, words, codebook_rows, g, G;
  int bits;
  int cb_kind;
  const float* x;            // [M, in]
  const uint32_t* packed;    // [S, out, words]
  const void* codebooks;     // [S, n_cb, K, d] of cb_kind
  const void* scales;        // [out, G] or nullptr
  at::ScalarType scales_type;
  const void* offsets;       // [out, G] or nullptr
  at::ScalarType offsets_type;
  const float* bias;         // [out] or nullptr
  const float* xsum;         // [M, G] when offsets
  const float* ct;           // lut: [S * n_cb * d, Kp]
  float* table;              // lut: [M * S * n_cb * nb, Kp]
  float* y;                  // [M, out]
  float* w;                  // dequant_rows: [out, in] (codebooks float32)
};

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Entries decode_row writes per row (the stride between decoded rows).
inline int64_t decoded_stride(int64_t nb) { return (nb + 31) / 32 * 32; }

// n values starting at element `offset` of a float32/float16/bfloat16/float64 buffer, as floats.
inline void load_row_f32(const void* base, at::ScalarType t, int64_t offset, int64_t n, float* dst) {
  switch (t) {
    case at::kFloat:
      std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
      return;
    case at::kHalf: {
      const c10::Half* p = static_cast<const c10::Half*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      return;
    }
    case at::kBFloat16: {
      const c10::BFloat16* p = static_cast<const c10::BFloat16*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      return;
    }
    default: {
      const double* p = static_cast<const double*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
      return;
    }
  }
}

// Entry points of one instruction set's kernels (csrc/codebook_matmul_kernels.h).
struct Kernels {
  void (*direct_rows)(const Args&, int64_t, int64_t);
  void (*lut_build)(const Args&, int64_t, int64_t);
  void (*lut_rows)(const Args&, int64_t, int64_t);
  void (*dequant_rows)(const Args&, int64_t, int64_t);
  const char* name;
};

Kernels kernels_baseline();
#if PHYSKERN_CBMM_X86
Kernels kernels_avx2();
Kernels kernels_avx512();
#endif

// The copy the process runs with (picked once: the best the CPU supports, or PHYSKERN_CPU_ISA);
// csrc/codebook_gemv_lut.cpp follows the same choice.
const Kernels& kernels();

}  // namespace cbmm
}  // namespace physkern
