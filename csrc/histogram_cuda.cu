// physkern._C: CUDA kernel of physkern::histogram_update (schema in histogram.cpp, layout and
// edge rule in histogram.h).
//
// Each block counts into shared-memory uint32 histograms with shared atomics (privatized: no
// global traffic per value), then adds its non-zero counters to the int64 output with one 64-bit
// global atomic each. A block covers a tile of groups (blockIdx.y) that fits in 48 KiB of shared
// memory; when a single histogram does not fit (bins > ~12k) values go straight to global 64-bit
// atomics. Launches are split so that no block counts 2^31 values or more: a uint32 shared counter
// can never wrap. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h) so that the file
// also compiles against a CPU build of torch plus a stub c10/cuda/impl/cuda_cmake_macros.h.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "histogram.h"

namespace physkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedCounters = 48 * 1024 / sizeof(uint32_t);
constexpr int64_t kMaxValuesPerBlock = 1LL << 30;  // per launch: uint32 counters cannot wrap

template <typename scalar_t>
__device__ __forceinline__ double load_value(const scalar_t* p) {
  return static_cast<double>(static_cast<float>(*p));
}
template <>
__device__ __forceinline__ double load_value<double>(const double* p) {
  return *p;
}

// x: `rows` rows of `row_stride` values (the groups). The block counts groups [g0, g0 + width),
// g0 = blockIdx.y * tile, of the first `groups` groups into shared memory, then merges them into
// counts [groups, slots].
template <typename scalar_t>
__global__ void histogram_shared_kernel(const scalar_t* __restrict__ x, int64_t rows,
                                        int64_t row_stride, int64_t groups, int64_t tile,
                                        int64_t slots,
                                        BinGeometry geom,
                                        unsigned long long* __restrict__ counts) {
  extern __shared__ uint32_t hist[];
  const int64_t g0 = static_cast<int64_t>(blockIdx.y) * tile;
  const int64_t width = min(tile, groups - g0);
  const int64_t local = width * slots;
  for (int64_t i = threadIdx.x; i < local; i += blockDim.x) hist[i] = 0u;
  __syncthreads();
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row_stride == 1) {
    for (int64_t k = first; k < n; k += stride) {
      atomicAdd(&hist[slot_of(load_value(x + k), geom)], 1u);
    }
  } else {
    for (int64_t k = first; k < n; k += stride) {
      const int64_t r = k / width;
      const int64_t c = k - r * width;
      atomicAdd(&hist[c * slots + slot_of(load_value(x + r * row_stride + g0 + c), geom)], 1u);
    }
  }
  __syncthreads();
  unsigned long long* out = counts + g0 * slots;
  for (int64_t i = threadIdx.x; i < local; i += blockDim.x) {
    const uint32_t v = hist[i];
    if (v != 0u) atomicAdd(out + i, static_cast<unsigned long long>(v));
  }
}

// Histograms too large for shared memory: one 64-bit global atomic per value.
template <typename scalar_t>
__global__ void histogram_global_kernel(const scalar_t* __restrict__ x, int64_t n,
                                        int64_t groups, int64_t slots, BinGeometry geom,
                                        unsigned long long* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    const int64_t g = k % groups;
    atomicAdd(counts + g * slots + slot_of(load_value(x + k), geom), 1ULL);
  }
}

template <typename scalar_t>
void launch(const scalar_t* x, int64_t numel, int64_t groups, int64_t slots,
            const BinGeometry& geom, unsigned long long* counts, int sms,
            cudaStream_t stream) {
  const int64_t rows = numel / groups;
  const int64_t max_blocks = static_cast<int64_t>(sms) * 8;
  if (slots > kSharedCounters) {
    const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, max_blocks);
    histogram_global_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, numel, groups, slots,
                                                                       geom, counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t tile = std::min<int64_t>(groups, kSharedCounters / slots);
  const int64_t tiles = (groups + tile - 1) / tile;
  const size_t shared = static_cast<size_t>(tile * slots) * sizeof(uint32_t);
  // Rows per launch such that no block counts more than kMaxValuesPerBlock values.
  const int64_t max_blocks_x = std::max<int64_t>(1, max_blocks / tiles);
  const int64_t rows_per_launch = std::max<int64_t>(1, max_blocks_x * kMaxValuesPerBlock / tile);
  for (int64_t r0 = 0; r0 < rows; r0 += rows_per_launch) {
    const int64_t r = std::min(rows_per_launch, rows - r0);
    const int64_t blocks_x = std::min<int64_t>((r * tile + kThreads - 1) / kThreads, max_blocks_x);
    for (int64_t t0 = 0; t0 < tiles; t0 += 65535) {  // gridDim.y limit
      const int64_t t = std::min<int64_t>(65535, tiles - t0);
      const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(t));
      histogram_shared_kernel<scalar_t><<<grid, kThreads, shared, stream>>>(
          x + r0 * groups + t0 * tile, r, groups, groups - t0 * tile, tile, slots, geom,
          counts + t0 * tile * slots);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

void histogram_update_cuda(const at::Tensor& x, at::Tensor& counts, double lo, double hi) {
  int64_t groups = 1;
  const BinGeometry geom = check_histogram_args(x, counts, lo, hi, &groups);
  TORCH_CHECK_VALUE(x.device().is_cuda(), "histogram_update: x must be on CUDA here, got ",
                    x.device());
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t slots = counts.size(-1);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  // int64 counters as unsigned 64-bit for atomicAdd: same bits for any count below 2^63.
  auto* out = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  switch (xc.scalar_type()) {
    case at::kFloat:
      launch(xc.const_data_ptr<float>(), numel, groups, slots, geom, out, sms, stream);
      break;
    case at::kDouble:
      launch(xc.const_data_ptr<double>(), numel, groups, slots, geom, out, sms, stream);
      break;
    case at::kHalf:
      launch(xc.const_data_ptr<c10::Half>(), numel, groups, slots, geom, out, sms, stream);
      break;
    case at::kBFloat16:
      launch(xc.const_data_ptr<c10::BFloat16>(), numel, groups, slots, geom, out, sms, stream);
      break;
    default:
      TORCH_CHECK_VALUE(false, "histogram_update: unsupported dtype ", xc.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(physkern, CUDA, m) {
  m.impl("histogram_update", &histogram_update_cuda);
}

}  // namespace physkern
