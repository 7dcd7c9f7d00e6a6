// CUDA path of argmax_logprob (cpp/include/pagedlm/sampling.h): a thread block per row, two
// passes over it (the row's maximum and its index, then the sum of exponentials, which rereads
// the row from L1/L2). One kernel where torch launches four; the sum is accumulated in f32.
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 256;

// A candidate for a row's argmax: its value and index (-1: none yet).
struct Best {
  float value;
  int64_t index;
};

// The better of two candidates: a NaN beats any number (as torch.argmax), then the larger
// value, then on a tie the smaller index.
__device__ __forceinline__ Best better(Best a, Best b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  const bool nan_a = isnan(a.value), nan_b = isnan(b.value);
  if (nan_a != nan_b) return nan_a ? a : b;
  if (nan_a || a.value == b.value) return a.index < b.index ? a : b;
  return a.value > b.value ? a : b;
}

template <typename Combine, typename V>
__device__ V block_reduce(V v, Combine combine, V* partial) {
  for (int offset = 16; offset > 0; offset /= 2) {
    V other;
    if constexpr (sizeof(V) == sizeof(float)) {
      other = __shfl_xor_sync(0xffffffffu, v, offset);
    } else {
      other.value = __shfl_xor_sync(0xffffffffu, v.value, offset);
      other.index = __shfl_xor_sync(0xffffffffu, v.index, offset);
    }
    v = combine(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < kThreads / 32; ++w) v = combine(v, partial[w]);
  return v;
}

// kWidth elements a thread per access: 1, or kPack<T> when the rows are whole 16-byte packs and
// aligned (a row of a large vocabulary is bandwidth-bound: wide accesses keep more bytes in flight).
template <typename T, int kWidth>
__global__ void __launch_bounds__(kThreads) argmax_logprob_kernel(ArgmaxLogprobParams p) {
  __shared__ Best best_of_warp[kThreads / 32];
  __shared__ float sum_of_warp[kThreads / 32];
  const T* row = static_cast<const T*>(p.logits) + static_cast<int64_t>(blockIdx.x) * p.vocab;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kWidth;
  Best best{0.0f, -1};
  // Each thread meets its elements in increasing index order: a later one wins only if larger.
#pragma unroll 4
  for (int64_t i = threadIdx.x * kWidth; i < p.vocab; i += kStep) {
    alignas(16) T x[kWidth];
    copy_elements<kWidth>(x, row + i);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float v = to_float(x[j]);
      if (best.index < 0 || v > best.value || (isnan(v) && !isnan(best.value))) best = Best{v, i + j};
    }
  }
  best = block_reduce(best, better, best_of_warp);
  float sum = 0.0f;
  if (isfinite(best.value)) {  // uniform across the block
#pragma unroll 4
    for (int64_t i = threadIdx.x * kWidth; i < p.vocab; i += kStep) {
      alignas(16) T x[kWidth];
      copy_elements<kWidth>(x, row + i);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) sum += __expf(to_float(x[j]) - best.value);
    }
    sum = block_reduce(sum, [](float a, float b) { return a + b; }, sum_of_warp);
  }
  if (threadIdx.x == 0) {
    p.out[2 * blockIdx.x] = static_cast<double>(best.index);
    p.out[2 * blockIdx.x + 1] = isfinite(best.value) ? 0.0 - log(static_cast<double>(sum)) : NAN;  // +0.0, not -0.0
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
