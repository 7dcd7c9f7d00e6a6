"""The block manager's rules, one fixed example each, with every expected refcount, block count
and cache hit worked out by hand from the contract (block_manager.h), not from the code; and a
content check that needs no knowledge of the implementation at all: a shadow KV memory into
which every sequence writes, at the slots the manager hands out, the prefix its token stands
for. A sequence must always read back its own prefixes. Shared blocks, copy-on-write, truncate,
eviction and the prefix cache all have to be right for that to hold, and hash_bits=0 (every
block hashes alike) makes the prefix cache prove that it compares tokens, not just hashes."""
import pytest

import pagedlm


class Shadow:
    """Drives a BlockManager as the engine does and keeps what each KV slot would hold: the
    token prefix (as a tuple) of the position written there."""

    def __init__(self, num_blocks, block_size, prefix_caching=True, hash_bits=64):
        self.bm = pagedlm.BlockManager(num_blocks, block_size, prefix_caching, hash_bits=hash_bits)
        self.bs = block_size
        self.memory = {}
        self.tokens = {}

    def _write(self, seq, count):
        tokens = self.tokens[seq]
        slots = self.bm.slot_mapping([seq], [count]).tolist()
        for pos, slot in zip(range(len(tokens) - count, len(tokens)), slots):
            self.memory[slot] = tuple(tokens[:pos + 1])

    def allocate(self, seq, tokens):
        cached = self.bm.allocate(seq, tokens)
        self.tokens[seq] = list(tokens)
        self._write(seq, len(tokens) - cached)
        return cached

    def append(self, seq, tokens):
        copies = self.bm.append(seq, tokens)
        for src, dst in copies:
            for i in range(self.bs):
                if src * self.bs + i in self.memory:
                    self.memory[dst * self.bs + i] = self.memory[src * self.bs + i]
        self.tokens[seq] += list(tokens)
        self._write(seq, len(tokens))
        return copies

    def fork(self, parent, child):
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def truncate(self, seq, n):
        self.bm.truncate(seq, n)
        del self.tokens[seq][n:]

    def free(self, seq):
        self.bm.free(seq)
        del self.tokens[seq]

    def check(self):
        """Every live sequence reads back, position by position, the prefix it wrote."""
        for seq, tokens in self.tokens.items():
            slots = self.bm.slot_mapping([seq], [len(tokens)]).tolist()
            for pos, slot in enumerate(slots):
                assert self.memory.get(slot) == tuple(tokens[:pos + 1]), (seq, pos)


def counts(bm, blocks):
    return [bm.ref_count(b) for b in blocks]


# ---- refcounts, one rule at a time -------------------------------------------------------

def test_allocate_holds_each_block_once_and_free_returns_all():
    bm = pagedlm.BlockManager(6, 4)
    bm.allocate(1, range(9))                 # ceil(9 / 4) = 3 blocks
    blocks = bm.block_table(1)
    assert len(blocks) == 3 and counts(bm, blocks) == [1, 1, 1]
    assert bm.num_free_blocks == 3
    bm.free(1)
    assert counts(bm, blocks) == [0, 0, 0] and bm.num_free_blocks == 6


def test_fork_adds_one_holder_to_every_block_and_each_free_removes_one():
    bm = pagedlm.BlockManager(8, 4)
    bm.allocate(1, range(6))
    blocks = bm.block_table(1)
    bm.fork(1, 2)
    bm.fork(2, 3)
    assert bm.block_table(2) == blocks == bm.block_table(3)
    assert counts(bm, blocks) == [3, 3]
    assert bm.num_free_blocks == 6         # forks take no block
    bm.free(2)
    assert counts(bm, blocks) == [2, 2]
    bm.free(1)
    assert counts(bm, blocks) == [1, 1] and bm.num_free_blocks == 6
    bm.free(3)
    assert counts(bm, blocks) == [0, 0] and bm.num_free_blocks == 8


def test_free_releases_the_first_block_too():
    bm = pagedlm.BlockManager(4, 2)
    for seq in range(4):                     # one block each, every block used
        bm.allocate(seq, [seq])
    held = {seq: bm.block_table(seq)[0] for seq in range(4)}
    bm.free(0)
    bm.free(3)
    assert bm.num_free_blocks == 2 and bm.ref_count(held[0]) == 0 and bm.ref_count(held[3]) == 0
    bm.allocate(9, range(4))                 # needs exactly the two released blocks
    assert sorted(bm.block_table(9)) == sorted([held[0], held[3]])


