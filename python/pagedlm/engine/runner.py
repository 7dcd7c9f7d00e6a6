"""One engine step on the model, top to bottom: the drafts of a speculative runner, the
forward of the scheduled tokens (and drafts) over the paged cache, the next token of each
sequence that now has all its tokens cached, and the drafts' verification. It returns, per
sequence, the tokens to emit; the graphs it replays are in cuda_graphs.py and varlen_graphs.py."""
import time
from operator import attrgetter

import numpy as np
import torch

from pagedlm.engine.cascade import plan as cascade_plan
from pagedlm.engine.cuda_graphs import DecodeGraphs
from pagedlm.engine.forward import ForwardItem, apply_block_copies, paged_forward
from pagedlm.engine.overlap import StepInFlight
from pagedlm.engine.sampler import logprob_dicts, on_device, sample_step, sampled_choices
from pagedlm.engine.scheduler import count_cached
from pagedlm.engine.varlen_graphs import VarlenGraphs
from pagedlm.kv_cache import measuring
from pagedlm.models import AttentionBatch

# Tokens per sequence up to which a plain step replays a VarlenGraphs graph of few tokens per
# sequence (the decode steps of tree methods, whose accepted tokens are recomputed with the next
# token); a step with more (prompt chunks) replays a chunks graph, or runs eagerly when large.
FEW_TOKENS = 8
NUM_NEW = attrgetter("num_new")


