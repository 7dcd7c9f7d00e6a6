// CUDA paged attention over FP8 KV caches, decode and prefill in every mode (causal, full,
// custom masks bytes or bits, sliding window, soft cap, lse), on CUDA cores. It is the f32
// prefill kernel's scheme (paged_prefill_f32.cu) with the cache read as bytes: one warp owns
// one query row of one head and walks its keys 32 at a time, lane j reading key t0 + j's whole
// row in 16-byte loads (half the bytes of a 16-bit cache) and widening it in registers; the
// scores fold into an online softmax, and P.V accumulates with lanes over head_dim. k_scale is
// folded into the score (q.k * k_scale * scale) and v_scale into the final normalization,
// which is the CPU path's stored * scale up to float32 rounding. A decode row is a prefill
// query at its sequence's last position; its custom mask row starts at mask_offsets[b].
//
// Not the tensor-core kernels, and no split-K: a long decode is one warp per (row, head), so
// FP8 trades speed for memory here. Bad values behave as in the other kernels: a bad block id,
// length or mask offset turns the row into NaN, never a fault.
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "fp8.cuh"
#include "paged_fp8.h"
#include "prefill_mask.cuh"
#include "prefill_schedule.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one query row each

template <typename Q, __nv_fp8_interpretation_t F, int D, bool kDecode, typename P>
__global__ void __launch_bounds__(kRowsPerBlock * 32) paged_fp8_kernel(P p) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_smem[kRowsPerBlock][D];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp;  // query row
  // Every early return below is taken by a whole warp (r is the warp's).
  int b = 0, q_len = 1, q_index = 0;
  bool causal = true;
  const uint8_t* decode_mask = nullptr;
  const int head = blockIdx.y, kv_head = head / (p.num_heads / p.num_kv_heads);
  int len = 0, bad = 0;
  if constexpr (kDecode) {
    if (r >= p.batch) return;
    b = static_cast<int>(r);
    len = p.seq_lens[b];
    const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
    bad = len < 0 || len > capacity;
    if (p.mask && !bad) {
      const int64_t start = p.mask_offsets[b];
      if (start < 0 || start > p.mask_size - len) bad = 1;  // start + len could pass 2^63
      else decode_mask = p.mask + start;
    }
    causal = true;
  } else {
    if (r >= p.total_q) return;
    while (b < p.batch && r >= p.cu_seqlens_q[b + 1]) ++b;
    if (b == p.batch) return;
    const SequenceRows seq_rows = sequence_rows(p, b);
    if (!seq_rows.known || r < seq_rows.begin) return;
    q_len = seq_rows.len;
    q_index = static_cast<int>(r - seq_rows.begin);
    len = p.seq_lens[b];
    bad = sequence_out_of_range(p, seq_rows, len);
    causal = p.causal && !p.mask;
  }
  const int pos = len - q_len + q_index;
  const int lo = p.sliding_window > 0 ? pos - p.sliding_window + 1 : 0;
  const int kv_lo = bad ? 0 : max(0, lo);
  const int kv_end = bad ? 0 : (causal ? pos + 1 : len);
  int kind = kScoreFinite;

  const Q* query = static_cast<const Q*>(p.query) + (r * p.num_heads + head) * D;
  float* q = q_smem[warp];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) q[lane + 32 * i] = to_float(query[lane + 32 * i]);
  __syncwarp();
  const float score_scale = p.scale * scale_at(p.k_scale, kv_head);
  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * D;
  const uint8_t* key_cache = static_cast<const uint8_t*>(p.key_cache);
  const uint8_t* value_cache = static_cast<const uint8_t*>(p.value_cache);

  float row_max = -INFINITY, row_sum = 0.0f, o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.0f;
  for (int t0 = kv_lo; t0 < kv_end; t0 += 32) {
    const int t = t0 + lane;
    int64_t kv_row = -1;  // byte offset of key t's row for this head (-1: not seen)
    float score = -INFINITY;
    bool visible;
    if constexpr (kDecode) {
      visible = t < kv_end && t >= lo && (decode_mask == nullptr || decode_mask[t] != 0);
    } else {
      const PrefillRow row{q_index, pos, lo};
      visible = prefill_visible(p, b, len, q_len, causal, row, t, kv_end, &bad);
    }
    if (visible) {
      const int block = table[t / p.block_size];
      if (block < 0 || block >= p.num_blocks) {
        bad = 1;
      } else {
        kv_row = (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * p.num_kv_heads * D + head_offset;
        const uint4* key = reinterpret_cast<const uint4*>(key_cache + kv_row);  // D bytes, 16-byte aligned
        float dot = 0.0f;
#pragma unroll 4
        for (int c = 0; c < D / 16; ++c) {
          const uint4 chunk = key[c];
          const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&chunk);
#pragma unroll
          for (int j = 0; j < 16; ++j) dot += q[16 * c + j] * fp8_to_float<F>(bytes[j]);
        }
        score = dot * score_scale;
        if (p.soft_cap > 0.0f) score = p.soft_cap * tanhf(score / p.soft_cap);
        score = screen_score(score, kind);
        if (score == -INFINITY) kv_row = -1;  // weight 0: its value plays no part
      }
    }
    const float new_max = fmaxf(row_max, warp_max(score));
    if (new_max == -INFINITY) continue;  // nothing visible yet
    const float rescale = expf(row_max - new_max);
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
      const uint8_t* value = value_cache + at;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) o[i] += w * fp8_to_float<F>(value[lane + 32 * i]);
    }
    row_max = new_max;
  }
  bad = __any_sync(0xffffffffu, bad);
  for (int step = 16; step > 0; step /= 2) kind = max(kind, __shfl_xor_sync(0xffffffffu, kind, step));
  if (bad) kind = kScoreNaN;

  Q* out = static_cast<Q*>(p.out) + (r * p.num_heads + head) * D;
  // A row that sees nothing yields zeros; v_scale multiplies the weighted sum of stored values.
  const float inv = row_sum > 0.0f ? scale_at(p.v_scale, kv_head) / row_sum : 0.0f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) out[lane + 32 * i] = from_float<Q>(flagged_out(kind, o[i] * inv));
  if (p.lse && lane == 0) {
    p.lse[r * p.num_heads + head] = flagged_lse(kind, row_sum > 0.0f ? row_max + logf(row_sum) : -INFINITY);
  }
}

