"""The engine step with speculation: the scheduled batch runs as usual, and each sequence in
its decode phase also brings a proposer's draft — a chain or a tree — computed in the same
target forward and verified losslessly with pagedlm's verification kernels.

Draft slots are reserved in the BlockManager after the scheduler's, and only when blocks are
free (else the sequence decodes plainly this step). After verification the cache is cut back
with truncate to the committed tokens: for a chain, plus the accepted drafts, whose KV is
exactly their causal KV; for a tree, nothing more (accepted tokens are recomputed next step,
and tree slots carry the id -1, so no tree block can ever match a real prompt in the prefix
cache). Rejected tokens never reach the output. Drafts also keep within the step's token
budget, and a step that fits the largest CUDA graph within that graph: sequences take turns
to draft when not all of them fit.

Two switches keep a method from costing more than it saves. Per sequence: one whose drafts
are all rejected BACKOFF_AFTER steps in a row stops drafting for 1, 2, 4, ... (at most
MAX_PAUSE) steps, and decodes plainly meanwhile; an accepted draft resets it. Engine-wide
(unless the config says "adaptive": False): PaySwitch times decode steps with and without
drafts and lets greedy sequences draft only while drafting emits more tokens per second.

Requests with penalties, min_tokens or logprobs (SamplingParams._special) never draft: they
decode one token a step through the engine's sampler, which applies their transforms (min_p,
a part of the sampling distribution itself, is verified like temperature, top-k and top-p).
"""
import time
from dataclasses import dataclass
from operator import attrgetter

import torch

import pagedlm
from pagedlm.engine.sampler import sample_step
from pagedlm.engine.forward import ForwardItem, apply_block_copies, paged_forward
from pagedlm.engine.runner import FEW_TOKENS
from pagedlm.engine.varlen_graphs import TOKEN_BUCKETS
from pagedlm.speculative.pay_switch import PaySwitch
from pagedlm.speculative.verification import Verification, VerificationGraphs

TREE_SLOT = -1
NUM_NEW = attrgetter("num_new")
BACKOFF_AFTER, MAX_PAUSE = 2, 16


@dataclass
class SequenceRecord:
    """What speculation counts for one sequence, kept on it (Sequence.speculation) as long as it lives."""
    drafted: int = 0        # tokens drafted (a tree's candidates)
    accepted: int = 0       # of them, accepted
    verify_steps: int = 0   # steps that verified a draft of it
    drafting_s: float = 0.0
    forwards: int = 0       # speculative steps in which it emitted, and the tokens it kept from them
    kept: int = 0           # (each plain step's forward emits one token: no per-sequence count)
    misses: int = 0         # verifications in a row that rejected every drafted token
    paused: int = 0         # steps left before it drafts again


def _record(seq):
    if seq.speculation is None:
        seq.speculation = SequenceRecord()
    return seq.speculation


