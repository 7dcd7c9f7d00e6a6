"""Speculative verification (pagedlm.verify): hand-built exact cases, a plain numpy reference
of every rule (Philox draws, fixed-point weights, inverse-CDF sampling) that the CPU path must
match token for token, bad input, torch.library registration, and on the GPU bit-identity
with the CPU path. The statistical tests are in test_verify_statistics.py."""
import numpy as np
import pytest
import torch

from pagedlm import _C
from pagedlm.verify import verify_greedy, verify_speculative, verify_tree_greedy, verify_tree_speculative

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DRAW_ACCEPT, DRAW_SAMPLE = 0, 1
POISON = -7


# ---- numpy reference -------------------------------------------------------------------

def philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10, vectorised over the counter words (uint64 arrays holding 32-bit values)."""
    mask = np.uint64(0xFFFFFFFF)
    c = [np.asarray(x, dtype=np.uint64) & mask for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return c


def draw(seed, offset, row, position, which):
    words = philox(offset & 0xFFFFFFFF, offset >> 32, row, position, seed & 0xFFFFFFFF, seed >> 32)
    return int(words[which])


def weights(x):
    """Fixed-point weights: floor(clamp(x, 0, 1) * 2^40), computed in float32 like the kernels."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    return (np.clip(x, np.float32(0), np.float32(1)) * np.float32(2.0 ** 40)).astype(np.uint64)


def sample(w, word):
    """Smallest index whose running weight exceeds floor(total * word / 2^32); None if all zero."""
    total = int(w.sum())
    if total == 0:
        return None
    return int(np.searchsorted(np.cumsum(w), (total * word) >> 32, side="right"))


def sample_or_fall_back(w, p, word):
    token = sample(w, word)
    if token is None:
        token = sample(weights(p), word)
    return 0 if token is None else token


def reference_greedy_argmax(logits):
    values = np.asarray(logits, dtype=np.float64)
    return int(np.argmax(np.where(np.isnan(values), -np.inf, values)))


def reference_speculative(draft_tokens, draft_probs, target_probs, seed, offset, draft_lens=None):
    draft_tokens, target = np.asarray(draft_tokens), np.asarray(target_probs, dtype=np.float32)
    batch, k = draft_tokens.shape
    out, accepted_counts = np.full((batch, k + 1), -1, dtype=np.int64), np.zeros(batch, dtype=np.int32)
    for b in range(batch):
        length = k if draft_lens is None else int(draft_lens[b])
        n = 0
        while n < length:
            x = draft_tokens[b, n]
            q = np.float32(1) if draft_probs is None else np.float32(draft_probs[b, n, x])
            u = (draw(seed, offset, b, n, DRAW_ACCEPT) >> 8) / 2 ** 24
            if not (q > 0 and u * float(q) < float(target[b, n, x])):
                break
            n += 1
        p = target[b, n]
        word = draw(seed, offset, b, n, DRAW_SAMPLE)
        if n == length:
            w = weights(p)
        elif draft_probs is not None:
            w = weights(p - np.asarray(draft_probs[b, n], dtype=np.float32))
        else:
            w = weights(np.where(np.arange(p.size) == draft_tokens[b, n], p - np.float32(1), p))
        out[b, :n] = draft_tokens[b, :n]
        out[b, n] = sample_or_fall_back(w, p, word)
        accepted_counts[b] = n
    return out, accepted_counts


def children(parents, node):
    return [c for c in range(node + 1, len(parents)) if parents[c] == node]


def reference_tree_greedy(tree_tokens, parents, logits, width):
    path = [0]
    while True:
        best = reference_greedy_argmax(logits[path[-1]])
        match = [c for c in children(parents, path[-1]) if tree_tokens[c] == best]
        if not match or len(path) >= width:
            return path, best
        path.append(match[0])


def reference_tree_speculative(tree_tokens, parents, probs, seed, offset, row, width):
    path = [0]
    while True:
        node = path[-1]
        w = weights(probs[node])
        nxt, remaining = None, int(w.sum())
        rejected = []
        if len(path) < width:
            for c in children(parents, node):
                t = int(tree_tokens[c])
                weight = 0 if t in rejected else int(w[t])
                threshold = (remaining * (draw(seed, offset, row, c, DRAW_ACCEPT) >> 8)) >> 24
                if threshold < weight:
                    nxt = c
                    break
                if weight > 0:
                    remaining -= weight
                    rejected.append(t)
        if nxt is not None:
            path.append(nxt)
            continue
        rest = w.copy()
        rest[rejected] = 0
        return path, sample_or_fall_back(rest, probs[node], draw(seed, offset, row, node, DRAW_SAMPLE))


def pad_path(path, width):
    return path + [-1] * (width - len(path))


