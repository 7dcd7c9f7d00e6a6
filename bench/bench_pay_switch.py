"""What the engine-wide speculation switch (pagedlm/speculative/pay_switch.py) is worth: plain decoding
against each method with the switch on ("adaptive", the default) and off, on the shipped code
pair and its held-out windows. The engines run in turn, round after round, so that drift in the
machine's speed hits every column alike; medians over the rounds.

    python bench/bench_pay_switch.py [--batch 16] [--rounds 4] [--device cpu] [--append-results]
"""
import argparse
import datetime
import statistics
import time

import numpy as np
import torch

from bench_common import cpu_name, git_commit, write_results
from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model

METHODS = {"ngram k=4 n=3": dict(method="ngram", num_tokens=4, max_ngram=3),
           "draft k=4": dict(method="draft", model="DRAFT", num_tokens=4),
           "lookahead W=5 N=3 G=5": dict(method="lookahead", window=5, ngram=3, guesses=5)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out"), parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # these models are too small to gain from threads
    windows = np.load(TINY_CODE / "heldout.npy")
    prompts = [w[:64].astype(int).tolist() for w in windows[:args.batch]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engines = {"plain": LLM(tiny_model("target"), device=args.device, num_blocks=4096)}
    for name, config in METHODS.items():
        config = {k: (str(tiny_model("draft")) if v == "DRAFT" else v) for k, v in config.items()}
        for adaptive in (True, False):
            engines[(name, adaptive)] = LLM(tiny_model("target"), device=args.device, num_blocks=4096,
                                            speculative=dict(config, adaptive=adaptive))
    for llm in engines.values():  # warm-up: the CUDA graphs most steps need, the switch's first measurements
        llm.generate(prompts, params, use_tqdm=False)
    rates = {key: [] for key in engines}
    for _ in range(args.rounds):
        for key, llm in engines.items():
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            if args.device != "cpu":
                torch.cuda.synchronize()
            rates[key].append(len(prompts) * args.max_tokens / (time.perf_counter() - start))
    median = {key: statistics.median(r) for key, r in rates.items()}
    card = torch.cuda.get_device_name() if args.device != "cpu" else cpu_name()
    lines = [f"### The speculation switch — {card}, {datetime.date.today()}, commit {git_commit()}", "",
             f"`python bench/bench_pay_switch.py` — shipped code pair, batch {len(prompts)}, "
             f"{args.max_tokens} greedy "
             f"tokens per request, engines in turn over {args.rounds} rounds, median tokens/s. Plain decoding: "
             f"{median['plain']:,.0f} tokens/s.", "",
             "| method | switch on (default) | vs plain | switch off | vs plain "
             "| switch on: steps that drafted | its rates, drafting / not (tokens/s) |",
             "|---|---|---|---|---|---|---|"]
    for name in METHODS:
        on, off = median[(name, True)], median[(name, False)]
        switch = engines[(name, True)].speculator.switch
        drafted = switch.recorded[True] / max(1, sum(switch.recorded.values()))
        rates = " / ".join(f"{switch.rate(len(prompts), mode) or 0:,.0f}" for mode in (True, False))
        lines.append(f"| {name} | {on:,.0f} | {on / median['plain']:.2f}x | {off:,.0f} | {off / median['plain']:.2f}x "
                     f"| {drafted:.0%} | {rates} |")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
