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
    const int q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    const int tiles = q_len > 0 ? (q_len + query_tile - 1) / query_tile : 0;
    if (tile < tiles) break;
    tile -= tiles;
  }
  seq = b;
  return b != p.batch;
}

// Whether a sequence's length or query rows are out of range (its rows then turn into NaN).
__device__ __forceinline__ bool sequence_out_of_range(const PagedPrefillParams& p, int q_begin, int q_len, int len) {
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  return len < 0 || len > capacity || q_len > len || q_begin < 0 || q_begin + q_len > p.total_q;
}

}  // namespace pagedlm::cuda
