// CPU path of paged-attention prefill, and through attend_query_tile of decode too: the
// reference semantics for the CUDA kernels.
//
// Work is split over (sequence, kv head, tile of 16 queries): the rows of a work item are
// the tile's queries times the kv head's GQA group, and they share every K/V chunk read.
// As in the decode path, a chunk of 32 keys is widened to f32 and transposed so that each
// row's scores vectorise across tokens; masked scores become -inf before an online softmax.
#include "pagedlm/paged_prefill.h"

#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "pagedlm/errors.h"
#include "pagedlm/kv_cache.h"
#include "pagedlm/parallel.h"
#include "multiversion.h"

namespace pagedlm {
namespace {

constexpr int kChunk = 32;

[[noreturn]] void bad_value(const std::string& what) { throw InvalidArgument(what); }

}  // namespace

void check_paged_prefill_values(const PagedPrefillParams& p) {
  if (p.cu_seqlens_q[0] != 0) bad_value("cu_seqlens_q[0] must be 0, got " + std::to_string(p.cu_seqlens_q[0]));
  if (p.cu_seqlens_q[p.batch] != p.total_q) {
    bad_value("cu_seqlens_q[-1] = " + std::to_string(p.cu_seqlens_q[p.batch]) + " must equal the query rows (" +
              std::to_string(p.total_q) + ")");
  }
  // 64-bit throughout: cu_seqlens_q and seq_lens values near 2^31 must not wrap past a bound.
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t q_len = static_cast<int64_t>(p.cu_seqlens_q[b + 1]) - p.cu_seqlens_q[b];
    const int64_t len = p.seq_lens[b];
    if (q_len < 0) bad_value("cu_seqlens_q must be non-decreasing (at index " + std::to_string(b + 1) + ")");
    if (len < 0 || len > capacity) {
      bad_value("seq_lens[" + std::to_string(b) + "] = " + std::to_string(len) + " is outside [0, " +
                std::to_string(capacity) + "] (block_tables width x block_size)");
    }
    if (q_len > len) {
      bad_value("cu_seqlens_q: sequence " + std::to_string(b) + " has " + std::to_string(q_len) +
                " queries but seq_lens[" + std::to_string(b) + "] = " + std::to_string(len));
    }
    const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq;
    for (int64_t i = 0; i < (len + p.block_size - 1) / p.block_size; ++i) {
      if (table[i] < 0 || table[i] >= p.num_blocks) {
        bad_value("block_tables[" + std::to_string(b) + ", " + std::to_string(i) + "] = " + std::to_string(table[i]) +
                  " is outside [0, " + std::to_string(p.num_blocks) + ")");
      }
    }
    if (p.mask) {
      const int64_t elems = q_len * len;
      const int64_t need = p.mask_packed ? (elems + 7) / 8 : elems;
      const int64_t start = p.mask_indptr[b], stop = p.mask_indptr[b + 1];
      if (start < 0 || stop - start != need || stop > p.mask_size) {
        bad_value("mask_indptr: sequence " + std::to_string(b) + " needs " + std::to_string(need) +
                  (p.mask_packed ? " bytes" : " elements") + " of custom_mask (q_len x seq_len), mask_indptr gives [" +
                  std::to_string(start) + ", " + std::to_string(stop) + ") of " + std::to_string(p.mask_size));
      }
    }
  }
}

namespace {

}  // namespace

