"""Iteration-level continuous batching over the C++ BlockManager, as nano-vllm does it: running
sequences first (a decode token or a prompt chunk each), then waiting ones admitted while
blocks, sequence slots and the token budget last; a sequence that cannot get a slot preempts
the newest running one, by recompute (nothing is dropped)."""
from collections import deque
from dataclasses import dataclass

import pagedlm
from pagedlm.engine.sequence import UNMATCHABLE_TOKEN, Status


@dataclass
class Scheduled:
    seq: object
    num_new: int        # tokens to compute this step (0 for a fork that shares its parent's)
    logits_of: object   # the sequence whose last position gives this one's next-token logits
    # What undoing a failed step needs (LLM._roll_back): the tokens whose KV was in the cache
    # before the step, and whether the step admitted the sequence from the waiting queue.
    start: int = 0
    admitted: bool = False


def count_cached(scheduled):
    """After a step ran: each scheduled sequence's computed tokens counted cached (a fork holds
    its parent's)."""
    for s in scheduled:
        s.seq.num_cached += s.num_new
    for s in scheduled:
        if s.seq is not s.logits_of:
            s.seq.num_cached = s.logits_of.num_cached


def owes_prompt_logprobs(seq):
    """Whether seq's request asks for prompt logprobs that are not all computed yet."""
    return seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt)


class Scheduler:
    def __init__(self, block_manager, max_num_seqs, max_num_batched_tokens):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = deque()   # groups: the n samples of a request that have not started, or one preempted seq
        self.running = []
        self.preemptions = 0

    def add(self, group):
        self.waiting.append(group)

    def has_work(self):
        return bool(self.waiting or self.running)

    def schedule(self):
        """The sequences of one step and the copy-on-write block copies to do before it. A
        preempted sequence's blocks are freed and it goes back to the front of the waiting
        queue with every token it has produced; a prompt longer than the token budget is
        prefilled in chunks, mixed with decodes.

        A running sequence computes its uncached tokens: one after a decode step, or the next
        chunk of a prompt that did not fit the token budget. With async scheduling, a token in
        flight counts as known (its slot holds a placeholder until it is), and a sequence whose
        last token is in flight computes nothing more. Slots are reserved only for the
        tokens computed in this step, so a block enters the prefix cache in the step that
        writes its KV (and a sequence admitted in the same step reads that KV after it is
        written, since every layer writes the whole batch's KV before attending).
        """
        batch, copies = [], []
        budget = self.max_num_batched_tokens
        running = self.running[::-1]  # the oldest last, to be popped first
        while running and budget > 0:
            seq = running.pop()
            if seq.ends_in_flight:
                continue
            count = min(len(seq) + seq.in_flight - seq.num_cached, budget)
            while not self._reserve(seq, count, copies):
                victim = running.pop(0) if running else seq  # the newest
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append(Scheduled(seq, count, seq, seq.num_cached))
                budget -= count
        while self.waiting and budget > 0 and len(self.running) + len(self.waiting[0]) <= self.max_num_seqs:
            group = self.waiting[0]
            first = group[0]
            # Forks share their parent's whole prompt, so a group of n > 1 is prefilled in one step.
            count = len(first) if len(group) > 1 else min(len(first), budget)
            if count > budget and batch:
                break
            if not self.bm.can_allocate(count + len(group)):
                break
            self.waiting.popleft()
            cached = self._allocate(first, count)
            first.num_cached = cached
            if not first.output:
                first.cached_prompt_tokens = cached
            batch.append(Scheduled(first, count - cached, first, cached, True))
            for child in group[1:]:
                self.bm.fork(first.seq_id, child.seq_id)
                batch.append(Scheduled(child, 0, first, cached, True))
            for seq in group:
                seq.status = Status.RUNNING
                self.running.append(seq)
            budget -= count - cached
        return batch, copies

    def _allocate(self, seq, count):
        """Enters seq's first count tokens into the block manager; returns how many its prefix
        cache served. A sequence still owed prompt logprobs takes no hit, as vLLM's: each of
        them needs its position's forward. Its blocks enter the cache as usual."""
        if not owes_prompt_logprobs(seq):
            return self.bm.allocate(seq.seq_id, seq.token_range(0, count))
        self.bm.allocate(seq.seq_id, [])
        self.bm.append(seq.seq_id, seq.token_range(0, count))  # cannot run out: can_allocate(count) held
        return 0

    def _reserve(self, seq, count, copies):
        """Slots for the seq's next `count` uncached tokens; False when blocks ran out."""
        try:
            copies += self.bm.append(seq.seq_id, seq.input_tokens(seq.num_cached, seq.num_cached + count,
                                                                  UNMATCHABLE_TOKEN))
            return True
        except pagedlm.OutOfBlocksError:
            return False

    def _preempt(self, seq):
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.status, seq.num_cached = Status.WAITING, 0
        self.waiting.appendleft([seq])
        self.preemptions += 1

    def finish(self, seq):
        """seq ends: running, its blocks are freed; waiting (preempted, or not yet admitted), it
        leaves its queued group."""
        if seq.status == Status.RUNNING:
            self.bm.free(seq.seq_id)
            self.running.remove(seq)
        else:
            kept = deque()
            for group in self.waiting:
                left = [s for s in group if s is not seq]
                if left:
                    kept.append(left)
            self.waiting = kept
        seq.status = Status.FINISHED
