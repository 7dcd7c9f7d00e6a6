"""The engine-wide switch that stops speculation where it costs more than it saves: for each
power-of-two batch size, it compares the tokens per second of decode steps with and without
drafts, lets greedy sequences draft while drafting is at least as fast, and now and then
re-measures the mode not in use. Seeded sampled sequences are not gated: their tokens depend
on which steps drafted, and must never depend on timing."""

PROBE_EVERY = 16           # the closest two measurements of the mode not in use may be
PROBE_LENGTH = 2           # steps one measurement lasts
PROBE_COST = 0.01          # the share of time that probing the slower mode may cost
MAX_PROBE_INTERVAL = 4096  # the longest gap between two such measurements, in steps
# Weight of the past in the sums, per step of that mode: about 30 steps of memory, long enough
# that a few unlucky steps of a bursty method (lookahead) do not turn drafting off.
DECAY = 0.97


class PaySwitch:
    """Acceptance alone cannot tell whether drafting pays: a method can be accepted often and
    still lose (a large lookahead tree in a large batch, a draft model nearly as slow as its
    target). So for steps with drafts and steps without, each batch-size bucket keeps decayed
    sums of emitted tokens and of seconds, and drafts while the first ratio is at least the
    second. Sums, not an average of per-step rates: one step's rate swings with how many
    drafts it happened to accept, the ratio of sums weighs each step by its time.

    The mode not in use is re-measured PROBE_LENGTH steps in a row, to notice when the balance
    turns. A probe of the losing mode costs time, so probes are spaced by it: the steps between
    two probes last the probe's cost over PROBE_COST, never more than MAX_PROBE_INTERVAL."""

    def __init__(self):
        self.regimes = {}  # batch-size bucket -> _Regime

    def drafting(self, batch_size):
        """Whether greedy sequences draft this step, in a decode batch of batch_size."""
        return self._regime(batch_size).drafting()

    def record(self, batch_size, drafted, tokens, seconds):
        """One decode step's result: whether it drafted, tokens it emitted, its wall time."""
        self._regime(batch_size).record(drafted, tokens, seconds)

    def rate(self, batch_size, drafting):
        """Emitted tokens per second in that mode at that batch size, or None before its first step."""
        return self._regime(batch_size).rate(drafting)

    @property
    def recorded(self):
        """drafting? -> decode steps recorded, over every batch size (for reports)."""
        return {mode: sum(r.recorded[mode] for r in self.regimes.values()) for mode in (True, False)}

    @property
    def steps(self):
        return sum(r.steps for r in self.regimes.values())

    def _regime(self, batch_size):
        bucket = max(1, batch_size).bit_length()  # 1 | 2-3 | 4-7 | 8-15 | 16-31 | ...
        regime = self.regimes.get(bucket)
        if regime is None:
            regime = self.regimes[bucket] = _Regime()
        return regime


class _Regime:
    def __init__(self):
        self.sums = {True: None, False: None}  # drafting? -> [decayed tokens, seconds, steps]
        self.recorded = {True: 0, False: 0}    # drafting? -> steps recorded
        self.steps = 0
        self.choice, self.next_probe = None, PROBE_EVERY

    def rate(self, drafting):
        sums = self.sums[drafting]
        return None if sums is None else sums[0] / sums[1]

    def step_seconds(self, drafting):
        _, seconds, steps = self.sums[drafting]
        return seconds / steps

    def drafting(self):
        self.steps += 1
        if self.sums[True] is None:
            return True
        if self.sums[False] is None:
            return False
        if self.next_probe <= self.steps < self.next_probe + PROBE_LENGTH:
            return not self.choice  # in a probe: the choice stands until it ends
        pays = self.rate(True) >= self.rate(False)
        if pays != self.choice or self.steps >= self.next_probe + PROBE_LENGTH:
            self.choice = pays
            self.next_probe = self.steps + self._probe_interval()
        return pays

    def _probe_interval(self):
        """Steps to the next probe: its PROBE_LENGTH slow steps lose what the fast mode would
        have saved on their tokens; the steps in between last that loss over PROBE_COST."""
        fast, slow = sorted((True, False), key=self.rate, reverse=True)
        if self.rate(fast) == 0:
            return PROBE_EVERY
        lost = PROBE_LENGTH * self.step_seconds(slow) * (1 - self.rate(slow) / self.rate(fast))
        steps = lost / PROBE_COST / self.step_seconds(fast)
        return int(min(MAX_PROBE_INTERVAL, max(PROBE_EVERY, steps)))

    def record(self, drafted, tokens, seconds):
        if seconds <= 0:
            return
        self.recorded[drafted] += 1
        old = self.sums[drafted] or [0.0, 0.0, 0.0]
        self.sums[drafted] = [DECAY * old[0] + tokens, DECAY * old[1] + seconds, DECAY * old[2] + 1]
