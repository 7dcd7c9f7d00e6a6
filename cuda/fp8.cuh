// FP8 KV caches on the device: reading a cache's scale and widening stored FP8 values. The
// widening is exact (every e4m3 and e5m2 value is an f16 and a bf16 value), so a kernel that
// widens to its query's 16-bit type and runs the tensor cores computes on the same numbers as
// the CPU path's stored * scale, with the scale applied outside the product.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace pagedlm::cuda {

// The scale of kv head `kv_head`: one value for all heads, one per head, or the host float.
__device__ __forceinline__ float scale_at(const KVScale& s, int kv_head) {
  return s.data ? s.data[s.count == 1 ? 0 : kv_head] : s.value;
}

template <__nv_fp8_interpretation_t F>
__device__ __forceinline__ float fp8_to_float(uint8_t x) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(x), F)));
}

// Eight FP8 values (8 bytes) widened to eight T values (16 bytes), in order.
template <typename T, __nv_fp8_interpretation_t F>
__device__ __forceinline__ uint4 widen_fp8x8(uint2 bytes) {
  uint4 out;
  uint32_t* words = reinterpret_cast<uint32_t*>(&out);
  const uint32_t in[2] = {bytes.x, bytes.y};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const auto pair = static_cast<__nv_fp8x2_storage_t>(in[i / 2] >> (16 * (i % 2)));
    const __half2 h(__nv_cvt_fp8x2_to_halfraw2(pair, F));
    if constexpr (std::is_same<T, __half>::value) {
      words[i] = *reinterpret_cast<const uint32_t*>(&h);
    } else {
      const __nv_bfloat162 b = __float22bfloat162_rn(__half22float2(h));
      words[i] = *reinterpret_cast<const uint32_t*>(&b);
    }
  }
  return out;
}

}  // namespace pagedlm::cuda
