// How a prefill thread block finds its work, shared by the tensor-core kernels (paged_prefill.cu,
// paged_prefill_sm90.cu) so that both schedule and validate sequences alike. The grid is sized
// from total_q on the host (an upper bound on the query tiles); each block finds its (sequence,
// query tile) by walking cu_seqlens_q on the device, so nothing is synchronised and the launch
// is graph-capturable.
#pragma once

#include <cstdint>

#include "pagedlm/paged_prefill.h"

namespace pagedlm::cuda {

// This block's (sequence, query tile) for tiles of query_tile queries; false for a spare block.
// Blocks take the tiles last to first: under a causal mask a sequence's last query tiles see the
// most keys, so the longest blocks start first and the short ones fill the tail (the spare
// blocks of the grid's bound come first and leave at once).
__device__ __forceinline__ bool find_query_tile(const PagedPrefillParams& p, int query_tile, int& seq, int& tile) {
  int b = 0;
  tile = gridDim.x - 1 - blockIdx.x;
  for (; b < p.batch; ++b) {
    // 64-bit: a bad cu_seqlens_q may hold any int32 values.
    const int64_t q_len = static_cast<int64_t>(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b];
    const int64_t tiles = q_len > 0 ? (q_len + query_tile - 1) / query_tile : 0;
    if (tile < tiles) break;
    tile -= static_cast<int>(tiles);  // tiles <= tile here
  }
  seq = b;
  return b != p.batch;
}

// Sequence b's query rows [begin, begin + len) of the packed query. `known` is false when
// cu_seqlens_q puts them outside [0, total_q) or backwards: then no row is certainly the
// sequence's to write, and begin = len = 0. Computed in 64 bits, whatever the values.
struct SequenceRows {
  int begin, len;
  bool known;
};

__device__ __forceinline__ SequenceRows sequence_rows(const PagedPrefillParams& p, int b) {
  const int64_t begin = p.cu_seqlens_q[b], end = p.cu_seqlens_q[b + 1];
  const bool known = begin >= 0 && end >= begin && end <= p.total_q;
  return {known ? static_cast<int>(begin) : 0, known ? static_cast<int>(end - begin) : 0, known};
}

// Whether a sequence's length or query rows are out of range (its rows then turn into NaN). A length
// within the capacity (at most kMaxSequenceTokens) keeps all position arithmetic inside int32.
__device__ __forceinline__ bool sequence_out_of_range(const PagedPrefillParams& p, const SequenceRows& rows, int len) {
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  return !rows.known || len < 0 || len > capacity || rows.len > len;
}

}  // namespace pagedlm::cuda
