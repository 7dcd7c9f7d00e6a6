// CPU path of the KV-cache writes and block copies: validated, then plain memcpy.
#include "pagedlm/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "pagedlm/errors.h"
#include "pagedlm/parallel.h"

namespace pagedlm {

namespace {

std::string pair_at(int64_t i) { return "block_mapping[" + std::to_string(i) + ", "; }

}  // namespace

void check_slot_mapping(const int64_t* slot_mapping, int64_t num_tokens, int64_t num_slots) {
  std::vector<std::pair<int64_t, int64_t>> used;  // (slot, token) of the tokens written
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < -1 || slot >= num_slots) {
      throw InvalidArgument("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(slot) +
                            " is outside [-1, " + std::to_string(num_slots) + ")");
    }
    if (slot >= 0) used.emplace_back(slot, t);
  }
  std::sort(used.begin(), used.end());
  for (size_t i = 1; i < used.size(); ++i) {
    if (used[i].first == used[i - 1].first) {
      throw InvalidArgument("slot_mapping[" + std::to_string(used[i].second) + "] = " + std::to_string(used[i].first) +
                            " repeats slot_mapping[" + std::to_string(used[i - 1].second) +
                            "] (two tokens written to one slot)");
    }
  }
}

void check_block_mapping(const int64_t* block_mapping, int64_t num_pairs, int64_t num_blocks) {
  for (int64_t i = 0; i < 2 * num_pairs; ++i) {
    const int64_t block = block_mapping[i];
    if (block < 0 || block >= num_blocks) {
      throw InvalidArgument(pair_at(i / 2) + std::to_string(i % 2) + "] = " + std::to_string(block) +
                            " is outside [0, " + std::to_string(num_blocks) + ")");
    }
  }
  // Copies run in parallel on CUDA: a destination must not be written twice, nor be another
  // pair's source. Pairs with src == dst copy nothing and take no part.
  std::vector<std::pair<int64_t, int64_t>> dsts, srcs;  // (block, pair)
  for (int64_t i = 0; i < num_pairs; ++i) {
    if (block_mapping[2 * i] == block_mapping[2 * i + 1]) continue;
    srcs.emplace_back(block_mapping[2 * i], i);
    dsts.emplace_back(block_mapping[2 * i + 1], i);
  }
  std::sort(dsts.begin(), dsts.end());
  std::sort(srcs.begin(), srcs.end());
  for (size_t i = 1; i < dsts.size(); ++i) {
    if (dsts[i].first == dsts[i - 1].first) {
      throw InvalidArgument(pair_at(dsts[i].second) + "1] = " + std::to_string(dsts[i].first) + " is also the destination of " +
                            pair_at(dsts[i - 1].second) + "1]");
    }
  }
  for (const auto& [block, pair] : dsts) {
    const auto it = std::lower_bound(srcs.begin(), srcs.end(), std::make_pair(block, int64_t{-1}));
    if (it != srcs.end() && it->first == block) {
      throw InvalidArgument(pair_at(pair) + "1] = " + std::to_string(block) + " is also the source of " +
                            pair_at(it->second) + "0] (copies run in parallel)");
    }
  }
}

void check_kv_scale(const KVScale& scale, const char* arg) {
  for (int32_t i = 0; scale.data && i < scale.count; ++i) {
    const float s = scale.data[i];
    if (!(s > 0.0f) || !std::isfinite(s)) {
      throw InvalidArgument(std::string(arg) + "[" + std::to_string(i) + "] = " + std::to_string(s) +
                            ": a scale must be finite and > 0");
    }
  }
}

namespace {

// FP8 caches: each element becomes saturate(x / scale), rounded to nearest even.
void write_kv_cache_fp8(const WriteKVCacheParams& p) {
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  auto quantize = [&](const void* src, int64_t stride, void* cache, const KVScale& scale, int64_t t, int64_t slot) {
    const char* from = static_cast<const char*>(src) + t * stride * dtype_size(p.dtype);
    uint8_t* to = static_cast<uint8_t*>(cache) + slot * row;
    for (int32_t h = 0; h < p.num_kv_heads; ++h) {
      const float s = kv_scale_at(scale, h);
      for (int32_t d = 0; d < p.head_dim; ++d) {
        const int64_t i = static_cast<int64_t>(h) * p.head_dim + d;
        to[i] = float_to_fp8(load_as_float(from, i, p.dtype) / s, p.cache_dtype);
      }
    }
  };
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    quantize(p.key, p.key_stride, p.key_cache, p.k_scale, t, slot);
    quantize(p.value, p.value_stride, p.value_cache, p.v_scale, t, slot);
  }
}

}  // namespace

void write_kv_cache_cpu(const WriteKVCacheParams& p) {
  check_slot_mapping(p.slot_mapping, p.num_tokens, p.num_slots);
  check_kv_scale(p.k_scale, "k_scale");
  check_kv_scale(p.v_scale, "v_scale");
  if (is_fp8(p.cache_dtype)) return write_kv_cache_fp8(p);
  const int64_t row = static_cast<int64_t>(p.num_kv_heads) * p.head_dim;
  const int64_t esize = dtype_size(p.dtype);
  auto* kc = static_cast<char*>(p.key_cache);
  auto* vc = static_cast<char*>(p.value_cache);
  const auto* k = static_cast<const char*>(p.key);
  const auto* v = static_cast<const char*>(p.value);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    std::memcpy(kc + slot * row * esize, k + t * p.key_stride * esize, row * esize);
    std::memcpy(vc + slot * row * esize, v + t * p.value_stride * esize, row * esize);
  }
}

void copy_blocks_cpu(const CopyBlocksParams& p) {
  check_block_mapping(p.block_mapping, p.num_pairs, p.num_blocks);
  const int64_t bytes = p.block_elems * dtype_size(p.dtype);
  for (char* cache : {static_cast<char*>(p.key_cache), static_cast<char*>(p.value_cache)}) {
    for (int64_t i = 0; i < p.num_pairs; ++i) {
      const int64_t src = p.block_mapping[2 * i], dst = p.block_mapping[2 * i + 1];
      if (src != dst) std::memcpy(cache + dst * bytes, cache + src * bytes, bytes);
    }
  }
}

}  // namespace pagedlm
