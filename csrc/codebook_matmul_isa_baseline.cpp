// physkern::codebook_matmul CPU kernels for the compiler's default target (GCC vector extensions; scalar fp16 conversion).
// The kernel code is csrc/codebook_matmul_kernels.h; this file compiles it for one instruction set.
#include "codebook_matmul.h"

namespace physkern {
namespace cbmm {
namespace isa_baseline {
#define PHYSKERN_CBMM_ISA 0
#include "codebook_matmul_kernels.h"
#undef PHYSKERN_CBMM_ISA
}  // namespace isa_baseline

Kernels kernels_baseline() {
  return {isa_baseline::direct_rows, isa_baseline::lut_build, isa_baseline::lut_rows,
          isa_baseline::dequant_rows, "baseline"};
}

}  // namespace cbmm
}  // namespace physkern
