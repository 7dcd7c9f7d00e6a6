// CPU path of the KV-cache writes and block copies: validated, then plain memcpy.
#include "pagedlm/kv_cache.h"

#include <cstring>
#include <string>

#include "pagedlm/errors.h"
#include "pagedlm/parallel.h"

namespace pagedlm {

void write_kv_cache_cpu(const WriteKVCacheParams& p) {
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < -1 || slot >= p.num_slots) {
      throw InvalidArgument("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(slot) +
                            " is outside [-1, " + std::to_string(p.num_slots) + ")");
    }
  }
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
  for (int64_t i = 0; i < 2 * p.num_pairs; ++i) {
    const int64_t block = p.block_mapping[i];
    if (block < 0 || block >= p.num_blocks) {
      throw InvalidArgument("block_mapping[" + std::to_string(i / 2) + ", " + std::to_string(i % 2) + "] = " +
                            std::to_string(block) + " is outside [0, " + std::to_string(p.num_blocks) + ")");
    }
  }
  const int64_t bytes = p.block_elems * dtype_size(p.dtype);
  for (char* cache : {static_cast<char*>(p.key_cache), static_cast<char*>(p.value_cache)}) {
    for (int64_t i = 0; i < p.num_pairs; ++i) {
      const int64_t src = p.block_mapping[2 * i], dst = p.block_mapping[2 * i + 1];
      if (src != dst) std::memcpy(cache + dst * bytes, cache + src * bytes, bytes);
    }
  }
}

}  // namespace pagedlm
