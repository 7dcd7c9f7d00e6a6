"""The engine-wide switch that stops speculation where it costs more than it saves.

Acceptance alone (the per-sequence backoff in speculator.py) cannot tell whether drafting
pays: a method can be accepted often and still lose, as a large lookahead tree does at batch
16, or a draft model nearly as slow as its target. So the speculator also times its decode
steps: it keeps an exponential average of emitted tokens per second in steps with drafts and
in steps without, drafts while the first is at least the second, and re-measures the other
mode every PROBE_EVERY steps so it notices when the balance turns (requests finish, the
batch shrinks, acceptance changes with the text).

It gates greedy sequences only. A seeded sampled sequence's tokens depend on which of its
steps drafted, and they must never depend on timing; those keep the acceptance rule alone.
"""

PROBE_EVERY = 16   # steps between two measurements of the mode not in use
SMOOTHING = 0.25   # weight of the newest step in the averages


class PaySwitch:
    def __init__(self):
        self.rate = {True: None, False: None}  # drafting? -> emitted tokens per second
        self.steps = 0

    def drafting(self):
        """Whether greedy sequences draft this step."""
        self.steps += 1
        if self.rate[True] is None:
            return True
        if self.rate[False] is None:
            return False
        pays = self.rate[True] >= self.rate[False]
        return not pays if self.steps % PROBE_EVERY == 0 else pays

    def record(self, drafted, tokens, seconds):
        """One decode step's result: whether it drafted, tokens it emitted, its wall time."""
        if tokens <= 0 or seconds <= 0:
            return
        rate, old = tokens / seconds, self.rate[drafted]
        self.rate[drafted] = rate if old is None else old + SMOOTHING * (rate - old)
