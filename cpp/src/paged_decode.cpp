// CPU path of paged-attention decode: the reference semantics for the CUDA kernel. A decode
// step is a prefill of one query at the sequence's last position, so after checking its
// arguments this runs the prefill path's loop (attention_cpu.h) over (sequence, kv head):
// the K/V of a head are read once for all the query heads of its GQA group.
#include "pagedlm/paged_decode.h"

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "pagedlm/errors.h"
#include "pagedlm/kv_cache.h"
#include "pagedlm/parallel.h"
#include "attention_cpu.h"

namespace pagedlm {

void check_paged_decode_values(const int32_t* block_tables, const int32_t* seq_lens, int32_t batch,
                               int32_t max_blocks_per_seq, int32_t block_size, int32_t num_blocks) {
  // 64-bit throughout: a length near 2^31 must not wrap past the block-id loop's bound.
  const int64_t capacity = static_cast<int64_t>(max_blocks_per_seq) * block_size;
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t len = seq_lens[b];
    if (len < 0 || len > capacity) {
      throw InvalidArgument("seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) +
                            " is outside [0, " + std::to_string(capacity) + "] (block_tables width x block_size)");
    }
    const int32_t* table = block_tables + static_cast<int64_t>(b) * max_blocks_per_seq;
    for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i) {
      if (table[i] < 0 || table[i] >= num_blocks) {
        throw InvalidArgument("block_tables[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                              std::to_string(table[i]) + " is outside [0, " + std::to_string(num_blocks) + ")");
      }
    }
  }
}

void check_paged_decode_mask(const int64_t* mask_offsets, const int32_t* seq_lens, int32_t batch, int64_t mask_size) {
  for (int32_t b = 0; b < batch; ++b) {
    const int64_t start = mask_offsets[b], len = std::max(seq_lens[b], 0);
    if (start < 0 || start > mask_size - len) {  // not start + len: start may be near 2^63
      throw InvalidArgument("mask_offsets[" + std::to_string(b) + "] = " + std::to_string(start) + ": the row's " +
                            std::to_string(seq_lens[b]) + " mask elements are not inside custom_mask's " +
                            std::to_string(mask_size));
    }
  }
}

void paged_decode_cpu(const PagedDecodeParams& p) {
  check_kv_scale(p.k_scale, "k_scale");
  check_kv_scale(p.v_scale, "v_scale");
  check_paged_decode_values(p.block_tables, p.seq_lens, p.batch, p.max_blocks_per_seq, p.block_size, p.num_blocks);
  // A custom mask: the prefill loop reads row b's mask at mask_indptr[b] (one query per row).
  std::vector<int32_t> mask_rows;
  if (p.mask) {
    check_paged_decode_mask(p.mask_offsets, p.seq_lens, p.batch, p.mask_size);
    for (int32_t b = 0; b < p.batch; ++b) {
      if (p.mask_offsets[b] > INT32_MAX) {
        throw InvalidArgument("mask_offsets[" + std::to_string(b) + "] = " + std::to_string(p.mask_offsets[b]) +
                              " is past what the CPU path indexes (2^31 - 1)");
      }
      mask_rows.push_back(static_cast<int32_t>(p.mask_offsets[b]));
    }
  }
  // Decode is prefill with one query per sequence, the last position: run the same loop.
  std::vector<int32_t> cu_seqlens(p.batch + 1);
  for (int32_t b = 0; b <= p.batch; ++b) cu_seqlens[b] = b;
  PagedPrefillParams prefill;
  prefill.query = p.query;
  prefill.key_cache = p.key_cache;
  prefill.value_cache = p.value_cache;
  prefill.block_tables = p.block_tables;
  prefill.cu_seqlens_q = cu_seqlens.data();
  prefill.seq_lens = p.seq_lens;
  prefill.out = p.out;
  prefill.lse = p.lse;
  prefill.dtype = p.dtype;
  prefill.kv_dtype = p.kv_dtype;
  prefill.k_scale = p.k_scale;
  prefill.v_scale = p.v_scale;
  prefill.batch = prefill.total_q = p.batch;
  prefill.num_heads = p.num_heads;
  prefill.num_kv_heads = p.num_kv_heads;
  prefill.head_dim = p.head_dim;
  prefill.block_size = p.block_size;
  prefill.num_blocks = p.num_blocks;
  prefill.max_blocks_per_seq = p.max_blocks_per_seq;
  prefill.scale = p.scale;
  prefill.sliding_window = p.sliding_window;
  prefill.soft_cap = p.soft_cap;
  prefill.mask = p.mask;
  prefill.mask_indptr = p.mask ? mask_rows.data() : nullptr;
  prefill.mask_size = p.mask_size;
  parallel_for(static_cast<int64_t>(p.batch) * p.num_kv_heads, [&](int64_t item) {
    thread_local std::vector<float> scratch;
    attend_query_tile(prefill, {static_cast<int32_t>(item / p.num_kv_heads), static_cast<int32_t>(item % p.num_kv_heads), 0},
                      scratch);
  });
}

}  // namespace pagedlm
