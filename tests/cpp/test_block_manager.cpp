// Unit tests of the C++ block manager: allocation, copy-on-write, truncation, prefix
// caching with LRU eviction, placeholders named later (set_token), atomic failure, and the
// batched builders.
#include <gtest/gtest.h>

#include <numeric>
#include <utility>
#include <vector>

#include "pagedlm/block_manager.h"
#include "pagedlm/errors.h"

using pagedlm::BlockId;
using pagedlm::BlockManager;
using pagedlm::TokenId;

namespace {

std::vector<TokenId> iota_tokens(int n, int start = 0) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), start);
  return t;
}

int64_t allocate(BlockManager& bm, int64_t id, const std::vector<TokenId>& t) {
  return bm.allocate(id, t.data(), static_cast<int64_t>(t.size()));
}

std::vector<std::pair<BlockId, BlockId>> append(BlockManager& bm, int64_t id, const std::vector<TokenId>& t) {
  return bm.append(id, t.data(), static_cast<int64_t>(t.size()));
}

TEST(BlockManager, AllocateUsesCeilBlocksAndFreeReturnsThem) {
  BlockManager bm(10, 4);
  EXPECT_EQ(allocate(bm, 1, iota_tokens(9)), 0);
  EXPECT_EQ(bm.block_table(1).size(), 3u);  // waste under one block
  EXPECT_EQ(bm.num_free_blocks(), 7);
  bm.free(1);
  EXPECT_EQ(bm.num_free_blocks(), 10);
  EXPECT_EQ(bm.num_seqs(), 0);
}

TEST(BlockManager, AppendFillsPartialBlockBeforeTakingNew) {
  BlockManager bm(10, 4);
  allocate(bm, 1, iota_tokens(3));
  EXPECT_TRUE(append(bm, 1, {7}).empty());
  EXPECT_EQ(bm.block_table(1).size(), 1u);
  append(bm, 1, {8});
  EXPECT_EQ(bm.block_table(1).size(), 2u);
  EXPECT_EQ(bm.num_tokens(1), 5);
}

TEST(BlockManager, ForkSharesAndAppendCopiesOnWrite) {
  BlockManager bm(10, 4);
  allocate(bm, 1, iota_tokens(6));  // blocks: full, half
  bm.fork(1, 2);
  const auto parent = bm.block_table(1);
  EXPECT_EQ(bm.block_table(2), parent);
  EXPECT_EQ(bm.ref_count(parent[0]), 2);
  EXPECT_EQ(bm.ref_count(parent[1]), 2);

  auto copies = append(bm, 2, {42});
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].first, parent[1]);
  EXPECT_EQ(copies[0].second, bm.block_table(2)[1]);
  EXPECT_NE(bm.block_table(2)[1], parent[1]);
  EXPECT_EQ(bm.block_table(2)[0], parent[0]);  // full block stays shared
  EXPECT_EQ(bm.ref_count(parent[1]), 1);
  EXPECT_EQ(bm.ref_count(parent[0]), 2);

  // The parent is now the only holder of its last block: it writes in place.
  EXPECT_TRUE(append(bm, 1, {43}).empty());
}

TEST(BlockManager, AppendAfterFullSharedBlockNeedsNoCopy) {
  BlockManager bm(10, 4);
  allocate(bm, 1, iota_tokens(8));
  bm.fork(1, 2);
  EXPECT_TRUE(append(bm, 2, {1}).empty());
  EXPECT_EQ(bm.ref_count(bm.block_table(1)[1]), 2);
}

TEST(BlockManager, TruncateReleasesEmptiedBlocksAndLeavesSharedOnesAlone) {
  BlockManager bm(10, 4);
  allocate(bm, 1, iota_tokens(10));
  bm.fork(1, 2);
  const auto shared = bm.block_table(1);
  bm.truncate(2, 5);
  EXPECT_EQ(bm.block_table(2).size(), 2u);
  EXPECT_EQ(bm.ref_count(shared[2]), 1);
  EXPECT_EQ(bm.ref_count(shared[1]), 2);
  auto copies = append(bm, 2, {99});  // block 1 is still shared: copy on write
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].first, shared[1]);
  EXPECT_THROW(bm.truncate(2, 7), pagedlm::InvalidArgument);
  EXPECT_THROW(bm.truncate(2, -1), pagedlm::InvalidArgument);
}

TEST(BlockManager, FailedCallsChangeNothing) {
  BlockManager bm(4, 4);
  allocate(bm, 1, iota_tokens(10));  // 3 blocks
  bm.fork(1, 2);
  const auto before = bm.stats();
  EXPECT_THROW(allocate(bm, 3, iota_tokens(8)), pagedlm::OutOfBlocks);
  EXPECT_THROW(append(bm, 2, iota_tokens(7)), pagedlm::OutOfBlocks);  // copy-on-write + 2 new > 1 free
  EXPECT_FALSE(bm.contains(3));
  EXPECT_EQ(bm.num_tokens(2), 10);
  const auto after = bm.stats();
  EXPECT_EQ(before.used_blocks, after.used_blocks);
  EXPECT_EQ(before.free_blocks, after.free_blocks);
  EXPECT_EQ(bm.ref_count(bm.block_table(1)[2]), 2);
}

TEST(BlockManager, UnknownAndDuplicateIdsThrow) {
  BlockManager bm(4, 4);
  allocate(bm, 1, iota_tokens(2));
  EXPECT_THROW(allocate(bm, 1, iota_tokens(2)), pagedlm::InvalidArgument);
  EXPECT_THROW(bm.free(5), pagedlm::UnknownId);
  EXPECT_THROW(bm.fork(5, 6), pagedlm::UnknownId);
  EXPECT_THROW(bm.fork(1, 1), pagedlm::InvalidArgument);
  EXPECT_THROW(bm.ref_count(4), pagedlm::InvalidArgument);
  EXPECT_THROW(BlockManager(0, 4), pagedlm::InvalidArgument);
  EXPECT_THROW(BlockManager(4, 0), pagedlm::InvalidArgument);
}

