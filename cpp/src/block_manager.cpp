// The KV-cache block manager (see block_manager.h for the contract).
#include "pagedlm/block_manager.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "pagedlm/errors.h"

namespace pagedlm {
namespace {

// MurmurHash3's 64-bit finaliser: a cheap, well-mixed step for chaining block hashes.
uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// A full block's key: the identity of the content before it, then its own tokens. Chained
// through identities, it covers every token up to the block's end.
uint64_t block_key_hash(uint64_t parent_id, const TokenId* tokens, int32_t n) {
  uint64_t h = mix64(parent_id ^ 0x9e3779b97f4a7c15ULL);
  for (int32_t i = 0; i < n; ++i) h = mix64(h ^ static_cast<uint32_t>(tokens[i]));
  return h;
}

std::string seq_str(SeqId id) { return std::to_string(id); }

}  // namespace

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching, int32_t hash_bits)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      prefix_caching_(enable_prefix_caching),
      hash_mask_(hash_bits >= 64 ? ~uint64_t{0} : hash_bits <= 0 ? 0 : (uint64_t{1} << hash_bits) - 1) {
  if (num_blocks <= 0) throw InvalidArgument("num_blocks must be positive, got " + std::to_string(num_blocks));
  if (block_size <= 0) throw InvalidArgument("block_size must be positive, got " + std::to_string(block_size));
  if (hash_bits < 0 || hash_bits > 64) throw InvalidArgument("hash_bits must be in [0, 64], got " + std::to_string(hash_bits));
  ref_count_.assign(num_blocks, 0);
  free_ring_.resize(num_blocks);
  for (BlockId b = 0; b < num_blocks; ++b) free_ring_[b] = b;
  free_count_ = num_blocks;
  lru_prev_.assign(num_blocks, -1);
  lru_next_.assign(num_blocks, -1);
  if (prefix_caching_) {
    block_hash_.assign(num_blocks, 0);
    cache_id_.assign(num_blocks, 0);
    parent_id_.assign(num_blocks, 0);
    block_tokens_.assign(static_cast<size_t>(num_blocks) * block_size, 0);
  }
}

BlockManager::Sequence& BlockManager::find(SeqId seq_id, const char* arg) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownId(std::string(arg) + ": unknown sequence id " + seq_str(seq_id));
  return it->second;
}

const BlockManager::Sequence& BlockManager::find(SeqId seq_id, const char* arg) const {
  return const_cast<BlockManager*>(this)->find(seq_id, arg);
}

// ---- block lifetime -------------------------------------------------------------------

BlockId BlockManager::take_block() {
  BlockId block;
  if (free_count_ > 0) {
    block = free_ring_[free_head_];
    if (++free_head_ == num_blocks_) free_head_ = 0;  // a branch, not a division: this is the hot path
    --free_count_;
  } else {
    block = lru_head_;  // callers have checked num_free_blocks(), so this is a block
    lru_remove(block);
    unregister(block);
    ++evictions_;
  }
  ref_count_[block] = 1;
  return block;
}

void BlockManager::release(BlockId block) {
  if (--ref_count_[block] > 0) return;
  if (prefix_caching_ && cache_id_[block] != 0) {
    lru_push_back(block);
  } else {
    int32_t tail = free_head_ + free_count_;
    free_ring_[tail >= num_blocks_ ? tail - num_blocks_ : tail] = block;
    ++free_count_;
  }
}

void BlockManager::acquire(BlockId block) {
  if (ref_count_[block]++ == 0) lru_remove(block);
}

void BlockManager::lru_push_back(BlockId block) {
  lru_prev_[block] = lru_tail_;
  lru_next_[block] = -1;
  if (lru_tail_ >= 0) lru_next_[lru_tail_] = block; else lru_head_ = block;
  lru_tail_ = block;
  ++lru_count_;
}

void BlockManager::lru_remove(BlockId block) {
  BlockId prev = lru_prev_[block], next = lru_next_[block];
  if (prev >= 0) lru_next_[prev] = next; else lru_head_ = next;
  if (next >= 0) lru_prev_[next] = prev; else lru_tail_ = prev;
  lru_prev_[block] = lru_next_[block] = -1;
  --lru_count_;
}

// ---- prefix cache ---------------------------------------------------------------------