def random_probs(gen, *shape, peaked=False):
    logits = torch.randn(*shape, generator=gen) * (4.0 if peaked else 1.0)
    return torch.softmax(logits, dim=-1)


# ---- Philox --------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_matches_random123_known_answers(counter, key, expected):
    assert _C.philox4x32_10(*counter, *key) == expected
    assert tuple(int(w) for w in philox(*counter, *key)) == expected


# ---- greedy chains -----------------------------------------------------------------------

def one_hot_logits(argmaxes, vocab, dtype, device):
    """Logits [B, P, V] whose argmax at [b, i] is argmaxes[b][i]; the rest is noise below it."""
    logits = torch.rand(len(argmaxes), len(argmaxes[0]), vocab) - 2.0
    for b, row in enumerate(argmaxes):
        for i, token in enumerate(row):
            logits[b, i, token] = 3.0
    return logits.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_greedy_chain_hand_built(device, dtype):
    vocab = 50
    argmaxes = [[3, 7, 9, 11], [3, 7, 9, 11], [5, 6, 7, 8], [1, 2, 3, 4]]
    drafts = torch.tensor([[3, 7, 9],     # all accepted: bonus 11
                           [3, 8, 9],     # second rejected: target's 7
                           [4, 6, 7],     # first rejected: 5
                           [1, 2, 3]], device=device)
    out, n = verify_greedy(drafts, one_hot_logits(argmaxes, vocab, dtype, device))
    assert out.tolist() == [[3, 7, 9, 11], [3, 7, -1, -1], [5, -1, -1, -1], [1, 2, 3, 4]]
    assert n.tolist() == [3, 1, 0, 3]
    assert out.dtype == torch.int64 and n.dtype == torch.int32


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_chain_ragged_lengths(device):
    argmaxes = [[3, 7, 9, 11]] * 4
    drafts = torch.tensor([[3, 7, 9]] * 4, device=device)
    lens = torch.tensor([3, 2, 0, 1], dtype=torch.int32, device=device)
    out, n = verify_greedy(drafts, one_hot_logits(argmaxes, 20, torch.float32, device), draft_lens=lens)
    # A row with len L accepts at most L drafts; its bonus is the argmax at position L.
    assert out.tolist() == [[3, 7, 9, 11], [3, 7, 9, -1], [3, -1, -1, -1], [3, 7, -1, -1]]
    assert n.tolist() == [3, 2, 0, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("vocab", [4099, 4096])  # CUDA: scalar loads, then 16-byte loads; ties across CTAs
def test_greedy_ties_go_to_the_lowest_index(device, dtype, vocab):
    logits = torch.zeros(3, 2, vocab)
    logits[0, 0, [5, 17, 4000]] = 2.0            # three-way tie: 5
    logits[1, 0, :] = -0.0                       # all equal (signed zeros too): 0
    logits[1, 0, 1::2] = 0.0
    logits[2, 0, :] = float("nan")               # NaN ranks lowest: the finite maximum wins
    logits[2, 0, [100, 3000]] = -5.0
    logits[:, 1, 2] = 1.0
    drafts = torch.tensor([[17], [1], [3000]])
    out, n = verify_greedy(drafts.to(device), logits.to(dtype).to(device))
    assert out.tolist() == [[5, -1], [0, -1], [100, -1]]
    assert n.tolist() == [0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_all_nan_or_inf_rows_give_token_zero(device):
    logits = torch.full((2, 1, 300), float("-inf"))
    logits[1] = float("nan")
    out, n = verify_greedy(torch.zeros(2, 0, dtype=torch.int64, device=device), logits.to(device))
    assert out.tolist() == [[0], [0]] and n.tolist() == [0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, k, vocab", [(1, 1, 1), (17, 5, 97), (8, 3, 32000), (5, 8, 4101)])
def test_greedy_chain_matches_reference(device, batch, k, vocab):
    gen = torch.Generator().manual_seed(batch * 1000 + vocab)
    logits = torch.randn(batch, k + 1, vocab, generator=gen)
    best = logits.argmax(-1)
    # Drafts that agree with the target for a random prefix of each row.
    drafts = torch.randint(0, vocab, (batch, k), generator=gen)
    agree = torch.randint(0, k + 1, (batch,), generator=gen)
    for b in range(batch):
        drafts[b, :agree[b]] = best[b, :agree[b]]
    lens = torch.randint(0, k + 1, (batch,), generator=gen, dtype=torch.int32)
    for draft_lens in (None, lens):
        out, n = verify_greedy(drafts.to(device), logits.to(device),
                               draft_lens=None if draft_lens is None else draft_lens.to(device))
        for b in range(batch):
            length = k if draft_lens is None else int(draft_lens[b])
            i = 0
            while i < length and drafts[b, i] == reference_greedy_argmax(logits[b, i]):
                i += 1
            expected = drafts[b, :i].tolist() + [reference_greedy_argmax(logits[b, i])] + [-1] * (k - i)
            assert out[b].tolist() == expected and int(n[b]) == i


# ---- speculative chains --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, k, vocab, peaked", [(1, 1, 1, False), (23, 4, 37, False), (16, 3, 1000, True),
                                                     (4, 6, 32000, True), (9, 2, 1023, False)])
@pytest.mark.parametrize("one_hot_draft", [False, True])
def test_speculative_chain_matches_reference(device, batch, k, vocab, peaked, one_hot_draft):
    gen = torch.Generator().manual_seed(vocab + k)
    target = random_probs(gen, batch, k + 1, vocab, peaked=peaked)
    draft = random_probs(gen, batch, k, vocab, peaked=peaked)
    # Drafts sampled from q, so that acceptance rates are realistic.
    drafts = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen).reshape(batch, k)
    lens = torch.randint(0, k + 1, (batch,), generator=gen, dtype=torch.int32)
    seed, offset = 0x1234_5678_9ABC_DEF0, 2 ** 33 + 5
    probs = None if one_hot_draft else draft
    for draft_lens in (None, lens):
        expected = reference_speculative(drafts.numpy(), None if probs is None else probs.numpy(), target.numpy(),
                                         seed, offset, None if draft_lens is None else draft_lens.numpy())
        out, n = verify_speculative(drafts.to(device), None if probs is None else probs.to(device),
                                    target.to(device), seed=seed, offset=offset,
                                    draft_lens=None if draft_lens is None else draft_lens.to(device))
        assert np.array_equal(out.cpu().numpy(), expected[0])
        assert np.array_equal(n.cpu().numpy(), expected[1])


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_degenerate_rows(device):
    vocab, k = 6, 2
    p = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0])
    target = p.repeat(6, k + 1, 1)
    draft = target[:, :k].clone()
    drafts = torch.tensor([[3, 2]] * 6)
    # Row 1: q(x) = 0 at position 0 rejects, however likely x is under p.
    draft[1, 0] = torch.tensor([0.3, 0.3, 0.4, 0.0, 0.0, 0.0])
    # Row 2: q(x) = 0 and p = q: the residual max(0, p - q) is all zero, so the token comes from p.
    target[2, 0] = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5, 0.0])
    draft[2, 0] = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5, 0.0])
    drafts[2, 0] = 5
    # Row 3: p is all zero at the rejecting position: token 0, never NaN or out of range.
    target[3, 0] = 0.0
    draft[3, 0, 3] = 1.0
    # Row 4: all of p's mass on token 1, drafted token 3 has p = 0: rejected, residual picks 1.
    target[4, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    # Row 5: NaN and negative target entries weigh nothing.
    target[5, 1] = torch.tensor([float("nan"), -1.0, 0.0, 0.0, 0.0, 0.0])
    target[5, 1, 2] = 0.0
    draft[5, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    for seed in range(20):
        out, n = verify_speculative(drafts.to(device), draft.to(device), target.to(device), seed=seed)
        out, n = out.cpu(), n.cpu()
        assert n[0] == k and out[0, :k].tolist() == [3, 2] and out[0, k] in (0, 1, 2, 3)  # p = q: always accept
        assert n[1] == 0 and out[1, 0] == 3  # residual = max(0, p - q) keeps only token 3
        assert n[2] == 0 and out[2, 0] in (2, 4)
        assert n[3] == 0 and out[3, 0] == 0
        assert n[4] == 0 and out[4, 0] == 1
        assert n[5] == 1 and out[5, 1] == 0  # p at position 1 weighs nothing anywhere: token 0
        assert ((out >= -1) & (out < vocab)).all()
        expected = reference_speculative(drafts.numpy(), draft.numpy(), target.numpy(), seed, 0)
        assert np.array_equal(out.numpy(), expected[0]) and np.array_equal(n.numpy(), expected[1])


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_one_hot_draft(device):
    # q one-hot: accept x iff u < p(x); rejection samples from p without x.
    target = torch.zeros(2, 2, 5)
    target[0, 0, 2] = 1.0                      # p(x) = 1: always accepted
    target[1, 0] = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5])  # p(x) = 0: always rejected
    target[:, 1] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    drafts = torch.tensor([[2], [0]], device=device)
    for seed in range(20):
        out, n = verify_speculative(drafts, None, target.to(device), seed=seed)
        assert out[0].tolist() == [2, 3] and int(n[0]) == 1
        assert int(n[1]) == 0 and int(out[1, 0]) in (1, 4) and int(out[1, 1]) == -1


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_seed_and_offset(device):
    gen = torch.Generator().manual_seed(3)
    batch, k, vocab = 64, 4, 50
    target = random_probs(gen, batch, k + 1, vocab).to(device)
    draft = random_probs(gen, batch, k, vocab).to(device)
    drafts = torch.randint(0, vocab, (batch, k), generator=gen).to(device)
    first = verify_speculative(drafts, draft, target, seed=7, offset=11)
    again = verify_speculative(drafts, draft, target, seed=7, offset=11)
    as_tensor = verify_speculative(drafts, draft, target, seed=7,
                                   offset=torch.tensor([11], dtype=torch.int64, device=device))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, as_tensor))
    assert not torch.equal(first[0], verify_speculative(drafts, draft, target, seed=8, offset=11)[0])
    assert not torch.equal(first[0], verify_speculative(drafts, draft, target, seed=7, offset=12)[0])
    # Seeds are 64-bit: the high word matters, and 2^64 - 1 is the same key as -1.
    assert not torch.equal(first[0], verify_speculative(drafts, draft, target, seed=7 + 2 ** 40, offset=11)[0])
    top = verify_speculative(drafts, draft, target, seed=2 ** 64 - 1)
    assert torch.equal(top[0], verify_speculative(drafts, draft, target, seed=-1)[0])