class ModelRunner:
    def __init__(self, model, kv_caches, block_manager, device, *, max_num_seqs, use_cuda_graphs,
                 eos_token_ids=frozenset(), speculator=None, cascade=False):
        """eos_token_ids: what min_tokens holds back in sampling; speculator: a Speculator, whose
        graphs are captured here with the runner's; cascade: whether decode steps whose rows share
        long prefixes read each prefix once per group (engine/cascade.py)."""
        self.model, self.kv_caches, self.bm, self.device = model, kv_caches, block_manager, device
        self.cascade, self.cascade_steps = cascade, 0  # decode steps that took the cascade
        self.eos_token_ids = eos_token_ids
        self.decode_token = None  # token id -> its text, for the Logprobs' decoded_token (the LLM's tokenizer)
        self.graphs = DecodeGraphs(model, kv_caches, max_num_seqs, device) if use_cuda_graphs else None
        # Forwards of a few tokens per sequence (speculative verification, recomputed tokens) and
        # steps with prompt chunks: captured on first use, or (the former) all at start by a
        # speculative runner.
        self.varlen = (VarlenGraphs(model, kv_caches, max_num_seqs, device, self.graphs.pool) if use_cuda_graphs
                       else None)
        # Prompt chunks replay chunks graphs, but not in mixtures of experts: under a capture their
        # experts may run densely (every expert on every token, models/moe.py), which for a chunk
        # of prompt costs far more than the eager step's host time.
        self.moe = bool(model.args.num_experts)
        self.speculator = speculator
        if speculator is not None and self.varlen is not None:
            speculator.capture_graphs(self.varlen, max_num_seqs)

    @property
    def captures(self):
        """CUDA graphs captured so far by every graph set a step can replay."""
        return sum(owner.captures for owner in (self.graphs, self.varlen, self.speculator) if owner is not None)

    def forget(self, seq):
        """seq ended, or restarts from nothing after a failed step: what the runner keeps for it
        (its proposer's state, a draft model's blocks) goes."""
        if self.speculator is not None:
            self.speculator.forget(seq)

    def step(self, scheduled, copies):
        """Runs one scheduled step: {seq: [(token, logprob, top logprobs or None), ...]} of the
        sequences that emit, each with every token now cached (not those after a mid-prompt
        chunk): its next token, or, after a verified draft, the accepted tokens and the target's
        token after them."""
        speculator, drafts = self.speculator, {}
        # The timing switch learns from decode steps (a few new tokens per sequence, as those a tree
        # step accepted, recomputed) that capture no graph: prompt chunks blur the timing, and a
        # capture is no measure at all.
        timed = (speculator is not None and speculator.switch is not None
                 and max(map(NUM_NEW, scheduled)) <= FEW_TOKENS)
        if timed:
            started, captures = time.perf_counter(), self.captures
        if speculator is not None:
            drafts = speculator.propose(scheduled, copies, self.bm, self.varlen)
        apply_block_copies(self.kv_caches, copies, self.device)
        computing = [s for s in scheduled if s.num_new > 0]
        logits = choices = None
        if computing:
            logits, choices, rows, prompt_rows = self._forward(computing, drafts)
            if prompt_rows:
                self._record_prompt_logprobs(logits, prompt_rows)
        count_cached(scheduled)
        ready = [s for s in scheduled if s.logits_of.num_cached == len(s.logits_of)]
        if not drafts:
            emitted = self._sample(ready, logits, choices, rows) if ready else {}
        else:  # the drafts verified, the other sequences sampled
            verified, host_choices = speculator.verify(drafts, rows, logits, choices, self.bm, self.varlen)
            ready = [s for s in ready if s.seq not in drafts]
            emitted = self._sample(ready, logits, choices, rows, host_choices) if ready else {}
            emitted.update(verified)
        if timed and self.captures == captures:
            tokens = sum(map(len, emitted.values())) if drafts else len(emitted)
            speculator.switch.record(len(scheduled), bool(drafts), tokens, time.perf_counter() - started)
        return emitted

    def _forward(self, computing, drafts, in_flight=None):
        """(logits, their greedy_choices or None, rows, prompt_rows): the logits of each computing
        sequence's last token, then of its draft's tokens, and before those, for a sequence
        still owed prompt logprobs, of its chunk's positions that give them; rows: seq -> its
        last token's row; prompt_rows: (seq, first row, first position, count) of the latter.
        in_flight: the StepInFlight holding the input token of each sequence with one in
        flight (async scheduling), taken on the device."""
        counts = [s.num_new for s in computing]
        prompt_rows = []
        if not drafts and max(counts) == 1:
            for i, s in enumerate(computing):  # a one-token chunk of a prompt gives one prompt row
                if s.seq.prompt_logprobs is not None and _prompt_positions(s.seq, s.seq.num_cached, 1):
                    prompt_rows.append((s.seq, i, s.seq.num_cached, 1))
            return (*self._decode(computing, in_flight), {s.seq: i for i, s in enumerate(computing)}, prompt_rows)
        # Drafts, prompt chunks, or a tree's accepted tokens recomputed: one packed forward. With
        # prompt chunks, the sequences that decode go first: they attend as decode rows (DecodeRows).
        few = bool(drafts) or max(counts) <= FEW_TOKENS
        if not few:
            computing = sorted(computing, key=lambda s: s.num_new != 1)
        items, rows, first, fed, token = [], {}, 0, [], 0
        for s in computing:
            seq, start, draft = s.seq, s.seq.num_cached, drafts.get(s.seq)
            if seq.in_flight:  # its last token (its only one), in flight
                fed.append((token + s.num_new - 1, seq))
            token += s.num_new + (len(draft.tokens) if draft is not None else 0)
            extra, parents = (draft.tokens, draft.parents) if draft is not None else ([], None)
            logit_rows = list(range(s.num_new - 1, s.num_new + len(extra)))
            span = _prompt_positions(seq, start, s.num_new) if seq.prompt_logprobs is not None else None
            if span:  # the LM head on those rows too (the last one may be the chunk's last token's)
                low, high = span[0] - start, span[1] - start
                prompt_rows.append((seq, first, span[0], high - low))
                logit_rows = list(range(low, high)) + [r for r in logit_rows if r >= high]
            rows[seq] = first + logit_rows.index(s.num_new - 1)
            first += len(logit_rows)
            items.append(ForwardItem(seq.seq_id, seq.input_tokens(start, start + s.num_new, 0) + extra, start,
                                     len(extra), parents, logit_rows))
        # A cache that measures its FP8 scales from the first tokens runs eagerly (kv_cache.measuring).
        graphs = None if (not few and (prompt_rows or self.moe)) or measuring(self.kv_caches) else self.varlen
        return (*paged_forward(self.model, self.kv_caches, self.bm, self.device, items, graphs, choices=True,
                               chunks=not few, feed=in_flight and in_flight.feed(fed)), rows, prompt_rows)

    def _record_prompt_logprobs(self, logits, prompt_rows):
        """Appends to each sequence's prompt_logprobs the entries its rows give: at position p,
        token p + 1's raw log-probability and the request's prompt_logprobs most likely tokens
        (logprob_dicts, as the sampled tokens' logprobs)."""
        index, targets, widths = [], [], []
        for seq, row, position, count in prompt_rows:
            index += range(row, row + count)
            targets += seq.prompt[position + 1:position + 1 + count]
            widths += [seq.params.prompt_logprobs] * count
        entries = iter(logprob_dicts(logits[on_device(index, logits.device, torch.int64)], targets, widths,
                                     self.decode_token))
        for seq, _, _, count in prompt_rows:
            seq.prompt_logprobs.extend(next(entries) for _ in range(count))

    def _decode(self, computing, in_flight=None):
        """(logits, greedy_choices or None) of one new token per sequence: a DecodeGraphs
        replay (which computes the choices) when the batch fits one, else an eager forward.
        in_flight: as _forward's."""
        seqs = [s.seq for s in computing]
        seq_ids = [s.seq_id for s in seqs]
        tables, slots = self.bm.block_tables(seq_ids), self.bm.slot_mapping(seq_ids, [1] * len(seq_ids))
        # Each one's next uncached token (0 where it is in flight: the feed puts it there on the device).
        ids = [0 if s.in_flight else s.token_range(s.num_cached, s.num_cached + 1)[0] for s in seqs]
        positions = [s.num_cached for s in seqs]
        feed = in_flight and in_flight.feed([(i, seq) for i, seq in enumerate(seqs) if seq.in_flight])
        cascade = cascade_plan(tables, [p + 1 for p in positions], self.bm.block_size) if self.cascade else None
        self.cascade_steps += cascade is not None
        if (self.graphs is not None and self.graphs.fits(len(computing), tables.shape[1])
                and not measuring(self.kv_caches)):  # (prompts of one token: the first forward decodes)
            return self.graphs.run(ids, positions, slots, tables, cascade, feed)
        return self._eager_decode(ids, positions, slots, tables, cascade, feed), None

    def launch(self, scheduled, copies, in_flight):
        """Launches a scheduled step and draws its tokens on the device, without waiting for
        either (async scheduling, engine/overlap.py; a step without drafts, prompt logprobs or
        logits transforms): a sequence whose input token is in flight takes it on the device
        from in_flight (the StepInFlight before, or None). Returns this step's StepInFlight,
        of the sequences that then have every token cached (the caller counts the tokens cached
        and in flight)."""
        apply_block_copies(self.kv_caches, copies, self.device)
        computing = [s for s in scheduled if s.num_new > 0]
        logits, choices, rows, _ = self._forward(computing, {}, in_flight)
        complete = {s.seq for s in computing if s.start + s.num_new == len(s.seq) + s.seq.in_flight}
        ready = [s for s in scheduled if s.logits_of in complete]
        logits, choices = _rows_of(ready, logits, choices, rows)
        seqs = [s.seq for s in ready]
        drawn = sampled_choices(logits, seqs, choices)
        if drawn is choices:  # (a graph's output, which the next step's graph capture may overwrite first)
            drawn = drawn.clone()
        return StepInFlight.launched(seqs, drawn)

    def _eager_decode(self, ids, positions, slots, tables, cascade=None, feed=None):
        n = len(ids)
        # One host-to-device copy for ids, positions, lengths (one past each position) and slots.
        host = np.empty(3 * n + len(slots), dtype=np.int64)
        host[:n], host[n:2 * n], host[3 * n:] = ids, positions, slots
        np.add(host[n:2 * n], 1, out=host[2 * n:3 * n])
        packed = on_device(host, self.device)
        if feed is not None:
            feed(packed[:n])
        batch = AttentionBatch(slot_mapping=packed[3 * n:],
                               block_tables=on_device(tables, self.device),
                               seq_lens=packed[2 * n:3 * n].int(), cu_seqlens_q=None, decode_only=True,
                               cascade=None if cascade is None else cascade.tensors(self.device))
        return self.model(packed[:n], packed[n:2 * n], batch, self.kv_caches)

    def _sample(self, ready, logits, choices, rows, host_choices=None):
        """{seq: [(token, logprob, top logprobs or None)]}: each ready sequence's next token, from
        its last token's row (a fork's: its parent's). host_choices: after a verification, every
        row's greedy (token, logprob) on the host, which greedy sequences emit unless their logits
        are transformed first or they ask for logprobs; the others go through the sampler."""
        emitted = {}
        if host_choices is not None:
            for s in ready:
                if s.seq.params.temperature == 0 and not s.seq.params._special:
                    emitted[s.seq] = [(*host_choices[rows[s.logits_of]], None)]
            ready = [s for s in ready if s.seq not in emitted]
            if not ready:
                return emitted
        logits, choices = _rows_of(ready, logits, choices, rows)
        seqs = [s.seq for s in ready]
        tokens, logprobs, tops = sample_step(logits, seqs, choices, self.eos_token_ids, self.decode_token)
        tops = tops or [None] * len(seqs)  # (None: no request asks for logprobs)
        emitted.update({seq: [entry] for seq, entry in zip(seqs, zip(tokens, logprobs, tops))})
        return emitted


def _rows_of(ready, logits, choices, rows):
    """(logits, choices or None) of each ready sequence's last token (a fork's: its parent's), in
    ready's order; rows: seq -> its last token's row."""
    index = [rows[s.logits_of] for s in ready]
    if index == list(range(logits.shape[0])):
        return logits, choices
    index = on_device(index, logits.device, torch.int64)
    return logits[index], None if choices is None else choices[index]


def _prompt_positions(seq, start, count):
    """(low, high): the positions among start .. start + count - 1 whose logits give prompt
    logprobs seq's request still lacks (position p gives token p + 1's), or None. They always
    follow the ones it has: the positions before start were computed (a sequence owed prompt
    logprobs takes no prefix-cache hit), and a recompute after a preemption skips those done."""
    done = len(seq.prompt_logprobs) - 1  # positions whose entry is there (the first entry is None)
    low, high = max(start, done), min(start + count, len(seq.prompt) - 1)
    if low >= high:
        return None
    if low > done:
        raise RuntimeError(f"sequence {seq.seq_id}: prompt logprobs of positions {done}..{low - 1} were never computed")
    return low, high
