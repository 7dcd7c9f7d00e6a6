"""Verification at the exact edges of its decisions, where a random test never lands: a drafted
token the target gives probability 0 is never accepted, even when the draw is 0; a draft whose
p/q equals the draw exactly is rejected (the rule is u < p/q) and one a hair above is accepted;
a token of weight 0 is never sampled. The draws are read from Philox (checked against the
published generator in test_verify.py) and the inputs built around them."""
import numpy as np
import pytest
import torch

from pagedlm import _C
from pagedlm.verify import verify_speculative, verify_tree_speculative

DRAW_ACCEPT, DRAW_SAMPLE = 0, 1
# A (seed, offset) whose accept draw at row 0, position 1 has its top 24 bits all zero: u = 0.
# Found by a search over offsets; the test re-derives the draw rather than trusting this comment.
ZERO_DRAW_SEED, ZERO_DRAW_OFFSET = 0, 1159484


def word(seed, offset, row, position, which):
    return _C.philox4x32_10(offset & 0xFFFFFFFF, offset >> 32, row, position, seed & 0xFFFFFFFF,
                            seed >> 32)[which]


def uniform(seed, offset, row, position):
    """The accept test's u, exactly: the top 24 bits of the accept word over 2^24."""
    return (word(seed, offset, row, position, DRAW_ACCEPT) >> 8) / 2.0 ** 24


def test_the_zero_draw_is_zero():
    assert word(ZERO_DRAW_SEED, ZERO_DRAW_OFFSET, 0, 1, DRAW_ACCEPT) >> 8 == 0


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_a_draft_the_target_never_samples_is_rejected_even_by_a_zero_draw(with_draft_probs):
    vocab = 4
    target = torch.zeros(1, 3, vocab)
    target[0, 0, 1] = 1.0                  # draft 0 (token 1) is certain: accepted
    target[0, 1, 3] = 1.0                  # draft 1 (token 2) has p = 0
    target[0, 2, 0] = 1.0
    drafts = torch.tensor([[1, 2]])
    draft_probs = None
    if with_draft_probs:
        draft_probs = torch.zeros(1, 2, vocab)
        draft_probs[0, 0, 1] = 1.0
        draft_probs[0, 1, 2] = 0.5
        draft_probs[0, 1, 0] = 0.5
    out, n = verify_speculative(drafts, draft_probs, target, seed=ZERO_DRAW_SEED, offset=ZERO_DRAW_OFFSET)
    assert n.tolist() == [1]
    assert out.tolist() == [[1, 3, -1]]   # the residual at position 1 is all on token 3


def test_a_tree_child_the_target_never_samples_is_rejected_even_by_a_zero_draw():
    vocab = 4
    probs = torch.zeros(1, 2, vocab)
    probs[0, 0, 3] = 1.0                   # the root's distribution: token 2 (node 1) has p = 0
    probs[0, 1, 0] = 1.0
    tokens = torch.tensor([[0, 2]])
    parents = torch.tensor([[-1, 0]], dtype=torch.int32)
    nodes, n, nxt = verify_tree_speculative(tokens, parents, probs, seed=ZERO_DRAW_SEED, offset=ZERO_DRAW_OFFSET)
    assert n.tolist() == [0] and nodes.tolist() == [[0, -1]] and nxt.tolist() == [3]


def boundary_chain(seed, offset, scale):
    """Drafts token 1 with q = scale and p = u * scale: p/q is the draw exactly."""
    u = uniform(seed, offset, 0, 0)
    vocab = 3
    target = torch.zeros(1, 2, vocab)
    draft = torch.zeros(1, 1, vocab)
    draft[0, 0, 1] = scale
    draft[0, 0, 2] = 1.0 - scale
    target[0, 0, 1] = u * scale            # u has 24 bits, scale is a power of two: exact in f32
    target[0, 0, 0] = 1.0 - u * scale
    target[0, 1, 2] = 1.0
    assert float(target[0, 0, 1]) == u * scale
    return torch.tensor([[1]]), draft, target


