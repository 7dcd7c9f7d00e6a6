"""Lossless verification of a step's drafts with pagedlm's kernels (Verification), and the CUDA
graphs of the greedy part (VerificationGraphs): greedy requests are verified in one batched
call per draft shape, sampled ones one by one with their own seed."""
import math

import numpy as np
import torch

import pagedlm.ops as ops
from pagedlm.engine.cuda_graphs import Graph, GraphSet, StaticInputs, power_of_two
from pagedlm.engine.sampler import choice_lists, on_device
from pagedlm.speculative.sampling import processed_probs, sample_seed, token_logprobs


class Verification:
    """One step's verification. Greedy chains go through verify_greedy with ragged draft_lens,
    trees through verify_tree_greedy with padding nodes; every index and draft the kernels
    read goes to the device in one copy, queued behind the forward. accept(logits, choices)
    reads everything the host needs from the greedy requests (verdicts, each row's argmax and
    its log-probability) back in one transfer, so a step synchronizes once. Sampled requests
    are verified one by one, each with its own seed and its position as the Philox offset, so
    their tokens do not depend on the batch (the kernels take one seed per call)."""

    def __init__(self, drafts, spans, device, graphs=None):
        """drafts: {seq: Draft}; spans: {seq: (its first row in the step's logits, its row
        count)}, row 0 its last token's, then its extras'. graphs: VerificationGraphs over the
        buffers the step's logits are in, or None (an eager forward)."""
        greedy = [s for s in drafts if s.params.temperature == 0]
        self.chains = [s for s in greedy if drafts[s].parents is None]
        self.trees = [s for s in greedy if drafts[s].parents is not None]
        self.seqs = self.chains + self.trees + [s for s in drafts if s.params.temperature > 0]
        self.drafts, self.spans = drafts, spans
        self.views = [tree_view(s, drafts[s]) for s in self.trees]
        k = max((len(drafts[s].tokens) for s in self.chains), default=0)
        nodes = max((len(v[0]) for v in self.views), default=0)
        shapes = (len(self.chains), k, len(self.trees), nodes)
        self.graph = None if graphs is None else graphs.graph(shapes)
        self.shapes = shapes if self.graph is None else self.graph.shapes
        values, fields = _empty_inputs(self.shapes)
        chain_drafts, tree_tokens, chain_rows, tree_rows, chain_lens, tree_parents = fields
        for i, d in enumerate(drafts[s] for s in self.chains):
            chain_drafts[i, :len(d.tokens)] = d.tokens
            chain_lens[i] = len(d.tokens)
        for i, (first, count) in enumerate(spans[s] for s in self.chains):
            # A chain shorter than the widest repeats its last row.
            chain_rows[i] = first + np.minimum(np.arange(chain_rows.shape[1]), count - 1)
        for i, (s, (tokens, parents, rows)) in enumerate(zip(self.trees, self.views)):
            tree_tokens[i, :len(tokens)], tree_parents[i, :len(parents)] = tokens, parents
            tree_rows[i, :len(rows)] = np.add(rows, spans[s][0])
        if self.graph is not None:
            self.graph.load(values)
        else:
            self.inputs = on_device(values, device)
        self.row_choices = None

    def accept(self, logits, choices):
        """{seq: (path, tokens, logprobs, row_argmax)}: path indexes the seq's rows (0, then the
        accepted extras); tokens are the ones to emit, one per path entry, with their
        log-probabilities; row_argmax is the argmax of each of the seq's rows (proposers that
        iterate on the model's own guesses read it). choices: the logits' greedy_choices; on
        return, row_choices holds them on the host, a (token, logprob) per row of the step."""
        if self.graph is not None:
            flat = self.graph.run()
        else:
            flat = _flatten(greedy_verdicts(self.inputs, self.shapes, logits, choices)).cpu().numpy()
        host, *rest = _split(flat, verdict_shapes(len(flat), self.shapes))
        host = host[:len(logits)]
        argmax, logprob = choice_lists(host)
        self.row_choices = list(zip(argmax, logprob))
        rest = [t.astype(np.int64).tolist() for t in rest]
        greedy = {}  # seq -> (path, tokens)
        if self.chains:
            out, accepted, rest = rest[0], rest[1], rest[2:]
            for i, seq in enumerate(self.chains):
                greedy[seq] = list(range(accepted[i] + 1)), out[i][:accepted[i] + 1]
        if self.trees:
            nodes, accepted, next_token = rest
            for j, (seq, (tokens, _, rows)) in enumerate(zip(self.trees, self.views)):
                accepted_nodes = nodes[j][:accepted[j] + 1]
                greedy[seq] = ([rows[n] for n in accepted_nodes],
                               [tokens[n] for n in accepted_nodes[1:]] + [next_token[j]])
        results = {}
        for seq in self.seqs:
            first, count = self.spans[seq]
            if seq in greedy:
                path, tokens = greedy[seq]
                logprobs = [logprob[first + r] for r in path]
            else:
                rows = logits[first:first + count]
                path, tokens = _sampled(seq, self.drafts[seq], rows)
                logprobs = token_logprobs(rows[path], seq.params, tokens)
            results[seq] = (path, tokens, logprobs, argmax[first:first + count])
        return results


def _field_shapes(shapes):
    """The inputs' fields: per chain its drafts and its k + 1 rows, per tree its tokens and
    rows, per chain its draft count, per tree its parents (-1 pads)."""
    c, k, t, nodes = shapes
    return [(c, k), (t, nodes), (c, k + 1), (t, nodes), (c,), (t, nodes)]


def _fields(flat, shapes):
    """Views of the fields of a flat int64 inputs array or tensor."""
    return _split(flat, _field_shapes(shapes))