uint64_t BlockManager::key_hash(uint64_t parent_id, const TokenId* tokens) const {
  return block_key_hash(parent_id, tokens, block_size_) & hash_mask_;
}

BlockId BlockManager::lookup(uint64_t hash, uint64_t parent_id, const TokenId* tokens) const {
  auto it = cached_.find(hash);
  if (it == cached_.end()) return -1;
  BlockId block = it->second;
  const TokenId* held = &block_tokens_[static_cast<size_t>(block) * block_size_];
  bool same = parent_id_[block] == parent_id &&
              std::memcmp(held, tokens, sizeof(TokenId) * block_size_) == 0;
  return same ? block : -1;
}

void BlockManager::unregister(BlockId block) {
  if (!prefix_caching_ || cache_id_[block] == 0) return;
  cached_.erase(block_hash_[block]);
  cache_id_[block] = 0;
}

// Gives every newly full block of seq a place in the prefix cache. A block whose content
// is already cached under another block keeps that block's identity so later blocks
// still chain to it; on a (practically impossible) hash clash the block stays private.
void BlockManager::register_full_blocks(Sequence& seq) {
  if (!prefix_caching_) return;
  const int64_t full = seq.num_tokens / block_size_;
  for (int64_t i = static_cast<int64_t>(seq.chain_id.size()); i < full; ++i) {
    const TokenId* tokens = &seq.tokens[i * block_size_];
    uint64_t parent = i > 0 ? seq.chain_id[i - 1] : 0;
    uint64_t hash = key_hash(parent, tokens);
    uint64_t id;
    BlockId same = lookup(hash, parent, tokens);
    if (same >= 0) {
      id = cache_id_[same];
    } else if (cached_.count(hash) != 0) {
      id = next_cache_id_++;
    } else {
      BlockId block = seq.blocks[i];
      id = next_cache_id_++;
      cached_.emplace(hash, block);
      block_hash_[block] = hash;
      cache_id_[block] = id;
      parent_id_[block] = parent;
      std::memcpy(&block_tokens_[static_cast<size_t>(block) * block_size_], tokens,
                  sizeof(TokenId) * block_size_);
    }
    seq.chain_id.push_back(id);
  }
}

// ---- sequence operations --------------------------------------------------------------

int64_t BlockManager::allocate(SeqId seq_id, const TokenId* tokens, int64_t n) {
  if (seqs_.count(seq_id)) throw InvalidArgument("seq_id: sequence " + seq_str(seq_id) + " already exists");
  if (n < 0) throw InvalidArgument("token_ids: negative length");

  // Longest cached run of full blocks, stopping early enough that the last token is computed.
  Sequence seq;
  std::vector<BlockId> hits;
  int32_t hits_in_lru = 0;
  if (prefix_caching_) {
    uint64_t parent = 0;
    for (int64_t i = 0; (i + 1) * block_size_ <= n - 1; ++i) {
      const TokenId* block_tokens = tokens + i * block_size_;
      uint64_t hash = key_hash(parent, block_tokens);
      BlockId block = lookup(hash, parent, block_tokens);
      if (block < 0) break;
      hits.push_back(block);
      hits_in_lru += ref_count_[block] == 0;
      seq.chain_id.push_back(cache_id_[block]);
      parent = cache_id_[block];
    }
  }
  const int64_t needed = blocks_for(n) - static_cast<int64_t>(hits.size());
  if (needed > num_free_blocks() - hits_in_lru) {
    throw OutOfBlocks("allocate: sequence " + seq_str(seq_id) + " needs " + std::to_string(needed) +
                      " new blocks, " + std::to_string(num_free_blocks() - hits_in_lru) + " free");
  }

  for (BlockId block : hits) acquire(block);
  seq.blocks.reserve(hits.size() + needed);
  seq.blocks.assign(hits.begin(), hits.end());
  for (int64_t i = 0; i < needed; ++i) seq.blocks.push_back(take_block());
  seq.num_tokens = n;
  const int64_t cached_tokens = static_cast<int64_t>(hits.size()) * block_size_;
  if (prefix_caching_) {
    seq.tokens.assign(tokens, tokens + n);
    register_full_blocks(seq);
    prefix_query_tokens_ += n;
    prefix_hit_tokens_ += cached_tokens;
  }
  seqs_.emplace(seq_id, std::move(seq));
  return cached_tokens;
}

