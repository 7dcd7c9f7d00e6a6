"""pagedlm.BlockManager from Python: argument checking (errors name the argument), the
accepted input types, the numpy builders, and atomic failure."""
import numpy as np
import pytest
import torch

import pagedlm


@pytest.fixture
def bm():
    return pagedlm.BlockManager(num_blocks=8, block_size=4)


def test_out_of_blocks_is_a_runtime_error_and_changes_nothing(bm):
    assert issubclass(pagedlm.OutOfBlocksError, RuntimeError)
    bm.allocate(1, range(18))  # 5 blocks
    bm.fork(1, 2)
    before = (bm.stats(), [bm.ref_count(b) for b in range(8)], bm.block_table(2))
    with pytest.raises(pagedlm.OutOfBlocksError, match="allocate"):
        bm.allocate(3, range(13))
    with pytest.raises(pagedlm.OutOfBlocksError, match="append"):
        bm.append(2, range(20))
    assert 3 not in bm
    assert (bm.stats(), [bm.ref_count(b) for b in range(8)], bm.block_table(2)) == before


@pytest.mark.parametrize("call, error, argument", [
    (lambda bm: bm.allocate(1, [1]), ValueError, "seq_id"),
    (lambda bm: bm.append(9, [1]), KeyError, "seq_id"),
    (lambda bm: bm.free(9), KeyError, "seq_id"),
    (lambda bm: bm.fork(9, 10), KeyError, "parent_id"),
    (lambda bm: bm.fork(1, 1), ValueError, "child_id"),
    (lambda bm: bm.truncate(1, 4), ValueError, "num_tokens"),
    (lambda bm: bm.truncate(1, -1), ValueError, "num_tokens"),
    (lambda bm: bm.block_table(9), KeyError, "seq_id"),
    (lambda bm: bm.block_tables([1, 9]), KeyError, "seq_ids"),
    (lambda bm: bm.slot_mapping([1], [4]), ValueError, "counts"),
    (lambda bm: bm.slot_mapping([1], [-1]), ValueError, "counts"),
    (lambda bm: bm.slot_mapping([1], [1, 1]), ValueError, "counts"),
    (lambda bm: bm.ref_count(8), ValueError, "block_id"),
    (lambda bm: bm.ref_count(-1), ValueError, "block_id"),
    (lambda bm: bm.append(1, [2**31]), ValueError, "token_ids"),
    (lambda bm: bm.append(1, ["a"]), TypeError, "token_ids"),
    (lambda bm: bm.append(1, 7), TypeError, "token_ids"),
    (lambda bm: bm.append(1, np.array([2**40])), ValueError, "token_ids"),
    (lambda bm: bm.can_allocate(-1), ValueError, "num_tokens"),
])
def test_bad_arguments_raise_naming_the_argument(bm, call, error, argument):
    bm.allocate(1, [1, 2, 3])
    with pytest.raises(error, match=argument):
        call(bm)
    assert bm.num_tokens(1) == 3 and len(bm) == 1


@pytest.mark.parametrize("num_blocks, block_size, argument", [(0, 4, "num_blocks"), (4, 0, "block_size"),
                                                              (-3, 4, "num_blocks")])
def test_bad_sizes(num_blocks, block_size, argument):
    with pytest.raises(ValueError, match=argument):
        pagedlm.BlockManager(num_blocks, block_size)


@pytest.mark.parametrize("make", [list, tuple, lambda t: range(t[0], t[-1] + 1),
                                  lambda t: np.asarray(t, dtype=np.int64),
                                  lambda t: np.asarray(t, dtype=np.int32),
                                  lambda t: np.asarray(t, dtype=np.int64)[::-1][::-1].copy(),
                                  lambda t: np.repeat(np.asarray(t, dtype=np.int64), 2)[::2],  # strided view
                                  lambda t: torch.tensor(t, dtype=torch.int64),
                                  lambda t: torch.tensor(t, dtype=torch.int32)])
def test_token_ids_accept_sequences_arrays_and_tensors(make):
    tokens = list(range(100, 121))
    bm = pagedlm.BlockManager(16, 4, enable_prefix_caching=True)
    bm.allocate(1, tokens)
    assert bm.allocate(2, make(tokens)) == 20  # identical content: every full block but the last token's
    bm.append(2, make([5, 6]))
    assert bm.num_tokens(2) == 23