class Speculator:
    def __init__(self, proposer, runner, max_num_batched_tokens, *, adaptive=True, eos_token_ids=frozenset()):
        self.proposer, self.runner = proposer, runner
        self.eos_token_ids = eos_token_ids  # what min_tokens holds back in the sampler
        self.switch = PaySwitch() if adaptive else None
        self.budget = max_num_batched_tokens
        self.rotation = 0  # which sequence drafts first when not every one fits
        self.verification_graphs = None

    def step(self, scheduled, copies):
        """A speculative step: {seq: [(token, logprob), ...]} for the sequences that emit, when
        some sequence drafts (the engine reports what it kept with speculative_step_done); None
        when none does, and the engine runs its plain step (then reports it with
        plain_step_done) at little more cost than an engine without speculation."""
        self.started, self.captures = time.perf_counter(), self._captures()
        greedy_may_draft = self.switch is None or self.switch.drafting(len(scheduled))
        drafts = self._draft(scheduled, copies, greedy_may_draft)
        if not drafts:
            return None
        return self._speculative_step(scheduled, copies, drafts)

    def speculative_step_done(self, scheduled, kept):
        """kept: {seq: tokens it kept} of the step() that returned emissions (tokens past a stop
        are dropped)."""
        for seq, count in kept.items():
            record = _record(seq)
            record.forwards += 1
            record.kept += count
        self._time(scheduled, drafted=True, tokens=sum(kept.values()))

    def plain_step_done(self, scheduled, tokens):
        """The engine's plain step after step() returned None, in which `tokens` sequences each
        emitted one token."""
        self._time(scheduled, drafted=False, tokens=tokens)

    def finished(self, seq):
        """seq finished or was aborted: its proposer state goes now (a draft model's blocks)."""
        self.proposer.forget(seq)

    def _time(self, scheduled, drafted, tokens):
        # Prompt chunks blur the timing, and a step that captured a CUDA graph is no measure at all.
        # A few new tokens per sequence (those a tree step accepted, recomputed) are a decode step.
        if (self.switch is not None and self.captures == self._captures()
                and max(map(NUM_NEW, scheduled)) <= FEW_TOKENS):
            self.switch.record(len(scheduled), drafted, tokens, time.perf_counter() - self.started)

    def _captures(self):
        """CUDA graphs captured so far by every graph set a step can replay."""
        verification = self.verification_graphs.captures if self.verification_graphs is not None else 0
        return self.runner.captures + verification + self.proposer.captures

    def _draft(self, scheduled, copies, greedy_may_draft):
        """{seq: draft} whose slots are reserved, within the step's token budget."""
        # The switch's verdict first: while greedy sequences may not draft, most steps end here.
        may_draft = scheduled if greedy_may_draft else [s for s in scheduled if s.seq.params.temperature != 0]
        candidates = [s.seq for s in may_draft if s.num_new > 0 and s.seq.output and not s.seq.params._special
                      and s.num_new == len(s.seq) - s.seq.num_cached and self._drafting(s.seq)]
        if not candidates:
            return {}
        left = self._draft_budget(sum(map(NUM_NEW, scheduled)))
        # Turns at the head of the line, for when the budget runs out before every draft fits; only
        # the sequences whose drafts should fit are proposed for (little is computed to be dropped).
        self.rotation = (self.rotation + 1) % len(candidates)
        chosen, caps, room = [], [], left
        for seq in candidates[self.rotation:] + candidates[:self.rotation]:
            cap = max(0, seq.params.max_tokens - len(seq.output) - 1)
            size = self.proposer.draft_size(seq, cap) if cap else 0
            if 0 < size <= room:
                chosen.append(seq)
                caps.append(cap)
                room -= size
        if not chosen:
            return {}
        start = time.perf_counter()
        drafts = self.proposer.propose(chosen, caps)
        drafting = time.perf_counter() - start
        for seq in drafts:
            _record(seq).drafting_s += drafting
        for seq, draft in list(drafts.items()):
            if len(draft.tokens) > left or not self._reserve(seq, draft, copies):
                del drafts[seq]
            else:
                left -= len(draft.tokens)
        return drafts

    def _draft_budget(self, scheduled_tokens):
        """Draft tokens the step may add. A step that fits the largest CUDA graph (VarlenGraphs)
        stays within it, or its whole forward would run eagerly (lookahead's ~90 tokens a sequence
        at batch 16: 7 ms instead of one replay, each time the timing switch probed drafting)."""
        limit = self.budget
        if self.runner.varlen is not None and scheduled_tokens <= TOKEN_BUCKETS[-1]:
            limit = min(limit, TOKEN_BUCKETS[-1])
        return limit - scheduled_tokens

    def _speculative_step(self, scheduled, copies, drafts):
        apply_block_copies(self.runner.kv_caches, copies, self.runner.device)
        computing = [s for s in scheduled if s.num_new > 0]
        items = []
        for s in computing:
            draft = drafts.get(s.seq)
            extra = draft.tokens if draft else []
            rows = range(s.num_new - 1, s.num_new + len(extra))
            new = s.seq.token_range(s.seq.num_cached, s.seq.num_cached + s.num_new)
            items.append(ForwardItem(s.seq.seq_id, new + extra,
                                     s.seq.num_cached, len(extra), draft.parents if draft else None, list(rows)))
        spans, first = {}, 0  # seq -> (its first row in the logits, its rows)
        for s, item in zip(computing, items):
            spans[s.seq] = (first, len(item.logit_rows))
            first += len(item.logit_rows)
        logits, choices = paged_forward(self.runner.model, self.runner.kv_caches, self.runner.bm, self.runner.device,
                                        items, self.runner.varlen, choices=True)
        # Built while the device runs the forward.
        verification = Verification(drafts, spans, self.runner.device, self._verification_graphs(logits))
        for s in computing:
            s.seq.num_cached += s.num_new

        plain = []
        for s in scheduled:
            if s.seq is not s.logits_of:  # a fork holds its parent's cached tokens
                s.seq.num_cached = s.logits_of.num_cached
            if s.logits_of.num_cached == len(s.logits_of) and s.seq not in drafts:
                plain.append(s)
        verdicts = verification.accept(logits, choices)
        last_row = {s.seq: sum(spans[s.logits_of]) - 1 for s in plain}
        # Greedy sequences emit their row's argmax, unless their logits are transformed first or
        # they ask for logprobs: those go through the sampler, as sampled ones do.
        sampled = [s for s in plain if s.seq.params.temperature != 0 or s.seq.params._special]
        emitted = {s.seq: [verification.row_choices[last_row[s.seq]]] for s in plain if s not in sampled}
        if sampled:
            rows = torch.tensor([last_row[s.seq] for s in sampled], device=logits.device)
            tokens, logprobs, tops = sample_step(logits[rows], [s.seq for s in sampled],
                                                 eos_token_ids=self.eos_token_ids)
            tops = tops or [None] * len(sampled)
            emitted.update({s.seq: [(t, lp, top)] for s, t, lp, top in zip(sampled, tokens, logprobs, tops)})
        emitted.update(self._verify(drafts, verdicts))
        return emitted

    def capture_verification_graphs(self, max_seqs, chain_drafts, tree_nodes):
        """Every verification graph a step can meet, captured now (see VerificationGraphs.capture_all)."""
        self.verification_graphs = VerificationGraphs(self.runner.varlen)
        self.verification_graphs.capture_all(max_seqs, chain_drafts, tree_nodes)

    def _verification_graphs(self, logits):
        """VerificationGraphs over the runner's VarlenGraphs when the forward replayed one of them."""
        varlen = self.runner.varlen
        if varlen is None:
            return None
        if self.verification_graphs is None or self.verification_graphs.varlen is not varlen:
            self.verification_graphs = VerificationGraphs(varlen)
        return self.verification_graphs if self.verification_graphs.holds(logits) else None

    def _verify(self, drafts, verdicts):
        emitted = {}
        for seq, (path, tokens, logprobs, row_argmax) in verdicts.items():
            draft = drafts[seq]
            self.proposer.update(seq, draft, row_argmax, len(path) - 1)
            seq.num_cached += len(path) - 1 if draft.parents is None else 0
            self.runner.bm.truncate(seq.seq_id, seq.num_cached)
            drafted = len(draft.tokens if draft.candidates is None else draft.candidates)
            record = _record(seq)
            record.drafted += drafted
            record.accepted += len(path) - 1
            record.verify_steps += 1
            _back_off(record, drafted, len(path) - 1)
            emitted[seq] = list(zip(tokens, logprobs))
        return emitted

    def _drafting(self, seq):
        """False while the sequence is paused by the switch (counting the pause down)."""
        record = seq.speculation
        if record is not None and record.paused > 0:
            record.paused -= 1
            return False
        return True

    def _reserve(self, seq, draft, copies):
        ids = draft.tokens if draft.parents is None else [TREE_SLOT] * len(draft.tokens)
        try:
            copies += self.runner.bm.append(seq.seq_id, ids)
            return True
        except pagedlm.OutOfBlocksError:
            return False

    def metrics(self, seqs):
        """The speculation metrics of a request's sequences (read, nothing reset)."""
        records = [s.speculation for s in seqs if s.speculation is not None]
        total = {key: sum(getattr(r, key) for r in records)
                 for key in ("drafted", "accepted", "verify_steps", "drafting_s", "forwards", "kept")}
        generated = sum(len(s.output) for s in seqs)
        forwards = total["forwards"] + generated - total["kept"]  # a plain step's forward: one token
        return {"acceptance_rate": total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
                "mean_accepted_length": total["accepted"] / total["verify_steps"] if total["verify_steps"] else 0.0,
                "tokens_per_forward": generated / forwards if forwards else 0.0,
                "draft_steps": total["verify_steps"],
                "drafting_time_s": float(total["drafting_s"])}


def _back_off(record, drafted, accepted):
    """The per-sequence switch: after BACKOFF_AFTER verifications in a row that rejected every
    drafted token, the sequence pauses drafting for 1, 2, 4, ... steps."""
    if accepted:
        record.misses = 0
    elif drafted:
        record.misses += 1
        if record.misses >= BACKOFF_AFTER:
            record.paused = min(MAX_PAUSE, 2 ** (record.misses - BACKOFF_AFTER))