# ---- trees ---------------------------------------------------------------------------

#            0
#        /   |   \
#       1    2    3          node 3 shares node 1's token
#      / \   |
#     4   5  6
#     |
#     7
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
TOKENS = [99, 10, 11, 10, 20, 21, 22, 30]


def tree_logits(argmax_by_node, nodes, vocab, dtype, device):
    logits = torch.rand(1, nodes, vocab) - 2.0
    for node, token in argmax_by_node.items():
        logits[0, node, token] = 4.0
    return logits.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("argmax_by_node, path, next_token", [
    ({0: 10, 1: 20, 4: 30, 7: 41}, [0, 1, 4, 7], 41),   # deepest path, bonus at the leaf
    ({0: 11, 2: 23}, [0, 2], 23),                        # second child, then no child matches
    ({0: 12}, [0], 12),                                  # root rejects every child
    ({0: 10, 1: 21, 5: 8}, [0, 1, 5], 8),                # second grandchild
])
def test_tree_greedy_hand_built(device, dtype, argmax_by_node, path, next_token):
    vocab = 100
    logits = tree_logits(argmax_by_node, len(PARENTS), vocab, dtype, device)
    tokens = torch.tensor([TOKENS], device=device)
    parents = torch.tensor([PARENTS], dtype=torch.int32, device=device)
    nodes, n, nxt = verify_tree_greedy(tokens, parents, logits, max_depth=3)
    assert nodes.tolist() == [pad_path(path, 4)]
    assert n.tolist() == [len(path) - 1] and nxt.tolist() == [next_token]
    assert nodes.dtype == torch.int32 and n.dtype == torch.int32 and nxt.dtype == torch.int64


