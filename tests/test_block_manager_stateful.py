"""Hypothesis drives random allocate/append/fork/truncate/set_token/free sequences against the C++
BlockManager and the pure-Python model (tests/py_block_manager.py) side by side, and
compares every observable after every step: results, errors, block tables, refcounts,
free counts, copy-on-write pairs, stats. Nothing may leak once every sequence is freed."""
import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, precondition, rule)

import pagedlm
from py_block_manager import PyBlockManager, PyOutOfBlocksError

# A tiny alphabet makes shared prefixes, prefix-cache hits and identical blocks common.
tokens = st.lists(st.integers(0, 2), max_size=12)


def both(real_call, model_call):
    """Run one operation on both managers; they must agree on the result or the error."""
    try:
        expected = model_call()
    except PyOutOfBlocksError:
        with pytest.raises(pagedlm.OutOfBlocksError):
            real_call()
        return None
    assert real_call() == expected
    return expected


class BlockManagerMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 3, 4]),
                prefix_caching=st.booleans())
    def create(self, num_blocks, block_size, prefix_caching):
        self.real = pagedlm.BlockManager(num_blocks, block_size, prefix_caching)
        self.model = PyBlockManager(num_blocks, block_size, prefix_caching)
        self.next_id = 0
        self.contents = {}   # live sequence -> its tokens
        self.history = [[]]  # every token list a sequence has held: prompts that hit the cache

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _remember(self, seq_id, content):
        self.contents[seq_id] = content
        self.history.append(list(content))

    @rule(target=seqs, prompt=tokens)
    def allocate(self, prompt):
        return self._allocate(prompt)

    @rule(target=seqs, data=st.data(), extra=tokens)
    def allocate_seen_prefix(self, data, extra):
        seen = data.draw(st.sampled_from(self.history))
        return self._allocate(seen[:data.draw(st.integers(0, len(seen)))] + extra)

    def _allocate(self, prompt):
        seq_id = self._new_id()
        cached = both(lambda: self.real.allocate(seq_id, prompt), lambda: self.model.allocate(seq_id, prompt))
        if cached is None:
            return seq_id  # refused: the id stays unused; later rules on it expect KeyError
        assert cached % self.model.block_size == 0 and cached <= max(len(prompt) - 1, 0)
        self._remember(seq_id, list(prompt))
        return seq_id

    @rule(seq=seqs, new=tokens)
    def append(self, seq, new):
        if seq not in self.model.seqs:
            with pytest.raises(KeyError):
                self.real.append(seq, new)
            return
        copies = both(lambda: self.real.append(seq, new), lambda: self.model.append(seq, new))
        if copies is not None:
            self._remember(seq, self.contents[seq] + new)
        for src, dst in copies or []:
            assert self.real.ref_count(src) >= 1 and self.real.ref_count(dst) == 1

    @rule(target=seqs, parent=seqs)
    def fork(self, parent):
        child = self._new_id()
        if parent not in self.model.seqs:
            with pytest.raises(KeyError):
                self.real.fork(parent, child)
            return child
        self.real.fork(parent, child)
        self.model.fork(parent, child)
        self.contents[child] = list(self.contents[parent])
        return child

    @rule(seq=seqs, data=st.data())
    def truncate(self, seq, data):
        if seq not in self.model.seqs:
            return
        keep = data.draw(st.integers(0, self.model.num_tokens(seq)))
        self.real.truncate(seq, keep)
        self.model.truncate(seq, keep)
        self.contents[seq] = self.contents[seq][:keep]

    @rule(seq=seqs, data=st.data())
    def set_token(self, seq, data):
        """A placeholder named once known: positions in the last block and before it."""
        if seq not in self.model.seqs or not self.model.num_tokens(seq):
            return
        n = self.model.num_tokens(seq)
        position = data.draw(st.integers(max(0, n - 2 * self.model.block_size), n - 1))
        token = data.draw(st.integers(0, 2))
        try:
            self.model.set_token(seq, position, token)
        except ValueError:
            with pytest.raises(ValueError, match="position"):
                self.real.set_token(seq, position, token)
            return
        self.real.set_token(seq, position, token)
        self.contents[seq][position] = token
        self.history.append(list(self.contents[seq]))

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.model.seqs:
            with pytest.raises(KeyError):
                self.real.free(seq)
            return
        self.real.free(seq)
        self.model.free(seq)
        del self.contents[seq]

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def batched_builders(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model.seqs)), min_size=1, max_size=4))
        counts = [data.draw(st.integers(0, self.model.num_tokens(s))) for s in ids]
        assert self.real.block_tables(ids).tolist() == self.model.block_tables(ids)
        assert self.real.slot_mapping(ids, counts).tolist() == self.model.slot_mapping(ids, counts)

    @invariant()
    def same_state(self):
        if not hasattr(self, "real"):
            return
        model, real = self.model, self.real
        assert len(real) == len(model.seqs)
        for seq_id, seq in model.seqs.items():
            assert real.block_table(seq_id) == seq.blocks
            assert real.num_tokens(seq_id) == seq.num_tokens
            # Paging wastes less than one block per sequence.
            assert len(seq.blocks) == -(-seq.num_tokens // model.block_size)
        assert [real.ref_count(b) for b in range(model.num_blocks)] == model.ref_counts
        assert real.num_free_blocks == model.num_free_blocks
        assert real.stats() == pytest.approx(model.stats())
        # Refcounts are exactly the number of block-table entries naming each block.
        held = [0] * model.num_blocks
        for seq in model.seqs.values():
            for b in seq.blocks:
                held[b] += 1
        assert held == model.ref_counts

    def teardown(self):
        if not hasattr(self, "real"):
            return
        for seq_id in list(self.model.seqs):
            self.real.free(seq_id)
            self.model.free(seq_id)
        assert self.real.num_free_blocks == self.real.num_blocks
        assert all(self.real.ref_count(b) == 0 for b in range(self.real.num_blocks))
        assert self.real.stats()["used_blocks"] == 0


BlockManagerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestBlockManagerStateful = BlockManagerMachine.TestCase