def test_append_to_a_shared_partial_block_copies_it_and_moves_one_holder():
    bm = pagedlm.BlockManager(8, 4)
    bm.allocate(1, range(6))                 # [0 1 2 3] [4 5 . .]
    full, partial = bm.block_table(1)
    bm.fork(1, 2)
    copies = bm.append(2, [9])
    new_table = bm.block_table(2)
    assert new_table[0] == full and new_table[1] != partial
    assert copies == [(partial, new_table[1])]
    assert bm.ref_count(full) == 2 and bm.ref_count(partial) == 1 and bm.ref_count(new_table[1]) == 1
    assert bm.append(1, [7]) == []           # the parent is now the partial block's only holder
    assert bm.block_table(1) == [full, partial]


def test_append_after_a_shared_full_block_copies_nothing():
    bm = pagedlm.BlockManager(8, 4)
    bm.allocate(1, range(8))
    blocks = bm.block_table(1)
    bm.fork(1, 2)
    assert bm.append(2, [1]) == []
    assert bm.block_table(2)[:2] == blocks and counts(bm, blocks) == [2, 2]
    assert bm.ref_count(bm.block_table(2)[2]) == 1


def test_copy_on_write_needs_a_free_block_and_fails_atomically():
    bm = pagedlm.BlockManager(2, 4)
    bm.allocate(1, range(6))                 # both blocks
    bm.fork(1, 2)
    before = (bm.block_table(2), counts(bm, [0, 1]), bm.stats())
    with pytest.raises(pagedlm.OutOfBlocksError):
        bm.append(2, [1])                    # fits the partial block, but it is shared: one block short
    assert (bm.block_table(2), counts(bm, [0, 1]), bm.stats()) == before


def test_truncate_releases_only_emptied_blocks_and_keeps_a_shared_one_shared():
    bm = pagedlm.BlockManager(8, 4)
    bm.allocate(1, range(10))                # 3 blocks
    a, b, c = bm.block_table(1)
    bm.fork(1, 2)
    bm.truncate(2, 5)                        # keeps ceil(5 / 4) = 2 blocks
    assert bm.block_table(2) == [a, b] and bm.num_tokens(2) == 5
    assert counts(bm, [a, b, c]) == [2, 2, 1]
    bm.truncate(1, 4)                        # exactly one block
    assert bm.block_table(1) == [a] and counts(bm, [a, b, c]) == [2, 1, 0]
    assert bm.num_free_blocks == 6
    copies = bm.append(2, [42])              # b is the child's alone now: written in place
    assert copies == [] and bm.block_table(2) == [a, b]


def test_can_allocate_is_true_up_to_the_last_free_block():
    bm = pagedlm.BlockManager(3, 4)
    assert bm.can_allocate(12) and not bm.can_allocate(13)
    bm.allocate(1, [1])
    assert bm.can_allocate(8) and not bm.can_allocate(9)


# ---- prefix cache: hits, keying, eviction --------------------------------------------------

def test_a_hit_adds_a_holder_and_a_freed_cached_block_waits_in_the_cache():
    bm = pagedlm.BlockManager(8, 2, True)
    assert bm.allocate(1, [1, 2, 3, 4, 5]) == 0
    first, second, _ = bm.block_table(1)
    assert bm.allocate(2, [1, 2, 3, 4, 6]) == 4
    assert bm.block_table(2)[:2] == [first, second] and counts(bm, [first, second]) == [2, 2]
    bm.free(1)
    bm.free(2)
    s = bm.stats()
    assert (s["used_blocks"], s["cached_blocks"], s["free_blocks"]) == (0, 2, 6)
    assert (s["prefix_query_tokens"], s["prefix_hit_tokens"]) == (10, 4)
    assert bm.allocate(3, [1, 2, 3, 4, 7]) == 4  # revived from the cache
    assert bm.block_table(3)[:2] == [first, second] and counts(bm, [first, second]) == [1, 1]


def test_a_hit_chains_through_every_earlier_block():
    bm = pagedlm.BlockManager(16, 2, True)
    bm.allocate(1, [1, 2, 3, 4, 5, 6, 7])
    assert bm.allocate(2, [1, 2, 3, 4, 5, 6, 9]) == 6
    assert bm.allocate(3, [8, 2, 3, 4, 5, 6, 7]) == 0   # same later blocks, other first block


def test_equal_blocks_after_different_prefixes_are_both_cached():
    bm = pagedlm.BlockManager(16, 2, True)
    bm.allocate(1, [1, 1, 5, 5, 0])
    bm.allocate(2, [2, 2, 5, 5, 0])          # [5 5] again, after another block
    assert bm.allocate(3, [2, 2, 5, 5, 9]) == 4
    assert bm.block_table(3)[:2] == bm.block_table(2)[:2]
    assert bm.allocate(4, [1, 1, 5, 5, 9]) == 4
    assert bm.block_table(4)[:2] == bm.block_table(1)[:2]