def test_tree_greedy_width_on_cpu_is_the_depth_and_on_request_truncates():
    logits = tree_logits({0: 10, 1: 20, 4: 30, 7: 41}, len(PARENTS), 100, torch.float32, "cpu")
    tokens, parents = torch.tensor([TOKENS]), torch.tensor([PARENTS], dtype=torch.int32)
    nodes, n, nxt = verify_tree_greedy(tokens, parents, logits)
    assert nodes.shape == (1, 4) and nodes.tolist() == [[0, 1, 4, 7]] and nxt.tolist() == [41]
    nodes, n, nxt = verify_tree_greedy(tokens, parents, logits, max_depth=1)
    assert nodes.tolist() == [[0, 1]] and n.tolist() == [1] and nxt.tolist() == [20]  # argmax at the last node
    nodes, n, nxt = verify_tree_greedy(tokens, parents, logits, max_depth=0)
    assert nodes.tolist() == [[0]] and n.tolist() == [0] and nxt.tolist() == [10]


@pytest.mark.gpu
def test_tree_greedy_width_on_cuda_is_the_node_count():
    logits = tree_logits({0: 10, 1: 20, 4: 30, 7: 41}, len(PARENTS), 100, torch.float32, "cuda")
    nodes, n, nxt = verify_tree_greedy(torch.tensor([TOKENS], device="cuda"),
                                       torch.tensor([PARENTS], dtype=torch.int32, device="cuda"), logits)
    assert nodes.tolist() == [pad_path([0, 1, 4, 7], len(PARENTS))] and n.tolist() == [3] and nxt.tolist() == [41]


