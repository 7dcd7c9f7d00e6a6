// CUDA paged-attention prefill for f32 caches, on CUDA cores (f16/bf16 take the tensor-core
// kernel of paged_prefill.cu). One warp owns one query row of one head and walks its keys 32
// at a time: lane j forms the whole score of key t0 + j (the query row from shared memory),
// so the 32 keys' loads are in flight together; the scores fold into an online softmax, and
// P.V accumulates with lanes over head_dim.
// The same visibility rules (prefill_mask.cuh) and the same bad-value behaviour as the
// tensor-core kernel: a bad block id, length or mask offset turns the row into NaN.
#include <cstdint>

#include "common.cuh"
#include "paged_prefill_f32.h"
#include "prefill_mask.cuh"
#include "prefill_schedule.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one query row each

template <int D>
__global__ void __launch_bounds__(kRowsPerBlock * 32) paged_prefill_f32_kernel(PagedPrefillParams p) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_smem[kRowsPerBlock][D];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;  // query row
  // Every early return below is taken by a whole warp (r is the warp's).
  if (r >= p.total_q) return;
  int b = 0;
  while (b < p.batch && r >= p.cu_seqlens_q[b + 1]) ++b;
  if (b == p.batch) return;
  // With cu_seqlens_q itself out of range there is no row that is certainly ours to write.
  const SequenceRows seq_rows = sequence_rows(p, b);
  if (!seq_rows.known || r < seq_rows.begin) return;
  const int q_begin = seq_rows.begin, q_len = seq_rows.len;

  const int head = blockIdx.y, kv_head = head / (p.num_heads / p.num_kv_heads);
  const int len = p.seq_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  int bad = len < 0 || len > capacity || q_len > len;
  int kind = kScoreFinite;  // non-finite scores seen by this lane (common.cuh)
  const bool causal = p.causal && !p.mask;
  const PrefillRow row = prefill_row(p, static_cast<int>(r - q_begin), len, q_len);
  const int kv_lo = bad ? 0 : max(0, row.lo);
  const int kv_end = bad ? 0 : (causal ? row.pos + 1 : len);

  const float* query = static_cast<const float*>(p.query) + (r * p.num_heads + head) * D;
  float* q = q_smem[warp];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) q[lane + 32 * i] = query[lane + 32 * i];
  __syncwarp();
  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * D;
  const float* key_cache = static_cast<const float*>(p.key_cache);
  const float* value_cache = static_cast<const float*>(p.value_cache);

  float row_max = -INFINITY, row_sum = 0.0f, o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.0f;
  for (int t0 = kv_lo; t0 < kv_end; t0 += 32) {
    // Lane j: the score of key t0 + j, and the cache row it reads (-1: not seen).
    const int t = t0 + lane;
    int64_t kv_row = -1;
    float score = -INFINITY;
    if (prefill_visible(p, b, len, q_len, causal, row, t, kv_end, &bad)) {
      const int block = table[t / p.block_size];
      if (block < 0 || block >= p.num_blocks) {
        bad = 1;
      } else {
        kv_row = (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * p.num_kv_heads * D + head_offset;
        const float* key = key_cache + kv_row;
        float dot = 0.0f;
#pragma unroll 16
        for (int d = 0; d < D; ++d) dot += q[d] * key[d];
        score = dot * p.scale;
        if (p.soft_cap > 0.0f) score = p.soft_cap * tanhf(score / p.soft_cap);
        score = screen_score(score, kind);
        if (score == -INFINITY) kv_row = -1;  // weight 0: its value plays no part
      }
    }
    const float new_max = fmaxf(row_max, warp_max(score));
    if (new_max == -INFINITY) continue;  // nothing visible yet
    const float rescale = expf(row_max - new_max);  // 0 when row_max is -inf (o and sum are 0 then)
    const float weight = kv_row >= 0 ? expf(score - new_max) : 0.0f;
    row_sum = row_sum * rescale + warp_sum(weight);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] *= rescale;
    const int count = min(32, kv_end - t0);
#pragma unroll 4
    for (int j = 0; j < count; ++j) {
      const float w = __shfl_sync(0xffffffffu, weight, j);
      const int64_t at = __shfl_sync(0xffffffffu, kv_row, j);
      if (at < 0) continue;  // the same for every lane: no divergence
      const float* value = value_cache + at;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) o[i] += w * value[lane + 32 * i];
    }
    row_max = new_max;
  }
  bad = __any_sync(0xffffffffu, bad);
  for (int step = 16; step > 0; step /= 2) kind = max(kind, __shfl_xor_sync(0xffffffffu, kind, step));
  if (bad) kind = kScoreNaN;

  float* out = static_cast<float*>(p.out) + (r * p.num_heads + head) * D;
  const float inv = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;  // a row that sees nothing yields zeros
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[lane + 32 * i] = flagged_out(kind, o[i] * inv);
  if (p.lse && lane == 0) {
    p.lse[r * p.num_heads + head] = flagged_lse(kind, row_sum > 0.0f ? row_max + logf(row_sum) : -INFINITY);
  }
}

template <int D>
int launch(const PagedPrefillParams& p, cudaStream_t stream) {
  const int64_t blocks = (static_cast<int64_t>(p.total_q) + kRowsPerBlock - 1) / kRowsPerBlock;
  paged_prefill_f32_kernel<D><<<dim3(static_cast<unsigned>(blocks), p.num_heads), kRowsPerBlock * 32, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int paged_prefill_f32(const PagedPrefillParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<64>(p, stream);
    case 128: return launch<128>(p, stream);
    case 256: return launch<256>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace pagedlm::cuda
