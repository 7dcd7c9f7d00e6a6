// Paged-attention prefill: a packed batch of new query tokens per sequence attends to that
// sequence's tokens in the paged KV cache (whose new tokens were written first). Sequence
// i's q_len_i queries are the LAST q_len_i of its seq_len_i positions, so one kernel serves
// plain prefill, chunked prefill, prefill after a prefix-cache hit and multi-token
// verification. The parameter struct is shared by the CPU path (cpp/src/paged_prefill.cpp)
// and the CUDA path.
#pragma once

#include <cstdint>

#include "pagedlm/dtype.h"

namespace pagedlm {

// The most tokens a block-table row may address (max_blocks_per_seq * block_size). Kernels hold
// token positions, lengths and windows in int32; with every valid length at most 2^30, any sum
// or difference of two of them stays inside int32. A length above the capacity is a bad value.
constexpr int64_t kMaxSequenceTokens = int64_t{1} << 30;

// Which CUDA kernel computes a prefill: the fastest the device and the configuration allow
// (automatic), the portable mma.sync kernel, or the Hopper wgmma kernel (sm90). The CPU path has
// one kernel and takes any of them.
enum class PrefillBackend : int32_t { automatic = 0, mma = 1, sm90 = 2 };

struct PagedPrefillParams {
  const void* query = nullptr;            // [total_q, num_heads, head_dim] contiguous
  const void* key_cache = nullptr;        // [num_blocks, block_size, num_kv_heads, head_dim] contiguous
  const void* value_cache = nullptr;
  const int32_t* block_tables = nullptr;  // [batch, max_blocks_per_seq] contiguous
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1]: sequence i's queries are rows [cu[i], cu[i+1])
  const int32_t* seq_lens = nullptr;      // [batch]: cached tokens, the new ones included
  void* out = nullptr;                    // [total_q, num_heads, head_dim] contiguous
  float* lse = nullptr;                   // [total_q, num_heads] natural-log sum-exp, or null
  // Optional custom mask replacing the causal one: sequence i's [q_len_i, seq_len_i]
  // row-major booleans start at mask + mask_indptr[i] (elements when unpacked, bytes when
  // packed: bit j of byte t is element 8t + j).
  const uint8_t* mask = nullptr;
  const int32_t* mask_indptr = nullptr;
  bool mask_packed = false;
  int64_t mask_size = 0;                  // elements (unpacked) or bytes (packed) in mask
  DType dtype = DType::f32;  // query and out (and the caches unless kv_dtype is FP8)
  // The caches' element type: dtype, or an FP8 format whose stored values are multiplied by
  // k_scale / v_scale (per cache, or per kv head) as they are read.
  DType kv_dtype = DType::f32;
  KVScale k_scale, v_scale;
  int32_t batch = 0, total_q = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t block_size = 0, num_blocks = 0, max_blocks_per_seq = 0;
  bool causal = true;
  float scale = 1.0f;
  // > 0: query at position p sees only positions > p - sliding_window; below the capacity (a
  // window as long as the table reaches is no window, and the bindings pass 0 for it).
  int32_t sliding_window = 0;
  float soft_cap = 0.0f;       // > 0: logits become soft_cap * tanh(logits / soft_cap)
  // Optional, CUDA: one int32 set to zero, through which a persistent grid hands out the work (the
  // Hopper kernel takes it: its blocks then overlap one query tile's start with the last one's end).
  // Null: one thread block per query tile. A counter serves one call at a time.
  int32_t* tile_counter = nullptr;
  PrefillBackend backend = PrefillBackend::automatic;
};

// Throws InvalidArgument naming cu_seqlens_q, seq_lens, block_tables or mask_indptr when a
// value is out of range. Host arrays only.
void check_paged_prefill_values(const PagedPrefillParams& p);

// CPU path: checks the values, then runs multithreaded over (sequence, kv head, query tile).
void paged_prefill_cpu(const PagedPrefillParams& p);

}  // namespace pagedlm