std::vector<std::pair<BlockId, BlockId>> BlockManager::append(SeqId seq_id, const TokenId* tokens, int64_t n) {
  Sequence& seq = find(seq_id, "seq_id");
  if (n < 0) throw InvalidArgument("token_ids: negative length");
  std::vector<std::pair<BlockId, BlockId>> copies;
  if (n == 0) return copies;

  const bool partial = seq.num_tokens % block_size_ != 0;
  const bool copy_on_write = partial && ref_count_[seq.blocks.back()] > 1;
  const int64_t needed = blocks_for(seq.num_tokens + n) - static_cast<int64_t>(seq.blocks.size()) + copy_on_write;
  if (needed > num_free_blocks()) {
    throw OutOfBlocks("append: sequence " + seq_str(seq_id) + " needs " + std::to_string(needed) +
                      " new blocks, " + std::to_string(num_free_blocks()) + " free");
  }

  if (partial) {
    BlockId last = seq.blocks.back();
    if (copy_on_write) {
      BlockId copy = take_block();
      --ref_count_[last];  // still > 0: another sequence holds it
      seq.blocks.back() = copy;
      copies.emplace_back(last, copy);
    } else {
      unregister(last);  // about to be overwritten past its kept tokens (after a truncate)
    }
  }
  while (static_cast<int64_t>(seq.blocks.size()) < blocks_for(seq.num_tokens + n)) {
    seq.blocks.push_back(take_block());
  }
  seq.num_tokens += n;
  if (prefix_caching_) {
    seq.tokens.insert(seq.tokens.end(), tokens, tokens + n);
    register_full_blocks(seq);
  }
  return copies;
}

void BlockManager::set_token(SeqId seq_id, int64_t position, TokenId token) {
  Sequence& seq = find(seq_id, "seq_id");
  const int64_t last = static_cast<int64_t>(seq.blocks.size()) - 1;
  if (position < last * block_size_ || position >= seq.num_tokens) {
    throw InvalidArgument("position: " + std::to_string(position) + " is outside the last block [" +
                          std::to_string(std::max<int64_t>(last, 0) * block_size_) + ", " +
                          std::to_string(seq.num_tokens) + ") of sequence " + seq_str(seq_id));
  }
  if (ref_count_[seq.blocks[static_cast<size_t>(last)]] > 1) {
    throw InvalidArgument("position: the last block of sequence " + seq_str(seq_id) +
                          " is shared (its KV is another sequence's too)");
  }
  if (!prefix_caching_) return;
  seq.tokens[static_cast<size_t>(position)] = token;
  if (static_cast<int64_t>(seq.chain_id.size()) > last) {  // full and entered: enter its new content
    const BlockId block = seq.blocks[static_cast<size_t>(last)];
    if (cache_id_[block] == seq.chain_id.back()) unregister(block);  // its own entry, not a shared one's
    seq.chain_id.pop_back();
    register_full_blocks(seq);
  }
}

void BlockManager::truncate(SeqId seq_id, int64_t num_tokens) {
  Sequence& seq = find(seq_id, "seq_id");
  if (num_tokens < 0 || num_tokens > seq.num_tokens) {
    throw InvalidArgument("num_tokens: " + std::to_string(num_tokens) + " is outside [0, " +
                          std::to_string(seq.num_tokens) + "] for sequence " + seq_str(seq_id));
  }
  const size_t keep = static_cast<size_t>(blocks_for(num_tokens));
  while (seq.blocks.size() > keep) {
    release(seq.blocks.back());
    seq.blocks.pop_back();
  }
  seq.num_tokens = num_tokens;
  if (prefix_caching_) {
    seq.tokens.resize(num_tokens);
    const size_t full = static_cast<size_t>(num_tokens / block_size_);
    if (seq.chain_id.size() > full) seq.chain_id.resize(full);
  }
}

void BlockManager::fork(SeqId parent_id, SeqId child_id) {
  const Sequence& parent = find(parent_id, "parent_id");
  if (seqs_.count(child_id)) throw InvalidArgument("child_id: sequence " + seq_str(child_id) + " already exists");
  for (BlockId block : parent.blocks) ++ref_count_[block];
  Sequence child = parent;  // copy before emplace: emplace may rehash and move parent
  seqs_.emplace(child_id, std::move(child));
}