@pytest.mark.parametrize("device", DEVICES)
def test_tree_greedy_sibling_ties_and_padding(device):
    # Nodes 1 and 3 both carry token 10 = argmax at the root: the lower index (1) wins.
    # Row 1 marks nodes 1 and 4 as padding (parent -1): node 3 is the match, and node 4's
    # subtree is unreachable; 7 hangs below padding.
    parents = torch.tensor([PARENTS, [-1, -1, 0, 0, -1, 1, 2, 4]], dtype=torch.int32)
    tokens = torch.tensor([TOKENS, TOKENS])
    logits = torch.rand(2, len(PARENTS), 100) - 2.0
    logits[:, 0, 10] = 1.0
    logits[:, 1, 20] = 1.0
    logits[:, 3, 55] = 1.0
    nodes, n, nxt = verify_tree_greedy(tokens.to(device), parents.to(device), logits.to(device), max_depth=3)
    assert nodes.tolist() == [[0, 1, 4, -1], [0, 3, -1, -1]]
    assert n.tolist() == [2, 1]
    assert nxt.tolist()[1] == 55


def random_trees(gen, batch, nodes, vocab, fanout_bias=0.5):
    """Random trees (some with padding nodes) whose tokens often repeat among siblings."""
    parents = torch.full((batch, nodes), -1, dtype=torch.int32)
    for b in range(batch):
        for c in range(1, nodes):
            if torch.rand(1, generator=gen) < 0.1:
                continue  # padding
            parents[b, c] = int(torch.randint(0, c, (1,), generator=gen) * fanout_bias)
    tokens = torch.randint(0, min(vocab, 6), (batch, nodes), generator=gen)
    return tokens, parents


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, nodes, vocab", [(1, 1, 1), (13, 9, 5), (6, 33, 4001), (3, 17, 32000)])
def test_tree_greedy_matches_reference(device, batch, nodes, vocab):
    gen = torch.Generator().manual_seed(nodes)
    tokens, parents = random_trees(gen, batch, nodes, vocab)
    logits = torch.randn(batch, nodes, vocab, generator=gen)
    logits[:, :, :6] += 3.0  # argmaxes among the tokens the trees use
    width = nodes
    out = verify_tree_greedy(tokens.to(device), parents.to(device), logits.to(device), max_depth=width - 1)
    for b in range(batch):
        path, best = reference_tree_greedy(tokens[b].tolist(), parents[b].tolist(), logits[b], width)
        assert out[0][b].tolist() == pad_path(path, width)
        assert int(out[1][b]) == len(path) - 1 and int(out[2][b]) == best


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, nodes, vocab, peaked", [(1, 1, 1, False), (40, 9, 6, False), (12, 20, 997, True),
                                                         (4, 33, 32000, True)])
@pytest.mark.parametrize("max_depth", [None, 2])
def test_tree_speculative_matches_reference(device, batch, nodes, vocab, peaked, max_depth):
    gen = torch.Generator().manual_seed(nodes + vocab)
    tokens, parents = random_trees(gen, batch, nodes, vocab)
    probs = random_probs(gen, batch, nodes, vocab, peaked=peaked)
    probs[:, :, :6] += 0.2  # the tree tokens carry real mass
    probs /= probs.sum(-1, keepdim=True)
    seed, offset = 99, 3
    width = nodes if max_depth is None else min(max_depth, nodes - 1) + 1
    out = verify_tree_speculative(tokens.to(device), parents.to(device), probs.to(device), seed=seed, offset=offset,
                                  max_depth=width - 1)
    for b in range(batch):
        path, token = reference_tree_speculative(tokens[b].tolist(), parents[b].tolist(), probs[b].numpy(), seed,
                                                 offset, b, width)
        assert out[0][b].tolist() == pad_path(path, width)
        assert int(out[1][b]) == len(path) - 1 and int(out[2][b]) == token


@pytest.mark.parametrize("device", DEVICES)
def test_tree_speculative_certain_and_impossible_children(device):
    probs = torch.zeros(1, len(PARENTS), 100)
    probs[0, 0, 11] = 1.0            # root: all mass on node 2's token -> nodes 1 (10) rejected, 2 accepted
    probs[0, 2, 5] = 1.0             # node 2: its child 6 (22) has no mass -> rejected; residual is token 5
    parents = torch.tensor([PARENTS], dtype=torch.int32, device=device)
    tokens = torch.tensor([TOKENS], device=device)
    for seed in range(10):
        nodes, n, nxt = verify_tree_speculative(tokens, parents, probs.to(device), seed=seed, max_depth=3)
        assert nodes.tolist() == [[0, 2, -1, -1]] and n.tolist() == [1] and nxt.tolist() == [5]


