"""What the engine does when a step raises: the step is rolled back (each of its sequences cut
back to the whole blocks it had before it, the blocks it may have entered in the prefix cache
with their KV unwritten taken out), then blamed on the requests that make it fail, found by
rerunning the step's requests in halves. The others go on as if those had never been there.
A mixin of LLM: it works on the engine's scheduler, block manager, runner and requests."""
from collections import deque

import pagedlm
from pagedlm.engine.sequence import UNMATCHABLE_TOKEN, Status


class StepRecovery:
    def _recover(self, exc):
        """Makes the engine consistent after a step that raised exc, wherever it stopped (blocks
        reserved, KV half written, tokens sampled but not emitted): rolls it back (_roll_back),
        and fails the requests an exception is blamed on (_blame; an interrupt, or a failure
        before the scheduler returned the step, fails none), each sequence's `error` saying why.
        Returns the ids of the requests it failed."""
        batch, self._scheduled = self._scheduled, None
        self._roll_back(batch)
        # Steps launched before the failed one went through (async scheduling): their tokens are
        # emitted now, after the rollback, so that none names a slot the failed step reserved.
        self._land_all()
        if batch is None or not isinstance(exc, Exception):
            return set()
        failed = set()
        for request_id, error in self._blame(batch, exc).items():
            for seq in self._requests[request_id]["seqs"]:
                if seq.status != Status.FINISHED:  # (a retry may have finished it)
                    self._finish(seq, "error")
                    seq.error = f"a step running it failed: {error!r}"
                    failed.add(request_id)
        return failed

    def _roll_back(self, batch, members=None):
        """Undoes a failed step of the scheduled `batch` (None: the scheduler raised before
        returning it). Each of its unfinished sequences is cut back to the whole blocks it had
        before the step (_cut), its proposer's state forgotten; those the step admitted go back,
        in their groups, to the head of the waiting queue, as before the step. Running
        sequences the step did not schedule, and waiting ones, are untouched. members: the
        sequences a retry (_retry) ran, which alone are in the scheduler's queues then.

        With prefix caching and blocks of one token, a block cannot leave the prefix cache
        while it is kept (see _cut): then, and if the queues are found broken, every
        unfinished sequence is requeued instead and the block manager replaced by an empty
        one (_reset). Returns whether it reset."""
        bm, scheduler = self.block_manager, self.scheduler
        if bm.enable_prefix_caching and bm.block_size == 1:
            self._reset()
            return True
        if batch is None:
            # Only block-manager reservations and admissions happened (the runner never ran):
            # a running sequence holding more tokens than its cached ones is cut back to them.
            for seq in reversed(scheduler.running):
                if bm.num_tokens(seq.seq_id) != seq.num_cached:
                    self._cut(seq, seq.num_cached)
            if not self._queued_as_expected(members):
                self._reset()
                return True
            return False
        requeued = set()
        # Last scheduled first: a block the step wrote may be shared by a sequence scheduled
        # after its writer (a fork, or a prompt that hit it in the prefix cache), which frees
        # its share before the writer takes the block out of the prefix cache.
        for s in reversed(batch):
            seq = s.seq
            if seq.status != Status.RUNNING:  # finished as its tokens were emitted
                continue
            self.runner.forget(seq)
            self._cut(seq, s.start)
            if s.admitted:
                bm.free(seq.seq_id)
                scheduler.running.remove(seq)
                seq.status, seq.num_cached = Status.WAITING, 0
                requeued.add(seq)
        groups, group_of = [], {}  # the admitted groups, in the step's order: a first, then its forks
        for s in batch:
            if s.seq in requeued:
                if s.logits_of is not s.seq and s.logits_of in group_of:
                    group_of[s.logits_of].append(s.seq)
                else:
                    group_of[s.seq] = [s.seq]
                    groups.append(group_of[s.seq])
        scheduler.waiting.extendleft(reversed(groups))
        return False

    def _cut(self, seq, keep):
        """Cuts seq back, in the block manager, to its first `keep` tokens rounded down to
        whole blocks (a partly filled block may be a copy-on-write copy the failed step never
        filled), and sets its num_cached to that. With prefix caching, every block past them
        that seq alone holds leaves the prefix cache first: the failed step may have entered
        it there with its KV unwritten. (The block manager takes a block out of the cache when
        a sequence appends into it partly filled: seq is truncated into it by one token and
        appended a token no prompt holds, so the block cannot be matched even if that fills
        it. With one-token blocks there is no such append: _roll_back resets instead.)"""
        bm, size, seq_id = self.block_manager, self.block_manager.block_size, seq.seq_id
        keep -= keep % size
        if bm.enable_prefix_caching:
            table = bm.block_table(seq_id)
            for j in range(len(table) - 1, keep // size - 1, -1):
                if bm.ref_count(table[j]) == 1:  # a shared one is its other holder's to take out
                    bm.truncate(seq_id, j * size + 1)
                    bm.append(seq_id, [UNMATCHABLE_TOKEN])
        bm.truncate(seq_id, keep)
        seq.num_cached = keep

    def _queued_as_expected(self, members):
        """Whether every unfinished sequence (of members, when given) is in exactly one of the
        scheduler's queues, running ones in the block manager and waiting ones not."""
        scheduler, bm = self.scheduler, self.block_manager
        running = scheduler.running
        waiting = [s for group in scheduler.waiting for s in group]
        live = {s for r in self._requests.values() for s in r["seqs"] if s.status != Status.FINISHED}
        if members is not None:
            live &= members
        return (len(running) + len(waiting) == len(live) and set(running) | set(waiting) == live
                and all(s.status == Status.RUNNING and s.seq_id in bm for s in running)
                and all(s.status == Status.WAITING and s.seq_id not in bm for s in waiting))

    def _blame(self, batch, exc):
        """{request_id: exception} of the failed step's requests to fail (all of a one-request
        step). The step's requests are bisected: both halves of a group known to fail run again
        alone (_retry); a half that goes through has its tokens emitted and carries on, a
        failing one is split further, and a request that fails on its own is to blame. Until a
        retry goes through, at most 2 * ceil(log2(requests)) retries run, enough to isolate one
        culprit; once one has (the failure is some requests', not every one's), up to
        2 * (requests - 1), enough to isolate every culprit. Where the failure is not
        attributable to single requests, every request of the group fails, as the step's
        requests all would without blame: when neither half fails alone (a failure that needs
        them together, or a transient one), and when the retries run out (a failure that every
        request meets alone)."""
        units = {}  # request id -> its sequences in the step (unfinished), in the step's order
        for s in batch:
            if s.seq.status != Status.FINISHED:
                units.setdefault(s.seq.request_id, set()).add(s.seq)
        one_culprit, every_culprit = 2 * (len(units) - 1).bit_length(), 2 * (len(units) - 1)
        retries, extended = one_culprit, False
        failed, pending = {}, [(list(units), exc)]  # groups known to fail, with their error
        while pending:
            group, error = pending.pop()
            if len(group) <= 1 or retries < 2:
                failed.update(dict.fromkeys(group, error))
                continue
            halves = [group[:len(group) // 2], group[len(group) // 2:]]
            errors = []
            for half in halves:
                retries -= 1
                errors.append(self._retry(set().union(*(units[r] for r in half))))
            failing = [(half, e) for half, e in zip(halves, errors) if e is not None]
            if len(failing) < len(halves) and not extended:  # a retry went through: request-specific
                retries, extended = retries + every_culprit - one_culprit, True
            if not failing:  # not attributable to a request: the whole group fails
                failed.update(dict.fromkeys(group, error))
            pending.extend(reversed(failing))
        return failed

    def _retry(self, members):
        """Runs one step of the failed step's sequences `members` alone, the engine's others
        waiting (as they were). Returns None when it went through (its tokens are emitted:
        those sequences carry on), else its exception, after rolling the retry back."""
        scheduler = self.scheduler
        running, waiting = scheduler.running, scheduler.waiting
        scheduler.running = [s for s in running if s in members]
        scheduler.waiting = deque(g for g in waiting if g[0] in members)
        reset = False
        try:
            self._scheduled = None
            batch, copies = scheduler.schedule()
            self._scheduled = batch
            if batch:
                for seq, tokens in self.runner.step(batch, copies).items():
                    self._emit(seq, tokens)
            return None
        except BaseException as exc:
            reset = self._roll_back(self._scheduled, members)
            if not isinstance(exc, Exception):
                raise
            return exc
        finally:
            self._scheduled = None
            if not reset:  # the retried sequences back in their places among the others
                ran, before = set(scheduler.running), set(running)
                scheduler.running = ([s for s in running if s in ran or s not in members]
                                     + [s for s in scheduler.running if s not in before])
                scheduler.waiting.extend(g for g in waiting if g[0] not in members)

    def _reset(self):
        """The last resort: every unfinished sequence goes back to waiting, in arrival order,
        to be recomputed as after a preemption (whose results are the same), and the block
        manager is replaced by an empty one (the prefix cache is lost)."""
        bm = self.block_manager
        self._drop_all_in_flight()  # (async scheduling) their sequences are recomputed
        self.block_manager = pagedlm.BlockManager(bm.num_blocks, bm.block_size, bm.enable_prefix_caching)
        self.scheduler.bm = self.runner.bm = self.block_manager
        self.scheduler.running, self.scheduler.waiting = [], deque()
        for request in self._requests.values():
            seqs = [s for s in request["seqs"] if s.status != Status.FINISHED]
            for seq in seqs:
                self.runner.forget(seq)  # its proposer's state may be half made
                seq.num_cached, seq.status = 0, Status.WAITING
            if seqs and len(seqs) == len(request["seqs"]) and not any(s.output for s in seqs):
                self.scheduler.add(seqs)  # not started: its n samples fork one prefill, as queued
            else:
                self.scheduler.waiting.extend([s] for s in seqs)

