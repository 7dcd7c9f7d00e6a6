// The CPU attention inner loop shared by the prefill and decode paths (private to cpp/src).
#pragma once

#include <cstdint>
#include <vector>

#include "pagedlm/paged_prefill.h"

namespace pagedlm {

constexpr int32_t kCpuQueryTile = 16;  // queries of one sequence attended together

// Sequence b's queries q0 .. q0 + kCpuQueryTile - 1 (fewer at the end) for every query head of
// kv head kv_head; values are assumed checked. A decode step is the tile of its one query.
struct QueryTile {
  int32_t b, kv_head, q0;
};
void attend_query_tile(const PagedPrefillParams& p, const QueryTile& tile, std::vector<float>& scratch);

}  // namespace pagedlm
