// CUDA path of argmax_logprob (cpp/include/pagedlm/sampling.h): a thread block per row, one pass
// over it. Each thread keeps its best candidate and an online softmax sum (the sum of
// exp(x - m) over its elements, m their running maximum, rescaled when m grows); the block then
// merges the threads' states. One kernel where torch launches four; the sum is accumulated in f32.
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kLoads = 4;  // accesses a thread issues before it waits for the first

// What a thread knows of its part of a row: the argmax candidate (index -1: none yet) and the
// sum of exp(x - max) over its elements, max their largest (-inf while there is none).
struct RowState {
  float value;
  int64_t index;
  float max;
  float sum;
};

// sum * exp(max - to), counting nothing for a part with no finite maximum yet.
__device__ __forceinline__ float rescaled(float sum, float max, float to) {
  return max == -INFINITY ? 0.0f : sum * __expf(max - to);
}

// Two parts' states as one: a NaN candidate beats any number (as torch.argmax), then the larger
// value, then on a tie the smaller index; the sums meet at the larger maximum.
__device__ __forceinline__ RowState merge(const RowState& a, const RowState& b) {
  RowState r;
  const bool nan_a = isnan(a.value), nan_b = isnan(b.value);
  bool take_a;
  if (a.index < 0 || b.index < 0) take_a = b.index < 0;
  else if (nan_a != nan_b) take_a = nan_a;
  else if (nan_a || a.value == b.value) take_a = a.index < b.index;
  else take_a = a.value > b.value;
  r.value = take_a ? a.value : b.value;
  r.index = take_a ? a.index : b.index;
  r.max = fmaxf(a.max, b.max);
  r.sum = rescaled(a.sum, a.max, r.max) + rescaled(b.sum, b.max, r.max);
  return r;
}

__device__ RowState block_merge(RowState s, RowState* of_warp) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    RowState other;
    other.value = __shfl_xor_sync(0xffffffffu, s.value, offset);
    other.index = __shfl_xor_sync(0xffffffffu, s.index, offset);
    other.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    s = merge(s, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) of_warp[warp] = s;
  __syncthreads();
  s = of_warp[0];
  for (int w = 1; w < kThreads / 32; ++w) s = merge(s, of_warp[w]);
  return s;
}

// kWidth elements a thread per access: 1, or kPack<T> when the rows are whole 16-byte packs and
// aligned (a row of a large vocabulary is bandwidth-bound: wide accesses keep more bytes in flight).
template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) argmax_logprob_kernel(ArgmaxLogprobParams p) {
  __shared__ RowState of_warp[kThreads / 32];
  const T* row = static_cast<const T*>(p.logits) + static_cast<int64_t>(blockIdx.x) * p.vocab;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kWidth;
  RowState s{0.0f, -1, -INFINITY, 0.0f};
  // kLoads packs loaded before any is used, so that many accesses a thread are in flight. Each
  // thread meets its elements in increasing index order: a later one wins only if larger.
  for (int64_t first = threadIdx.x * kWidth; first < p.vocab; first += kLoads * kStep) {
    alignas(16) T x[kLoads][kWidth];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      if (first + u * kStep < p.vocab) copy_elements<kWidth>(x[u], row + first + u * kStep);
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t i = first + u * kStep;
      if (i >= p.vocab) break;
      float v[kWidth], pack_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        v[j] = to_float(x[u][j]);
        if (s.index < 0 || v[j] > s.value || (isnan(v[j]) && !isnan(s.value))) {
          s.value = v[j];
          s.index = i + j;
        }
        pack_max = fmaxf(pack_max, v[j]);  // NaNs aside: a NaN makes the result NaN anyway
      }
      if (pack_max > s.max) {  // once per pack, not per element
        s.sum = rescaled(s.sum, s.max, pack_max);
        s.max = pack_max;
      }
      if (s.max != -INFINITY) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) s.sum += __expf(v[j] - s.max);
      }
    }
  }
  s = block_merge(s, of_warp);
  if (threadIdx.x == 0) {
    p.out[2 * blockIdx.x] = static_cast<double>(s.index);
    p.out[2 * blockIdx.x + 1] = isfinite(s.value) ? 0.0 - log(static_cast<double>(s.sum)) : NAN;  // +0.0, not -0.0
  }
}

}  // namespace

int argmax_logprob(const ArgmaxLogprobParams& p, void* stream) {
  if (p.rows == 0) return 0;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const bool packed = p.vocab % kPack<T> == 0 && aligned16(p.logits);
    auto kernel = packed ? argmax_logprob_kernel<T, kPack<T>> : argmax_logprob_kernel<T, 1>;
    kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace pagedlm::cuda
