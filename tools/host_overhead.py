"""The engine's host time per decode step, measured on the CPU with the model's forward replaced
by a stub: what the scheduler, the block manager, sampling, emission and the speculator's work
cost per step, without a GPU. On the GPU these run while the device waits, so they add to every
step.

    python tools/host_overhead.py [--batch 16] [--rounds 7] [--drafting] [--profile METHOD]

By default decode steps return zero logits and speculative engines have their switch hold
drafting off (the bookkeeping every step pays). With --drafting every forward is a bigram
stub (the logits of a token pick a fixed function of it, so drafts are often accepted) and
the speculative engines draft at every step: the host cost of proposing, building the masked
forward and verifying. --profile METHOD prints a cProfile of that engine's timed rounds.

Engines run in turn, round after round; the fastest round of each is reported (host noise only
ever adds time).
"""
import argparse
import cProfile
import pstats
import time

import numpy as np
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model

METHODS = {"ngram": {"method": "ngram", "num_tokens": 4, "max_ngram": 3},
           "draft": {"method": "draft", "model": None, "num_tokens": 4},
           "lookahead": {"method": "lookahead", "window": 5, "ngram": 3, "guesses": 5}}


def bigram_model(model):
    """model's forward replaced by one whose logits at token t peak at (7 t + 3) mod vocab."""
    vocab = model.args.vocab_size

    def forward(input_ids, positions, batch, kv_caches, logits_indices=None):
        ids = input_ids if logits_indices is None else input_ids[logits_indices]
        logits = torch.zeros(len(ids), vocab)
        logits[torch.arange(len(ids)), (7 * ids + 3) % vocab] = 1.0
        return logits
    model.forward = forward


def stub_forward(llm):
    """Decode forwards return zero logits and their greedy choices, as a replayed graph does,
    without running the model (prompt steps still run it)."""
    logits = torch.zeros(llm.scheduler.max_num_seqs, llm.model.args.vocab_size)
    choices = torch.zeros(llm.scheduler.max_num_seqs, 2, dtype=torch.float64)
    llm.runner._decode = lambda computing: (logits[:len(computing)], choices[:len(computing)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--drafting", action="store_true", help="bigram stub, speculative engines always drafting")
    parser.add_argument("--profile", choices=["plain", *METHODS], help="cProfile this engine's timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The held-out windows, each made distinct by a shift when the batch needs more of them than there are.
    windows = np.load(TINY_CODE / "heldout.npy")
    prompts = [((windows[i % len(windows), :64].astype(int) + i // len(windows)) % 4096).tolist()
               for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engines = {"plain": LLM(tiny_model("target"), device="cpu", num_blocks=2048)}
    for name, config in METHODS.items():
        config = dict(config, model=str(tiny_model("draft"))) if "model" in config else config
        if args.drafting:
            config = dict(config, adaptive=False)
        engines[name] = llm = LLM(tiny_model("target"), device="cpu", num_blocks=2048, speculative=config)
        if not args.drafting:
            llm.speculator.switch.drafting = lambda batch_size: False  # the switch holding drafting off
    for llm in engines.values():
        if args.drafting:
            bigram_model(llm.model)
            if llm.speculator is not None and hasattr(llm.speculator.proposer, "model"):  # the draft model
                bigram_model(llm.speculator.proposer.model)
        else:
            stub_forward(llm)
    profiler = cProfile.Profile()
    best = dict.fromkeys(engines, float("inf"))
    for _ in range(args.rounds):
        for name, llm in engines.items():
            ids = [llm.add_request(prompt, params) for prompt in prompts]
            while llm.scheduler.waiting or any(s.num_cached < len(s.prompt) for s in llm.scheduler.running):
                llm.step()  # the prompts' prefill: not timed
            steps, start = 0, time.perf_counter()
            if name == args.profile:
                profiler.enable()
            while llm.scheduler.has_work():
                llm.step()
                steps += 1
            profiler.disable()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
            for request_id in ids:
                llm.take_output(request_id)
    mode = "drafting at every step" if args.drafting else "never drafting"
    for name, seconds in best.items():
        print(f"{name + ('' if name == 'plain' else ', ' + mode):36s} {seconds * 1e6:7.1f} us per decode step "
              f"(batch {args.batch}), {seconds / best['plain']:.2f}x plain")
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    main()
