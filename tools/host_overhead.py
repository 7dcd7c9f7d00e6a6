"""The engine's host time per decode step, measured on the CPU with the model's forward replaced
by a stub that returns zero logits: what the scheduler, the block manager, sampling, emission and
(for a speculative engine whose switch holds drafting off) the speculator's bookkeeping cost per
step, without a GPU. On the GPU these run while the device waits, so they add to every step.

    python tools/host_overhead.py [--batch 16] [--rounds 7]

Engines run in turn, round after round; the fastest round of each is reported (host noise only
ever adds time).
"""
import argparse
import time

import numpy as np
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model

METHODS = {"ngram": {"method": "ngram", "num_tokens": 4, "max_ngram": 3},
           "draft": {"method": "draft", "model": None, "num_tokens": 4},
           "lookahead": {"method": "lookahead", "window": 5, "ngram": 3, "guesses": 5}}


def stub_forward(llm):
    """Decode steps return zero logits without running the model (prompt steps still run it)."""
    prefill = llm.runner.step
    logits = torch.zeros(llm.scheduler.max_num_seqs, llm.model.args.vocab_size)

    def step(scheduled, copies):
        if any(s.num_new > 1 for s in scheduled):
            return prefill(scheduled, copies)
        for s in scheduled:
            s.seq.num_cached += s.num_new
        return [s.seq for s in scheduled], logits[:len(scheduled)]
    llm.runner.step = step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompts = [w[:64].astype(int).tolist() for w in np.load(TINY_CODE / "heldout.npy")[:args.batch]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engines = {"plain": LLM(tiny_model("target"), device="cpu", num_blocks=2048)}
    for name, config in METHODS.items():
        config = dict(config, model=str(tiny_model("draft"))) if "model" in config else config
        engines[f"{name}, never drafting"] = llm = LLM(tiny_model("target"), device="cpu", num_blocks=2048,
                                                       speculative=config)
        llm.speculator.switch.drafting = lambda batch_size: False  # the switch holding drafting off
    for llm in engines.values():
        stub_forward(llm)
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(args.rounds):
        for name, llm in engines.items():
            ids = [llm.add_request(prompt, params) for prompt in prompts]
            llm.step()  # the prompts' prefill: not timed
            steps, start = 0, time.perf_counter()
            while llm.scheduler.has_work():
                llm.step()
                steps += 1
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
            for request_id in ids:
                llm.take_output(request_id)
    for name, seconds in best.items():
        print(f"{name:28s} {seconds * 1e6:7.1f} us per decode step (batch {args.batch}), "
              f"{seconds / best['plain']:.2f}x plain")


if __name__ == "__main__":
    main()
