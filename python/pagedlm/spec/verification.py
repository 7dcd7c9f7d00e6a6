"""Verification of a step's drafts with pagedlm's kernels. Greedy requests are verified in
one batched call per draft shape (chains with verify_greedy and ragged draft_lens, trees with
verify_tree_greedy and padding nodes). Sampled requests are verified one by one, each with
its own seed and its position as the Philox offset, so a seeded request's tokens do not
depend on its batch (the kernels take one seed per call).

Everything the host needs from the greedy requests (the kernels' verdicts, each row's argmax
and its log-probability) comes back in one transfer, so a step synchronizes once however
many sequences it verifies: a greedy request emits each row's argmax, whose log-probability
is computed for every row up front."""
import torch

import pagedlm.ops as ops
from pagedlm.spec.sampling import processed_probs, request_seed, token_logprobs


def accept(drafts, logits, spans, engine_seed):
    """{seq: (path, tokens, logprobs, row_argmax)}. logits: the step's rows; spans: {seq: (its
    first row, its row count)}, row 0 its last token's, then its extras'. path indexes the
    seq's rows (0, then the accepted extras); tokens are the ones to emit, one per path entry,
    with their log-probabilities; row_argmax is the argmax of each of the seq's rows (proposers
    that iterate on the model's own guesses read it)."""
    seqs = list(drafts)
    width = max(spans[s][1] for s in seqs)
    index = [[first + min(r, count - 1) for r in range(width)] for first, count in (spans[s] for s in seqs)]
    padded = logits[torch.tensor(index, device=logits.device)]  # [B, width, V], short rows repeat their last
    argmax = padded.argmax(-1)
    logprob = torch.log_softmax(padded.float(), -1).gather(-1, argmax.unsqueeze(-1)).squeeze(-1)
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    chains = [i for i in greedy if drafts[seqs[i]].parents is None]
    trees = [i for i in greedy if drafts[seqs[i]].parents is not None]
    views = [tree_view(seqs[i], drafts[seqs[i]]) for i in trees]
    verdicts = [argmax, logprob]
    if chains:
        verdicts += _greedy_chains([drafts[seqs[i]] for i in chains], padded[chains])
    if trees:
        verdicts += _greedy_trees(views, padded[trees])
    argmax, logprob, *rest = _to_host(verdicts)
    argmax, logprob, rest = argmax.long().tolist(), logprob.tolist(), [t.long().tolist() for t in rest]
    results = {}
    if chains:
        out, accepted, rest = rest[0], rest[1], rest[2:]
        for j, i in enumerate(chains):
            path = list(range(accepted[j] + 1))
            results[seqs[i]] = (path, out[j][:len(path)], [logprob[i][r] for r in path], argmax[i])
    if trees:
        nodes, accepted, next_token = rest
        for j, (i, (tokens, _, rows)) in enumerate(zip(trees, views)):
            accepted_nodes = nodes[j][:accepted[j] + 1]
            path = [rows[n] for n in accepted_nodes]
            emitted = [tokens[n] for n in accepted_nodes[1:]] + [next_token[j]]
            results[seqs[i]] = (path, emitted, [logprob[i][r] for r in path], argmax[i])
    for i, seq in enumerate(seqs):
        if seq.params.temperature > 0:
            first, count = spans[seq]
            rows = logits[first:first + count]
            path, tokens = _sampled(seq, drafts[seq], rows, engine_seed)
            results[seq] = (path, tokens, token_logprobs(rows[path], seq.params, tokens), argmax[i])
    return results


def tree_view(seq, draft):
    """(tokens, parents, logit rows) of the verification tree: the last token as root, then
    the candidate extras; a chain is a tree of one branch."""
    nodes = range(len(draft.tokens)) if draft.candidates is None else draft.candidates
    parents = [i - 1 for i in range(len(draft.tokens))] if draft.parents is None else draft.parents
    index = {extra: i + 1 for i, extra in enumerate(nodes)}
    return ([seq.tokens[-1]] + [draft.tokens[e] for e in nodes], [-1] + [index.get(parents[e], 0) for e in nodes],
            [0] + [e + 1 for e in nodes])


def _to_host(tensors):
    """The tensors on the host, after one device-to-host copy (every value fits a float64)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _greedy_chains(drafts, padded):
    """[output_tokens, num_accepted] on the device; padded: [B, rows, V], row 0 the last token's."""
    k = max(len(d.tokens) for d in drafts)
    host = torch.zeros(len(drafts), k + 1, dtype=torch.int64)  # the drafts, then their lengths
    for i, d in enumerate(drafts):
        host[i, :len(d.tokens)] = torch.tensor(d.tokens)
        host[i, k] = len(d.tokens)
    device_copy = host.to(padded.device, non_blocking=True)
    out, accepted = ops.verify_greedy(device_copy[:, :k].contiguous(), padded[:, :k + 1].contiguous(),
                                      draft_lens=device_copy[:, k].int())
    return [out, accepted]


def _greedy_trees(views, padded):
    """[accepted_nodes, num_accepted, next_token] on the device."""
    width = max(len(v[0]) for v in views)
    tokens = torch.zeros(len(views), width, dtype=torch.int64)
    parents = torch.full((len(views), width), -1, dtype=torch.int64)  # -1 past node 0: padding
    rows = torch.zeros(len(views), width, dtype=torch.int64)
    for i, (toks, pars, node_rows) in enumerate(views):
        tokens[i, :len(toks)] = torch.tensor(toks)
        parents[i, :len(pars)] = torch.tensor(pars)
        rows[i, :len(node_rows)] = torch.tensor(node_rows)
    device_copy = torch.stack([tokens, parents, rows]).to(padded.device, non_blocking=True)
    logits = padded[torch.arange(len(views), device=padded.device).unsqueeze(1), device_copy[2]]
    nodes, accepted, next_token = ops.verify_tree_greedy(device_copy[0], device_copy[1].int(), logits)
    return [nodes, accepted, next_token]


def _sampled(seq, draft, rows, engine_seed):
    seed, offset = request_seed(seq, engine_seed), len(seq)
    if draft.parents is None:
        drafted = torch.tensor([draft.tokens], dtype=torch.int64, device=rows.device)
        q = None if draft.probs is None else draft.probs.unsqueeze(0).float()
        out, accepted = ops.verify_speculative(drafted, q, processed_probs(rows, seq.params).unsqueeze(0), seed=seed,
                                               offset=offset)
        count = int(accepted[0])
        return list(range(count + 1)), out[0, :count + 1].tolist()
    tokens, parents, node_rows = tree_view(seq, draft)
    probs = processed_probs(rows[node_rows], seq.params).unsqueeze(0)
    nodes, accepted, next_token = ops.verify_tree_speculative(
        torch.tensor([tokens], device=rows.device), torch.tensor([parents], dtype=torch.int32, device=rows.device),
        probs, seed=seed, offset=offset)
    path = nodes[0, :int(accepted[0]) + 1].tolist()
    return [node_rows[p] for p in path], [tokens[p] for p in path[1:]] + [int(next_token[0])]
