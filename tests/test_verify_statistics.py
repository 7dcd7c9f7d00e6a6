"""Losslessness of speculative verification, tested statistically: the first two tokens a
decoder emits must follow the target model's joint distribution p1(y1) p2(y2 | y1), whatever
the draft. 200,000 independent rows (the kernel's row counter makes them independent draws),
V = 8, target and draft distributions that differ by position and context, a chi-square
goodness-of-fit test on the 64 cells, fixed seeds. Each test also runs a deliberately wrong
variant (a rejection resampled from p instead of the residual, applied to the kernel's output)
and requires the same test to reject it, which shows the test has power."""
import numpy as np
import pytest
import scipy.stats
import torch

from pagedlm.verify import verify_speculative, verify_tree_speculative

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
V = 8
DRAWS = 200_000
SEED = 20240607


def distributions(rng, *shape):
    """Random distributions over V, kept away from zero so every cell expects many counts."""
    return (0.8 * rng.dirichlet(np.ones(V), size=shape) + 0.2 / V).astype(np.float32)


class Model:
    """A toy language model: p1 over the first token, p2[y1] over the second, p3[y1, y2] over the
    third. The draft is the target mixed half and half with another random model: close enough
    that every acceptance count is common, different everywhere."""

    def __init__(self, rng, mix_with=None):
        self.p1, self.p2, self.p3 = distributions(rng), distributions(rng, V), distributions(rng, V, V)
        if mix_with is not None:
            self.p1, self.p2, self.p3 = [((a + b) / 2).astype(np.float32) for a, b in
                                         zip((self.p1, self.p2, self.p3), (mix_with.p1, mix_with.p2, mix_with.p3))]


def sample(rng, probs):
    """One token per row of probs [N, V] (float64 inverse CDF)."""
    cdf = np.cumsum(probs, axis=-1, dtype=np.float64)
    u = rng.random(len(probs)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(-1), V - 1)


def resample_rejections_from_p(rng, tokens, rejected, p_rows):
    """The bug under test: where a rejection happened, draw the emitted token from p, not from
    norm(max(0, p - q)) (or, in a tree, from p with the tried children removed)."""
    tokens = tokens.copy()
    tokens[rejected] = sample(rng, p_rows[rejected])
    return tokens


def chi_square_p_value(y1, y2, target):
    observed = np.zeros((V, V))
    np.add.at(observed, (y1, y2), 1)
    p1 = target.p1.astype(np.float64) / target.p1.sum(dtype=np.float64)
    p2 = target.p2.astype(np.float64) / target.p2.sum(-1, keepdims=True, dtype=np.float64)
    expected = (p1[:, None] * p2).ravel()
    return scipy.stats.chisquare(observed.ravel(), expected / expected.sum() * len(y1)).pvalue


# ---- chains ----------------------------------------------------------------------------

def chain_round(rng, device, target_rows, draft_rows, drafts, offset, buggy):
    """One call of verify_speculative; returns (tokens [N, k+1], accepted [N])."""
    out, accepted = verify_speculative(torch.from_numpy(drafts).to(device), torch.from_numpy(draft_rows).to(device),
                                       torch.from_numpy(target_rows).to(device), seed=SEED, offset=offset)
    out, accepted = out.cpu().numpy(), accepted.cpu().numpy()
    if buggy:
        k = drafts.shape[1]
        rows = np.arange(len(out))
        rejected = accepted < k
        emitted = resample_rejections_from_p(rng, out[rows, accepted], rejected, target_rows[rows, accepted])
        out[rows, accepted] = emitted
    return out, accepted


def first_two_chain_tokens(device, buggy):
    rng = np.random.default_rng(SEED)
    target = Model(rng)
    draft = Model(rng, mix_with=target)
    # Round 1: two drafts sampled from the draft model, checked against the target in context.
    x1 = sample(rng, np.broadcast_to(draft.p1, (DRAWS, V)))
    x2 = sample(rng, draft.p2[x1])
    drafts = np.stack([x1, x2], axis=1)
    draft_rows = np.stack([np.broadcast_to(draft.p1, (DRAWS, V)), draft.p2[x1]], axis=1)
    target_rows = np.stack([np.broadcast_to(target.p1, (DRAWS, V)), target.p2[x1], target.p3[x1, x2]], axis=1)
    out, accepted = chain_round(rng, device, target_rows, draft_rows, drafts, 0, buggy)
    y1, y2 = out[:, 0], out[:, 1].copy()
    # Rows that emitted a single token continue with a second round, one draft in context y1.
    again = accepted == 0
    y1_again = y1[again]
    x = sample(rng, draft.p2[y1_again])[:, None]
    second_target = np.stack([target.p2[y1_again], target.p3[y1_again, x[:, 0]]], axis=1)
    out2, _ = chain_round(rng, device, second_target, draft.p2[y1_again][:, None], x, 1, buggy)
    y2[again] = out2[:, 0]
    return y1, y2, target, accepted