def test_a_prompt_needing_its_cached_blocks_and_more_than_is_free_is_refused():
    bm = pagedlm.BlockManager(4, 2, True)
    bm.allocate(1, [1, 2, 3, 4, 5])          # blocks [1 2] [3 4] [5]
    bm.free(1)                               # 2 cached, 2 free
    before = bm.stats()
    with pytest.raises(pagedlm.OutOfBlocksError):
        bm.allocate(2, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # 2 hits + 3 new blocks, only 2 that are not hits
    assert bm.stats() == before and 2 not in bm
    assert bm.allocate(3, [1, 2, 3, 4, 5, 6, 7]) == 4  # 2 hits + 2 new: fits exactly


def test_eviction_takes_the_least_recently_released_block_tail_first():
    bm = pagedlm.BlockManager(4, 2, True)
    bm.allocate(1, [1, 2, 3, 4, 5])          # [1 2] [3 4] [5]
    bm.free(1)                               # released tail first: [3 4] is older than [1 2]
    bm.allocate(2, [9, 9, 9, 9, 9, 9])       # 3 blocks: 2 free + 1 evicted, [3 4]
    assert bm.stats()["evictions"] == 1
    bm.free(2)
    assert bm.allocate(3, [1, 2, 3, 4, 5]) == 2  # [1 2] is still cached, [3 4] is not


def test_an_evicted_block_is_never_served_for_its_old_content():
    s = Shadow(3, 2)
    s.allocate(1, [1, 2, 3])                 # [1 2] cached once 1 is freed
    s.free(1)
    s.allocate(2, [7, 8, 9, 9, 9])           # takes every block: [1 2] is evicted and overwritten
    s.free(2)
    assert s.allocate(3, [1, 2, 3]) == 0
    s.check()


def test_a_block_rewritten_after_truncate_is_never_served_for_its_old_content():
    s = Shadow(16, 2)
    s.allocate(1, [1, 2, 3, 4, 5, 6, 7])
    s.truncate(1, 3)                         # keeps [1 2] [3 .]
    s.append(1, [40, 50, 60, 70])            # [1 2] [3 40] [50 60] [70]
    s.check()
    assert s.allocate(2, [1, 2, 3, 4, 5, 6, 7]) == 2  # only [1 2] still holds the old tokens
    assert s.allocate(3, [1, 2, 3, 40, 50, 60, 0]) == 6  # the rewritten blocks are cached as rewritten
    s.check()


def test_a_block_left_partial_after_an_overwrite_is_never_served_for_its_old_content():
    s = Shadow(16, 4)
    s.allocate(1, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    s.truncate(1, 5)                         # [1 2 3 4] [5 . . .]: the cached [5 6 7 8] is cut
    s.append(1, [50])                        # [5 50 . .] overwrites slot 1 of that block
    assert s.allocate(2, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 4
    s.check()


def test_truncate_at_a_block_boundary_then_new_content_chains_correctly():
    s = Shadow(16, 2)
    s.allocate(1, [1, 2, 3, 4, 5, 6, 7])
    s.truncate(1, 2)                         # [1 2]
    s.append(1, [8, 8, 6, 6, 0])             # [1 2] [8 8] [6 6] [0]
    s.check()
    assert s.allocate(2, [1, 2, 3, 4, 5, 6, 0]) == 6  # [3 4] [5 6] were released to the cache, not rewritten
    assert s.allocate(3, [1, 2, 8, 8, 5, 6, 0]) == 4  # [5 6] after [8 8] is not cached
    assert s.allocate(4, [1, 2, 8, 8, 6, 6, 1]) == 6
    s.check()


# ---- forced hash collisions: sharing must still be exact ----------------------------------

def longest_cached_prefix(history, tokens, block_size):
    """Whole blocks of tokens (never the last token) that some earlier prompt or sequence
    really held: an upper bound on what a correct prefix cache may report as cached."""
    best = 0
    for seen in history:
        n = 0
        while n < min(len(seen), len(tokens) - 1) and seen[n] == tokens[n]:
            n += 1
        best = max(best, n // block_size * block_size)
    return best


@pytest.mark.parametrize("hash_bits", [0, 1, 2])
def test_colliding_hashes_never_share_blocks_with_other_tokens(hash_bits):
    s = Shadow(64, 2, hash_bits=hash_bits)
    history = []
    prompts = [[1, 2, 3, 4, 5], [9, 9, 3, 4, 5], [1, 2, 7, 7, 5], [9, 9, 3, 4, 0], [2, 2, 5, 5, 0],
               [1, 1, 5, 5, 0], [2, 2, 3, 4, 5, 6], [1, 1, 5, 5, 1], [9, 9, 7, 7, 5], [1, 2, 3, 4, 5, 6, 7]]
    for seq, prompt in enumerate(prompts):
        cached = s.allocate(seq, prompt)
        assert cached <= longest_cached_prefix(history, prompt, 2), (seq, cached)
        history.append(prompt)
        s.check()
    assert s.allocate(100, [1, 2, 3, 4, 9]) in (2, 4)  # the very first block is always found
    for a in s.tokens:
        for b in s.tokens:
            for i, (x, y) in enumerate(zip(s.bm.block_table(a), s.bm.block_table(b))):
                if x == y:  # a shared block holds the same prefix in both sequences
                    end = min((i + 1) * 2, len(s.tokens[a]), len(s.tokens[b]))
                    assert s.tokens[a][:end] == s.tokens[b][:end], (a, b, i)


@pytest.mark.parametrize("hash_bits", [1, 2, 3])
def test_every_prompt_over_a_small_alphabet_with_few_hash_bits_hits_only_real_prefixes(hash_bits):
    """Two-block prefixes over three tokens in a shuffled order: first blocks collide often, and
    a block after a colliding one must never be found under the other block's identity."""
    import itertools
    import random
    prompts = [list(p) for p in itertools.product(range(3), repeat=4)]
    random.Random(hash_bits).shuffle(prompts)
    s = Shadow(400, 2, hash_bits=hash_bits)
    history = []
    for seq, prompt in enumerate(prompts):
        prompt = prompt + [seq]
        cached = s.allocate(seq, prompt)
        assert cached <= longest_cached_prefix(history, prompt, 2), (seq, prompt, cached)
        history.append(prompt)
        s.check()


def test_a_block_after_a_clashing_one_is_never_found_under_the_other_ones_identity():
    """With 10 hash bits, 300 first blocks X are cached (each followed by [1 1]); then 300 other
    first blocks Y, each followed by [2 2], many clashing with some X. [X][2 2] was never
    written, so a later prompt starting with it may hit its first block at most."""
    s = Shadow(3000, 2, hash_bits=10)
    xs = [[a, b] for a in range(10, 30) for b in range(10, 25)]
    ys = [[a, b] for a in range(100, 120) for b in range(100, 115)]
    seq = 0
    for first, second in [(x, [1, 1]) for x in xs] + [(y, [2, 2]) for y in ys]:
        s.allocate(seq, first + second + [seq])
        seq += 1
    for x in xs:
        assert s.allocate(seq, x + [2, 2, 0]) <= 2, x  # 0 when x itself clashed and stayed private
        seq += 1
    s.check()


def test_with_every_hash_equal_the_same_tokens_under_another_parent_are_not_shared():
    s = Shadow(32, 2, hash_bits=0)
    s.allocate(1, [1, 1, 5, 5, 0])
    s.allocate(2, [2, 2, 5, 5, 0])           # [2 2] clashes with [1 1]; [5 5] must not chain to 1's
    assert s.bm.block_table(2)[1] != s.bm.block_table(1)[1]
    assert s.allocate(3, [2, 2, 5, 5, 1]) == 0   # 2's blocks stayed private: no hit, and no wrong hit
    assert s.allocate(4, [1, 1, 5, 5, 1]) == 2   # [1 1] is the one block the single hash holds
    s.check()


def test_random_operations_always_read_back_their_own_prefixes_with_colliding_hashes():
    import random
    rng = random.Random(7)
    for hash_bits in (0, 2, 64):
        s = Shadow(24, 2, hash_bits=hash_bits)
        next_id = 0
        written = set()  # every token list a sequence held: cached blocks may outlive their sequence
        for _ in range(300):
            live = list(s.tokens)
            op = rng.random()
            try:
                if op < 0.3 or not live:
                    prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
                    history = [list(t) for t in s.tokens.values()] + [list(t) for t in written]
                    cached = s.allocate(next_id, prompt)
                    assert cached <= longest_cached_prefix(history, prompt, 2)
                    next_id += 1
                elif op < 0.55:
                    s.append(rng.choice(live), [rng.randrange(3) for _ in range(rng.randrange(1, 4))])
                elif op < 0.7:
                    s.fork(rng.choice(live), next_id)
                    next_id += 1
                elif op < 0.85:
                    seq = rng.choice(live)
                    s.truncate(seq, rng.randrange(len(s.tokens[seq]) + 1))
                else:
                    s.free(rng.choice(live))
            except pagedlm.OutOfBlocksError:
                pass
            written.update(tuple(t) for t in s.tokens.values())
            s.check()
        used = sum(s.bm.ref_count(b) > 0 for b in range(24))
        assert used + s.bm.num_free_blocks == 24


def test_hash_bits_is_checked():
    with pytest.raises(ValueError, match="hash_bits"):
        pagedlm.BlockManager(4, 2, True, hash_bits=65)
