// CUDA paged-attention prefill for f32 caches, on CUDA cores: correct and simple rather than
// fast (f16/bf16 take the tensor-core kernel of paged_prefill.cu). One warp owns one query
// row of one head; for each run of 32 keys it forms the scores (lanes split head_dim and
// reduce), folds them into an online softmax, and accumulates P.V with lanes over head_dim.
// The same visibility rules (prefill_mask.cuh) and the same bad-value behaviour as the
// tensor-core kernel: a bad block id, length or mask offset turns the row into NaN.
#include <cstdint>

#include "common.cuh"
#include "paged_prefill_f32.h"
#include "prefill_mask.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one query row each

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int step = 16; step > 0; step /= 2) v += __shfl_xor_sync(0xffffffffu, v, step);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int step = 16; step > 0; step /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, step));
  return v;
}

template <int D>
__global__ void __launch_bounds__(kRowsPerBlock * 32) paged_prefill_f32_kernel(PagedPrefillParams p) {
  constexpr int kPerLane = D / 32;
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;  // query row
  if (r >= p.total_q) return;
  int b = 0;
  while (b < p.batch && r >= p.cu_seqlens_q[b + 1]) ++b;
  if (b == p.batch) return;
  const int q_begin = p.cu_seqlens_q[b], q_len = p.cu_seqlens_q[b + 1] - q_begin;
  // With cu_seqlens_q itself out of range there is no row that is certainly ours to write.
  if (r < q_begin || q_begin < 0 || q_len < 0 || q_begin + q_len > p.total_q) return;

  const int head = blockIdx.y, kv_head = head / (p.num_heads / p.num_kv_heads);
  const int len = p.seq_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  int bad = len < 0 || len > capacity || q_len > len;
  const bool causal = p.causal && !p.mask;
  const PrefillRow row = prefill_row(p, static_cast<int>(r - q_begin), len, q_len);
  const int kv_lo = bad ? 0 : max(0, row.lo);
  const int kv_end = bad ? 0 : (causal ? row.pos + 1 : len);

  const float* query = static_cast<const float*>(p.query) + (r * p.num_heads + head) * D;
  float q[kPerLane], o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) q[i] = query[lane + 32 * i], o[i] = 0.0f;
  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  // The row of key/value position t, or null for a block id outside the cache.
  auto kv_row = [&](const void* cache, int t) -> const float* {
    const int block = table[t / p.block_size];
    if (block < 0 || block >= p.num_blocks) return nullptr;
    const int64_t slot = static_cast<int64_t>(block) * p.block_size + t % p.block_size;
    return static_cast<const float*>(cache) + (slot * p.num_kv_heads + kv_head) * D;
  };

  float row_max = -INFINITY, row_sum = 0.0f;
  for (int t0 = kv_lo; t0 < kv_end; t0 += 32) {
    float my_score = -INFINITY;  // lane j keeps the score of position t0 + j
    const int count = min(32, kv_end - t0);
    for (int j = 0; j < count; ++j) {
      const int t = t0 + j;
      if (!prefill_visible(p, b, len, q_len, causal, row, t, kv_end, &bad)) continue;
      const float* key = kv_row(p.key_cache, t);
      if (!key) {
        bad = 1;
        continue;
      }
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) dot += q[i] * key[lane + 32 * i];
      float score = warp_sum(dot) * p.scale;
      if (p.soft_cap > 0.0f) score = p.soft_cap * tanhf(score / p.soft_cap);
      if (lane == j) my_score = score;
    }
    const float new_max = fmaxf(row_max, warp_max(my_score));
    if (new_max == -INFINITY) continue;  // nothing visible yet
    const float rescale = expf(row_max - new_max);  // 0 when row_max is -inf (o and sum are 0 then)
    const float weight = expf(my_score - new_max);
    row_sum = row_sum * rescale + warp_sum(weight);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] *= rescale;
    for (int j = 0; j < count; ++j) {
      const float w = __shfl_sync(0xffffffffu, weight, j);
      if (w == 0.0f) continue;
      const float* value = kv_row(p.value_cache, t0 + j);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) o[i] += w * value[lane + 32 * i];
    }
    row_max = new_max;
  }

  float* out = static_cast<float*>(p.out) + (r * p.num_heads + head) * D;
  const float inv = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;  // a row that sees nothing yields zeros
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[lane + 32 * i] = bad ? NAN : o[i] * inv;
  if (p.lse && lane == 0) {
    p.lse[r * p.num_heads + head] = bad ? NAN : (row_sum > 0.0f ? row_max + logf(row_sum) : -INFINITY);
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
