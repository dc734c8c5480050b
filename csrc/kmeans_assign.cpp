// physkern._C: fused CPU nearest-centroid assignment for k-means.
//
//   physkern::kmeans_assign_cpu(Tensor blocks, Tensor centroids, Tensor? importance)
//       -> (Tensor indices, Tensor distances)
//
// blocks [S, N, d], centroids [S, K, d] (K >= 1), importance broadcastable to [S, N, d] or None
// (any strides, stride 0 included; any floating dtype, computed in float32). For every scope s
// and block n:
//   indices[s, n]   = argmin_k sum_j imp[s, n, j] * (blocks[s, n, j] - centroids[s, k, j])^2
//   distances[s, n] = that sum for the chosen k, computed as the reference does (in order over j:
//                     diff = w - c; t = diff * diff; t = imp * t; acc += t; each op rounded)
// indices int64 [S, N], distances float32 [S, N]. Ties go to the lowest index. The contract of
// kernels/kmeans_assign.py (its torch reference is the independent check).
//
// Ranking uses the expanded form (the per-block constant sum_j imp_j w_j^2 does not change the
// argmin), as a small GEMM per tile with a running (min, argmin):
//   no importance, or importance constant over blocks (stride 0 over N):
//     score[n, k] = q[k] + sum_j W[j, n] C[k, j],  W = w, C = -2 imp c, q = sum_j imp c^2
//   importance per block: the quadratic term varies with n, so it joins the product:
//     score[n, k] = sum_{j < 2d} W[j, n] C[k, j],  W = [imp w, imp], C = [-2 c, c^2]
// Near-ties that fp32 rounding of the expanded form reorders may pick a different, equally near
// centroid; the distance returned is always the exact one of the centroid chosen.
//
// Layout. Blocks are vectorised over lanes: a tile of NV x 16 blocks of one scope is transposed
// into W [DP][NV][16] and held in registers for the whole sweep over the scope's K centroids;
// each centroid k costs DP broadcast loads of C[k, :] and NV * DP vector FMAs, then a compare /
// min / blend per vector keeps each lane's running minimum (strict <, k ascending: the lowest
// index wins ties, no horizontal reduction). DP (d or 2d, rounded up to a power of two with zero
// padding) and NV are compile-time; the loop is cloned for AVX-512 / AVX2+FMA / baseline and
// picked at load time. Tiles are spread over threads with at::parallel_for; each thread builds
// C and q of the scope it is working on in a private buffer.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace physkern {
namespace {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PHYSKERN_KM_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PHYSKERN_KM_CLONES
#endif
#define PHYSKERN_INLINE inline __attribute__((always_inline))

struct Strided3 {  // a float32 [S, N, d] view with arbitrary strides
  const float* p;
  int64_t s0, s1, s2;
  PHYSKERN_INLINE float operator()(int64_t a, int64_t b, int64_t c) const {
    return p[a * s0 + b * s1 + c * s2];
  }
};

struct Problem {
  Strided3 w, c, imp;
  bool has_imp;
  bool per_block;   // importance varies over blocks: the 2d-wide product form
  int64_t S, N, K, d;
  int dp;           // product width actually used (power of two >= d or 2d, or exact if > 32)
  int nv;           // vectors of 16 blocks per tile
  int64_t tiles_per_scope;
  int64_t* idx;
  float* dist;
};

// C [K][dp] (zero padded) and q [K] of scope s. q is unused (left empty) in the per-block form.
// Inlined into each instruction-set clone; the contiguous case (the usual one) has unit-stride
// inner loops the compiler vectorises.
PHYSKERN_INLINE void build_scope_operands(const Problem& p, int64_t s, std::vector<float>& C,
                                          std::vector<float>& q) {
  const int64_t K = p.K, d = p.d, dp = p.dp;
  C.resize(static_cast<size_t>(K * dp));
  float* __restrict Cp = C.data();
  const float* cs = p.c.p + s * p.c.s0;
  const int64_t cs1 = p.c.s1, cs2 = p.c.s2;
  if (p.per_block) {
    q.clear();
    for (int64_t k = 0; k < K; ++k) {
      float* __restrict ck = Cp + k * dp;
      const float* src = cs + k * cs1;
      if (cs2 == 1) {
        for (int64_t j = 0; j < d; ++j) ck[j] = -2.0f * src[j];
        for (int64_t j = 0; j < d; ++j) ck[d + j] = src[j] * src[j];
      } else {
        for (int64_t j = 0; j < d; ++j) ck[j] = -2.0f * src[j * cs2];
        for (int64_t j = 0; j < d; ++j) ck[d + j] = src[j * cs2] * src[j * cs2];
      }
      for (int64_t j = 2 * d; j < dp; ++j) ck[j] = 0.0f;
    }
    return;
  }
  q.resize(static_cast<size_t>(K));
  float sdim[64];  // importance of scope s per dimension (d <= 64), or a run-time buffer
  std::vector<float> sdim_big;
  float* sv = sdim;
  if (d > 64) {
    sdim_big.resize(static_cast<size_t>(d));
    sv = sdim_big.data();
  }
  for (int64_t j = 0; j < d; ++j) sv[j] = p.has_imp ? p.imp(s, 0, j) : 1.0f;
  for (int64_t k = 0; k < K; ++k) {
    float* __restrict ck = Cp + k * dp;
    const float* src = cs + k * cs1;
    float acc = 0.0f;
    if (cs2 == 1) {
      for (int64_t j = 0; j < d; ++j) {
        const float sc = sv[j] * src[j];
        ck[j] = -2.0f * sc;
        acc += sc * src[j];
      }
    } else {
      for (int64_t j = 0; j < d; ++j) {
        const float sc = sv[j] * src[j * cs2];
        ck[j] = -2.0f * sc;
        acc += sc * src[j * cs2];
      }
    }
    for (int64_t j = d; j < dp; ++j) ck[j] = 0.0f;
    q[k] = acc;
  }
}

// W [dp][nv * 16] of the tile's blocks n0 .. n0 + nv * 16 (lanes past N are zero).
PHYSKERN_INLINE void build_tile(const Problem& p, int64_t s, int64_t n0, float* W) {
  const int64_t width = static_cast<int64_t>(p.nv) * kLanes;
  std::fill(W, W + p.dp * width, 0.0f);
  const int64_t n_end = std::min(p.N, n0 + width);
  for (int64_t n = n0; n < n_end; ++n) {
    const int64_t lane = n - n0;
    for (int64_t j = 0; j < p.d; ++j) {
      const float wv = p.w(s, n, j);
      if (p.per_block) {
        const float sv = p.imp(s, n, j);
        W[j * width + lane] = sv * wv;
        W[(p.d + j) * width + lane] = sv;
      } else {
        W[j * width + lane] = wv;
      }
    }
  }
}

// The hot loop: each lane's argmin over k of q[k] + sum_j W[j][lane] * C[k][j].
// DP == 0: run-time width (W read from memory); otherwise compile-time, W in registers.
template <int DP, int NV, bool HAS_Q>
PHYSKERN_INLINE void tile_argmin(const float* __restrict W, const float* __restrict C,
                                 const float* __restrict q, int64_t K, int dp_rt,
                                 int32_t* __restrict out) {
  constexpr int width = NV * kLanes;
  const int dp = DP > 0 ? DP : dp_rt;
  vfloat best[NV];
  vint bidx[NV];
  for (int v = 0; v < NV; ++v) {
    best[v] = vfloat{} + std::numeric_limits<float>::infinity();
    bidx[v] = vint{};
  }
  if constexpr (DP > 0) {
    vfloat w[DP][NV];
    for (int j = 0; j < DP; ++j)
      for (int v = 0; v < NV; ++v)
        __builtin_memcpy(&w[j][v], W + j * width + v * kLanes, sizeof(vfloat));
    for (int64_t k = 0; k < K; ++k) {
      const float* ck = C + k * DP;
      vfloat acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = HAS_Q ? (vfloat{} + q[k]) + w[0][v] * ck[0]
                                                  : w[0][v] * ck[0];
      if constexpr (DP >= 8) {
        // Two partial sums halve the FMA dependency chain.
        vfloat acc2[NV];
        for (int v = 0; v < NV; ++v) acc2[v] = w[1][v] * ck[1];
        for (int j = 2; j < DP; j += 2)
          for (int v = 0; v < NV; ++v) {
            acc[v] += w[j][v] * ck[j];
            acc2[v] += w[j + 1][v] * ck[j + 1];
          }
        for (int v = 0; v < NV; ++v) acc[v] += acc2[v];
      } else {
        for (int j = 1; j < DP; ++j)
          for (int v = 0; v < NV; ++v) acc[v] += w[j][v] * ck[j];
      }
      const vint kv = vint{} + static_cast<int32_t>(k);
      for (int v = 0; v < NV; ++v) {
        const vint better = acc[v] < best[v];
        best[v] = better ? acc[v] : best[v];
        bidx[v] = better ? kv : bidx[v];
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const float* ck = C + k * dp;
      vfloat acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = HAS_Q ? vfloat{} + q[k] : vfloat{};
      for (int j = 0; j < dp; ++j)
        for (int v = 0; v < NV; ++v) {
          vfloat wv;
          __builtin_memcpy(&wv, W + j * width + v * kLanes, sizeof(vfloat));
          acc[v] += wv * ck[j];
        }
      const vint kv = vint{} + static_cast<int32_t>(k);
      for (int v = 0; v < NV; ++v) {
        const vint better = acc[v] < best[v];
        best[v] = better ? acc[v] : best[v];
        bidx[v] = better ? kv : bidx[v];
      }
    }
  }
  for (int v = 0; v < NV; ++v) __builtin_memcpy(out + v * kLanes, &bidx[v], sizeof(vint));
}

template <int DP, int NV>
PHYSKERN_INLINE void tile_argmin_q(bool has_q, const float* W, const float* C, const float* q,
                                   int64_t K, int dp_rt, int32_t* out) {
  if (has_q) {
    tile_argmin<DP, NV, true>(W, C, q, K, dp_rt, out);
  } else {
    tile_argmin<DP, NV, false>(W, C, q, K, dp_rt, out);
  }
}

// Largest vectors per tile for a product width DP: W (DP x NV vectors) should stay in the 32
// vector registers of AVX-512. (Measured on Zen 5, 3072 scopes of 96 blocks, K = 64: DP = 8
// runs alike with 2 or 3 vectors; DP = 16 is faster with 2 vectors, partly spilled, than 1.)
constexpr int max_vectors_for(int dp) { return dp <= 4 ? 4 : (dp <= 16 ? 2 : 1); }

template <int DP>
PHYSKERN_INLINE void tile_argmin_nv(int nv, bool has_q, const float* W, const float* C,
                                    const float* q, int64_t K, int dp_rt, int32_t* out) {
  constexpr int kMax = max_vectors_for(DP > 0 ? DP : 64);
  if constexpr (kMax >= 4) {
    if (nv == 4) return tile_argmin_q<DP, 4>(has_q, W, C, q, K, dp_rt, out);
    if (nv == 3) return tile_argmin_q<DP, 3>(has_q, W, C, q, K, dp_rt, out);
  }
  if constexpr (kMax >= 2) {
    if (nv == 2) return tile_argmin_q<DP, 2>(has_q, W, C, q, K, dp_rt, out);
  }
  tile_argmin_q<DP, 1>(has_q, W, C, q, K, dp_rt, out);
}

// One instruction-set clone: every tile in [t_begin, t_end).
PHYSKERN_KM_CLONES void assign_tiles(const Problem& p, int64_t t_begin, int64_t t_end,
                                     std::vector<float>& C, std::vector<float>& q,
                                     int64_t& built_scope, float* W, int32_t* tile_idx) {
  const int64_t width = static_cast<int64_t>(p.nv) * kLanes;
  const bool has_q = !p.per_block;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t s = t / p.tiles_per_scope;
    const int64_t n0 = (t % p.tiles_per_scope) * width;
    if (s != built_scope) {
      build_scope_operands(p, s, C, q);
      built_scope = s;
    }
    build_tile(p, s, n0, W);
    const float* qp = has_q ? q.data() : nullptr;
    switch (p.dp) {
      case 1: tile_argmin_nv<1>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
      case 2: tile_argmin_nv<2>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
      case 4: tile_argmin_nv<4>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
      case 8: tile_argmin_nv<8>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
      case 16: tile_argmin_nv<16>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
      case 32: tile_argmin_nv<32>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
      default: tile_argmin_nv<0>(p.nv, has_q, W, C.data(), qp, p.K, p.dp, tile_idx); break;
    }
    // Exact distance of the chosen centroid, in the reference's order and rounding.
    const int64_t n_end = std::min(p.N, n0 + width);
    for (int64_t n = n0; n < n_end; ++n) {
      p.idx[s * p.N + n] = tile_idx[n - n0];
    }
  }
}

// Exact distances, kept out of the cloned (FMA-contracting) code: no fused multiply-add, so each
// operation rounds as the torch reference's does.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
__attribute__((noinline)) void exact_distances(const Problem& p, int64_t t_begin, int64_t t_end) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t width = static_cast<int64_t>(p.nv) * kLanes;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t s = t / p.tiles_per_scope;
    const int64_t n0 = (t % p.tiles_per_scope) * width;
    const int64_t n_end = std::min(p.N, n0 + width);
    for (int64_t n = n0; n < n_end; ++n) {
      const int64_t k = p.idx[s * p.N + n];
      float acc = 0.0f;
      for (int64_t j = 0; j < p.d; ++j) {
        const float diff = p.w(s, n, j) - p.c(s, k, j);
        float t2 = diff * diff;
        if (p.has_imp) t2 = p.imp(s, n, j) * t2;
        acc += t2;
      }
      p.dist[s * p.N + n] = acc;
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

int padded_width(int64_t width) {
  for (int w : {1, 2, 4, 8, 16, 32})
    if (width <= w) return w;
  return static_cast<int>(width);
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& blocks,
                                                     const at::Tensor& centroids,
                                                     const std::optional<at::Tensor>& importance) {
  TORCH_CHECK_VALUE(blocks.dim() == 3, "kmeans_assign_cpu: blocks must be [n_scopes, n_blocks, d], got shape ",
                    blocks.sizes());
  TORCH_CHECK_VALUE(centroids.dim() == 3, "kmeans_assign_cpu: centroids must be [n_scopes, K, d], got shape ",
                    centroids.sizes());
  const int64_t S = blocks.size(0), N = blocks.size(1), d = blocks.size(2);
  TORCH_CHECK_VALUE(centroids.size(0) == S && centroids.size(2) == d, "kmeans_assign_cpu: centroids ",
                    centroids.sizes(), " do not match blocks ", blocks.sizes(),
                    ": need the same n_scopes and d");
  const int64_t K = centroids.size(1);
  TORCH_CHECK_VALUE(K >= 1, "kmeans_assign_cpu: centroids must hold at least one centroid per scope (K >= 1)");
  TORCH_CHECK_VALUE(K <= std::numeric_limits<int32_t>::max(), "kmeans_assign_cpu: K must be < 2^31, got ", K);
  TORCH_CHECK_VALUE(d >= 1, "kmeans_assign_cpu: block dim d must be >= 1");
  TORCH_CHECK_VALUE(blocks.is_floating_point() && centroids.is_floating_point(),
                    "kmeans_assign_cpu: blocks and centroids must be floating point, got ",
                    blocks.scalar_type(), ", ", centroids.scalar_type());
  TORCH_CHECK_VALUE(blocks.device().is_cpu() && centroids.device().is_cpu(),
                    "kmeans_assign_cpu: blocks and centroids must be CPU tensors, got ",
                    blocks.device(), " and ", centroids.device());
  const at::Tensor w = blocks.to(at::kFloat);
  const at::Tensor c = centroids.to(at::kFloat);
  at::Tensor imp;
  if (importance.has_value()) {
    TORCH_CHECK_VALUE(importance->is_floating_point(),
                      "kmeans_assign_cpu: importance must be floating point, got ",
                      importance->scalar_type());
    TORCH_CHECK_VALUE(importance->device().is_cpu(), "kmeans_assign_cpu: importance must be a CPU tensor");
    TORCH_CHECK_VALUE(importance->dim() <= 3, "kmeans_assign_cpu: importance ", importance->sizes(),
                      " is not broadcastable to blocks ", blocks.sizes());
    // expand() gives stride 0 on broadcast dims; convert first so the stride-0 view survives.
    imp = importance->to(at::kFloat).expand({S, N, d});
  }
  at::Tensor idx = at::empty({S, N}, blocks.options().dtype(at::kLong));
  at::Tensor dist = at::empty({S, N}, blocks.options().dtype(at::kFloat));
  if (S == 0 || N == 0) return {idx, dist};

  Problem p;
  p.w = {w.const_data_ptr<float>(), w.stride(0), w.stride(1), w.stride(2)};
  p.c = {c.const_data_ptr<float>(), c.stride(0), c.stride(1), c.stride(2)};
  p.has_imp = imp.defined();
  p.imp = p.has_imp ? Strided3{imp.const_data_ptr<float>(), imp.stride(0), imp.stride(1), imp.stride(2)}
                    : Strided3{nullptr, 0, 0, 0};
  p.per_block = p.has_imp && N > 1 && imp.stride(1) != 0;
  p.S = S;
  p.N = N;
  p.K = K;
  p.d = d;
  p.dp = padded_width(p.per_block ? 2 * d : d);
  const int64_t nvec = (N + kLanes - 1) / kLanes;
  // Fewest padded vectors first, then the widest tile (more blocks share each C load).
  int nv = 1;
  for (int cand = 1; cand <= max_vectors_for(p.dp); ++cand) {
    const int64_t pad_c = (nvec + cand - 1) / cand * cand, pad_b = (nvec + nv - 1) / nv * nv;
    if (pad_c <= pad_b) nv = cand;
  }
  p.nv = nv;
  p.tiles_per_scope = (nvec + nv - 1) / nv;
  p.idx = idx.data_ptr<int64_t>();
  p.dist = dist.data_ptr<float>();

  const int64_t tiles = S * p.tiles_per_scope;
  const int64_t work_per_tile = K * p.dp * nv * kLanes;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, work_per_tile));
  at::parallel_for(0, tiles, grain, [&](int64_t t_begin, int64_t t_end) {
    std::vector<float> C, q;
    std::vector<float> W(static_cast<size_t>(p.dp) * nv * kLanes);
    std::vector<int32_t> tile_idx(static_cast<size_t>(nv) * kLanes);
    int64_t built_scope = -1;
    assign_tiles(p, t_begin, t_end, C, q, built_scope, W.data(), tile_idx.data());
    exact_distances(p, t_begin, t_end);
  });
  return {idx, dist};
}

}  // namespace
}  // namespace physkern

TORCH_LIBRARY_FRAGMENT(physkern, m) {
  m.def("kmeans_assign_cpu(Tensor blocks, Tensor centroids, Tensor? importance) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(physkern, CPU, m) {
  m.impl("kmeans_assign_cpu", &physkern::kmeans_assign_cpu);
}