template <bool kDecode, typename P>
int launch(const P& p, int64_t rows, cudaStream_t stream) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>(blocks), p.num_heads);
  const bool e4m3 = p.kv_dtype == DType::e4m3;
  return dispatch_dtype(p.dtype, [&](auto type) {
    using Q = decltype(type);
    auto go = [&](auto kernel) {
      kernel<<<grid, kRowsPerBlock * 32, 0, stream>>>(p);
      return static_cast<int>(cudaGetLastError());
    };
    switch (p.head_dim) {
      case 64: return e4m3 ? go(paged_fp8_kernel<Q, __NV_E4M3, 64, kDecode, P>)
                           : go(paged_fp8_kernel<Q, __NV_E5M2, 64, kDecode, P>);
      case 128: return e4m3 ? go(paged_fp8_kernel<Q, __NV_E4M3, 128, kDecode, P>)
                            : go(paged_fp8_kernel<Q, __NV_E5M2, 128, kDecode, P>);
      case 256: return e4m3 ? go(paged_fp8_kernel<Q, __NV_E4M3, 256, kDecode, P>)
                            : go(paged_fp8_kernel<Q, __NV_E5M2, 256, kDecode, P>);
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  });
}

}  // namespace

int paged_decode_fp8(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0) return 0;
  return launch<true>(p, p.batch, stream);
}

int paged_prefill_fp8(const PagedPrefillParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.total_q == 0) return 0;
  return launch<false>(p, p.total_q, stream);
}

}  // namespace pagedlm::cuda
