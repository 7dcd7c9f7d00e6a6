"""Block-manager benchmark: the scheduler-like trace of bench/README.md replayed on the C++
manager and on a plain pure-Python manager with the same semantics, the batched builders
called from Python, and (when built) the C++ microbenchmarks of single operations.

    python bench/bench_block_manager.py [--cpp-bench build/cpp/bench/cpp/bench_block_manager] [--append-results]

Both replays go through the same Python loop; the Python manager's tables are turned into
numpy arrays, as an engine must do before handing them to a kernel.
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import timeit

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pagedlm  # noqa: E402
from bench_common import cpu_name, git_commit, write_results  # noqa: E402
from block_manager_trace import PyBlockManager, record_trace  # noqa: E402

NUM_BLOCKS, BLOCK_SIZE = 16384, 16
AS_ARRAY = {"block_tables": lambda r: np.asarray(r, dtype=np.int32),
            "slot_mapping": lambda r: np.asarray(r, dtype=np.int64)}


def replay(manager, calls, to_array):
    """Time the calls on one manager. Methods are bound before the clock starts, so the
    loop costs both managers the same few tens of nanoseconds a call."""
    methods = {name: getattr(manager, name) for name in ("allocate", "append", "fork", "free",
                                                          "block_tables", "slot_mapping")}
    if to_array:
        for name, convert in AS_ARRAY.items():
            methods[name] = lambda *a, _f=methods[name], _c=convert: _c(_f(*a))
    bound = [(methods[name], args) for name, args in calls]
    gc.disable()  # as timeit does: collections would scan the 400K-call list mid-replay
    try:
        start = time.perf_counter()
        for method, args in bound:
            method(*args)
        return time.perf_counter() - start
    finally:
        gc.enable()


def time_replays(calls, repeats):
    times = {"python": [], "cpp": []}
    for _ in range(repeats):
        py = PyBlockManager(NUM_BLOCKS, BLOCK_SIZE, True)
        times["python"].append(replay(py, calls, to_array=True))
        cpp = pagedlm.BlockManager(NUM_BLOCKS, BLOCK_SIZE, True)
        times["cpp"].append(replay(cpp, calls, to_array=False))
        stats_py, stats_cpp = py.stats(), cpp.stats()
        assert stats_py == stats_cpp, (stats_py, stats_cpp)  # same semantics, same end state
    return {k: statistics.median(v) for k, v in times.items()}


def time_builders():
    """Median time of one Python call of block_tables (256 x 128 blocks) and slot_mapping."""
    bm = pagedlm.BlockManager(256 * 128, BLOCK_SIZE)
    ids = list(range(256))
    for i in ids:
        bm.allocate(i, range(128 * BLOCK_SIZE))
    ids_np = np.asarray(ids, dtype=np.int64)
    ones = np.ones(256, dtype=np.int64)
    out = {}
    for label, fn in [("block_tables(list of 256 ids), 256 x 128", lambda: bm.block_tables(ids)),
                      ("block_tables(int64 array), 256 x 128", lambda: bm.block_tables(ids_np)),
                      ("slot_mapping(256 ids, 1 token each)", lambda: bm.slot_mapping(ids_np, ones))]:
        runs = timeit.repeat(fn, number=200, repeat=15)
        out[label] = statistics.median(runs) / 200 * 1e6
    return out


def run_cpp_bench(path):
    proc = subprocess.run([path, "--benchmark_format=json", "--benchmark_repetitions=5",
                           "--benchmark_report_aggregates_only=true"], capture_output=True, text=True, check=True)
    rows = {}
    for b in json.loads(proc.stdout)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            rows[b["run_name"]] = (b["items_per_second"], b["cpu_time"], b["time_unit"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpp-bench", help="path of the built bench_block_manager binary")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    calls = record_trace(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    counts = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    replays = time_replays(calls, args.repeats)
    builders = time_builders()

    lines = [f"### Block manager — {datetime.date.today()}, {cpu_name()} ({os.cpu_count()} cores), "
             f"commit {git_commit()}",
             "", f"`{' '.join(['python'] + sys.argv)}`", "",
             f"Trace: {len(calls):,} calls ({', '.join(f'{k} {v:,}' for k, v in sorted(counts.items()))}), "
             f"{NUM_BLOCKS} blocks of {BLOCK_SIZE}, prefix caching on. Median of {args.repeats} replays.", "",
             "| trace replay | time | calls/s |", "|---|---|---|"]
    for name in ("python", "cpp"):
        lines.append(f"| {'pure-Python manager' if name == 'python' else 'pagedlm.BlockManager (C++)'} "
                     f"| {replays[name] * 1e3:.1f} ms | {len(calls) / replays[name] / 1e6:.2f} M |")
    lines += ["", f"Speed-up of the C++ manager on the trace: **{replays['python'] / replays['cpp']:.1f}x**.", "",
              "| Python call | median |", "|---|---|"]
    lines += [f"| {label} | {us:.1f} us |" for label, us in builders.items()]
    if args.cpp_bench:
        lines += ["", "| C++ microbenchmark (one core) | ops/s | time per iteration |", "|---|---|---|"]
        for name, (ips, t, unit) in run_cpp_bench(args.cpp_bench).items():
            lines.append(f"| {name} | {ips / 1e6:.2f} M | {t:.2f} {unit} |")
    write_results("\n".join(lines) + "\n", append_results=args.append_results)


if __name__ == "__main__":
    main()
