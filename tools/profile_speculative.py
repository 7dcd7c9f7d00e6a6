"""Where a speculative decoding step spends its time: cProfile of the host (cumulative, top
functions) and torch.profiler of the device kernels, for one method on the shipped code pair.

    python tools/profile_speculative.py [--method draft|ngram|lookahead|plain] [--batch 1]
                                        [--dtype bfloat16] [--out DIR] [--spec JSON]

--spec replaces the method's configuration, e.g. '{"method": "lookahead", "window": 7, "ngram": 4, "guesses": 7}'.
"""
import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import numpy as np
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model

METHODS = {"draft": {"method": "draft", "model": None, "num_tokens": 4},
           "ngram": {"method": "ngram", "num_tokens": 4, "max_ngram": 3},
           "lookahead": {"method": "lookahead", "window": 5, "ngram": 3, "guesses": 5},
           "plain": None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="draft", choices=METHODS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--spec", type=json.loads, help="a speculative configuration replacing the method's")
    args = parser.parse_args()
    config = args.spec or METHODS[args.method]
    if config is not None:
        config = dict(config, adaptive=False)
        if "model" in config:
            config["model"] = str(tiny_model("draft"))
    llm = LLM(tiny_model("target"), device="cuda", dtype=getattr(torch, args.dtype), num_blocks=4096,
              speculative=config)
    windows = np.load(TINY_CODE / "heldout.npy")
    prompts = [w[:64].astype(int).tolist() for w in windows[:args.batch]]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # captures happen here
    torch.cuda.synchronize()

    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    text.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
    text.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    out = Path(args.out) / f"profile-{args.method}-b{args.batch}.txt"
    out.write_text(text.getvalue())
    print(text.getvalue()[:3000])


if __name__ == "__main__":
    main()
