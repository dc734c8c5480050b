// physkern._C: the input rotation of a rotated quantized layer (physkern/rotation.py) as one op.
//
//   physkern::hadamard_rotate(Tensor x, Tensor inv_perm, Tensor signs, int block) -> Tensor
//
// x [..., n] float32, inv_perm int64 [n] (a permutation of range(n)), signs float32 [n],
// block a power of two dividing n. Returns y [..., n] float32 with, for every row r,
//   z[j] = x[r, inv_perm[j]] * signs[j]
//   y[r, c*b : (c+1)*b] = z[c*b : (c+1)*b] @ H_b          (H_b = Sylvester Hadamard / sqrt(b))
// i.e. y = x R for R = P D blockdiag(H_b) (the module docstring of physkern/rotation.py).
//
// Why an op: on the decode path (one row per layer) the torch form is an index_select and a
// batched [1, b] x [b, b] product per block, two dispatches and n*b multiply-adds. Here the row
// is gathered and signed in one pass, then each block goes through the in-place fast
// Walsh-Hadamard transform (log2(b) butterfly passes: n*log2(b) additions), then one scale by
// 1/sqrt(b) (exact for b = 4^k, e.g. 1/8 for b = 64). The Sylvester matrix's entry (i, j) is
// (-1)^popcount(i & j), which is exactly what the natural-order butterfly computes, so the
// result equals the torch path up to float32 summation order (tests/test_hadamard_rotate.py
// compares both with the dense float64 R).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace physkern {
namespace rotate {

namespace {

void rotate_row(const float* x, const int64_t* inv, const float* signs, int64_t n, int64_t b,
                float scale, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] = x[inv[j]] * signs[j];
  for (int64_t c = 0; c < n; c += b) {
    float* v = y + c;
    for (int64_t h = 1; h < b; h *= 2) {
      for (int64_t i = 0; i < b; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], d = v[j + h];
          v[j] = a + d;
          v[j + h] = a - d;
        }
      }
    }
  }
  if (scale != 1.0f) {
    for (int64_t j = 0; j < n; ++j) y[j] *= scale;
  }
}

}  // namespace

at::Tensor hadamard_rotate(const at::Tensor& x, const at::Tensor& inv_perm,
                           const at::Tensor& signs, int64_t block) {
  const char* fn = "hadamard_rotate: ";
  TORCH_CHECK_VALUE(x.dim() >= 1, fn, "x must have at least one dimension");
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, fn, "x must be float32, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(inv_perm.scalar_type() == at::kLong && inv_perm.dim() == 1 &&
                        inv_perm.size(0) == n,
                    fn, "inv_perm must be int64 [", n, "], got ", inv_perm.scalar_type(), " ",
                    inv_perm.sizes());
  TORCH_CHECK_VALUE(signs.scalar_type() == at::kFloat && signs.dim() == 1 && signs.size(0) == n,
                    fn, "signs must be float32 [", n, "], got ", signs.scalar_type(), " ",
                    signs.sizes());
  TORCH_CHECK_VALUE(block >= 1 && (block & (block - 1)) == 0 && n % block == 0, fn,
                    "block must be a power of two dividing n (", n, "), got ", block);
  for (const at::Tensor* t : {&x, &inv_perm, &signs}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), fn, "every tensor must be on the CPU, got ",
                      t->device());
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = inv_perm.contiguous();
  const at::Tensor sc = signs.contiguous();
  const int64_t* inv = ic.data_ptr<int64_t>();
  // An index outside [0, n) would read out of bounds: refuse it (O(n), cheap beside the row).
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK_VALUE(inv[j] >= 0 && inv[j] < n, fn, "inv_perm[", j, "] = ", inv[j],
                      " is outside [0, ", n, ")");
  }
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = n == 0 ? 0 : xc.numel() / n;
  if (rows == 0) return y;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
  const float* xp = xc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // ~n*log2(b) flops a row: split only when there are many rows (a decode row stays on its
  // thread; a parallel region costs more than one row).
  const int64_t grain = std::max<int64_t>(1, 16384 / n);
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) rotate_row(xp + r * n, inv, sp, n, block, scale, yp + r * n);
  });
  return y;
}

}  // namespace rotate
}  // namespace physkern

TORCH_LIBRARY_FRAGMENT(physkern, m) {
  m.def("hadamard_rotate(Tensor x, Tensor inv_perm, Tensor signs, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(physkern, CPU, m) {
  m.impl("hadamard_rotate", &physkern::rotate::hadamard_rotate);
}
