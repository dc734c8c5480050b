// physkern::codebook_matmul CPU kernels for AVX2 + FMA + F16C.
// The kernel code is csrc/codebook_matmul_kernels.h; this file compiles it for one instruction set.
#include "codebook_matmul.h"

#if PHYSKERN_CBMM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace physkern {
namespace cbmm {
namespace isa_avx2 {
#define PHYSKERN_CBMM_ISA 1
#include "codebook_matmul_kernels.h"
#undef PHYSKERN_CBMM_ISA
}  // namespace isa_avx2

Kernels kernels_avx2() {
  return {isa_avx2::direct_rows, isa_avx2::lut_build, isa_avx2::lut_rows,
          isa_avx2::dequant_rows, "avx2"};
}

}  // namespace cbmm
}  // namespace physkern
#pragma GCC pop_options
#endif  // PHYSKERN_CBMM_X86
