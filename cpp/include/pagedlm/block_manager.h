// The KV-cache block manager: fixed-size blocks, per-sequence block tables, refcounted
// sharing with copy-on-write for forks, and opt-in prefix caching. It hands out block ids
// only; the caller owns the KV memory and performs the copies that append() returns.
//
// Every mutating call is all-or-nothing: it validates and counts the blocks it needs
// first, throws (OutOfBlocks, UnknownId, InvalidArgument) before changing any state,
// and cannot fail once it starts to commit. Not thread-safe: one scheduler drives it.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pagedlm {

using SeqId = int64_t;
using TokenId = int32_t;
using BlockId = int32_t;

struct BlockManagerStats {
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t used_blocks = 0;    // refcount > 0
  int32_t free_blocks = 0;    // refcount 0, holding nothing worth keeping
  int32_t cached_blocks = 0;  // refcount 0, kept for prefix reuse until evicted (LRU)
  int64_t num_seqs = 0;
  int64_t tokens_stored = 0;  // distinct filled slots in used blocks
  double utilization = 0.0;   // tokens_stored / (used_blocks * block_size)
  int64_t prefix_query_tokens = 0;  // prompt tokens seen by allocate()
  int64_t prefix_hit_tokens = 0;    // of those, served from the prefix cache
  int64_t evictions = 0;            // cached blocks reclaimed for new content
};

class BlockManager {
 public:
  // hash_bits (a test hook, 0 to 64): keeps only the low hash_bits bits of every block key's
  // hash, so that tests can force collisions (0: every full block hashes alike). Sharing must
  // stay exact whatever it is, since every hit compares the block's parent and tokens.
  BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching = false, int32_t hash_bits = 64);

  // Creates seq_id holding n prompt tokens. With prefix caching, reuses the longest run of
  // cached full blocks matching the prompt, leaving at least the last token to compute;
  // returns the number of prompt tokens already cached (a multiple of block_size).
  int64_t allocate(SeqId seq_id, const TokenId* tokens, int64_t n);

  // Reserves slots for n more tokens. If the partly filled last block is shared, it is
  // copied on write: the returned (src, dst) pairs name the blocks the caller must copy.
  std::vector<std::pair<BlockId, BlockId>> append(SeqId seq_id, const TokenId* tokens, int64_t n);

  // Sets the token at `position`, which must lie in the last block (not shared), to `token`: a caller that
  // reserved a slot before it knew the token there (an asynchronous step's input, appended as a
  // placeholder) names it once known. If that block is full, its prefix-cache entry is redone
  // with the new content. Without prefix caching, only the position is checked.
  void set_token(SeqId seq_id, int64_t position, TokenId token);

  // Keeps the first num_tokens tokens and releases blocks left empty. A kept block that is
  // shared is left untouched; the next append into it copies it on write.
  void truncate(SeqId seq_id, int64_t num_tokens);

  void fork(SeqId parent_id, SeqId child_id);  // child shares every block of parent
  void free(SeqId seq_id);

  bool contains(SeqId seq_id) const { return seqs_.count(seq_id) != 0; }
  int64_t num_seqs() const { return static_cast<int64_t>(seqs_.size()); }
  const std::vector<BlockId>& block_table(SeqId seq_id) const;
  int64_t num_tokens(SeqId seq_id) const;

  // Batched builders. block_tables writes [n, width] row-major, padding with -1; width
  // must be at least max_blocks(). slot_mapping writes sum(counts) slots: the last
  // counts[i] tokens of each sequence, in order. Both validate every id before writing.
  int32_t max_blocks(const SeqId* seq_ids, int64_t n) const;
  void block_tables(const SeqId* seq_ids, int64_t n, int32_t width, BlockId* out) const;
  int64_t slot_mapping_size(const SeqId* seq_ids, const int64_t* counts, int64_t n) const;
  void slot_mapping(const SeqId* seq_ids, const int64_t* counts, int64_t n, int64_t* out) const;

  bool can_allocate(int64_t num_tokens) const;
  int32_t num_free_blocks() const { return free_count_ + lru_count_; }
  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  int32_t ref_count(BlockId block_id) const;
  BlockManagerStats stats() const;

 private:
  struct Sequence {
    std::vector<BlockId> blocks;
    int64_t num_tokens = 0;
    // Prefix caching only: the tokens, and for each full block the identity of the cached
    // content it holds (its own cache id, or that of an identical cached block).
    std::vector<TokenId> tokens;
    std::vector<uint64_t> chain_id;
  };

  Sequence& find(SeqId seq_id, const char* arg);
  const Sequence& find(SeqId seq_id, const char* arg) const;
  int64_t blocks_for(int64_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

  BlockId take_block();          // from the free list, else evicts the LRU cached block
  void release(BlockId block);   // refcount - 1; at zero the block is freed or cached
  void acquire(BlockId block);   // refcount + 1, reclaiming it from the LRU list if cached

  void lru_push_back(BlockId block);
  void lru_remove(BlockId block);

  // Prefix caching: the cached block whose content is this block of tokens following the
  // content identified by parent_id, or -1.
  BlockId lookup(uint64_t hash, uint64_t parent_id, const TokenId* tokens) const;
  void unregister(BlockId block);
  void register_full_blocks(Sequence& seq);

  uint64_t key_hash(uint64_t parent_id, const TokenId* tokens) const;

  int32_t num_blocks_;
  int32_t block_size_;
  bool prefix_caching_;
  uint64_t hash_mask_;

  std::vector<int32_t> ref_count_;
  // Free list: a FIFO ring of block ids with refcount 0 and no cached content.
  std::vector<BlockId> free_ring_;
  int32_t free_head_ = 0;
  int32_t free_count_ = 0;
  // Cached blocks with refcount 0, least recently released first (intrusive list).
  std::vector<BlockId> lru_prev_, lru_next_;
  BlockId lru_head_ = -1, lru_tail_ = -1;
  int32_t lru_count_ = 0;

  // Prefix cache: a full block is identified by (parent_id, its tokens), where parent_id is
  // the cache id of the content before it, so the key covers every token up to the block's
  // end. The map is keyed by a 64-bit hash of that pair and the pair itself is compared on
  // every hit, so a hash collision can never share the wrong content. A block's cache_id is
  // nonzero while it is in the map; ids are never reused.
  std::unordered_map<uint64_t, BlockId> cached_;
  std::vector<uint64_t> block_hash_, cache_id_, parent_id_;
  std::vector<TokenId> block_tokens_;
  uint64_t next_cache_id_ = 1;

  std::unordered_map<SeqId, Sequence> seqs_;
  int64_t prefix_query_tokens_ = 0;
  int64_t prefix_hit_tokens_ = 0;
  int64_t evictions_ = 0;
};

}  // namespace pagedlm
