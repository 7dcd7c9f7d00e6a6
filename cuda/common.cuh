// Device helpers shared by the kernels: element types and their conversions to f32, and
// the DType -> C++ type dispatch used by the launchers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "pagedlm/dtype.h"

namespace pagedlm::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kPack = 16 / sizeof(T);

// kWidth consecutive elements from src to dst: one 16-byte access when they fill one (both
// pointers then 16-byte aligned: arrays declared alignas(16), global memory as its launcher
// checks with aligned16).
template <int kWidth, typename T>
__device__ __forceinline__ void copy_elements(T* dst, const T* src) {
  if constexpr (kWidth * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) dst[j] = src[j];
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 2^x on the special-function unit alone (ex2.approx.ftz). exp2f adds a fix-up of results under
// 2^-126, three more instructions per call: softmax weights that small count for nothing next to
// the row maximum's weight of 1, and the attention kernels take one per score.
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Non-finite attention scores, as the CPU path treats them (cpp/src/paged_prefill.cpp): a NaN or
// +inf among a row's visible scores leaves the softmax (the score becomes -inf) and is remembered,
// the worst kind per row; the row's output is then NaN, its lse NaN or +inf. -inf is an ordinary
// score of weight 0. kScoreNaN also stands for a row turned into NaN by a bad block id or length.
constexpr int kScoreFinite = 0, kScoreInf = 1, kScoreNaN = 2;
__device__ __forceinline__ int nonfinite_kind(float s) { return s < INFINITY ? kScoreFinite : s != s ? kScoreNaN : kScoreInf; }
// max that propagates NaN (max.NaN.f32, one instruction like fmaxf). The hot loops take their
// tiles' maxima with it, so a tile's non-finite scores show in its maximum alone:
// nonfinite_kind(tile max) is the worst kind among them, at no cost per score. (Such a row's
// output is NaN whatever its softmax state holds.)
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// Takes a visible score out of the softmax if it is NaN or +inf, noting its kind in `kind`.
__device__ __forceinline__ float screen_score(float s, int& kind) {
  const int k = nonfinite_kind(s);
  kind = max(kind, k);
  return k == kScoreFinite ? s : -INFINITY;
}
// The max of `kind` over the four lanes of a quad (the lanes holding one row of an mma tile).
__device__ __forceinline__ int quad_max(int kind) {
  kind = max(kind, __shfl_xor_sync(0xffffffffu, kind, 1));
  return max(kind, __shfl_xor_sync(0xffffffffu, kind, 2));
}
__device__ __forceinline__ float flagged_out(int kind, float out) { return kind == kScoreFinite ? out : NAN; }
__device__ __forceinline__ float flagged_lse(int kind, float lse) {
  return kind == kScoreNaN ? NAN : kind == kScoreInf ? INFINITY : lse;
}

// Calls fn(T{}) with T the element type of `dtype`.
template <typename Fn>
int dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{});
    case DType::f16: return fn(__half{});
    case DType::bf16: return fn(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace pagedlm::cuda