def test_block_tables_are_int32_padded_with_minus_one(bm):
    bm.allocate(1, range(9))
    bm.allocate(2, range(2))
    tables = bm.block_tables(np.array([2, 1]))
    assert tables.dtype == np.int32 and tables.shape == (2, 3)
    assert tables[0].tolist() == bm.block_table(2) + [-1, -1]
    assert tables[1].tolist() == bm.block_table(1)
    assert bm.block_tables([]).shape == (0, 0)


def test_slot_mapping_covers_the_last_tokens_in_order(bm):
    bm.allocate(1, range(9))
    bm.allocate(2, range(5))
    slots = bm.slot_mapping([1, 2], np.array([3, 5]))
    assert slots.dtype == np.int64
    table1, table2 = bm.block_table(1), bm.block_table(2)
    expected = [table1[t // 4] * 4 + t % 4 for t in (6, 7, 8)] + [table2[t // 4] * 4 + t % 4 for t in range(5)]
    assert slots.tolist() == expected
    assert bm.slot_mapping([1], [0]).shape == (0,)


def test_copy_on_write_pair_names_the_shared_block(bm):
    bm.allocate(1, range(6))
    bm.fork(1, 2)
    shared_last = bm.block_table(1)[-1]
    [(src, dst)] = bm.append(2, [7])
    assert src == shared_last and dst == bm.block_table(2)[-1] and dst != src
    assert bm.ref_count(src) == 1 and bm.ref_count(dst) == 1
    assert bm.append(1, [8]) == []  # the parent is the sole holder now


def test_prefix_cache_hit_leaves_the_last_token_to_compute():
    bm = pagedlm.BlockManager(32, 4, enable_prefix_caching=True)
    assert bm.allocate(1, range(16)) == 0
    assert bm.allocate(2, range(16)) == 12
    assert bm.allocate(3, range(17)) == 16
    assert bm.allocate(4, list(range(8)) + [99] * 8) == 8
    stats = bm.stats()
    assert stats["prefix_hit_tokens"] == 36 and stats["prefix_query_tokens"] == 65


def test_stats_and_repr(bm):
    bm.allocate(1, range(6))
    s = bm.stats()
    assert (s["used_blocks"], s["free_blocks"], s["tokens_stored"]) == (2, 6, 6)
    assert s["utilization"] == pytest.approx(6 / 8)
    assert "num_free_blocks=6" in repr(bm)
    assert bm.num_free_blocks == 6 and bm.can_allocate(24) and not bm.can_allocate(25)


def test_set_token_names_a_placeholder_and_redoes_the_full_blocks_cache_entry():
    """A slot reserved with a placeholder (an asynchronous step's input) is named once known: the
    full block it completed is cached with the real token, so a prompt holding that token hits
    it and the placeholder's content no longer exists in the cache."""
    bm = pagedlm.BlockManager(8, 4, True)
    bm.allocate(1, [5, 6, 7])
    bm.append(1, [-1])  # the placeholder fills the first block
    bm.set_token(1, 3, 8)
    bm.append(1, [9])
    assert bm.allocate(2, [5, 6, 7, 8, 9]) == 4  # the block [5, 6, 7, 8] is a hit
    assert bm.allocate(3, [5, 6, 7, -1, 9]) == 0
    bm.set_token(1, 4, 10)  # in a partly filled last block: only the token changes
    assert bm.num_tokens(1) == 5


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_set_token_refuses_positions_outside_the_last_block_and_shared_blocks(prefix_caching):
    bm = pagedlm.BlockManager(8, 4, prefix_caching)
    bm.allocate(1, [1, 2, 3, 4, 5, 6])
    for position in (3, 6, -1):
        with pytest.raises(ValueError, match="position"):
            bm.set_token(1, position, 0)
    bm.fork(1, 2)
    with pytest.raises(ValueError, match="shared"):
        bm.set_token(1, 5, 0)
    with pytest.raises(KeyError):
        bm.set_token(3, 0, 0)
