"""Verification of a step's drafts with pagedlm's kernels. Greedy requests are verified in
one batched call per draft shape (chains with verify_greedy and ragged draft_lens, trees with
verify_tree_greedy and padding nodes). Sampled requests are verified one by one, each with
its own seed and its position as the Philox offset, so a seeded request's tokens do not
depend on its batch (the kernels take one seed per call)."""
import torch

import pagedlm.ops as ops
from pagedlm.spec.sampling import processed_probs, request_seed


def accept(drafts, rows_of, engine_seed):
    """{seq: (path, tokens)}: path indexes the seq's logit rows (0 = its last token, then the
    accepted extras); tokens are the ones to emit, one per path entry."""
    results = {}
    greedy = [s for s in drafts if s.params.temperature == 0]
    chains = [s for s in greedy if drafts[s].parents is None]
    trees = [s for s in greedy if drafts[s].parents is not None]
    if chains:
        results.update(_greedy_chains(chains, drafts, rows_of))
    if trees:
        results.update(_greedy_trees(trees, drafts, rows_of))
    for seq in drafts:
        if seq.params.temperature > 0:
            results[seq] = _sampled(seq, drafts[seq], rows_of[seq], engine_seed)
    return results


def tree_view(seq, draft):
    """(tokens, parents, logit rows) of the verification tree: the last token as root, then
    the candidate extras; a chain is a tree of one branch."""
    nodes = range(len(draft.tokens)) if draft.candidates is None else draft.candidates
    parents = [i - 1 for i in range(len(draft.tokens))] if draft.parents is None else draft.parents
    index = {extra: i + 1 for i, extra in enumerate(nodes)}
    return ([seq.tokens[-1]] + [draft.tokens[e] for e in nodes], [-1] + [index.get(parents[e], 0) for e in nodes],
            [0] + [e + 1 for e in nodes])


def _greedy_chains(seqs, drafts, rows_of):
    k = max(len(drafts[s].tokens) for s in seqs)
    drafted = torch.zeros(len(seqs), k, dtype=torch.int64)
    for i, s in enumerate(seqs):
        drafted[i, :len(drafts[s].tokens)] = torch.tensor(drafts[s].tokens)
    device = rows_of[seqs[0]].device
    logits = torch.zeros(len(seqs), k + 1, rows_of[seqs[0]].shape[-1], device=device)
    for i, s in enumerate(seqs):
        logits[i, :len(rows_of[s])] = rows_of[s]
    lens = torch.tensor([len(drafts[s].tokens) for s in seqs], dtype=torch.int32, device=device)
    drafted = drafted.to(device)
    out, accepted = ops.verify_greedy(drafted, logits, draft_lens=lens)
    return {s: (list(range(int(a) + 1)), row[:int(a) + 1].tolist()) for s, row, a in zip(seqs, out, accepted)}


def _greedy_trees(seqs, drafts, rows_of):
    views = [tree_view(s, drafts[s]) for s in seqs]
    width = max(len(v[0]) for v in views)
    tokens = torch.zeros(len(seqs), width, dtype=torch.int64)
    parents = torch.full((len(seqs), width), -1, dtype=torch.int32)  # -1 past node 0: padding
    device = rows_of[seqs[0]].device
    logits = torch.zeros(len(seqs), width, rows_of[seqs[0]].shape[-1], device=device)
    for i, (s, (toks, pars, rows)) in enumerate(zip(seqs, views)):
        tokens[i, :len(toks)] = torch.tensor(toks)
        parents[i, :len(pars)] = torch.tensor(pars, dtype=torch.int32)
        logits[i, :len(rows)] = rows_of[s][rows]
    nodes, accepted, next_token = ops.verify_tree_greedy(tokens.to(device), parents.to(device), logits)
    return {s: _tree_result(v, nodes[i], accepted[i], next_token[i]) for i, (s, v) in enumerate(zip(seqs, views))}


def _sampled(seq, draft, rows, engine_seed):
    seed, offset = request_seed(seq, engine_seed), len(seq)
    if draft.parents is None:
        drafted = torch.tensor([draft.tokens], dtype=torch.int64, device=rows.device)
        q = None if draft.probs is None else draft.probs.unsqueeze(0).float()
        out, accepted = ops.verify_speculative(drafted, q, processed_probs(rows, seq.params).unsqueeze(0), seed=seed,
                                               offset=offset)
        count = int(accepted[0])
        return list(range(count + 1)), out[0, :count + 1].tolist()
    view = tree_view(seq, draft)
    probs = processed_probs(rows[view[2]], seq.params).unsqueeze(0)
    nodes, accepted, next_token = ops.verify_tree_speculative(
        torch.tensor([view[0]], device=rows.device), torch.tensor([view[1]], dtype=torch.int32, device=rows.device),
        probs, seed=seed, offset=offset)
    return _tree_result(view, nodes[0], accepted[0], next_token[0])


def _tree_result(view, nodes, accepted, next_token):
    tokens, _, rows = view
    path = nodes[:int(accepted) + 1].tolist()
    return [rows[p] for p in path], [tokens[p] for p in path[1:]] + [int(next_token)]
