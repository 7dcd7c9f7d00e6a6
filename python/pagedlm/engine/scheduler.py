"""Iteration-level continuous batching over the C++ BlockManager, as nano-vllm does it: two
queues, running sequences first (one token each), then waiting ones admitted while blocks,
sequence slots and the token budget last. When a running sequence cannot get a slot, the
newest running sequence is preempted by recompute: its blocks are freed and it goes back to
the front of the waiting queue with every token it has produced. Nothing is dropped.

Not yet: chunked prefill (a prompt is prefilled in one step, even past the token budget).
"""
from collections import deque
from dataclasses import dataclass

import pagedlm
from pagedlm.engine.sequence import Status


@dataclass
class Scheduled:
    seq: object
    num_new: int        # tokens to compute this step (0 for a fork that shares its parent's)
    logits_of: object   # the sequence whose last position gives this one's next-token logits


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
        """The sequences of one step and the copy-on-write block copies to do before it."""
        batch, copies = [], []
        running = list(self.running)
        while running:
            seq = running.pop(0)
            while not self._reserve_slot(seq, copies):
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append(Scheduled(seq, 1, seq))
        budget = self.max_num_batched_tokens - len(batch)
        while self.waiting and len(self.running) + len(self.waiting[0]) <= self.max_num_seqs:
            group = self.waiting[0]
            first = group[0]
            if len(first) > budget and batch:
                break
            if not self.bm.can_allocate(len(first) + len(group)):
                break
            self.waiting.popleft()
            cached = self.bm.allocate(first.seq_id, first.tokens)
            first.num_cached = cached
            if not first.output:
                first.cached_prompt_tokens = cached
            batch.append(Scheduled(first, len(first) - cached, first))
            for child in group[1:]:
                self.bm.fork(first.seq_id, child.seq_id)
                batch.append(Scheduled(child, 0, first))
            for seq in group:
                seq.status = Status.RUNNING
                self.running.append(seq)
            budget -= len(first) - cached
        return batch, copies

    def _reserve_slot(self, seq, copies):
        try:
            copies += self.bm.append(seq.seq_id, [seq.tokens[-1]])
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
        self.bm.free(seq.seq_id)
        self.running.remove(seq)
        seq.status = Status.FINISHED

    def abort(self, request_id):
        for seq in [s for s in self.running if s.request_id == request_id]:
            self.finish(seq)
            seq.finish_reason = "abort"
        kept = deque()
        for group in self.waiting:
            left = [s for s in group if s.request_id != request_id]
            for s in group:
                if s.request_id == request_id:
                    s.status, s.finish_reason = Status.FINISHED, "abort"
            if left:
                kept.append(left)
        self.waiting = kept