void BlockManager::free(SeqId seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownId("seq_id: unknown sequence id " + seq_str(seq_id));
  // Last block first: the tail of a prompt is the least likely to be shared again, so it
  // should be the first cached block to be evicted.
  const std::vector<BlockId>& blocks = it->second.blocks;
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) release(*b);
  seqs_.erase(it);
}

// ---- queries --------------------------------------------------------------------------

const std::vector<BlockId>& BlockManager::block_table(SeqId seq_id) const { return find(seq_id, "seq_id").blocks; }

int64_t BlockManager::num_tokens(SeqId seq_id) const { return find(seq_id, "seq_id").num_tokens; }

int32_t BlockManager::max_blocks(const SeqId* seq_ids, int64_t n) const {
  size_t width = 0;
  for (int64_t i = 0; i < n; ++i) width = std::max(width, find(seq_ids[i], "seq_ids").blocks.size());
  return static_cast<int32_t>(width);
}

void BlockManager::block_tables(const SeqId* seq_ids, int64_t n, int32_t width, BlockId* out) const {
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<BlockId>& blocks = find(seq_ids[i], "seq_ids").blocks;
    if (blocks.size() > static_cast<size_t>(width)) throw InvalidArgument("block_tables: width too small");
    BlockId* row = out + i * width;
    std::copy(blocks.begin(), blocks.end(), row);
    std::fill(row + blocks.size(), row + width, -1);
  }
}

int64_t BlockManager::slot_mapping_size(const SeqId* seq_ids, const int64_t* counts, int64_t n) const {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Sequence& seq = find(seq_ids[i], "seq_ids");
    if (counts[i] < 0 || counts[i] > seq.num_tokens) {
      throw InvalidArgument("counts[" + std::to_string(i) + "] = " + std::to_string(counts[i]) +
                            " is outside [0, " + std::to_string(seq.num_tokens) + "] for sequence " +
                            seq_str(seq_ids[i]));
    }
    total += counts[i];
  }
  return total;
}

void BlockManager::slot_mapping(const SeqId* seq_ids, const int64_t* counts, int64_t n, int64_t* out) const {
  slot_mapping_size(seq_ids, counts, n);  // validates everything before writing
  for (int64_t i = 0; i < n; ++i) {
    const Sequence& seq = seqs_.find(seq_ids[i])->second;
    for (int64_t t = seq.num_tokens - counts[i]; t < seq.num_tokens; ++t) {
      *out++ = static_cast<int64_t>(seq.blocks[t / block_size_]) * block_size_ + t % block_size_;
    }
  }
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  if (num_tokens < 0) throw InvalidArgument("num_tokens: must be non-negative");
  return blocks_for(num_tokens) <= num_free_blocks();
}

int32_t BlockManager::ref_count(BlockId block_id) const {
  if (block_id < 0 || block_id >= num_blocks_) {
    throw InvalidArgument("block_id: " + std::to_string(block_id) + " is outside [0, " +
                          std::to_string(num_blocks_) + ")");
  }
  return ref_count_[block_id];
}

BlockManagerStats BlockManager::stats() const {
  BlockManagerStats s;
  s.num_blocks = num_blocks_;
  s.block_size = block_size_;
  s.free_blocks = free_count_;
  s.cached_blocks = lru_count_;
  s.used_blocks = num_blocks_ - free_count_ - lru_count_;
  s.num_seqs = num_seqs();
  // A shared block is filled as far as its fullest holder has written it.
  std::vector<int32_t> filled(num_blocks_, 0);
  for (const auto& [id, seq] : seqs_) {
    for (size_t i = 0; i < seq.blocks.size(); ++i) {
      int64_t in_block = std::min<int64_t>(block_size_, seq.num_tokens - static_cast<int64_t>(i) * block_size_);
      filled[seq.blocks[i]] = std::max<int32_t>(filled[seq.blocks[i]], static_cast<int32_t>(in_block));
    }
  }
  for (int32_t f : filled) s.tokens_stored += f;
  s.utilization = s.used_blocks ? static_cast<double>(s.tokens_stored) / (static_cast<double>(s.used_blocks) * block_size_) : 0.0;
  s.prefix_query_tokens = prefix_query_tokens_;
  s.prefix_hit_tokens = prefix_hit_tokens_;
  s.evictions = evictions_;
  return s;
}

}  // namespace pagedlm
