// Argument checks shared by the codebook ops' CPU entry points (codebook_matmul.cpp,
// codebook_gemv_lut.cpp): the optional per-row affine tensors and bias, and the device rule.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

namespace physkern {

// offsets need scales and share their shape; bias is float [out]; every tensor is on the CPU.
inline void check_affine_bias_cpu(const char* fn, int64_t out,
                                  const std::optional<at::Tensor>& scales,
                                  const std::optional<at::Tensor>& offsets,
                                  const std::optional<at::Tensor>& bias,
                                  std::initializer_list<const at::Tensor*> required) {
  if (offsets.has_value()) {
    TORCH_CHECK_VALUE(scales.has_value(), fn, "offsets need scales");
    TORCH_CHECK_VALUE(offsets->is_floating_point() && offsets->sizes() == scales->sizes(), fn,
                      "offsets must have the shape of scales ", scales->sizes(), ", got ",
                      offsets->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->is_floating_point() && bias->dim() == 1 && bias->size(0) == out, fn,
                      "bias must be float [", out, "], got ", bias->sizes());
  }
  for (const at::Tensor* t : required) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), fn, "every tensor must be on the CPU, got ",
                      t->device());
  }
  for (const std::optional<at::Tensor>* t : {&scales, &offsets, &bias}) {
    TORCH_CHECK_VALUE(!t->has_value() || (*t)->device().is_cpu(), fn,
                      "every tensor must be on the CPU, got ", (*t)->device());
  }
}

}  // namespace physkern
