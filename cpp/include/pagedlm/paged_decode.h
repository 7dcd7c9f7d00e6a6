// Paged-attention decode: one query token per sequence attends to that sequence's tokens
// in the paged KV cache. The parameter struct is shared by the CPU path
// (cpp/src/paged_decode.cpp) and the CUDA path (cuda/paged_decode.cu).
#pragma once

#include <cstdint>

#include "pagedlm/dtype.h"

namespace pagedlm {

struct PagedDecodeParams {
  const void* query = nullptr;        // [batch, num_heads, head_dim] contiguous
  const void* key_cache = nullptr;    // [num_blocks, block_size, num_kv_heads, head_dim] contiguous
  const void* value_cache = nullptr;
  const int32_t* block_tables = nullptr;  // [batch, max_blocks_per_seq] contiguous
  const int32_t* seq_lens = nullptr;      // [batch]
  void* out = nullptr;                    // [batch, num_heads, head_dim] contiguous
  float* lse = nullptr;                   // [batch, num_heads] natural-log sum-exp, or null
  DType dtype = DType::f32;  // query and out (and the caches unless kv_dtype is FP8)
  // The caches' element type: dtype, or an FP8 format whose stored values are multiplied by
  // k_scale / v_scale (per cache, or per kv head) as they are read.
  DType kv_dtype = DType::f32;
  KVScale k_scale, v_scale;
  int32_t batch = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t block_size = 0, num_blocks = 0, max_blocks_per_seq = 0;
  float scale = 1.0f;
  int32_t sliding_window = 0;  // > 0: attend only to the last sliding_window positions
  float soft_cap = 0.0f;       // > 0: logits become soft_cap * tanh(logits / soft_cap)
  // Optional custom mask, for a masked prefill computed one query row at a time (tree and lookahead
  // verification): row b sees key t < seq_lens[b] only where mask[mask_offsets[b] + t] is nonzero
  // (one byte per key). A row that sees nothing yields zeros and lse -inf.
  const uint8_t* mask = nullptr;
  const int64_t* mask_offsets = nullptr;  // [batch]
  int64_t mask_size = 0;                  // bytes in mask
};

// Throws InvalidArgument naming seq_lens or block_tables if a length is outside the table's
// capacity or a block id the sequence uses is outside [0, num_blocks). Host arrays only.
void check_paged_decode_values(const int32_t* block_tables, const int32_t* seq_lens, int32_t batch,
                               int32_t max_blocks_per_seq, int32_t block_size, int32_t num_blocks);

// Throws InvalidArgument naming mask_offsets if row b's mask, [mask_offsets[b], + seq_lens[b]),
// is not inside the mask's mask_size bytes. Host arrays only.
void check_paged_decode_mask(const int64_t* mask_offsets, const int32_t* seq_lens, int32_t batch, int64_t mask_size);

// CPU path: checks seq_lens and the block ids it will read (InvalidArgument naming the
// argument) before computing, then runs multithreaded over (sequence, kv head).
void paged_decode_cpu(const PagedDecodeParams& p);

}  // namespace pagedlm