# ---- outputs written, bad input, registration ---------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_every_output_element_is_written(device):
    """Calls the bindings directly with poisoned outputs: every element must be overwritten."""
    gen = torch.Generator().manual_seed(5)
    batch, k, vocab = 5, 3, 300
    target = random_probs(gen, batch, k + 1, vocab).to(device)
    drafts = torch.randint(0, vocab, (batch, k), generator=gen).to(device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    for call in ("greedy", "speculative"):
        out = torch.full((batch, k + 1), POISON, dtype=torch.int64, device=device)
        n = torch.full((batch,), POISON, dtype=torch.int32, device=device)
        if call == "greedy":
            _C.verify_greedy(drafts, target, None, out, n, stream)
        else:
            _C.verify_speculative(drafts, None, target, None, 1, 0, None, out, n, stream)
        assert not (out == POISON).any() and not (n == POISON).any()
    tokens = torch.tensor([TOKENS] * batch, device=device)
    parents = torch.tensor([PARENTS] * batch, dtype=torch.int32, device=device)
    probs = random_probs(gen, batch, len(PARENTS), vocab).to(device)
    for call in ("tree_greedy", "tree_speculative"):
        nodes = torch.full((batch, 4), POISON, dtype=torch.int32, device=device)
        n = torch.full((batch,), POISON, dtype=torch.int32, device=device)
        nxt = torch.full((batch,), POISON, dtype=torch.int64, device=device)
        if call == "tree_greedy":
            _C.verify_tree_greedy(tokens, parents, probs, nodes, n, nxt, stream)
        else:
            _C.verify_tree_speculative(tokens, parents, probs, 1, 0, None, nodes, n, nxt, stream)
        assert not any((t == POISON).any() for t in (nodes, n, nxt))


def chain_inputs():
    return torch.zeros(2, 3, dtype=torch.int64), torch.full((2, 3, 8), 0.125), torch.full((2, 4, 8), 0.125)


@pytest.mark.parametrize("call, error, argument", [
    (lambda d, q, p: verify_greedy(d.int(), p), TypeError, "draft_tokens"),
    (lambda d, q, p: verify_greedy(d[0], p), ValueError, "draft_tokens"),
    (lambda d, q, p: verify_greedy(d, p[:, :3]), ValueError, "target_logits"),
    (lambda d, q, p: verify_greedy(d, p.long()), TypeError, "target_logits"),
    (lambda d, q, p: verify_greedy(d + 8, p), ValueError, "draft_tokens"),
    (lambda d, q, p: verify_greedy(d - 1, p), ValueError, "draft_tokens"),
    (lambda d, q, p: verify_greedy(d, p, draft_lens=torch.tensor([1, 4], dtype=torch.int32)), ValueError, "draft_lens"),
    (lambda d, q, p: verify_greedy(d, p, draft_lens=torch.tensor([1, 2])), TypeError, "draft_lens"),
    (lambda d, q, p: verify_greedy(d, p.transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "target_logits"),
    (lambda d, q, p: verify_speculative(d, q, p.half(), seed=0), TypeError, "target_probs"),
    (lambda d, q, p: verify_speculative(d, q[:, :, :7], p, seed=0), ValueError, "draft_probs"),
    (lambda d, q, p: verify_speculative(d, q[:, :2], p, seed=0), ValueError, "draft_probs"),
    (lambda d, q, p: verify_speculative(d, q, p, seed=2 ** 64), ValueError, "seed"),
    (lambda d, q, p: verify_speculative(d, q, p, seed=0.5), TypeError, "seed"),
    (lambda d, q, p: verify_speculative(d, q, p, seed=0, offset=torch.tensor([1, 2])), ValueError, "offset"),
    (lambda d, q, p: verify_speculative(d, q, p, seed=0, offset=torch.tensor([1], dtype=torch.int32)),
     ValueError, "offset"),
    (lambda d, q, p: verify_speculative(d, q, p, seed=0, draft_lens=torch.tensor([-1, 0], dtype=torch.int32)),
     ValueError, "draft_lens"),
    (lambda d, q, p: verify_speculative(d, q, torch.zeros(2, 4, 0), seed=0), ValueError, "target_probs"),
    (lambda d, q, p: verify_speculative(d, [q], p, seed=0), TypeError, "draft_probs"),
])
def test_chain_bad_input_raises_naming_the_argument(call, error, argument):
    d, q, p = chain_inputs()
    with pytest.raises(error, match=argument):
        call(d, q, p)


def tree_inputs():
    return torch.tensor([TOKENS]), torch.tensor([PARENTS], dtype=torch.int32), torch.full((1, 8, 100), 0.01)


@pytest.mark.parametrize("call, error, argument", [
    (lambda t, a, p: verify_tree_greedy(t, a.long(), p), TypeError, "parents"),
    (lambda t, a, p: verify_tree_greedy(t, a[:, :7], p), ValueError, "parents"),
    (lambda t, a, p: verify_tree_greedy(t, a, p[:, :7]), ValueError, "target_logits"),
    (lambda t, a, p: verify_tree_greedy(t, torch.tensor([[0, 0, 0, 0, 1, 1, 2, 4]], dtype=torch.int32), p),
     ValueError, "parents"),
    (lambda t, a, p: verify_tree_greedy(t, torch.tensor([[-1, 0, 0, 0, 1, 5, 2, 4]], dtype=torch.int32), p),
     ValueError, "parents"),
    (lambda t, a, p: verify_tree_greedy(t, torch.tensor([[-1, 0, 0, 0, 1, -2, 2, 4]], dtype=torch.int32), p),
     ValueError, "parents"),
    (lambda t, a, p: verify_tree_greedy(t * 10, a, p), ValueError, "tree_tokens"),
    (lambda t, a, p: verify_tree_greedy(t, a, p, max_depth=-1), ValueError, "max_depth"),
    (lambda t, a, p: verify_tree_greedy(t[:, :0], a[:, :0], p[:, :0]), ValueError, "tree_tokens"),
    (lambda t, a, p: verify_tree_speculative(t, a, p.double(), seed=1), TypeError, "target_probs"),
    (lambda t, a, p: verify_tree_speculative(t.int(), a, p, seed=1), TypeError, "tree_tokens"),
])
def test_tree_bad_input_raises_naming_the_argument(call, error, argument):
    t, a, p = tree_inputs()
    with pytest.raises(error, match=argument):
        call(t, a, p)


def test_padding_nodes_tokens_are_not_checked_and_never_accepted():
    t, a, p = tree_inputs()
    logits = torch.zeros(1, 8, 100)
    logits[0, 0, 10] = logits[0, 1, 20] = logits[0, 4, 30] = 5.0  # the walk would take nodes 1, 4, 7
    a[0, 4] = -1       # node 4 is padding, and so is node 7 below it
    valid = verify_tree_greedy(t, a, logits)
    t[0, 4] = -5       # a padding node may carry anything,
    t[0, 7] = 10 ** 6  # so may a node under one,
    t[0, 0] = 10 ** 9  # and so may the root: it is the last emitted token, never compared
    nodes, n, nxt = verify_tree_greedy(t, a, logits)
    assert nodes.tolist() == [[0, 1, -1]] and n.tolist() == [1] and nxt.tolist() == [20]  # depth 2 without 4, 7
    assert [x.tolist() for x in valid] == [nodes.tolist(), n.tolist(), nxt.tolist()]
    probs = torch.softmax(logits * 4, -1)
    out = verify_tree_speculative(t, a, probs, seed=1, offset=0)
    assert 4 not in out[0].tolist()[0] and 7 not in out[0].tolist()[0]


@pytest.mark.gpu
def test_cuda_mixed_devices_raise():
    d, q, p = chain_inputs()
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_greedy(d, p.cuda())
    with pytest.raises(ValueError, match="offset"):
        verify_speculative(d.cuda(), q.cuda(), p.cuda(), seed=0, offset=torch.zeros(1, dtype=torch.int64,
                                                                                     device="cuda:0")[:0])


def test_torch_ops_are_registered_and_pass_opcheck():
    gen = torch.Generator().manual_seed(1)
    batch, k, vocab = 3, 2, 16
    drafts = torch.randint(0, vocab, (batch, k), generator=gen)
    target = random_probs(gen, batch, k + 1, vocab)
    draft = random_probs(gen, batch, k, vocab)
    lens = torch.tensor([2, 0, 1], dtype=torch.int32)
    tokens, parents, probs = tree_inputs()
    cases = [
        (torch.ops.pagedlm.verify_greedy.default, (drafts, target), {"draft_lens": lens}),
        (torch.ops.pagedlm.verify_speculative.default, (drafts, draft, target), {"seed": 3, "offset": 4}),
        (torch.ops.pagedlm.verify_speculative.default, (drafts, None, target),
         {"seed": -3, "offset_tensor": torch.tensor([4]), "draft_lens": lens}),
        (torch.ops.pagedlm.verify_tree_greedy.default, (tokens, parents, probs), {"max_depth": 2}),
        (torch.ops.pagedlm.verify_tree_greedy.default, (tokens, parents, probs), {}),
        (torch.ops.pagedlm.verify_tree_speculative.default, (tokens, parents, probs), {"seed": 5, "max_depth": 3}),
    ]
    for op, args, kwargs in cases:
        torch.library.opcheck(op, args, kwargs)
    # The op and the Python function agree.
    assert all(torch.equal(a, b) for a, b in zip(torch.ops.pagedlm.verify_speculative(drafts, draft, target, seed=3),
                                                 verify_speculative(drafts, draft, target, seed=3)))


def test_verify_module_imports_before_or_after_ops():
    import subprocess
    import sys
    for first, second in (("pagedlm.verify", "pagedlm.ops"), ("pagedlm.ops", "pagedlm.verify")):
        code = (f"import torch, {first}, {second}; "
                "print(torch.ops.pagedlm.verify_greedy, torch.ops.pagedlm.paged_decode_attention)")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---- CPU and CUDA bit-identical -------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("batch, k, vocab", [(64, 4, 32000), (16, 8, 128256), (3, 5, 4099), (300, 2, 64),
                                             (1, 7, 151936)])
def test_cuda_matches_cpu_bit_for_bit(batch, k, vocab):
    gen = torch.Generator().manual_seed(vocab)
    target = random_probs(gen, batch, k + 1, vocab, peaked=True)
    draft = random_probs(gen, batch, k, vocab, peaked=True)
    drafts = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen).reshape(batch, k)
    lens = torch.randint(0, k + 1, (batch,), generator=gen, dtype=torch.int32)
    logits = torch.log(target).to(torch.bfloat16)
    for kwargs in ({}, {"draft_lens": lens}):
        cuda_kwargs = {name: t.cuda() for name, t in kwargs.items()}
        for probs in (draft, None):
            cpu = verify_speculative(drafts, probs, target, seed=42, offset=9, **kwargs)
            gpu = verify_speculative(drafts.cuda(), None if probs is None else probs.cuda(), target.cuda(), seed=42,
                                     offset=torch.tensor([9], device="cuda"), **cuda_kwargs)
            assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
        cpu = verify_greedy(drafts, logits, **kwargs)
        gpu = verify_greedy(drafts.cuda(), logits.cuda(), **cuda_kwargs)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    nodes = min(k + 1, 9)
    tokens, parents = random_trees(gen, batch, nodes, vocab)
    tree_probs = target[:, :nodes].contiguous()
    cpu = verify_tree_speculative(tokens, parents, tree_probs, seed=1, max_depth=nodes - 1)
    gpu = verify_tree_speculative(tokens.cuda(), parents.cuda(), tree_probs.cuda(), seed=1)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    cpu = verify_tree_greedy(tokens, parents, logits[:, :nodes].contiguous(), max_depth=nodes - 1)
    gpu = verify_tree_greedy(tokens.cuda(), parents.cuda(), logits[:, :nodes].contiguous().cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))