@pytest.mark.parametrize("device", DEVICES)
def test_chain_speculative_sampling_is_lossless(device):
    y1, y2, target, accepted = first_two_chain_tokens(device, buggy=False)
    # The case mix is rich: rejections at both positions and full acceptance all occur often.
    assert all((accepted == n).mean() > 0.1 for n in range(3))
    assert chi_square_p_value(y1, y2, target) > 1e-3
    y1, y2, target, _ = first_two_chain_tokens(device, buggy=True)
    assert chi_square_p_value(y1, y2, target) < 1e-9


# ---- trees -----------------------------------------------------------------------------

#        0            children are tried in node order: 1, 2, 3 at the root, 4, 5 below 1
#      / | \
#     1  2  3
#    / \  \
#   4   5  6
PARENTS = np.array([-1, 0, 0, 0, 1, 1, 2], dtype=np.int32)
DEPTH1, DEPTH2 = [1, 2, 3], [4, 5, 6]
CHILDREN = {0: [1, 2, 3], 1: [4, 5], 2: [6]}


def tree_round(rng, device, root_token, target_at, proposal, offset, buggy):
    """One call of verify_tree_speculative over a row per root token. Children tokens are drawn
    from `proposal` (duplicates among siblings included); target_at(node_tokens, node) gives the
    target distribution at each node. Returns (accepted_nodes, num_accepted, next_token, tokens)."""
    n = len(root_token)
    tokens = np.zeros((n, len(PARENTS)), dtype=np.int64)
    tokens[:, 0] = root_token
    for c in range(1, len(PARENTS)):
        tokens[:, c] = sample(rng, proposal(tokens, PARENTS[c]))
    probs = np.stack([target_at(tokens, node) for node in range(len(PARENTS))], axis=1)
    nodes, accepted, nxt = verify_tree_speculative(
        torch.from_numpy(tokens).to(device), torch.from_numpy(np.tile(PARENTS, (n, 1))).to(device),
        torch.from_numpy(probs).to(device), seed=SEED, offset=offset)
    nodes, accepted, nxt = nodes.cpu().numpy(), accepted.cpu().numpy(), nxt.cpu().numpy()
    if buggy:
        rows = np.arange(n)
        last = nodes[rows, accepted]
        rejected = np.isin(last, list(CHILDREN))  # the walk stopped where children were tried
        nxt = resample_rejections_from_p(rng, nxt, rejected, probs[rows, last])
    return nodes, accepted, nxt, tokens


def first_two_tree_tokens(device, buggy):
    rng = np.random.default_rng(SEED + 1)
    target = Model(rng)
    draft = Model(rng, mix_with=target)
    rows = np.arange(DRAWS)

    def target_round1(tokens, node):  # the node's path: root, then depth-1, depth-2 tokens
        if node == 0:
            return np.broadcast_to(target.p1, (DRAWS, V))
        if node in DEPTH1:
            return target.p2[tokens[:, node]]
        return target.p3[tokens[:, PARENTS[node]], tokens[:, node]]

    def proposal_round1(tokens, parent):
        return np.broadcast_to(draft.p1, (DRAWS, V)) if parent == 0 else draft.p2[tokens[:, parent]]

    nodes, accepted, nxt, tokens = tree_round(rng, device, np.zeros(DRAWS), target_round1, proposal_round1, 0, buggy)
    y1 = np.where(accepted >= 1, tokens[rows, nodes[:, 1]], nxt)
    y2 = np.where(accepted >= 2, tokens[rows, np.maximum(nodes[:, 2], 0)], nxt)
    # Rows whose root rejected every child continue with a second tree rooted at y1.
    again = accepted == 0
    first = y1[again]
    count = len(first)

    def target_round2(tokens, node):
        if node == 0:
            return target.p2[first]
        if node in DEPTH1:
            return target.p3[first, tokens[:, node]]
        return np.full((count, V), 1.0 / V, dtype=np.float32)

    def proposal_round2(tokens, parent):
        return draft.p2[first] if parent == 0 else draft.p3[first, tokens[:, parent]]

    nodes2, accepted2, nxt2, tokens2 = tree_round(rng, device, first, target_round2, proposal_round2, 1, buggy)
    y2[again] = np.where(accepted2 >= 1, tokens2[np.arange(count), nodes2[:, 1]], nxt2)
    return y1, y2, target, accepted


@pytest.mark.parametrize("device", DEVICES)
def test_tree_speculative_sampling_is_lossless(device):
    y1, y2, target, accepted = first_two_tree_tokens(device, buggy=False)
    assert all((accepted == n).mean() > 0.05 for n in range(3))
    assert chi_square_p_value(y1, y2, target) > 1e-3
    y1, y2, target, _ = first_two_tree_tokens(device, buggy=True)
    assert chi_square_p_value(y1, y2, target) < 1e-9
