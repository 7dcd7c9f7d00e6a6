"""The speculation the model runner carries: before a step's forward, Speculator.propose picks
the sequences that draft, has the proposer draft and reserves their slots; after it,
Speculator.verify verifies the drafts losslessly and cuts each cache back to its committed
tokens. Two switches keep a method from costing more than it saves: a per-sequence backoff
and the engine-wide PaySwitch."""
import time
from dataclasses import dataclass
from operator import attrgetter

import pagedlm
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
    misses: int = 0         # verifications in a row that rejected every drafted token
    paused: int = 0         # steps left before it drafts again


def _record(seq):
    if seq.speculation is None:
        seq.speculation = SequenceRecord()
    return seq.speculation


class Speculator:
    def __init__(self, proposer, max_num_batched_tokens, *, adaptive=True):
        self.proposer = proposer
        self.switch = PaySwitch() if adaptive else None  # fed by the runner: its decode steps' times
        self.budget = max_num_batched_tokens
        self.rotation = 0  # which sequence drafts first when not every one fits
        self.verification_graphs = None

    @property
    def captures(self):
        """CUDA graphs captured so far by the verification graphs and the proposer."""
        return sum(owner.captures for owner in (self.verification_graphs, self.proposer) if owner is not None)

    def capture_graphs(self, varlen, max_num_seqs):
        """Captures now every graph a speculative step can replay, rather than at unpredictable
        steps (the timing switch's probes most of all), where each capture costs tens of
        milliseconds: the verification forwards' (varlen: unmasked, and masked for a method
        that drafts trees, whose accepted tokens the next step recomputes unmasked) and the
        verdicts' (VerificationGraphs), up to the shapes the proposer drafts."""
        chain_drafts, tree_nodes = self.proposer.verification_bounds
        varlen.capture_all(masked=False)
        if tree_nodes:
            varlen.capture_all(masked=True)
        self.verification_graphs = VerificationGraphs(varlen)
        self.verification_graphs.capture_all(max_num_seqs, chain_drafts, tree_nodes)

    def propose(self, scheduled, copies, bm, varlen):
        """{seq: Draft} of the sequences that draft this step, their slots reserved in bm after
        the scheduler's (their copy-on-write pairs added to copies), within the step's token
        budget and, when the step fits the largest graph of varlen (None: eager forwards), within it.
        A sequence without free blocks for its draft decodes plainly this step; sequences take
        turns when not all drafts fit. Requests with penalties, logit_bias, min_tokens or logprobs
        (SamplingParams._special) never draft: the sampler applies their transforms."""
        # The engine-wide switch (unless the config says "adaptive": False) lets greedy sequences
        # draft only while drafting emits more tokens per second; its verdict first: while greedy
        # sequences may not draft, most steps end here.
        greedy_may_draft = self.switch is None or self.switch.drafting(len(scheduled))
        may_draft = scheduled if greedy_may_draft else [s for s in scheduled if s.seq.params.temperature != 0]
        candidates = [s.seq for s in may_draft if s.num_new > 0 and s.seq.output and not s.seq.params._special
                      and s.num_new == len(s.seq) - s.seq.num_cached and self._drafting(s.seq)]
        if not candidates:
            return {}
        left = self._draft_budget(sum(map(NUM_NEW, scheduled)), varlen)
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
            if len(draft.tokens) > left or not _reserve(bm, seq, draft, copies):
                del drafts[seq]
            else:
                left -= len(draft.tokens)
        return drafts

    def _draft_budget(self, scheduled_tokens, varlen):
        """Draft tokens the step may add. A step that fits the largest CUDA graph (VarlenGraphs)
        stays within it, or its whole forward would run eagerly (a lookahead window per sequence
        can outgrow the largest graph in a large batch)."""
        limit = self.budget
        if varlen is not None and scheduled_tokens <= varlen.max_tokens:
            limit = min(limit, varlen.max_tokens)
        return limit - scheduled_tokens

    def verify(self, drafts, rows, logits, choices, bm, varlen):
        """(verified, row_choices) of a step whose forward computed the drafts: verified holds
        each drafted sequence's accepted tokens and the target's token after them, as
        [(token, logprob, None), ...], its cache cut back to its committed tokens; row_choices,
        each row's greedy (token, logprob) on the host, read back with the verdicts. rows: each
        sequence's first row in logits (its last token's; its draft's follow); choices: the
        logits' greedy_choices; varlen: the graphs the forward may have replayed.

        A chain keeps the KV of its accepted drafts, which is exactly their causal KV; a tree
        keeps nothing past the committed tokens (the next step recomputes the accepted ones),
        and its slots carry the id TREE_SLOT, so no tree block can match a prompt in the prefix
        cache. Rejected tokens never reach the output."""
        spans = {seq: (rows[seq], 1 + len(draft.tokens)) for seq, draft in drafts.items()}
        verification = Verification(drafts, spans, logits.device, self._verification_graphs(logits, varlen))
        verified = {}
        for seq, (path, tokens, logprobs, row_argmax) in verification.accept(logits, choices).items():
            draft = drafts[seq]
            self.proposer.update(seq, draft, row_argmax, len(path) - 1)
            seq.num_cached += len(path) - 1 if draft.parents is None else 0
            bm.truncate(seq.seq_id, seq.num_cached)
            drafted = len(draft.tokens if draft.candidates is None else draft.candidates)
            record = _record(seq)
            record.drafted += drafted
            record.accepted += len(path) - 1
            record.verify_steps += 1
            _back_off(record, drafted, len(path) - 1)
            verified[seq] = [(token, logprob, None) for token, logprob in zip(tokens, logprobs)]
        return verified, verification.row_choices

    def _verification_graphs(self, logits, varlen):
        """VerificationGraphs over varlen when the forward replayed one of its graphs."""
        if varlen is None:
            return None
        if self.verification_graphs is None or self.verification_graphs.varlen is not varlen:
            self.verification_graphs = VerificationGraphs(varlen)
        return self.verification_graphs if self.verification_graphs.holds(logits) else None

    def forget(self, seq):
        """seq ended, or restarts from nothing: the proposer's state for it goes (a draft model's blocks)."""
        self.proposer.forget(seq)

    def _drafting(self, seq):
        """False while the sequence is paused by the switch (counting the pause down)."""
        record = seq.speculation
        if record is not None and record.paused > 0:
            record.paused -= 1
            return False
        return True

    def metrics(self, seqs):
        """The speculation metrics of a request's sequences (read, nothing reset)."""
        records = [s.speculation for s in seqs if s.speculation is not None]
        total = {key: sum(getattr(r, key) for r in records) for key in ("drafted", "accepted", "verify_steps",
                                                                        "drafting_s")}
        generated, forwards = sum(len(s.output) for s in seqs), sum(s.forwards for s in seqs)
        return {"acceptance_rate": total["accepted"] / total["drafted"] if total["drafted"] else 0.0,
                "mean_accepted_length": total["accepted"] / total["verify_steps"] if total["verify_steps"] else 0.0,
                "tokens_per_forward": generated / forwards if forwards else 0.0,
                "draft_steps": total["verify_steps"],
                "drafting_time_s": float(total["drafting_s"])}


def _reserve(bm, seq, draft, copies):
    """Slots for the draft after the sequence's tokens (a tree's carry the id TREE_SLOT); False
    when blocks ran out."""
    ids = draft.tokens if draft.parents is None else [TREE_SLOT] * len(draft.tokens)
    try:
        copies += bm.append(seq.seq_id, ids)
        return True
    except pagedlm.OutOfBlocksError:
        return False


def _back_off(record, drafted, accepted):
    """The per-sequence switch: after BACKOFF_AFTER verifications in a row that rejected every
    drafted token, the sequence pauses drafting for 1, 2, 4, ... (at most MAX_PAUSE) steps and
    decodes plainly meanwhile; an accepted token resets it."""
    if accepted:
        record.misses = 0
    elif drafted:
        record.misses += 1
        if record.misses >= BACKOFF_AFTER:
            record.paused = min(MAX_PAUSE, 2 ** (record.misses - BACKOFF_AFTER))
