// Which keys a prefill query row sees, shared by the tensor-core (f16/bf16) and the
// CUDA-core (f32) prefill kernels so the two can never disagree: bottom-right causal, a
// sliding window, or a custom mask (bytes or packed bits) read with its bounds checked.
#pragma once

#include <cstdint>

#include "pagedlm/paged_prefill.h"

namespace pagedlm::cuda {

struct PrefillRow {
  int q;      // the query's index within its sequence (>= q_len marks a padding row)
  int pos;    // its absolute position: len - q_len + q
  int lo;     // the first position its window keeps
};

__device__ __forceinline__ PrefillRow prefill_row(const PagedPrefillParams& p, int q, int len, int q_len) {
  const int pos = len - q_len + q;
  return {q, pos, p.sliding_window > 0 ? pos - p.sliding_window + 1 : 0};
}

// Whether `row` of sequence b sees key position t < kv_end (the caller's loop bound). A bad
// mask_indptr sets *bad_row and sees nothing: the mask is never read outside its bounds.
__device__ __forceinline__ bool prefill_visible(const PagedPrefillParams& p, int b, int len, int q_len,
                                                bool causal, const PrefillRow& row, int t, int kv_end,
                                                int* bad_row) {
  if (row.q >= q_len || t >= kv_end || t < row.lo) return false;  // padding rows see nothing
  if (p.mask) {
    const int64_t elem = static_cast<int64_t>(row.q) * len + t;
    const int64_t at = p.mask_indptr[b] + (p.mask_packed ? elem / 8 : elem);
    if (at < 0 || at >= p.mask_size) {
      *bad_row = 1;
      return false;
    }
    return p.mask_packed ? ((p.mask[at] >> (elem % 8)) & 1) != 0 : p.mask[at] != 0;
  }
  return !causal || t <= row.pos;
}

}  // namespace pagedlm::cuda