@pytest.mark.gpu
def test_cuda_out_of_range_values_never_fault():
    vocab = 1000
    target = torch.full((4, 3, vocab), 1.0 / vocab, device="cuda")
    drafts = torch.tensor([[5, vocab + 3], [-4, 2], [10 ** 12, 0], [1, 1]], device="cuda")
    lens = torch.tensor([2, 7, -3, 2], dtype=torch.int32, device="cuda")
    out, n = verify_speculative(drafts, target[:, :2].contiguous(), target, seed=0, draft_lens=lens)
    out2, n2 = verify_greedy(drafts, target.log(), draft_lens=lens)
    torch.cuda.synchronize()
    for o, a in ((out, n), (out2, n2)):
        assert ((o >= -1) & (o < vocab)).all() and ((a >= 0) & (a <= 2)).all()
        assert int(a[0]) <= 1 and int(a[1]) == 0  # an out-of-range draft counts as rejected
    tokens = torch.tensor([[0, vocab, -1, 3]], device="cuda")
    parents = torch.tensor([[5, 0, 9, -7]], dtype=torch.int32, device="cuda")
    res = verify_tree_speculative(tokens, parents, target[:1, :1].expand(1, 4, vocab).contiguous(), seed=0)
    torch.cuda.synchronize()
    assert 0 <= int(res[2][0]) < vocab and int(res[1][0]) == 0


