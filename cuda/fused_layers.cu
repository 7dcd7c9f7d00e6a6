// CUDA path of the fused layers (cpp/include/pagedlm/fused_layers.h): one kernel where the
// unfused torch code launches several tiny ones. rms_norm and silu_and_mul are bound by launch
// latency at decode sizes and by memory bandwidth on prompt chunks (thousands of rows), so they
// move 16 bytes a thread per access where the rows and pointers allow it (the scalar kernels
// handle the rest), f32 in registers. Every product and sum that torch rounds separately is
// written with __fmul_rn / __fadd_rn, so nvcc does not contract it into an FMA that would
// round once.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace pagedlm::cuda {
namespace {

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// kWidth elements a thread per access: 1, or kPack<T> when hidden is a multiple of it
// and every pointer 16-byte aligned. Each thread touches the same elements
// i = (threadIdx.x + k * blockDim.x) * kWidth + j in both passes, so the residual it wrote in
// the first is what it reads in the second, and out may alias input.
template <typename T, bool kResidual, int kWidth>
__global__ void rms_norm_kernel(RMSNormParams p) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * p.hidden;
  const T* input = static_cast<const T*>(p.input) + base;
  T* residual = kResidual ? static_cast<T*>(p.residual) + base : nullptr;
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out) + base;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kWidth;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x * kWidth; i < p.hidden; i += step) {
    alignas(16) T x[kWidth], r[kWidth];
    copy_elements<kWidth>(x, input + i);
    if constexpr (kResidual) {
      copy_elements<kWidth>(r, residual + i);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) x[j] = from_float<T>(__fadd_rn(to_float(r[j]), to_float(x[j])));
      copy_elements<kWidth>(residual + i, x);
    }
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum = __fadd_rn(sum, __fmul_rn(to_float(x[j]), to_float(x[j])));
  }
  const float mean = block_sum(sum) / static_cast<float>(p.hidden);
  const float inv_rms = rsqrtf(__fadd_rn(mean, p.eps));
  for (int64_t i = threadIdx.x * kWidth; i < p.hidden; i += step) {
    alignas(16) T x[kWidth], w[kWidth];
    copy_elements<kWidth>(x, kResidual ? residual + i : input + i);
    copy_elements<kWidth>(w, weight + i);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float normed = to_float(from_float<T>(__fmul_rn(to_float(x[j]), inv_rms)));
      x[j] = from_float<T>(__fmul_rn(normed, to_float(w[j])));
    }
    copy_elements<kWidth>(out + i, x);
  }
}

// torch's silu on CUDA, x / (1 + exp(-x)) with the accurate expf, rounded to the dtype; then
// the product, rounded.
template <typename T>
__device__ __forceinline__ T silu_times(T gate, T up) {
  const float g = to_float(gate);
  const float silu = to_float(from_float<T>(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g)))));
  return from_float<T>(__fmul_rn(silu, to_float(up)));
}

// grid (rows, ceil(d / (blockDim.x * kWidth))): kWidth elements of out a thread (see rms_norm_kernel).
template <typename T, int kWidth>
__global__ void silu_and_mul_kernel(SiluAndMulParams p) {
  const int64_t i = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * kWidth;
  if (i >= p.d) return;
  const T* row = static_cast<const T*>(p.input) + static_cast<int64_t>(blockIdx.x) * 2 * p.d;
  alignas(16) T gate[kWidth], up[kWidth];
  copy_elements<kWidth>(gate, row + i);
  copy_elements<kWidth>(up, row + p.d + i);
#pragma unroll
  for (int j = 0; j < kWidth; ++j) gate[j] = silu_times(gate[j], up[j]);
  copy_elements<kWidth>(static_cast<T*>(p.out) + static_cast<int64_t>(blockIdx.x) * p.d + i, gate);
}

