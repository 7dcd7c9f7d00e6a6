"""Verification of a step's drafts with pagedlm's kernels. Greedy requests are verified in
one batched call per draft shape (chains with verify_greedy and ragged draft_lens, trees with
verify_tree_greedy and padding nodes). Sampled requests are verified one by one, each with
its own seed and its position as the Philox offset, so a seeded request's tokens do not
depend on its batch (the kernels take one seed per call).

Everything the host needs from the greedy requests (the kernels' verdicts, each row's argmax
and its log-probability, which the forward's graph computes with the logits) comes back in
one transfer, so a step synchronizes once however many sequences it verifies: a greedy
request emits each row's argmax."""
import numpy as np
import torch

import pagedlm.ops as ops
from pagedlm.spec.sampling import processed_probs, request_seed, token_logprobs


class Verification:
    """One step's verification. Built while the device runs the step's forward (the host is
    what limits small models): every index and draft the kernels read goes to the device in
    one copy from pinned memory, which queues behind the forward without waiting for it. Then
    accept(logits, choices) reads the verdicts back in one transfer."""

    def __init__(self, drafts, spans, device):
        """drafts: {seq: Draft}; spans: {seq: (its first row in the step's logits, its row
        count)}, row 0 its last token's, then its extras'."""
        greedy = [s for s in drafts if s.params.temperature == 0]
        self.chains = [s for s in greedy if drafts[s].parents is None]
        self.trees = [s for s in greedy if drafts[s].parents is not None]
        self.seqs = self.chains + self.trees + [s for s in drafts if s.params.temperature > 0]
        self.drafts, self.spans = drafts, spans
        self.views = [tree_view(s, drafts[s]) for s in self.trees]
        k = max((len(drafts[s].tokens) for s in self.chains), default=0)
        nodes = max((len(v[0]) for v in self.views), default=0)
        # Per chain its drafts, its k + 1 rows (short ones repeat their last); per tree its tokens
        # and rows; then per chain its draft count and per tree its parents (-1 pads), which
        # become int32 in one launch. One int64 upload.
        c, t = len(self.chains), len(self.trees)
        values = []
        for d in (drafts[s] for s in self.chains):
            values += d.tokens + [0] * (k - len(d.tokens))
        for tokens, _, _ in self.views:
            values += tokens + [0] * (nodes - len(tokens))
        for first, count in (spans[s] for s in self.chains):
            values += [first + min(r, count - 1) for r in range(k + 1)]
        for s, (_, _, rows) in zip(self.trees, self.views):
            values += [spans[s][0] + r for r in rows] + [0] * (nodes - len(rows))
        values += [len(drafts[s].tokens) for s in self.chains]
        for _, parents, _ in self.views:
            values += parents + [-1] * (nodes - len(parents))
        shapes = [(c, k), (t, nodes), (c, k + 1), (t, nodes)]
        flat = torch.tensor(values, dtype=torch.int64)
        flat = (flat.pin_memory() if device.type == "cuda" else flat).to(device, non_blocking=True)
        *parts, self.narrow = flat.split([a * b for a, b in shapes] + [c + t * nodes])
        self.chain_drafts, self.tree_tokens, self.chain_rows, self.tree_rows = (
            part.view(shape) for part, shape in zip(parts, shapes))
        self.row_choices = None

    def accept(self, logits, choices, engine_seed):
        """{seq: (path, tokens, logprobs, row_argmax)}: path indexes the seq's rows (0, then the
        accepted extras); tokens are the ones to emit, one per path entry, with their
        log-probabilities; row_argmax is the argmax of each of the seq's rows (proposers that
        iterate on the model's own guesses read it). choices: the logits' greedy_choices; on
        return, row_choices holds them on the host, a (token, logprob) per row of the step."""
        verdicts = [choices]
        narrow = self.narrow.int() if self.chains or self.trees else None
        if self.chains:
            verdicts += ops.verify_greedy(self.chain_drafts, logits[self.chain_rows],
                                          draft_lens=narrow[:len(self.chains)])
        if self.trees:
            parents = narrow[len(self.chains):].view(self.tree_tokens.shape)
            verdicts += ops.verify_tree_greedy(self.tree_tokens, parents, logits[self.tree_rows])
        host, *rest = _to_host(verdicts)
        argmax, logprob = host[:, 0].astype(np.int64).tolist(), host[:, 1].tolist()
        self.row_choices = list(zip(argmax, logprob))
        rest = [t.astype(np.int64).tolist() for t in rest]
        results = {}
        if self.chains:
            out, accepted, rest = rest[0], rest[1], rest[2:]
            for i, seq in enumerate(self.chains):
                first, count = self.spans[seq]
                path = list(range(accepted[i] + 1))
                results[seq] = (path, out[i][:len(path)], [logprob[first + r] for r in path],
                                argmax[first:first + count])
        if self.trees:
            nodes, accepted, next_token = rest
            for j, (seq, (tokens, _, rows)) in enumerate(zip(self.trees, self.views)):
                first, count = self.spans[seq]
                accepted_nodes = nodes[j][:accepted[j] + 1]
                path = [rows[n] for n in accepted_nodes]
                emitted = [tokens[n] for n in accepted_nodes[1:]] + [next_token[j]]
                results[seq] = (path, emitted, [logprob[first + r] for r in path], argmax[first:first + count])
        for seq in self.seqs:
            if seq.params.temperature > 0:
                first, count = self.spans[seq]
                rows = logits[first:first + count]
                path, tokens = _sampled(seq, self.drafts[seq], rows, engine_seed)
                results[seq] = (path, tokens, token_logprobs(rows[path], seq.params, tokens),
                                argmax[first:first + count])
        return results


def tree_view(seq, draft):
    """(tokens, parents, logit rows) of the verification tree: the last token as root, then
    the candidate extras; a chain is a tree of one branch."""
    nodes = range(len(draft.tokens)) if draft.candidates is None else draft.candidates
    parents = [i - 1 for i in range(len(draft.tokens))] if draft.parents is None else draft.parents
    index = {extra: i + 1 for i, extra in enumerate(nodes)}
    return ([seq.last_token] + [draft.tokens[e] for e in nodes], [-1] + [index.get(parents[e], 0) for e in nodes],
            [0] + [e + 1 for e in nodes])


def _to_host(tensors):
    """The tensors as numpy arrays, after one device-to-host copy: concatenated as float64 (cat
    promotes the rest to the first's dtype; every value fits a float64)."""
    flat = torch.cat([tensors[0].reshape(-1).double()] + [t.reshape(-1) for t in tensors[1:]]).cpu().numpy()
    ends = np.cumsum([t.numel() for t in tensors])
    return [part.reshape(t.shape) for part, t in zip(np.split(flat, ends[:-1]), tensors)]


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
