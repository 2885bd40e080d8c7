// Merge of a frozen PIA into the linear layers that read it (EAS_SPEC §4), CUDA.
//
// Per target W (out x d, storage type T), with W_u (r x d), β (d), W_d1 (r x d) of its site
// (MergeTarget::site) in fp32 — the same math and order of operations as csrc/cpu/merge.h:
//
//   Q  = W [W_u; β]ᵀ          (out x (r+1)), dots_kernel: P = Q[:, :r], W βᵀ = Q[:, r]
//                             (or factors_kernel, from the target's factors and the site's
//                             mix: P = α₁ A + α₂ C, Q[:, r] = P cᵀ + α₁ a₁ + α₂ a₂)
//   W' = round(W + Δ),  Δ = Σ_k P[:, k] W_d1[k, :] summed from zero, k ascending, fmaf
//   b' = round(b + W βᵀ)
//
// W is only read, twice (steps 1 and 3); W' goes to the target's `merged` buffer
// (MergeTarget).
// 1. dots_kernel: Q and the row maxima max_j |W[o, j]| in one read of W (for a target with
//    factors: factors_kernel for Q, and row_max_kernel for the maxima alone, Inf for a row
//    that is not finite);
//    down_max_kernel: max_j |W_d1[k, j]|, Inf if row k is not finite;
// 2. check_kernel, one warp per row: finite Q row and b', and W' finite — cleared by the
//    bound max|W_o| + Σ_k |P_ok| max|W_d1[k, :]| < max_finite(T) / 2, else computed and
//    scanned (the only other read of a row of W, for rows near the overflow); the host
//    reads one flag per target (one stream synchronisation);
// 3. only if no target was refused, update_kernel: W' into `merged`, tiles of 32 rows x 128
//    columns with P and W_d1 staged in shared memory.
// Before step 1 the grids of all three steps, for every target, are checked against the
// device limits (std::invalid_argument) and every kernel is loaded, so that step 3 cannot
// fail to launch for its configuration after an earlier target was computed.
// Scratch (device, fp32): Σ out·(r+1) for Q, Σ out for the maxima, Σ over sites of r for
// the down projections' maxima, and one int per target.
#include <string>
#include <vector>

#include "common.cuh"
#include "dots.cuh"
#include "launch.h"

namespace eas::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void down_max_kernel(const float* __restrict__ down, int64_t d, float* __restrict__ out) {
  __shared__ float partial[kThreads / 32];
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const float* row = down + static_cast<int64_t>(blockIdx.x) * d;
  float m = 0.0f;
  for (int64_t j = threadIdx.x; j < d; j += kThreads) {
    if (!isfinite(row[j])) bad = 1;
    m = fmaxf(m, fabsf(row[j]));
  }
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads / 32; ++i) m = fmaxf(m, partial[i]);
    out[blockIdx.x] = bad ? INFINITY : m;
  }
}

// Q (out x (r + 1)) from the factors Fᵀ (out x (2r + 2)) and mix = (α₁, α₂, c), one thread
// per row, in the order of operations of csrc/cpu/merge.h's q_from_factors.
__global__ void factors_kernel(const float* __restrict__ factors, const float* __restrict__ mix,
                               int64_t out, int64_t r, float* __restrict__ q) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= out) return;
  const float a1 = mix[0], a2 = mix[1];
  const float* f = factors + row * (2 * r + 2);
  float* qr = q + row * (r + 1);
  float bias = 0.0f;
  for (int64_t k = 0; k < r; ++k) {
    const float p = fmaf(a2, f[r + k], a1 * f[k]);
    qr[k] = p;
    bias = fmaf(p, mix[2 + k], bias);
  }
  qr[r] = fmaf(a2, f[2 * r + 1], fmaf(a1, f[2 * r], bias));
}

// maxima[o] = max_j |W[o, j]|, Inf if row o is not finite; one warp per row.
template <class T>
__global__ void row_max_kernel(const T* __restrict__ w, int64_t ld, int64_t out, int64_t d,
                               float* __restrict__ maxima) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= out) return;
  const T* wr = w + row * ld;
  float m = 0.0f;
  bool finite = true;
  for (int64_t c = lane; c < d; c += 32) {
    const float v = to_float(wr[c]);
    finite = finite && isfinite(v);
    m = fmaxf(m, fabsf(v));
  }
  for (int offset = 16; offset > 0; offset /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
  finite = __all_sync(0xffffffffu, finite);
  if (lane == 0) maxima[row] = finite ? m : INFINITY;
}