TEST(PrefixCache, HitsWholeBlocksButNeverTheLastToken) {
  BlockManager bm(16, 4, /*enable_prefix_caching=*/true);
  EXPECT_EQ(allocate(bm, 1, iota_tokens(12)), 0);
  EXPECT_EQ(allocate(bm, 2, iota_tokens(12)), 8);  // 12 - 1 rounded down to blocks
  EXPECT_EQ(allocate(bm, 3, iota_tokens(13)), 12);
  EXPECT_EQ(allocate(bm, 4, iota_tokens(7)), 4);
  EXPECT_EQ(bm.block_table(2)[0], bm.block_table(1)[0]);
  EXPECT_EQ(bm.ref_count(bm.block_table(1)[0]), 4);
  // A different first block breaks the chain even when later tokens agree.
  auto other = iota_tokens(12);
  other[0] = 100;
  EXPECT_EQ(allocate(bm, 5, other), 0);
}

TEST(PrefixCache, FreedBlocksStayCachedAndAreEvictedLeastRecentlyUsedFirst) {
  BlockManager bm(5, 2, true);
  allocate(bm, 1, {1, 2, 3, 4, 5});  // 3 blocks: [1,2] [3,4] [5]
  bm.free(1);
  auto s = bm.stats();
  EXPECT_EQ(s.cached_blocks, 2);  // the two full blocks
  EXPECT_EQ(s.free_blocks, 3);
  EXPECT_EQ(allocate(bm, 2, {1, 2, 3, 4, 9}), 4);  // revived from the cache
  bm.free(2);
  // Freed tail-first, so [3,4] is older than [1,2] and is evicted first.
  allocate(bm, 3, {7, 7, 7, 7, 7, 7, 7, 7});  // needs 4 blocks: 3 free + 1 eviction
  EXPECT_EQ(bm.stats().evictions, 1);
  bm.free(3);
  EXPECT_EQ(allocate(bm, 4, {1, 2, 3, 4, 5}), 2);  // [1,2] survived, [3,4] did not
}

TEST(PrefixCache, OverwrittenBlockIsNeverServed) {
  BlockManager bm(8, 4, true);
  allocate(bm, 1, iota_tokens(8));
  bm.truncate(1, 6);                  // keeps block 1 with 2 of its 4 tokens
  append(bm, 1, {50, 51});            // overwrites tokens 6 and 7 in place
  auto original = iota_tokens(9);
  EXPECT_EQ(allocate(bm, 2, original), 4);  // only the first block still matches
}

TEST(PrefixCache, SetTokenNamesAPlaceholderAndRecachesTheFullBlock) {
  BlockManager bm(8, 4, true);
  allocate(bm, 1, {5, 6, 7});
  append(bm, 1, {-1});  // a placeholder completes the first block
  bm.set_token(1, 3, 8);
  append(bm, 1, {9});
  EXPECT_EQ(allocate(bm, 2, {5, 6, 7, 8, 9}), 4);  // the block [5, 6, 7, 8] is a hit
  EXPECT_EQ(allocate(bm, 3, {5, 6, 7, -1, 9}), 0);
  EXPECT_THROW(bm.set_token(1, 3, 0), pagedlm::InvalidArgument);  // not in the last block
  EXPECT_THROW(bm.set_token(1, 5, 0), pagedlm::InvalidArgument);  // past the last token
  bm.fork(1, 4);
  EXPECT_THROW(bm.set_token(1, 4, 0), pagedlm::InvalidArgument);  // the last block is shared
}

TEST(BatchedBuilders, BlockTablesPadAndSlotMappingFollowsBlocks) {
  BlockManager bm(16, 4);
  allocate(bm, 1, iota_tokens(9));
  allocate(bm, 2, iota_tokens(2));
  const int64_t ids[] = {2, 1};
  const int32_t width = bm.max_blocks(ids, 2);
  ASSERT_EQ(width, 3);
  std::vector<BlockId> tables(2 * width);
  bm.block_tables(ids, 2, width, tables.data());
  EXPECT_EQ(tables[0], bm.block_table(2)[0]);
  EXPECT_EQ(tables[1], -1);
  EXPECT_EQ(tables[3 + 2], bm.block_table(1)[2]);

  const int64_t counts[] = {1, 2};
  ASSERT_EQ(bm.slot_mapping_size(ids, counts, 2), 3);
  std::vector<int64_t> slots(3);
  bm.slot_mapping(ids, counts, 2, slots.data());
  const auto& b1 = bm.block_table(1);
  EXPECT_EQ(slots[0], bm.block_table(2)[0] * 4 + 1);
  EXPECT_EQ(slots[1], b1[1] * 4 + 3);  // token 7
  EXPECT_EQ(slots[2], b1[2] * 4 + 0);  // token 8
  const int64_t too_many[] = {3, 0};
  EXPECT_THROW(bm.slot_mapping_size(ids, too_many, 2), pagedlm::InvalidArgument);
}

TEST(Stats, UtilizationCountsSharedSlotsOnce) {
  BlockManager bm(16, 4);
  allocate(bm, 1, iota_tokens(6));
  bm.fork(1, 2);
  auto s = bm.stats();
  EXPECT_EQ(s.used_blocks, 2);
  EXPECT_EQ(s.tokens_stored, 6);
  EXPECT_DOUBLE_EQ(s.utilization, 6.0 / 8.0);
}

}  // namespace
