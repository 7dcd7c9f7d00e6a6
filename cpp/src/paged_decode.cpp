// CPU path of paged-attention decode: the reference semantics for the CUDA kernel.
//
// Work is split over (sequence, kv head), so the K/V of a head are read once for all the
// query heads of its GQA group. Tokens go in chunks: the chunk's keys are widened to f32
// and transposed so that the scores of every query head vectorise across tokens, then an
// online softmax folds the chunk into running (max, sum, accumulator) per query head.
// The hot function is compiled twice (AVX2+FMA and baseline) and picked at load time.
#include "pagedlm/paged_decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "pagedlm/errors.h"
#include "pagedlm/parallel.h"
#include "multiversion.h"

namespace pagedlm {
namespace {

constexpr int kChunk = 32;

}  // namespace

void check_paged_decode_values(const int32_t* block_tables, const int32_t* seq_lens, int32_t batch,
                               int32_t max_blocks_per_seq, int32_t block_size, int32_t num_blocks) {
  const int64_t capacity = static_cast<int64_t>(max_blocks_per_seq) * block_size;
  for (int32_t b = 0; b < batch; ++b) {
    const int32_t len = seq_lens[b];
    if (len < 0 || len > capacity) {
      throw InvalidArgument("seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) +
                            " is outside [0, " + std::to_string(capacity) + "] (block_tables width x block_size)");
    }
    const int32_t* table = block_tables + static_cast<int64_t>(b) * max_blocks_per_seq;
    for (int32_t i = 0; i < (len + block_size - 1) / block_size; ++i) {
      if (table[i] < 0 || table[i] >= num_blocks) {
        throw InvalidArgument("block_tables[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                              std::to_string(table[i]) + " is outside [0, " + std::to_string(num_blocks) + ")");
      }
    }
  }
}

namespace {

// One (sequence, kv head): all `group` query heads of that kv head.
PAGEDLM_MULTIVERSION
void decode_one(const PagedDecodeParams& p, int32_t b, int32_t kv_head, std::vector<float>& scratch) {
  const int32_t D = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int32_t len = p.seq_lens[b];
  const int32_t start = p.sliding_window > 0 ? std::max(0, len - p.sliding_window) : 0;
  const int64_t row_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // between tokens in a block
  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  const int64_t q_row = (static_cast<int64_t>(b) * p.num_heads + static_cast<int64_t>(kv_head) * group) * D;

  scratch.resize(static_cast<size_t>(group) * (2 * D + kChunk + 2) + static_cast<size_t>(D) * (kChunk + 1));
  float* q = scratch.data();                // [group][D], pre-multiplied by the scale
  float* acc = q + group * D;               // [group][D]
  float* scores = acc + group * D;          // [group][kChunk]
  float* row_max = scores + group * kChunk; // [group]
  float* row_sum = row_max + group;         // [group]
  float* keys_t = row_sum + group;          // [D][kChunk]
  float* v_row = keys_t + D * kChunk;       // [D]
  widen(static_cast<const char*>(p.query) + q_row * dtype_size(p.dtype), p.dtype, group * D, q);
  for (int i = 0; i < group * D; ++i) q[i] *= p.scale;
  std::fill(acc, acc + group * D, 0.0f);
  std::fill(keys_t, keys_t + D * kChunk, 0.0f);  // columns past a short last chunk stay finite
  std::fill(row_max, row_max + group, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + group, 0.0f);

  auto token_offset = [&](int32_t t) {
    const int64_t slot = static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size;
    return (slot * row_stride + static_cast<int64_t>(kv_head) * D) * dtype_size(p.dtype);
  };
  const char* k_base = static_cast<const char*>(p.key_cache);
  const char* v_base = static_cast<const char*>(p.value_cache);

  for (int32_t t0 = start; t0 < len; t0 += kChunk) {
    const int32_t n = std::min(kChunk, len - t0);
    for (int32_t j = 0; j < n; ++j) {
      widen(k_base + token_offset(t0 + j), p.dtype, D, v_row);
      for (int32_t d = 0; d < D; ++d) keys_t[d * kChunk + j] = v_row[d];
    }
    for (int32_t g = 0; g < group; ++g) {
      float* s = scores + g * kChunk;
      std::fill(s, s + kChunk, 0.0f);
      for (int32_t d = 0; d < D; ++d) {
        const float qd = q[g * D + d];
        const float* kd = keys_t + d * kChunk;
        for (int32_t j = 0; j < kChunk; ++j) s[j] += qd * kd[j];
      }
      if (p.soft_cap > 0.0f) {
        for (int32_t j = 0; j < n; ++j) s[j] = p.soft_cap * std::tanh(s[j] / p.soft_cap);
      }
      float chunk_max = row_max[g];
      for (int32_t j = 0; j < n; ++j) chunk_max = std::max(chunk_max, s[j]);
      const float rescale = std::exp(row_max[g] - chunk_max);
      row_max[g] = chunk_max;
      row_sum[g] *= rescale;
      for (int32_t d = 0; d < D; ++d) acc[g * D + d] *= rescale;
      for (int32_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - chunk_max);
        row_sum[g] += s[j];
      }
    }
    for (int32_t j = 0; j < n; ++j) {
      widen(v_base + token_offset(t0 + j), p.dtype, D, v_row);
      for (int32_t g = 0; g < group; ++g) {
        const float pj = scores[g * kChunk + j];
        float* a = acc + g * D;
        for (int32_t d = 0; d < D; ++d) a[d] += pj * v_row[d];
      }
    }
  }

  for (int32_t g = 0; g < group; ++g) {
    const int64_t head = static_cast<int64_t>(b) * p.num_heads + static_cast<int64_t>(kv_head) * group + g;
    const float inv = row_sum[g] > 0.0f ? 1.0f / row_sum[g] : 0.0f;  // an empty row yields zeros
    for (int32_t d = 0; d < D; ++d) store_from_float(p.out, head * D + d, p.dtype, acc[g * D + d] * inv);
    if (p.lse) {
      p.lse[head] = row_sum[g] > 0.0f ? row_max[g] + std::log(row_sum[g])
                                      : -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace

void paged_decode_cpu(const PagedDecodeParams& p) {
  check_paged_decode_values(p.block_tables, p.seq_lens, p.batch, p.max_blocks_per_seq, p.block_size, p.num_blocks);
  parallel_for(static_cast<int64_t>(p.batch) * p.num_kv_heads, [&](int64_t item) {
    thread_local std::vector<float> scratch;
    decode_one(p, static_cast<int32_t>(item / p.num_kv_heads), static_cast<int32_t>(item % p.num_kv_heads), scratch);
  });
}

}  // namespace pagedlm
