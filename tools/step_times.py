"""Is a decoding step bound by the host or by the device? For plain decoding and each
speculative method on the shipped code pair (one request at a time, greedy): the median wall
time of an engine step, and on the GPU the device's busy time per step (the kernels' total in
a torch.profiler pass over one request). Their difference is host work that the device waits
for: on small models it is most of a speculative step.

    python tools/step_times.py [--device cuda] [--max-tokens 128] [--rounds 5] [--methods plain lookahead ...]
"""
import argparse
import statistics
import time

import numpy as np
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model

METHODS = {"plain": None,
           "draft": {"method": "draft", "model": "DRAFT", "num_tokens": 4},
           "ngram": {"method": "ngram", "num_tokens": 4, "max_ngram": 3},
           "lookahead": {"method": "lookahead", "window": 4, "ngram": 6, "guesses": 12}}


def timed_steps(llm):
    """Wraps llm.step so that each call's wall time is appended to the returned list."""
    times, step = [], llm.step

    def timed():
        start = time.perf_counter()
        emitted = step()
        times.append(time.perf_counter() - start)
        return emitted
    llm.step = timed
    return times


def busy_per_step(llm, prompt, params, times):
    """Device time per step over one request: the profiled kernels' total over its steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        times.clear()
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in profile.key_averages()) / len(times)  # microseconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    prompt = np.load(TINY_CODE / "heldout.npy")[0][:64].astype(int).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for name in args.methods:
        config = METHODS[name]
        if config is not None:
            config = dict(config, adaptive=False)
            if config.get("model") == "DRAFT":
                config["model"] = str(tiny_model("draft"))
        llm = LLM(tiny_model("target"), device=args.device, num_blocks=1024, speculative=config)
        llm.generate([prompt], params, use_tqdm=False)  # warm-up: graphs, allocations
        times = timed_steps(llm)
        busy = busy_per_step(llm, prompt, params, times) if args.device == "cuda" else None
        times.clear()
        for _ in range(args.rounds):
            llm.generate([prompt], params, use_tqdm=False)
        steps = len(times) / args.rounds
        wall = statistics.median(times) * 1e6
        print(f"{name:10s} {steps:5.1f} steps/request, {args.max_tokens / steps:4.2f} tokens/step, wall {wall:7.1f} us"
              f"/step" + ("" if busy is None else f", device busy {busy:6.1f} us/step, host-bound {wall - busy:6.1f} us"))


if __name__ == "__main__":
    main()