template <class T>
__global__ void check_kernel(const T* __restrict__ w, int64_t ld, int64_t out, int64_t d, int64_t r,
                             const T* __restrict__ bias, T* __restrict__ new_bias,
                             const float* __restrict__ q, const float* __restrict__ maxima,
                             const float* __restrict__ down, const float* __restrict__ down_max,
                             int* __restrict__ refused) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= out) return;
  const float* qr = q + row * (r + 1);
  bool ok = true;
  double bound = 0.0;
  for (int64_t k = lane; k <= r; k += 32) {
    ok = ok && isfinite(qr[k]);
    if (k < r) bound += fabs(static_cast<double>(qr[k])) * static_cast<double>(down_max[k]);
  }
  for (int offset = 16; offset > 0; offset /= 2) bound += __shfl_xor_sync(0xffffffffu, bound, offset);
  bound += maxima[row];
  int bias_ok = 1;
  if (lane == 0) {
    const float b = bias != nullptr ? to_float(bias[row]) : 0.0f;
    const T nb = from_float<T>(b + qr[r]);
    new_bias[row] = nb;
    bias_ok = isfinite(to_float(nb));
  }
  bias_ok = __shfl_sync(0xffffffffu, bias_ok, 0);
  ok = __all_sync(0xffffffffu, ok) && bias_ok;
  if (ok && !(bound < Limits<T>::half_max)) {  // not cleared by the bound: compute the row
    const T* wr = w + row * ld;
    for (int64_t c = lane; c < d; c += 32) {
      float delta = 0.0f;
      for (int64_t k = 0; k < r; ++k) delta = fmaf(qr[k], down[k * d + c], delta);
      ok = ok && isfinite(to_float(from_float<T>(to_float(wr[c]) + delta)));
    }
    ok = __all_sync(0xffffffffu, ok);
  }
  if (!ok && lane == 0) *refused = 1;
}

constexpr int kRows = 32, kCols = 128, kRankChunk = 32;

template <class T>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const T* __restrict__ w, int64_t ld, T* __restrict__ merged, int64_t out,
                  int64_t d, int64_t r, const float* __restrict__ q,
                  const float* __restrict__ down) {
  __shared__ float ps[kRows][kRankChunk + 1];
  __shared__ float ds[kRankChunk][kCols];
  const int col = threadIdx.x % kCols, group = threadIdx.x / kCols;  // 2 groups of rows
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCols;
  float delta[kRows / 2] = {};
  for (int64_t k0 = 0; k0 < r; k0 += kRankChunk) {
    for (int e = threadIdx.x; e < kRows * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk, kk = e % kRankChunk;
      ps[i][kk] = (r0 + i < out && k0 + kk < r) ? q[(r0 + i) * (r + 1) + k0 + kk] : 0.0f;
    }
    for (int e = threadIdx.x; e < kRankChunk * kCols; e += kThreads) {
      const int kk = e / kCols, cc = e % kCols;
      ds[kk][cc] = (k0 + kk < r && c0 + cc < d) ? down[(k0 + kk) * d + c0 + cc] : 0.0f;
    }
    __syncthreads();
    const int chunk = static_cast<int>(r - k0 < kRankChunk ? r - k0 : kRankChunk);
    for (int kk = 0; kk < chunk; ++kk) {
      const float dv = ds[kk][col];
#pragma unroll
      for (int i = 0; i < kRows / 2; ++i) delta[i] = fmaf(ps[group + 2 * i][kk], dv, delta[i]);
    }
    __syncthreads();
  }
  if (c0 + col >= d) return;
#pragma unroll
  for (int i = 0; i < kRows / 2; ++i) {
    const int64_t row = r0 + group + 2 * i;
    if (row < out)
      merged[row * d + c0 + col] = from_float<T>(to_float(w[row * ld + c0 + col]) + delta[i]);
  }
}

std::string target_shape(int t, const MergeTarget& tg, int64_t d, int64_t r) {
  return "target " + std::to_string(t) + " (out " + std::to_string(tg.out) + ", d " +
         std::to_string(d) + ", rank " + std::to_string(r) + ")";
}

// The grids of one call's launches (phases 1-3, every site and target), all checked against
// the device limits (std::invalid_argument) before anything is launched.
struct MergeGrids {
  std::vector<dim3> down_max;            // per site
  std::vector<DotsLaunch> dots;          // per target
  std::vector<dim3> factors, check, update;  // per target
};

MergeGrids merge_grids(const MergeArgs& a) {
  const int64_t d = a.d;
  const size_t element = a.dtype == kFloat32 ? 4 : 2;
  if (a.num_targets < 1 || a.num_sites < 1) throw std::invalid_argument("merge: no target");
  MergeGrids g;
  for (int s = 0; s < a.num_sites; ++s) {
    const int64_t r = a.sites[s].rank;
    g.down_max.push_back(grid_of(r, 1, 1, "merge", "down_max_kernel",
                                 "d " + std::to_string(d) + ", rank " + std::to_string(r)));
  }
  for (int t = 0; t < a.num_targets; ++t) {
    const MergeTarget& tg = a.targets[t];
    const int64_t r = a.sites[tg.site].rank;
    const std::string shape = target_shape(t, tg, d, r);
    g.dots.push_back(dots_launch(tg.weight, tg.ld, element, tg.out, r + 1, "merge", shape));
    g.factors.push_back(grid_of(blocks(tg.out, kThreads), 1, 1, "merge", "factors_kernel", shape));
    g.check.push_back(
        grid_of(blocks(tg.out, kThreads / 32), 1, 1, "merge", "check_kernel", shape));
    // row tiles along y: out <= 65535 * kRows = 2,097,120
    g.update.push_back(
        grid_of(blocks(d, kCols), blocks(tg.out, kRows), 1, "merge", "update_kernel", shape));
  }
  return g;
}

