"""Asynchronous scheduling (LLM(async_scheduling=True), vLLM's name): while the GPU runs a
step, the host schedules and launches the next one, whose input tokens still in flight it takes
on the device from the step before, and only then waits for that step's tokens and emits them.
The GPU no longer idles while the host schedules, builds a step's inputs and emits its tokens.

A step overlaps when none of the sequences it may run asks for logprobs (of its tokens or its
prompt), penalties, logit bias or min_tokens (greedy and sampled ones both overlap: a draw
depends on the sequence's seed and position alone), and the free blocks cover what the running
sequences may reserve (so the scheduler preempts none): decodes, prompt chunks and admissions
alike. Any other step first lands the step in flight and runs as before (LLM._step). A
sequence that ends at a token in flight (EOS, a stop id or string) has had one more token
computed for nothing; max_tokens is known ahead, and costs nothing. A slot reserved before its
token is known holds a placeholder in the block manager until then (BlockManager.set_token)."""
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedlm.engine.sampler import choice_lists, on_device
from pagedlm.engine.scheduler import count_cached
from pagedlm.engine.sequence import Status
from pagedlm.kv_cache import measuring


@dataclass
class StepInFlight:
    """A launched step whose tokens the host has not read: the sequences it draws a token for,
    each one's row, their tokens and log-probabilities on the device (sampler.sampled_choices,
    float64 [rows, 2]; never a graph's output buffer, which the next step may overwrite before
    its feed reads it: capturing a new graph runs its forward once, and varlen graphs share
    their outputs) and their copy on its way to the host."""
    seqs: list
    rows: dict
    choices: torch.Tensor
    host: torch.Tensor
    done: object  # a CUDA event recorded after the copy, None on the CPU
    dropped: set = field(default_factory=set)  # sequences whose token here is not to be emitted

    @classmethod
    def launched(cls, seqs, choices):
        host = torch.empty(choices.shape, dtype=choices.dtype, pin_memory=choices.is_cuda)
        host.copy_(choices, non_blocking=True)
        done = None
        if choices.is_cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(choices.device))  # the copy's stream, on any cuda:N
        return cls(seqs, {seq: i for i, seq in enumerate(seqs)}, choices, host, done)

    def feed(self, at):
        """The Feed of the next step's input tokens drawn here: at, (index into the step's
        token ids, seq) of each sequence whose token here is its input; None when empty."""
        if not at:
            return None
        return Feed(self.choices, [(i, self.rows[seq]) for i, seq in at])

    def tokens(self):
        """(token ids, their logprobs) as lists, once the step is done."""
        if self.done is not None:
            self.done.synchronize()
        return choice_lists(self.host.numpy())


@dataclass
class Feed:
    """Input tokens a step in flight draws, written into the next step's token ids on the device
    before it runs: ids[i] = choices[j, 0] for each (i, j) of pairs."""
    choices: torch.Tensor
    pairs: list

    def __call__(self, ids):
        n = len(self.pairs)
        if all(i == j == k for k, (i, j) in enumerate(self.pairs)):  # ids[:n] = rows 0..n-1 (steady decoding)
            ids[:n] = self.choices[:n, 0]
            return
        index = on_device(np.asarray(self.pairs, dtype=np.int64).T.copy(), ids.device)
        ids[index[0]] = self.choices[index[1], 0].long()


def _plain(seq):
    """Whether seq's steps may overlap: none of its tokens needs the host before the next step."""
    return not seq.params._special and seq.prompt_logprobs is None