// One block per token: the token's cos and sin (head_dim / 2 each) go to shared memory once,
// then the block's threads rotate every (head, i) pair of its query and key heads (the query's
// into query_out when given).
template <typename T>
__global__ void apply_rope_kernel(RopeParams p) {
  extern __shared__ float cos_sin[];
  const int half = p.head_dim / 2;
  float* cos_t = cos_sin;
  float* sin_t = cos_sin + half;
  const int64_t t = blockIdx.x;
  const float position = static_cast<float>(p.positions[t]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(position, p.inv_freq[i]);
    cos_t[i] = cosf(angle);  // the accurate cosf and sinf, as torch's cos() and sin()
    sin_t[i] = sinf(angle);
  }
  __syncthreads();
  const int pairs = (p.num_heads + p.num_kv_heads) * half;
  for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
    const int head = j / half, i = j % half;
    const bool is_query = head < p.num_heads;
    T* x = is_query ? static_cast<T*>(p.query) + t * p.query_token_stride + head * p.query_head_stride
                    : static_cast<T*>(p.key) + t * p.key_token_stride + (head - p.num_heads) * p.key_head_stride;
    T* out = is_query && p.query_out != nullptr
                 ? static_cast<T*>(p.query_out) + (t * p.num_heads + head) * p.head_dim
                 : x;
    const float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
    out[i] = from_float<T>(__fsub_rn(__fmul_rn(x1, cos_t[i]), __fmul_rn(x2, sin_t[i])));
    out[half + i] = from_float<T>(__fadd_rn(__fmul_rn(x2, cos_t[i]), __fmul_rn(x1, sin_t[i])));
  }
}

}  // namespace

int rms_norm(const RMSNormParams& p, void* stream) {
  if (p.rows == 0) return 0;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const bool packed = p.hidden % kPack<T> == 0 && aligned16(p.input) && aligned16(p.weight) && aligned16(p.out) &&
                        (p.residual == nullptr || aligned16(p.residual));
    // A pack a thread (else about four elements), in whole warps, at most 1024 threads.
    const int64_t units = packed ? p.hidden / kPack<T> : p.hidden / 4;
    const int64_t threads = std::min<int64_t>(1024, std::max<int64_t>(32, (units + 31) / 32 * 32));
    auto kernel = packed ? (p.residual ? rms_norm_kernel<T, true, kPack<T>> : rms_norm_kernel<T, false, kPack<T>>)
                         : (p.residual ? rms_norm_kernel<T, true, 1> : rms_norm_kernel<T, false, 1>);
    kernel<<<static_cast<unsigned>(p.rows), static_cast<unsigned>(threads), 0,
             static_cast<cudaStream_t>(stream)>>>(p);
    return static_cast<int>(cudaGetLastError());
  });
}

int silu_and_mul(const SiluAndMulParams& p, void* stream) {
  if (p.rows == 0 || p.d == 0) return 0;
  const int64_t threads = 256;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    const bool packed = p.d % kPack<T> == 0 && aligned16(p.input) && aligned16(p.out);
    const int64_t width = packed ? kPack<T> : 1;
    const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>((p.d + threads * width - 1) / (threads * width)));
    auto kernel = packed ? silu_and_mul_kernel<T, kPack<T>> : silu_and_mul_kernel<T, 1>;
    kernel<<<grid, static_cast<unsigned>(threads), 0, static_cast<cudaStream_t>(stream)>>>(p);
    return static_cast<int>(cudaGetLastError());
  });
}

int apply_rope(const RopeParams& p, void* stream) {
  if (p.tokens == 0) return 0;
  const size_t shared = sizeof(float) * p.head_dim;  // cos and sin, head_dim / 2 each
  return dispatch_dtype(p.dtype, [&](auto t) {
    apply_rope_kernel<decltype(t)><<<static_cast<unsigned>(p.tokens), 256, shared,
                                     static_cast<cudaStream_t>(stream)>>>(p);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace pagedlm::cuda
