// CUDA path of the KV-cache writes and block copies: pure data movement in 16-byte
// pieces, or, into an FP8 cache, quantization: saturate(x / scale) rounded to nearest even
// (cvt.rn.satfinite, as the CPU path's float_to_fp8). An out-of-range slot or block id is
// skipped, never dereferenced (the CPU path and PAGEDLM_DEBUG=1 report it as an error).
#include "fp8.cuh"
#include "launchers.h"

namespace pagedlm::cuda {
namespace {

using Chunk = uint4;  // 16 bytes

// One thread block per token; threads copy the token's K and V rows in 16-byte chunks.
__global__ void write_kv_cache_kernel(WriteKVCacheParams p, int64_t row_bytes, int64_t key_stride_bytes,
                                      int64_t value_stride_bytes) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_slots) return;
  const char* k = static_cast<const char*>(p.key) + t * key_stride_bytes;
  const char* v = static_cast<const char*>(p.value) + t * value_stride_bytes;
  char* kc = static_cast<char*>(p.key_cache) + slot * row_bytes;
  char* vc = static_cast<char*>(p.value_cache) + slot * row_bytes;
  const bool aligned = ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) | row_bytes) & 15) == 0;
  if (aligned) {
    for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x) {
      reinterpret_cast<Chunk*>(kc)[i] = reinterpret_cast<const Chunk*>(k)[i];
      reinterpret_cast<Chunk*>(vc)[i] = reinterpret_cast<const Chunk*>(v)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes / 2; i += blockDim.x) {
      reinterpret_cast<uint16_t*>(kc)[i] = reinterpret_cast<const uint16_t*>(k)[i];
      reinterpret_cast<uint16_t*>(vc)[i] = reinterpret_cast<const uint16_t*>(v)[i];
    }
  }
}

// FP8 caches: one thread block per token; each thread quantizes elements of the token's K and V
// rows (x / scale in float32, correctly rounded, then to FP8 with saturation; NaN stays NaN).
template <typename T>
__global__ void write_kv_cache_fp8_kernel(WriteKVCacheParams p, __nv_fp8_interpretation_t format) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0 || slot >= p.num_slots) return;
  const int row = p.num_kv_heads * p.head_dim;
  const T* k = static_cast<const T*>(p.key) + t * p.key_stride;
  const T* v = static_cast<const T*>(p.value) + t * p.value_stride;
  auto* kc = static_cast<__nv_fp8_storage_t*>(p.key_cache) + slot * row;
  auto* vc = static_cast<__nv_fp8_storage_t*>(p.value_cache) + slot * row;
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    const int head = i / p.head_dim;
    kc[i] = __nv_cvt_float_to_fp8(__fdiv_rn(to_float(k[i]), scale_at(p.k_scale, head)), __NV_SATFINITE, format);
    vc[i] = __nv_cvt_float_to_fp8(__fdiv_rn(to_float(v[i]), scale_at(p.v_scale, head)), __NV_SATFINITE, format);
  }
}

// grid.x: pairs, grid.y: 0 = key cache, 1 = value cache.
__global__ void copy_blocks_kernel(CopyBlocksParams p, int64_t block_bytes) {
  const int64_t src = p.block_mapping[2 * blockIdx.x], dst = p.block_mapping[2 * blockIdx.x + 1];
  if (src < 0 || src >= p.num_blocks || dst < 0 || dst >= p.num_blocks || src == dst) return;
  char* cache = static_cast<char*>(blockIdx.y == 0 ? p.key_cache : p.value_cache);
  if (block_bytes % 16 == 0) {
    const Chunk* from = reinterpret_cast<const Chunk*>(cache + src * block_bytes);
    Chunk* to = reinterpret_cast<Chunk*>(cache + dst * block_bytes);
    for (int64_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) to[i] = from[i];
  } else if (block_bytes % 2 == 0) {  // tiny blocks of odd size: 2-byte pieces
    const uint16_t* from = reinterpret_cast<const uint16_t*>(cache + src * block_bytes);
    uint16_t* to = reinterpret_cast<uint16_t*>(cache + dst * block_bytes);
    for (int64_t i = threadIdx.x; i < block_bytes / 2; i += blockDim.x) to[i] = from[i];
  } else {  // FP8 blocks of an odd number of elements: bytes
    const char* from = cache + src * block_bytes;
    char* to = cache + dst * block_bytes;
    for (int64_t i = threadIdx.x; i < block_bytes; i += blockDim.x) to[i] = from[i];
  }
}

}  // namespace

int write_kv_cache(const WriteKVCacheParams& p, void* stream) {
  if (p.num_tokens == 0) return 0;
  if (is_fp8(p.cache_dtype)) {
    const __nv_fp8_interpretation_t format = p.cache_dtype == DType::e4m3 ? __NV_E4M3 : __NV_E5M2;
    return dispatch_dtype(p.dtype, [&](auto type) {
      using T = decltype(type);
      write_kv_cache_fp8_kernel<T><<<static_cast<unsigned>(p.num_tokens), 128, 0, static_cast<cudaStream_t>(stream)>>>(
          p, format);
      return static_cast<int>(cudaGetLastError());
    });
  }
  const int64_t esize = dtype_size(p.dtype);
  const int64_t row_bytes = static_cast<int64_t>(p.num_kv_heads) * p.head_dim * esize;
  write_kv_cache_kernel<<<static_cast<unsigned>(p.num_tokens), 128, 0, static_cast<cudaStream_t>(stream)>>>(
      p, row_bytes, p.key_stride * esize, p.value_stride * esize);
  return static_cast<int>(cudaGetLastError());
}

int copy_blocks(const CopyBlocksParams& p, void* stream) {
  if (p.num_pairs == 0) return 0;
  const int64_t block_bytes = p.block_elems * dtype_size(p.dtype);  // FP8: 1 byte an element
  copy_blocks_kernel<<<dim3(static_cast<unsigned>(p.num_pairs), 2), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      p, block_bytes);
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace pagedlm::cuda
