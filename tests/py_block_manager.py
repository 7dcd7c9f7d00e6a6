"""A plain pure-Python block manager with exactly the semantics of pagedlm.BlockManager.

It is the oracle that tests/test_block_manager_stateful.py checks the C++ manager against
after every step, and the baseline that bench/bench_block_manager.py replays traces on.
Written for clarity, the way nano-vllm writes its block manager: lists, a deque, dicts.
"""
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import count


class PyOutOfBlocksError(RuntimeError):
    pass


@dataclass
class _Seq:
    blocks: list = field(default_factory=list)
    num_tokens: int = 0
    tokens: list = field(default_factory=list)    # prefix caching only
    chain_id: list = field(default_factory=list)  # cache identity of each full block's content


class PyBlockManager:
    def __init__(self, num_blocks, block_size, enable_prefix_caching=False):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks = deque(range(num_blocks))  # FIFO: released to the back, taken from the front
        self.lru = OrderedDict()                      # cached blocks with refcount 0, oldest first
        self.cached = {}                              # (parent_id, tokens) -> block
        self.key_of = {}                              # block -> its key in `cached`
        self.cache_id = {}                            # block -> identity of the content it holds
        self.next_cache_id = count(1)
        self.seqs = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.evictions = 0

    # -- blocks ---------------------------------------------------------------------
    @property
    def num_free_blocks(self):
        return len(self.free_blocks) + len(self.lru)

    def _blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def _take(self):
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.lru.popitem(last=False)
            self._unregister(block)
            self.evictions += 1
        self.ref_counts[block] = 1
        return block

    def _release(self, block):
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.key_of:
                self.lru[block] = None
            else:
                self.free_blocks.append(block)

    def _acquire(self, block):
        if self.ref_counts[block] == 0:
            del self.lru[block]
        self.ref_counts[block] += 1

    def _unregister(self, block):
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cached[key]
            del self.cache_id[block]

    def _register_full_blocks(self, seq):
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.chain_id), seq.num_tokens // bs):
            parent = seq.chain_id[i - 1] if i else 0
            key = (parent, tuple(seq.tokens[i * bs:(i + 1) * bs]))
            same = self.cached.get(key)
            if same is not None:
                seq.chain_id.append(self.cache_id[same])
                continue
            block = seq.blocks[i]
            self.cached[key] = block
            self.key_of[block] = key
            self.cache_id[block] = next(self.next_cache_id)
            seq.chain_id.append(self.cache_id[block])

    def _find(self, seq_id, arg="seq_id"):
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise KeyError(f"{arg}: unknown sequence id {seq_id}") from None

    # -- sequences ------------------------------------------------------------------
    def allocate(self, seq_id, token_ids):
        if seq_id in self.seqs:
            raise ValueError(f"seq_id: sequence {seq_id} already exists")
        tokens = list(token_ids)
        n, bs = len(tokens), self.block_size
        seq = _Seq(num_tokens=n)
        hits = []
        if self.enable_prefix_caching:
            parent = 0
            for i in range((n - 1) // bs if n else 0):
                block = self.cached.get((parent, tuple(tokens[i * bs:(i + 1) * bs])))
                if block is None:
                    break
                hits.append(block)
                parent = self.cache_id[block]
                seq.chain_id.append(parent)
        hits_in_lru = sum(self.ref_counts[b] == 0 for b in hits)
        needed = self._blocks_for(n) - len(hits)
        if needed > self.num_free_blocks - hits_in_lru:
            raise PyOutOfBlocksError(f"allocate: sequence {seq_id} needs {needed} new blocks")
        for block in hits:
            self._acquire(block)
        seq.blocks = hits + [self._take() for _ in range(needed)]
        if self.enable_prefix_caching:
            seq.tokens = tokens
            self._register_full_blocks(seq)
            self.prefix_query_tokens += n
            self.prefix_hit_tokens += len(hits) * bs
        self.seqs[seq_id] = seq
        return len(hits) * bs

    def append(self, seq_id, token_ids):
        seq = self._find(seq_id)
        tokens = list(token_ids)
        if not tokens:
            return []
        partial = seq.num_tokens % self.block_size != 0
        copy_on_write = partial and self.ref_counts[seq.blocks[-1]] > 1
        new_total = seq.num_tokens + len(tokens)
        needed = self._blocks_for(new_total) - len(seq.blocks) + copy_on_write
        if needed > self.num_free_blocks:
            raise PyOutOfBlocksError(f"append: sequence {seq_id} needs {needed} new blocks")
        copies = []
        if partial:
            last = seq.blocks[-1]
            if copy_on_write:
                copy = self._take()
                self.ref_counts[last] -= 1
                seq.blocks[-1] = copy
                copies.append((last, copy))
            else:
                self._unregister(last)
        while len(seq.blocks) < self._blocks_for(new_total):
            seq.blocks.append(self._take())
        seq.num_tokens = new_total
        if self.enable_prefix_caching:
            seq.tokens.extend(tokens)
            self._register_full_blocks(seq)
        return copies

    def set_token(self, seq_id, position, token):
        seq = self._find(seq_id)
        last = len(seq.blocks) - 1
        if not max(last, 0) * self.block_size <= position < seq.num_tokens:
            raise ValueError(f"position: {position} is outside the last block")
        if self.ref_counts[seq.blocks[last]] > 1:
            raise ValueError("position: the last block is shared")
        if not self.enable_prefix_caching:
            return
        seq.tokens[position] = token
        if len(seq.chain_id) > last:  # the block is full: its content is entered anew
            block = seq.blocks[last]
            if self.cache_id.get(block) == seq.chain_id[-1]:
                self._unregister(block)
            seq.chain_id.pop()
            self._register_full_blocks(seq)

    def truncate(self, seq_id, num_tokens):
        seq = self._find(seq_id)
        if not 0 <= num_tokens <= seq.num_tokens:
            raise ValueError(f"num_tokens: {num_tokens} is outside [0, {seq.num_tokens}]")
        keep = self._blocks_for(num_tokens)
        while len(seq.blocks) > keep:
            self._release(seq.blocks.pop())
        seq.num_tokens = num_tokens
        if self.enable_prefix_caching:
            del seq.tokens[num_tokens:]
            del seq.chain_id[num_tokens // self.block_size:]

    def fork(self, parent_id, child_id):
        parent = self._find(parent_id, "parent_id")
        if child_id in self.seqs:
            raise ValueError(f"child_id: sequence {child_id} already exists")
        for block in parent.blocks:
            self.ref_counts[block] += 1
        self.seqs[child_id] = _Seq(list(parent.blocks), parent.num_tokens,
                                   list(parent.tokens), list(parent.chain_id))

    def free(self, seq_id):
        seq = self._find(seq_id)
        for block in reversed(seq.blocks):
            self._release(block)
        del self.seqs[seq_id]

    # -- queries --------------------------------------------------------------------
    def block_table(self, seq_id):
        return list(self._find(seq_id).blocks)

    def num_tokens(self, seq_id):
        return self._find(seq_id).num_tokens

    def block_tables(self, seq_ids):
        tables = [self._find(s, "seq_ids").blocks for s in seq_ids]
        width = max((len(t) for t in tables), default=0)
        return [t + [-1] * (width - len(t)) for t in tables]

    def slot_mapping(self, seq_ids, counts):
        bs, slots = self.block_size, []
        for seq_id, c in zip(seq_ids, counts):
            seq = self._find(seq_id, "seq_ids")
            if not 0 <= c <= seq.num_tokens:
                raise ValueError(f"counts: {c} is outside [0, {seq.num_tokens}]")
            for t in range(seq.num_tokens - c, seq.num_tokens):
                slots.append(seq.blocks[t // bs] * bs + t % bs)
        return slots

    def can_allocate(self, num_tokens):
        return self._blocks_for(num_tokens) <= self.num_free_blocks

    def ref_count(self, block_id):
        return self.ref_counts[block_id]

    def stats(self):
        filled = {}
        for seq in self.seqs.values():
            for i, block in enumerate(seq.blocks):
                filled[block] = max(filled.get(block, 0), min(self.block_size, seq.num_tokens - i * self.block_size))
        used = self.num_blocks - self.num_free_blocks
        stored = sum(filled.values())
        return {
            "num_blocks": self.num_blocks, "block_size": self.block_size,
            "used_blocks": used, "free_blocks": len(self.free_blocks), "cached_blocks": len(self.lru),
            "num_seqs": len(self.seqs), "tokens_stored": stored,
            "utilization": stored / (used * self.block_size) if used else 0.0,
            "prefix_query_tokens": self.prefix_query_tokens, "prefix_hit_tokens": self.prefix_hit_tokens,
            "evictions": self.evictions,
        }
