"""Asynchronous scheduling (LLM(async_scheduling=True), vLLM's name): while the GPU runs a
decode step, the host schedules and launches the next one, whose input tokens it takes on the
device from the step in flight, and only then waits for that step's tokens and emits them. The
GPU no longer idles while the host schedules, builds a step's inputs and emits its tokens.

Only steady decoding overlaps: nothing waiting, every running sequence computing one token, none
of them asking for logprobs, penalties, logit bias or min_tokens (greedy and sampled ones both
overlap: a draw depends on the sequence's seed and position alone), and a decode graph to
replay. Any other step first lands the step in flight (LLM._step). A sequence that ends at a
token in flight (EOS, a stop id or string) has had one more token computed for nothing;
max_tokens is known ahead, and costs nothing. A slot reserved before its token is known holds a
placeholder in the block manager until then (BlockManager.set_token)."""
from dataclasses import dataclass, field

import torch

from pagedlm.engine.recovery import UNMATCHABLE_TOKEN
from pagedlm.engine.sampler import choice_lists
from pagedlm.engine.scheduler import Scheduled
from pagedlm.engine.sequence import Status
from pagedlm.kv_cache import measuring


@dataclass
class DecodeInFlight:
    """A launched decode step whose tokens the host has not read: its sequences, each one's row,
    its tokens and their log-probabilities on the device (sampler.sampled_choices, float64
    [rows, 2]; a graph's output when every row is greedy, valid until that graph replays again,
    so the next step's feed reads it before its replay) and their copy on its way to the host."""
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
            done.record()
        return cls(seqs, {seq: i for i, seq in enumerate(seqs)}, choices, host, done)

    def tokens(self):
        """(token ids, their logprobs) as lists, once the step is done."""
        if self.done is not None:
            self.done.synchronize()
        return choice_lists(self.host.numpy())


class OverlappedDecoding:
    """A mixin of LLM: steps launched before the step in flight lands, and their landing.
    LLM._flights holds the launched steps not landed yet, oldest first (at most two, the newer
    launched just before the older lands)."""

    def _overlapped_step(self):
        """One step of asynchronous scheduling, or None when the next step cannot overlap: the
        next decode step launched, then the step in flight before it landed (the tokens it kept
        returned); with nothing to launch, the step in flight landed alone."""
        seqs = self._overlap_candidates()
        if seqs is not None:
            self._launch(seqs, self._flights[-1] if self._flights else None)
            return self._land_oldest() if len(self._flights) > 1 else 0
        return self._land_oldest() if self._flights else None

    def _overlap_candidates(self):
        """The sequences the next step decodes, when it can launch before the step in flight
        lands (see the module docstring); else None. A sequence whose last token is in flight
        is left out: it ends with that token."""
        runner, scheduler = self.runner, self.scheduler
        if (not self.async_scheduling or runner.graphs is None or runner.cascade or scheduler.waiting
                or not scheduler.running or measuring(self.kv_caches)):
            return None
        seqs, longest = [], 0
        for seq in scheduler.running:
            params = seq.params
            if (params._special or seq.prompt_logprobs is not None
                    or len(seq) + seq.in_flight - seq.num_cached != 1):
                return None
            if len(seq.output) + seq.in_flight < params.max_tokens:
                seqs.append(seq)
                longest = max(longest, seq.num_cached + 1)
        block_size = self.block_manager.block_size
        # Each needs at most one new block, and one more for a copy on write; one token each
        # within the step's token budget, as the scheduler keeps it.
        if (not seqs or len(seqs) > scheduler.max_num_batched_tokens
                or not runner.graphs.fits(len(seqs), -(-longest // block_size))
                or self.block_manager.num_free_blocks < 2 * len(seqs)):
            return None
        return seqs

    def _launch(self, seqs, in_flight):
        """Reserves a slot for each of seqs (a placeholder where its input token is in flight)
        and launches their decode step into self._flights. Until it is in flight, a failure
        (or an interrupt) rolls it back as a failed step (LLM._recover)."""
        self._scheduled = [Scheduled(seq, 1, seq, seq.num_cached) for seq in seqs]
        copies, bm = [], self.block_manager
        for seq in seqs:
            token = UNMATCHABLE_TOKEN if seq.in_flight else seq.token_range(seq.num_cached, seq.num_cached + 1)[0]
            copies += bm.append(seq.seq_id, [token])
        flight = self.runner.launch_decodes(seqs, copies, in_flight)
        # In flight from here: the counters, the queue and the rollback's batch change together;
        # an interrupt among them leaves the step to the rollback, as before it launched.
        was = [seq.in_flight for seq in seqs]
        try:
            for seq in seqs:
                seq.num_cached += 1
                seq.in_flight += 1
            self._flights.append(flight)
            self._scheduled = None
        except BaseException:
            if self._scheduled is not None and self._flights and self._flights[-1] is flight:
                self._flights.pop()
            for seq, count in zip(seqs, was):
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
