"""The engine-wide switch that stops speculation where it costs more than it saves.

Acceptance alone (the per-sequence backoff in speculator.py) cannot tell whether drafting
pays: a method can be accepted often and still lose, as a large lookahead tree does at batch
16, or a draft model nearly as slow as its target. So the speculator also times its decode
steps: for steps with drafts and steps without it keeps decayed sums of emitted tokens and of
seconds, and drafts while the first ratio (tokens per second) is at least the second. Sums,
not an average of per-step rates: one step's rate swings with how many drafts it happened to
accept, the ratio of sums weighs each step by its time. It re-measures the other mode now and
then, PROBE_LENGTH steps in a row, to notice when the balance turns (requests finish, the
batch shrinks, acceptance changes with the text); a probe of the losing mode costs slow steps,
so probes thin out while they keep confirming the choice: after PROBE_EVERY steps, then twice
as long each time, up to MAX_PROBE_INTERVAL; a change of choice starts over.

It gates greedy sequences only. A seeded sampled sequence's tokens depend on which of its
steps drafted, and they must never depend on timing; those keep the acceptance rule alone.
"""

PROBE_EVERY = 16           # steps to the first measurement of the mode not in use
PROBE_LENGTH = 2           # steps one measurement lasts
MAX_PROBE_INTERVAL = 256   # the longest gap between two such measurements
DECAY = 0.9                # weight of the past in the sums, per step of that mode


class PaySwitch:
    def __init__(self):
        self.sums = {True: None, False: None}  # drafting? -> [decayed tokens, decayed seconds]
        self.recorded = {True: 0, False: 0}    # drafting? -> steps recorded (for reports)
        self.steps = 0
        self.choice, self.interval, self.next_probe = None, PROBE_EVERY, PROBE_EVERY

    def rate(self, drafting):
        """Emitted tokens per second in that mode, or None before its first step."""
        sums = self.sums[drafting]
        return None if sums is None else sums[0] / sums[1]

    def drafting(self):
        """Whether greedy sequences draft this step."""
        self.steps += 1
        if self.sums[True] is None:
            return True
        if self.sums[False] is None:
            return False
        if self.steps < self.next_probe + PROBE_LENGTH and self.steps >= self.next_probe:
            return not self.choice  # in a probe: the choice stands until it ends
        if self.steps == self.next_probe + PROBE_LENGTH:
            self.interval = min(2 * self.interval, MAX_PROBE_INTERVAL)
            self.next_probe = self.steps + self.interval
        pays = self.rate(True) >= self.rate(False)
        if pays != self.choice:
            self.choice, self.interval, self.next_probe = pays, PROBE_EVERY, self.steps + PROBE_EVERY
        return pays

    def record(self, drafted, tokens, seconds):
        """One decode step's result: whether it drafted, tokens it emitted, its wall time."""
        if seconds <= 0:
            return
        self.recorded[drafted] += 1
        old = self.sums[drafted] or [0.0, 0.0]
        self.sums[drafted] = [DECAY * old[0] + tokens, DECAY * old[1] + seconds]