@pytest.mark.parametrize("seed, offset", [(1, 0), (2, 5), (77, 123456)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_p_over_q_equal_to_the_draw_is_rejected_and_a_hair_above_accepted(seed, offset, scale):
    drafts, draft, target = boundary_chain(seed, offset, scale)
    assert 0 < target[0, 0, 1] < 1
    _, n = verify_speculative(drafts, draft, target, seed=seed, offset=offset)
    assert n.tolist() == [0]               # u < p/q is false when they are equal
    target[0, 0, 1] = float(np.nextafter(np.float32(target[0, 0, 1]), np.float32(1)))
    out, n = verify_speculative(drafts, draft, target, seed=seed, offset=offset)
    assert n.tolist() == [1] and out.tolist() == [[1, 2]]


@pytest.mark.parametrize("seed, offset", [(1, 0), (2, 5), (77, 123456)])
def test_one_hot_draft_with_p_equal_to_the_draw_is_rejected(seed, offset):
    drafts, _, target = boundary_chain(seed, offset, 1.0)
    _, n = verify_speculative(drafts, None, target, seed=seed, offset=offset)
    assert n.tolist() == [0]


@pytest.mark.parametrize("seed, offset", [(1, 0), (3, 9), (77, 123456)])
def test_tree_child_whose_share_equals_the_draw_is_rejected_and_a_hair_above_accepted(seed, offset):
    u = uniform(seed, offset, 0, 1)        # node 1's accept draw
    probs = torch.zeros(1, 2, 3)
    probs[0, 0, 1] = u                     # node 1's token weighs exactly u of the root's mass
    probs[0, 0, 0] = 1.0 - u
    probs[0, 1, 2] = 1.0
    tokens = torch.tensor([[0, 1]])
    parents = torch.tensor([[-1, 0]], dtype=torch.int32)
    assert 0 < u < 1
    _, n, _ = verify_tree_speculative(tokens, parents, probs, seed=seed, offset=offset)
    assert n.tolist() == [0]
    probs[0, 0, 1] = u + 2.0 ** -24        # one unit of the draw's resolution more
    probs[0, 0, 0] = 1.0 - u - 2.0 ** -24
    nodes, n, nxt = verify_tree_speculative(tokens, parents, probs, seed=seed, offset=offset)
    assert n.tolist() == [1] and nodes.tolist() == [[0, 1]] and nxt.tolist() == [2]


@pytest.mark.parametrize("seed", range(6))
def test_a_token_of_weight_zero_is_never_sampled(seed):
    # The whole mass is one weight unit (2^-40) on token 1: the threshold is 0 for every draw,
    # and token 0 before it, of weight 0, must not be picked.
    target = torch.zeros(2, 1, 4)
    target[:, 0, 1] = 2.0 ** -40
    out, n = verify_speculative(torch.zeros(2, 0, dtype=torch.int64), None, target, seed=seed, offset=0)
    assert out.tolist() == [[1], [1]] and n.tolist() == [0, 0]
    probs = torch.zeros(1, 1, 4)
    probs[0, 0, 2] = 2.0 ** -40
    _, _, nxt = verify_tree_speculative(torch.tensor([[0]]), torch.tensor([[-1]], dtype=torch.int32), probs,
                                        seed=seed, offset=0)
    assert nxt.tolist() == [2]


def test_probabilities_above_one_weigh_as_one():
    # Target [3.0, 0.5] weighs [1, 0.5]: token 0 has 2/3 of the mass (4/5 if 3.0 counted more).
    # A draw between 2/3 and 4/5 tells the two apart; find one by scanning seeds.
    seed = next(s for s in range(1000) if 0.68 < word(s, 0, 0, 0, DRAW_SAMPLE) / 2.0 ** 32 < 0.79)
    target = torch.tensor([[[3.0, 0.5]]])
    out, _ = verify_speculative(torch.zeros(1, 0, dtype=torch.int64), None, target, seed=seed, offset=0)
    assert out.tolist() == [[1]]


def test_a_tree_walk_stops_at_max_depth_even_when_every_child_is_certain():
    tokens = torch.tensor([[0, 1, 2, 3]])
    parents = torch.tensor([[-1, 0, 1, 2]], dtype=torch.int32)   # a chain 0 -> 1 -> 2 -> 3
    probs = torch.zeros(1, 4, 5)
    for node, nxt in enumerate([1, 2, 3, 4]):
        probs[0, node, nxt] = 1.0                                   # each child's token is certain
    for depth in range(4):
        nodes, n, nxt = verify_tree_speculative(tokens, parents, probs, seed=3, offset=0, max_depth=depth)
        assert n.tolist() == [depth] and nodes.tolist() == [list(range(depth + 1))]
        assert nxt.tolist() == [depth + 1]
