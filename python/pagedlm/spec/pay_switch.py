"""The engine-wide switch that stops speculation where it costs more than it saves.

Acceptance alone (the per-sequence backoff in speculator.py) cannot tell whether drafting
pays: a method can be accepted often and still lose, as a large lookahead tree does at batch
16, or a draft model nearly as slow as its target. So the speculator also times its decode
steps: it keeps an exponential average of emitted tokens per second in steps with drafts and
in steps without, and drafts while the first is at least the second. It re-measures the other
mode now and then, to notice when the balance turns (requests finish, the batch shrinks,
acceptance changes with the text); a probe of the losing mode costs a slow step, so probes
thin out while they keep confirming the choice: after PROBE_EVERY steps, then twice as long
each time, up to MAX_PROBE_INTERVAL; a change of choice starts over.

It gates greedy sequences only. A seeded sampled sequence's tokens depend on which of its
steps drafted, and they must never depend on timing; those keep the acceptance rule alone.
"""

PROBE_EVERY = 16           # steps to the first measurement of the mode not in use
MAX_PROBE_INTERVAL = 256   # the longest gap between two such measurements
SMOOTHING = 0.25           # weight of the newest step in the averages


class PaySwitch:
    def __init__(self):
        self.rate = {True: None, False: None}  # drafting? -> emitted tokens per second
        self.steps = 0
        self.choice, self.interval, self.next_probe = None, PROBE_EVERY, PROBE_EVERY

    def drafting(self):
        """Whether greedy sequences draft this step."""
        self.steps += 1
        if self.rate[True] is None:
            return True
        if self.rate[False] is None:
            return False
        pays = self.rate[True] >= self.rate[False]
        if pays != self.choice:
            self.choice, self.interval, self.next_probe = pays, PROBE_EVERY, self.steps + PROBE_EVERY
        if self.steps >= self.next_probe:
            self.interval = min(2 * self.interval, MAX_PROBE_INTERVAL)
            self.next_probe = self.steps + self.interval
            return not pays
        return pays

    def record(self, drafted, tokens, seconds):
        """One decode step's result: whether it drafted, tokens it emitted, its wall time."""
        if tokens <= 0 or seconds <= 0:
            return
        rate, old = tokens / seconds, self.rate[drafted]
        self.rate[drafted] = rate if old is None else old + SMOOTHING * (rate - old)
