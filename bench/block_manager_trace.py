"""The scheduler-like block-manager trace of bench/README.md, recorded as a list of calls.

The workload and scheduler are pagedlm.workload's (1,000 requests, prompts of 16-2,048
tokens, 1-512 decode steps, 30% forks, shared prefixes). The trace is recorded once,
against the pure-Python manager, and then replayed call for call on each manager measured.
"""
import os
import sys

from pagedlm.workload import simulate, synthetic_requests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from py_block_manager import PyBlockManager  # noqa: E402  (the tests' oracle, the benchmark's baseline)

RECORDED = ("allocate", "append", "fork", "free", "truncate", "block_tables", "slot_mapping")


class _Recorder:
    """Forwards every attribute to the manager and records the calls that change or read
    block state in bulk (queries such as num_free_blocks are the scheduler's own business)."""

    def __init__(self, manager):
        self._manager, self.calls = manager, []

    def __getattr__(self, name):
        attr = getattr(self._manager, name)
        if name not in RECORDED:
            return attr

        def record(*args):
            self.calls.append((name, args))
            return attr(*args)
        return record


def record_trace(num_requests=1000, num_blocks=16384, block_size=16, max_running=256,
                 enable_prefix_caching=True, seed=0):
    recorder = _Recorder(PyBlockManager(num_blocks, block_size, enable_prefix_caching))
    simulate(recorder, synthetic_requests(num_requests, seed=seed), max_running=max_running,
             seed=seed, track_utilization=False)
    return recorder.calls