class OverlappedSteps:
    """A mixin of LLM: steps launched before the step in flight lands, and their landing.
    LLM._flights holds the launched steps not landed yet, oldest first (at most two, the newer
    launched just before the older lands)."""

    def _overlaps(self):
        """Whether the next step may launch before the step in flight lands (see the module
        docstring): every sequence it may run is plain, and the scheduler will preempt none."""
        scheduler, bm = self.scheduler, self.block_manager
        if not self.async_scheduling or self.runner.cascade or measuring(self.kv_caches):
            return False
        running, budget, size = scheduler.running, scheduler.max_num_batched_tokens, bm.block_size
        if not all(map(_plain, running)):
            return False
        # The step reserves at most `budget` tokens: their whole blocks, plus a partly filled and
        # a copied block per sequence. Only a nearly full cache counts each sequence's own need.
        if (bm.num_free_blocks < budget // size + 2 * len(running) and bm.num_free_blocks
                < sum(2 + min(len(seq) + seq.in_flight - seq.num_cached, budget) // size for seq in running)):
            return False
        slots = scheduler.max_num_seqs - len(scheduler.running)
        for group in scheduler.waiting:  # the groups the scheduler may admit
            if len(group) > slots:
                break
            if not all(map(_plain, group)):
                return False
            slots -= len(group)
        return True

    def _launch(self, scheduled, copies):
        """Launches the scheduled step (its slots reserved, a placeholder where a token is in
        flight) into self._flights. Until it is in flight, a failure (or an interrupt) rolls it
        back as a failed step (LLM._recover)."""
        flight = self.runner.launch(scheduled, copies, self._flights[-1] if self._flights else None)
        # In flight from here: the counters, the queue and the rollback's batch change together;
        # an interrupt among them leaves the step to the rollback, as before it launched.
        was = [seq.in_flight for seq in flight.seqs]
        try:
            count_cached(scheduled)
            for seq in flight.seqs:
                seq.in_flight += 1
            self._flights.append(flight)
            self._scheduled = None
        except BaseException:
            if self._scheduled is not None and self._flights and self._flights[-1] is flight:
                self._flights.pop()
            for seq, count in zip(flight.seqs, was):
                seq.in_flight = count
            raise

    def _land_all(self):
        while self._flights:
            self._land_oldest()

    def _land_oldest(self):
        """Waits for the oldest step in flight and emits its tokens; returns how many were kept.
        A sequence that finished meanwhile (at an earlier token, or aborted), or whose token was
        dropped, skips its token. Interrupted while waiting, the step stays in flight;
        interrupted while emitting, the sequences whose token is not emitted yet drop their
        tokens in flight, to be recomputed (_drop_in_flight), as a failed step's are. A step
        launched after it whose sequences have all ended now is dropped unread."""
        flight = self._flights[0]
        tokens, logprobs = flight.tokens()
        self._flights.popleft()
        bm, kept, i, before = self.block_manager, 0, 0, None
        try:
            for i, seq in enumerate(flight.seqs):
                before = len(seq.output)
                if seq in flight.dropped:
                    continue
                seq.in_flight -= 1
                if seq.status == Status.FINISHED:
                    continue
                position = len(seq)  # the token's place; a later step may have reserved its slot already
                if bm.num_tokens(seq.seq_id) > position:
                    bm.set_token(seq.seq_id, position, tokens[i])
                kept += self._emit(seq, [(tokens[i], logprobs[i], None)])
        except BaseException:
            emitted = before is not None and len(flight.seqs[i].output) > before
            for seq in flight.seqs[i + emitted:]:
                if seq not in flight.dropped:
                    self._drop_in_flight(seq)
            raise
        # A step in flight whose sequences all ended is dropped unread (its copy to the host
        # keeps its pinned buffer until done).
        while self._flights and all(seq.status == Status.FINISHED for seq in self._flights[0].seqs):
            flight = self._flights.popleft()
            for seq in flight.seqs:
                seq.in_flight -= seq not in flight.dropped
        return kept

    def _drop_in_flight(self, seq):
        """seq's tokens in flight are dropped (the steps still run, their tokens for seq unread),
        and a running seq is cut back to recompute from its last emitted token (LLM._cut), as
        after a failed step: it draws the same tokens again."""
        for flight in self._flights:
            if seq in flight.rows:
                flight.dropped.add(seq)
        seq.in_flight = 0
        if seq.status == Status.RUNNING and seq.num_cached > len(seq) - 1:
            self._cut(seq, len(seq) - 1)

    def _drop_all_in_flight(self):
        """Every step in flight dropped, its sequences' tokens unread (LLM._reset recomputes them)."""
        for flight in self._flights:
            for seq in flight.seqs:
                seq.in_flight = 0
        self._flights.clear()