template <class T>
int merge_typed(const MergeArgs& a, const MergeGrids& grids, cudaStream_t stream) {
  const int64_t d = a.d;
  // Every kernel loaded before the first launch (the grids were checked by merge_grids), so
  // that no launch of phase 3 fails after an earlier target was computed.
  preload(down_max_kernel, kThreads, "merge: loading down_max_kernel");
  preload_dots<T>("merge: loading dots_kernel");
  preload(factors_kernel, kThreads, "merge: loading factors_kernel");
  preload(row_max_kernel<T>, kThreads, "merge: loading row_max_kernel");
  preload(check_kernel<T>, kThreads, "merge: loading check_kernel");
  preload(update_kernel<T>, kThreads, "merge: loading update_kernel");

  // Scratch layout: Q of every target (out x (r + 1) each), the row maxima (Σ out), the
  // down maxima of every site (r each), the refusal flags (one int per target).
  std::vector<int64_t> q_of(a.num_targets), row_of(a.num_targets), down_of(a.num_sites);
  int64_t q_floats = 0, rows = 0, ranks = 0;
  for (int t = 0; t < a.num_targets; ++t) {
    q_of[t] = q_floats;
    row_of[t] = rows;
    q_floats += a.targets[t].out * (a.sites[a.targets[t].site].rank + 1);
    rows += a.targets[t].out;
  }
  for (int s = 0; s < a.num_sites; ++s) {
    down_of[s] = ranks;
    ranks += a.sites[s].rank;
  }
  float* q = a.scratch;
  float* maxima = q + q_floats;
  float* down_max = maxima + rows;
  int* refused = reinterpret_cast<int*>(down_max + ranks);
  check(cudaMemsetAsync(refused, 0, sizeof(int) * a.num_targets, stream),
        "merge: cudaMemsetAsync");
  for (int s = 0; s < a.num_sites; ++s) {
    down_max_kernel<<<grids.down_max[s], kThreads, 0, stream>>>(a.sites[s].down, d,
                                                                 down_max + down_of[s]);
    check(cudaGetLastError(), "merge: launching down_max_kernel");
  }
  for (int t = 0; t < a.num_targets; ++t) {
    const MergeTarget& tg = a.targets[t];
    const MergeSite& site = a.sites[tg.site];
    const int64_t r = site.rank;
    const T* w = static_cast<const T*>(tg.weight);
    float* q_t = q + q_of[t];
    if (tg.factors == nullptr) {
      launch_dots<T>(grids.dots[t], w, tg.ld, tg.out, site.up, r + 1, d, q_t, r + 1, 1,
                     maxima + row_of[t], stream);
    } else {
      factors_kernel<<<grids.factors[t], kThreads, 0, stream>>>(tg.factors, site.mix, tg.out, r,
                                                                 q_t);
      row_max_kernel<T><<<grids.check[t], kThreads, 0, stream>>>(w, tg.ld, tg.out, d,
                                                                  maxima + row_of[t]);
    }
    check_kernel<T><<<grids.check[t], kThreads, 0, stream>>>(
        w, tg.ld, tg.out, d, r, static_cast<const T*>(tg.bias), static_cast<T*>(tg.new_bias), q_t,
        maxima + row_of[t], site.down, down_max + down_of[tg.site], refused + t);
    if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess)
      check(status, ("merge: launching phases 1-2 of " + target_shape(t, tg, d, r)).c_str());
  }
  std::vector<int> host(a.num_targets);
  check(cudaMemcpyAsync(host.data(), refused, sizeof(int) * a.num_targets, cudaMemcpyDeviceToHost,
                        stream),
        "merge: cudaMemcpyAsync");
  check(cudaStreamSynchronize(stream), "merge: phases 1-2");
  for (int t = 0; t < a.num_targets; ++t)
    if (host[t]) return t;
  for (int t = 0; t < a.num_targets; ++t) {
    const MergeTarget& tg = a.targets[t];
    const MergeSite& site = a.sites[tg.site];
    update_kernel<T><<<grids.update[t], kThreads, 0, stream>>>(
        static_cast<const T*>(tg.weight), tg.ld, static_cast<T*>(tg.merged), tg.out, d, site.rank,
        q + q_of[t], site.down);
    if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess)
      check(status, ("merge: launching phase 3 of " + target_shape(t, tg, d, site.rank) +
                     " (no weight was written: they are only read)")
                        .c_str());
  }
  return -1;
}

}  // namespace

int merge(const MergeArgs& args, int device, void* stream) {
  const MergeGrids grids = merge_grids(args);
  const DeviceGuard guard(device);
  return with_dtype(args.dtype, [&](auto tag) {
    return merge_typed<decltype(tag)>(args, grids, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace eas::cuda