@pytest.mark.gpu
def test_cuda_debug_mode_checks_values(monkeypatch):
    monkeypatch.setenv("PAGEDLM_DEBUG", "1")
    d, q, p = chain_inputs()
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_speculative((d + 9).cuda(), q.cuda(), p.cuda(), seed=0)
    t, a, probs = tree_inputs()
    a[0, 3] = 5
    with pytest.raises(ValueError, match="parents"):
        verify_tree_greedy(t.cuda(), a.cuda(), probs.cuda())


@pytest.mark.gpu
def test_cuda_graph_replay_advances_a_tensor_offset():
    gen = torch.Generator().manual_seed(2)
    batch, k, vocab = 32, 4, 1000
    target = random_probs(gen, batch, k + 1, vocab)
    draft = random_probs(gen, batch, k, vocab)
    drafts = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen).reshape(batch, k).cuda()
    target, draft = target.cuda(), draft.cuda()
    offset = torch.zeros(1, dtype=torch.int64, device="cuda")
    verify_speculative(drafts, draft, target, seed=5, offset=offset)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = verify_speculative(drafts, draft, target, seed=5, offset=offset)
    for step in range(3):
        offset.fill_(step)
        graph.replay()
        expected = verify_speculative(drafts.cpu(), draft.cpu(), target.cpu(), seed=5, offset=step)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(captured, expected))