def _empty_inputs(shapes):
    """(flat int64 inputs, their fields), every node padding until set."""
    values = np.zeros(sum(math.prod(s) for s in _field_shapes(shapes)), dtype=np.int64)
    fields = _fields(values, shapes)
    fields[5][:] = -1
    return values, fields


def greedy_verdicts(inputs, shapes, logits, choices):
    """The greedy verdicts of a step: [choices, then the chains' (output_tokens, num_accepted),
    then the trees' (accepted_nodes, num_accepted, next_token)], from the flat int64 inputs."""
    c, k, t, nodes = shapes
    chain_drafts, tree_tokens, chain_rows, tree_rows, lens, parents = _fields(inputs, shapes)
    verdicts = [choices]
    if c:
        verdicts += ops.verify_greedy(chain_drafts, logits[chain_rows], draft_lens=lens.int())
    if t:  # every node may lie on the path: the output width is the node count (shapes alone, no sync)
        verdicts += ops.verify_tree_greedy(tree_tokens, parents.int(), logits[tree_rows], max_depth=nodes - 1)
    return verdicts


def verdict_shapes(size, shapes):
    """The shapes of greedy_verdicts' tensors, flattened into size float64 values."""
    c, k, t, nodes = shapes
    verdicts = ([(c, k + 1), (c,)] if c else []) + ([(t, nodes), (t,), (t,)] if t else [])
    rows = (size - sum(math.prod(s) for s in verdicts)) // 2
    return [(rows, 2)] + verdicts


def _flatten(tensors):
    """One float64 tensor (cat promotes the rest to the first's dtype; every value fits a float64)."""
    return torch.cat([tensors[0].reshape(-1).double()] + [t.reshape(-1) for t in tensors[1:]])


def _split(flat, shapes):
    """Consecutive views of flat (numpy or torch), one per shape (plain slicing: numpy's split
    and cumsum cost more than the rest of a step's bookkeeping)."""
    parts, end = [], 0
    for shape in shapes:
        start, end = end, end + math.prod(shape)
        parts.append(flat[start:end].reshape(shape))
    return parts


MAX_GATHER_BYTES = 1 << 28  # 256 MiB: e.g. 512 rows of a 128K vocabulary


class VerificationGraphs(GraphSet):
    """CUDA graphs of greedy_verdicts over a VarlenGraphs' output buffers, keyed by the
    (chains, draft length, trees, nodes) they take, each rounded up to a power of two. Padding
    chains draft nothing; padding trees are a root alone; their verdicts are ignored."""

    def __init__(self, varlen):
        super().__init__(lambda *shapes: _VerificationGraph(varlen, shapes))
        self.varlen = varlen

    def holds(self, logits):
        """Whether logits are the first rows of the buffer these graphs read (a replayed forward)."""
        return self.varlen.logits is not None and logits.data_ptr() == self.varlen.logits.data_ptr()

    def capture_all(self, max_seqs, chain_drafts=0, tree_nodes=0):
        """Captures up front the graph of every shape bucket a step can meet (Speculator.capture_graphs
        says why). chain_drafts: the longest chain drafted; tree_nodes: the most nodes (root
        included) of a verification tree."""
        self.varlen.allocate_outputs()
        for seqs in _powers_of_two(max_seqs):
            for k in _powers_of_two(chain_drafts):
                self.graph((seqs, k, 0, 0))
            for nodes in _powers_of_two(tree_nodes):
                self.graph((0, 0, seqs, nodes))

    def graph(self, shapes):
        """The graph for these (chains, draft length, trees, nodes), or None (verify eagerly)
        when its padded logits gather would hold more than MAX_GATHER_BYTES: the memory of a
        graph's intermediates stays reserved in its pool."""
        key = tuple(power_of_two(n) for n in shapes)
        c, k, t, nodes = key
        if (c * (k + 1) + t * nodes) * self.varlen.logits.shape[1] * 4 > MAX_GATHER_BYTES:
            return None
        return super().graph(key)


def _powers_of_two(n):
    """1, 2, 4, ... up to power_of_two(n); nothing for n = 0."""
    return [1 << i for i in range(power_of_two(n).bit_length())]


class _VerificationGraph:
    def __init__(self, varlen, shapes):
        self.shapes = shapes
        padding = _empty_inputs(shapes)[0]
        inputs = StaticInputs(dict(values=len(padding)), varlen.device)
        inputs.device["values"].copy_(torch.from_numpy(padding))  # captured with every node padding
        self.graph = Graph(inputs, lambda f: _flatten(greedy_verdicts(f["values"], shapes, varlen.logits,
                                                                      varlen.choices)), varlen.pool, varlen.device)

    def load(self, values):
        self.graph.inputs.host["values"][:] = values

    def run(self):
        """The flat verdicts on the host (numpy float64), choices for every row of the buffers."""
        return self.graph.replay().cpu().numpy()


def tree_view(seq, draft):
    """(tokens, parents, logit rows) of the verification tree: the last token as root, then
    the candidate extras; a chain is a tree of one branch."""
    nodes = range(len(draft.tokens)) if draft.candidates is None else draft.candidates
    parents = [i - 1 for i in range(len(draft.tokens))] if draft.parents is None else draft.parents
    index = {extra: i + 1 for i, extra in enumerate(nodes)}
    return ([seq.last_token] + [draft.tokens[e] for e in nodes], [-1] + [index.get(parents[e], 0) for e in nodes],
            [0] + [e + 1 for e in nodes])


def _sampled(seq, draft, rows):
    seed, offset = sample_seed(seq), len(seq)
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