PAGEDLM_MULTIVERSION
void attend_query_tile(const PagedPrefillParams& p, const QueryTile& tile, std::vector<float>& scratch) {
  const int32_t D = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int32_t len = p.seq_lens[tile.b];
  const int32_t q_len = p.cu_seqlens_q[tile.b + 1] - p.cu_seqlens_q[tile.b];
  const int32_t queries = std::min(kCpuQueryTile, q_len - tile.q0);
  const int32_t rows = queries * group;  // row r: query q0 + r / group, head r % group
  const int32_t first_pos = len - q_len + tile.q0;  // absolute position of the tile's first query
  const int32_t esize = dtype_size(p.dtype);
  const int32_t kv_esize = dtype_size(p.kv_dtype);
  // FP8: keys and values are the stored values times their scale, rounded to f32 as they are widened.
  const bool fp8 = is_fp8(p.kv_dtype);
  const float k_scale = fp8 ? kv_scale_at(p.k_scale, tile.kv_head) : 1.0f;
  const float v_scale = fp8 ? kv_scale_at(p.v_scale, tile.kv_head) : 1.0f;

  scratch.resize(static_cast<size_t>(rows) * (2 * D + kChunk + 3) + static_cast<size_t>(D) * (kChunk + 1));
  float* q = scratch.data();                // [rows][D], scaled
  float* acc = q + rows * D;                // [rows][D]
  float* scores = acc + rows * D;           // [rows][kChunk]
  float* row_max = scores + rows * kChunk;  // [rows]
  float* row_sum = row_max + rows;          // [rows]
  float* keys_t = row_sum + rows;           // [D][kChunk]
  float* v_row = keys_t + D * kChunk;       // [D]
  // [rows]: the worst non-finite score a row has seen among its visible keys (kFinite, kPosInf,
  // kNaN). Such a score leaves the softmax, and the row's result becomes what IEEE arithmetic
  // gives: NaN with lse NaN, or NaN with lse +inf for +inf (exp(inf - inf) is NaN).
  float* nonfinite = v_row + D;
  constexpr float kFinite = 0.0f, kPosInf = 1.0f, kNaN = 2.0f;

  for (int32_t r = 0; r < rows; ++r) {
    const int64_t qrow = static_cast<int64_t>(p.cu_seqlens_q[tile.b] + tile.q0 + r / group) * p.num_heads +
                         static_cast<int64_t>(tile.kv_head) * group + r % group;
    widen(static_cast<const char*>(p.query) + qrow * D * esize, p.dtype, D, q + r * D);
    for (int32_t d = 0; d < D; ++d) q[r * D + d] *= p.scale;
  }
  std::fill(acc, acc + rows * D, 0.0f);
  std::fill(keys_t, keys_t + D * kChunk, 0.0f);
  std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + rows, 0.0f);
  std::fill(nonfinite, nonfinite + rows, kFinite);

  // Which keys a query at position pos may see (before the custom mask, if any).
  auto lowest = [&](int32_t pos) { return p.sliding_window > 0 ? std::max(0, pos - p.sliding_window + 1) : 0; };
  auto highest = [&](int32_t pos) { return (p.causal && !p.mask) ? pos : len - 1; };
  const int32_t kv_begin = lowest(first_pos);
  const int32_t kv_end = highest(first_pos + queries - 1) + 1;

  const int32_t* table = p.block_tables + static_cast<int64_t>(tile.b) * p.max_blocks_per_seq;
  const int64_t row_stride = static_cast<int64_t>(p.num_kv_heads) * D;
  auto token_offset = [&](int32_t t) {
    const int64_t slot = static_cast<int64_t>(table[t / p.block_size]) * p.block_size + t % p.block_size;
    return (slot * row_stride + static_cast<int64_t>(tile.kv_head) * D) * kv_esize;
  };
  auto mask_allows = [&](int32_t query, int32_t t) {
    const int64_t elem = static_cast<int64_t>(query) * len + t;
    if (!p.mask_packed) return p.mask[p.mask_indptr[tile.b] + elem] != 0;
    return ((p.mask[p.mask_indptr[tile.b] + elem / 8] >> (elem % 8)) & 1) != 0;
  };
  const char* k_base = static_cast<const char*>(p.key_cache);
  const char* v_base = static_cast<const char*>(p.value_cache);

  for (int32_t t0 = kv_begin; t0 < kv_end; t0 += kChunk) {
    const int32_t n = std::min(kChunk, kv_end - t0);
    for (int32_t j = 0; j < n; ++j) {
      widen(k_base + token_offset(t0 + j), p.kv_dtype, D, v_row);
      if (fp8) {
        for (int32_t d = 0; d < D; ++d) v_row[d] *= k_scale;
      }
      for (int32_t d = 0; d < D; ++d) keys_t[d * kChunk + j] = v_row[d];
    }
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t query = tile.q0 + r / group;
      const int32_t pos = first_pos + r / group;
      float* s = scores + r * kChunk;
      std::fill(s, s + kChunk, 0.0f);
      for (int32_t d = 0; d < D; ++d) {
        const float qd = q[r * D + d];
        const float* kd = keys_t + d * kChunk;
        for (int32_t j = 0; j < kChunk; ++j) s[j] += qd * kd[j];
      }
      const int32_t lo = lowest(pos), hi = highest(pos);
      for (int32_t j = 0; j < n; ++j) {
        const int32_t t = t0 + j;
        bool visible = t >= lo && t <= hi && (!p.mask || mask_allows(query, t));
        if (visible && p.soft_cap > 0.0f) s[j] = p.soft_cap * std::tanh(s[j] / p.soft_cap);
        if (visible && !(s[j] < std::numeric_limits<float>::infinity())) {  // NaN or +inf
          nonfinite[r] = std::max(nonfinite[r], std::isnan(s[j]) ? kNaN : kPosInf);
          visible = false;
        }
        if (!visible) s[j] = -std::numeric_limits<float>::infinity();
      }
      float chunk_max = row_max[r];
      for (int32_t j = 0; j < n; ++j) chunk_max = std::max(chunk_max, s[j]);
      if (chunk_max == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
        std::fill(s, s + n, 0.0f);
        continue;
      }
      const float rescale = std::exp(row_max[r] - chunk_max);
      row_max[r] = chunk_max;
      row_sum[r] *= rescale;
      for (int32_t d = 0; d < D; ++d) acc[r * D + d] *= rescale;
      for (int32_t j = 0; j < n; ++j) {
        s[j] = std::exp(s[j] - chunk_max);
        row_sum[r] += s[j];
      }
    }
    for (int32_t j = 0; j < n; ++j) {
      widen(v_base + token_offset(t0 + j), p.kv_dtype, D, v_row);
      if (fp8) {
        for (int32_t d = 0; d < D; ++d) v_row[d] *= v_scale;
      }
      for (int32_t r = 0; r < rows; ++r) {
        const float pj = scores[r * kChunk + j];
        if (pj == 0.0f) continue;
        float* a = acc + r * D;
        for (int32_t d = 0; d < D; ++d) a[d] += pj * v_row[d];
      }
    }
  }

  for (int32_t r = 0; r < rows; ++r) {
    const int64_t head = static_cast<int64_t>(p.cu_seqlens_q[tile.b] + tile.q0 + r / group) * p.num_heads +
                         static_cast<int64_t>(tile.kv_head) * group + r % group;
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    const float inv = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;  // a row that sees nothing yields zeros
    for (int32_t d = 0; d < D; ++d) {
      store_from_float(p.out, head * D + d, p.dtype, nonfinite[r] != kFinite ? nan : acc[r * D + d] * inv);
    }
    if (p.lse) {
      const float lse = row_sum[r] > 0.0f ? row_max[r] + std::log(row_sum[r]) : -inf;
      p.lse[head] = nonfinite[r] == kNaN ? nan : nonfinite[r] == kPosInf ? inf : lse;
    }
  }
}

void paged_prefill_cpu(const PagedPrefillParams& p) {
  check_paged_prefill_values(p);
  check_kv_scale(p.k_scale, "k_scale");
  check_kv_scale(p.v_scale, "v_scale");
  std::vector<QueryTile> tiles;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int32_t q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      for (int32_t q0 = 0; q0 < q_len; q0 += kCpuQueryTile) tiles.push_back({b, h, q0});
    }
  }
  parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t i) {
    thread_local std::vector<float> scratch;
    attend_query_tile(p, tiles[i], scratch);
  });
}

}  // namespace pagedlm
