// KV-cache writes and block copies. The parameter structs are shared by the CPU path
// (cpp/src/kv_cache.cpp) and the CUDA path (cuda/kv_cache.cu).
#pragma once

#include <cstdint>

#include "pagedlm/dtype.h"

namespace pagedlm {

// key/value: [num_tokens, num_kv_heads, head_dim], each token's heads contiguous, tokens
// `key_stride` / `value_stride` elements apart (so slices of a fused QKV work).
// Caches: [num_blocks, block_size, num_kv_heads, head_dim] contiguous; a token goes to slot
// slot_mapping[t] = block * block_size + offset, and -1 skips it.
struct WriteKVCacheParams {
  const void* key = nullptr;
  const void* value = nullptr;
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0;
  int64_t key_stride = 0, value_stride = 0;
  int64_t num_slots = 0;  // num_blocks * block_size
  int32_t num_kv_heads = 0, head_dim = 0;
  DType dtype = DType::f32;        // key and value
  // The caches': dtype, or an FP8 format, which stores saturate(x / scale) rounded to nearest
  // even (x / scale in float32; one scale per cache, or per kv head).
  DType cache_dtype = DType::f32;
  KVScale k_scale, v_scale;
};

// Copies whole blocks src -> dst within one layer's cache (both K and V), one (src, dst)
// pair per row of block_mapping [num_pairs, 2].
struct CopyBlocksParams {
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  const int64_t* block_mapping = nullptr;
  int64_t num_pairs = 0;
  int64_t num_blocks = 0;
  int64_t block_elems = 0;  // block_size * num_kv_heads * head_dim
  DType dtype = DType::f32;  // the caches' (FP8 blocks are copied as bytes: their scales do not change)
};

// Host-side value checks (the CPU path runs them, CUDA calls with PAGEDLM_DEBUG=1 on copies),
// throwing InvalidArgument naming the argument: every slot in [-1, num_slots) and no slot written
// twice; every block id in [0, num_blocks), no destination written twice or read by another pair.
void check_slot_mapping(const int64_t* slot_mapping, int64_t num_tokens, int64_t num_slots);
void check_block_mapping(const int64_t* block_mapping, int64_t num_pairs, int64_t num_blocks);

// Throws InvalidArgument naming `arg` (as arg[i]) unless every value of a host scale is finite
// and > 0; a scale without data is checked where it is made.
void check_kv_scale(const KVScale& scale, const char* arg);

// CPU path. Both run the checks above first, so a refused call writes nothing.
void write_kv_cache_cpu(const WriteKVCacheParams& p);
void copy_blocks_cpu(const CopyBlocksParams& p);

}  // namespace pagedlm
