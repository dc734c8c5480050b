// physkern::codebook_matmul CPU kernels for AVX-512 (F, BW, VL, DQ) + F16C.
// The kernel code is csrc/codebook_matmul_kernels.h; this file compiles it for one instruction set.
#include "codebook_matmul.h"

#if PHYSKERN_CBMM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
// GCC 12's _mm512_cvtph_ps reads an intentionally undefined register: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace physkern {
namespace cbmm {
namespace isa_avx512 {
#define PHYSKERN_CBMM_ISA 2
#include "codebook_matmul_kernels.h"
#undef PHYSKERN_CBMM_ISA
}  // namespace isa_avx512

Kernels kernels_avx512() {
  return {isa_avx512::direct_rows, isa_avx512::lut_build, isa_avx512::lut_rows,
          isa_avx512::dequant_rows, "avx512"};
}

}  // namespace cbmm
}  // namespace physkern
#pragma GCC pop_options
#endif  // PHYSKERN_CBMM_X86
