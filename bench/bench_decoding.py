"""Decoding strategies on pagedlm.LLM: plain greedy decoding against each speculative method
(draft k in {2, 4, 6}, ngram, jacobi, lookahead at a few W/N/G) at batch 1 and batch 16, on
CPU or GPU; and the KV memory that sharing saves in beam search and parallel sampling.

    python bench/bench_decoding.py [--target DIR --draft DIR --prompts FILE] [--append-results]

Without --target/--draft: the shipped code pair (pagedlm.data.tiny_model) when this install has
it, else random-weight models (a smoke run). --prompts: a text file, one prompt per line (or a
.jsonl with a "prompt" field) tokenized with the target's tokenizer, or a .npy of held-out token
windows (the first --prompt-len tokens of each); by default the shipped pair's heldout.npy,
else random token prompts that repeat themselves a little.
Every run is greedy with ignore_eos, in bfloat16 by default (--dtype; the engine's default on the
GPU). Each method should emit plain decoding's tokens: the table counts the requests whose
tokens are identical (in bf16 a near-tie between two logits may break differently in the
verification forward, which computes the same logits with other kernels; in float32 all match).

Every engine is built first and warmed up by one pass; then the engines are timed in turn,
round after round (--rounds), so that drift in the machine's speed hits every column alike.
Columns: tokens/s (generated tokens over wall time, prefill included; the median over the
rounds), speedup over plain at the same batch, acceptance α (the per-token acceptance that the
measured mean accepted length implies, under i.i.d. acceptance), tokens per target forward,
and for the draft method the analytic expectation (1 - α^(k+1)) / ((1 - α)(k·c + 1)), c the
measured draft/target step-cost ratio (plain tokens/s of the target over the draft's, same batch).
"""
import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from bench_common import cpu_name, git_commit, write_results
from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model
from pagedlm.models import random_model

RANDOM_TARGET = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)
RANDOM_DRAFT = dict(RANDOM_TARGET, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
METHODS = [("plain", None)] + [
    (f"draft k={k}", {"method": "draft", "model": "DRAFT", "num_tokens": k}) for k in (2, 4, 6)] + [
    ("ngram k=4 n=3", {"method": "ngram", "num_tokens": 4, "max_ngram": 3}),
    ("jacobi n=4", {"method": "jacobi", "num_tokens": 4}),
    ("lookahead W=5 N=3 G=5", {"method": "lookahead", "window": 5, "ngram": 3, "guesses": 5}),
    ("lookahead W=7 N=4 G=7", {"method": "lookahead", "window": 7, "ngram": 4, "guesses": 7}),
    ("lookahead W=4 N=6 G=12", {"method": "lookahead", "window": 4, "ngram": 6, "guesses": 12}),
    ("lookahead W=7 N=4 G=7, window pool only",
     {"method": "lookahead", "window": 7, "ngram": 4, "guesses": 7, "pool_from_prompt": False}),
]


def load_prompts(path, llm, count, prompt_len, seed=0):
    if path is None:
        g = torch.Generator().manual_seed(seed)
        vocab = llm.model.args.vocab_size
        return [(torch.randint(vocab, (24,), generator=g).tolist() * 4) for _ in range(count)]
    if path.endswith(".npy"):
        import numpy as np
        windows = np.load(path)
        if len(windows) < count:
            raise ValueError(f"--prompts: {path} has {len(windows)} windows, the run needs {count}")
        return [w[:prompt_len].astype(int).tolist() for w in windows[:count]]
    lines = Path(path).read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines] if path.endswith(".jsonl") else lines
    texts = [t for t in texts if t.strip()]
    if len(texts) < count:
        raise ValueError(f"--prompts: {path} has {len(texts)} prompts, the run needs {count}")
    return [llm.tokenizer.encode(t).ids for t in texts[:count]]


def implied_alpha(mean_accepted, k):
    """α with α(1 - α^k)/(1 - α) = mean accepted drafts per step (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        expected = sum(mid ** i for i in range(1, k + 1))
        low, high = (mid, high) if expected < mean_accepted else (low, mid)
    return (low + high) / 2


class Engine:
    """One LLM and its timed passes over the prompts, `batch` requests at a time."""

    def __init__(self, model, speculative, batch, args):
        self.llm = LLM(model, device=args.device, dtype=args.dtype, num_blocks=args.num_blocks,
                       speculative=speculative)
        self.batch, self.args, self.speeds, self.outputs = batch, args, [], []

    def timed_pass(self, prompts, max_tokens):
        """Generates for every prompt; appends tokens/s (prefill included) to self.speeds."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        synchronize = torch.cuda.synchronize if self.args.device != "cpu" else (lambda: None)
        self.outputs, elapsed = [], 0.0
        for start in range(0, len(prompts), self.batch):
            synchronize()
            begin = time.perf_counter()
            self.outputs += self.llm.generate(prompts[start:start + self.batch], params, use_tqdm=False)
            synchronize()
            elapsed += time.perf_counter() - begin
        self.speeds.append(sum(len(o.outputs[0].token_ids) for o in self.outputs) / elapsed)

    def result(self):
        mean = lambda key: sum(o.metrics.get(key, 0.0) for o in self.outputs) / len(self.outputs)  # noqa: E731
        return {"tokens_per_s": statistics.median(self.speeds), "tokens": [o.outputs[0].token_ids for o in self.outputs],
                "mean_accepted": mean("mean_accepted_length"), "tokens_per_forward": mean("tokens_per_forward") or 1.0,
                "drafting_s": mean("drafting_time_s")}


def measure(engines, prompts, args):
    """Every engine warmed up by one pass (its CUDA graphs, the switch's first measurements),
    then timed round after round in turn, so that drift in the machine's speed (clocks, the
    host's load) hits every engine alike; each engine's median over the rounds."""
    for engine in engines.values():
        engine.timed_pass(prompts, args.max_tokens)
        engine.speeds.clear()
    for _ in range(args.rounds):
        for engine in engines.values():
            engine.timed_pass(prompts, args.max_tokens)
    return {key: engine.result() for key, engine in engines.items()}


def parallel_sampling_saving(target, prompts, n, args):
    """KV blocks that n samples sharing their prompt save against unshared copies, over the steps."""
    llm = LLM(target, device=args.device, dtype=args.dtype, num_blocks=args.num_blocks, enable_prefix_caching=False)
    for p in prompts:
        llm.add_request(p, SamplingParams(n=n, temperature=1.0, max_tokens=args.max_tokens, seed=0))
    shared = unshared = 0
    while llm.scheduler.has_work():
        llm.step()
        seqs = [s.seq_id for s in llm.scheduler.running]
        tables = [llm.block_manager.block_table(s) for s in seqs]
        shared += len({b for t in tables for b in t})
        unshared += sum(len(t) for t in tables)
    return 1 - shared / unshared


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target"), parser.add_argument("--draft"), parser.add_argument("--prompts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt from a .npy of windows")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9, help="timed passes per engine, in turn; the median is shown")
    parser.add_argument("--methods", nargs="+", help="names (prefixes) of the methods to run; plain always runs")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out"), parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    args.dtype = dtype = getattr(torch, args.dtype)
    if args.target is None and (TINY_CODE / "target" / "config.json").is_file():
        args.target, args.draft = str(tiny_model("target")), args.draft or str(tiny_model("draft"))
        args.prompts = args.prompts or (str(TINY_CODE / "heldout.npy") if (TINY_CODE / "heldout.npy").is_file()
                                        else None)
    target = args.target or random_model(RANDOM_TARGET, seed=0, dtype=dtype, device=args.device)
    draft = args.draft or random_model(RANDOM_DRAFT, seed=1, dtype=dtype, device=args.device)
    prompts = load_prompts(args.prompts, LLM(target, device=args.device, num_blocks=16), args.num_prompts,
                           args.prompt_len)
    methods = [m for m in METHODS if m[1] is None or not args.methods or any(m[0].startswith(p) for p in args.methods)]

    rows, spreads = [], []
    for batch in args.batches:
        engines = {"plain": Engine(target, None, batch, args), "draft alone": Engine(draft, None, batch, args)}
        for name, config in methods[1:]:
            if config.get("model") == "DRAFT":
                config = dict(config, model=draft)
            # The method as it is (switch off: its α and compression), and with the switch on.
            engines[name, False] = Engine(target, dict(config, adaptive=False), batch, args)
            engines[name, True] = Engine(target, config, batch, args)
        # Short passes time poorly: at larger batches each pass runs the prompts several times.
        results = measure(engines, prompts * max(1, batch // 4), args)
        plain = results["plain"]
        speeds = engines["plain"].speeds
        spreads.append(f"batch {batch} {min(speeds) / plain['tokens_per_s']:.2f}-{max(speeds) / plain['tokens_per_s']:.2f}")
        cost_ratio = plain["tokens_per_s"] / results["draft alone"]["tokens_per_s"]
        for name, config in methods:
            result = plain if config is None else results[name, False]
            switched = plain if config is None else results[name, True]
            same = sum(a == b for a, b in zip(result["tokens"], plain["tokens"]))
            same += sum(a == b for a, b in zip(switched["tokens"], plain["tokens"]))
            k = (config or {}).get("num_tokens")
            analytic = ""
            alpha = ""
            if config is not None and config["method"] in ("draft", "ngram", "jacobi"):
                a = implied_alpha(result["mean_accepted"], k)
                alpha = f"{a:.2f}"
                if config["method"] == "draft":
                    per_step = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
                    analytic = f"{per_step / (k * cost_ratio + 1):.2f}x (c={cost_ratio:.2f})"
            rows.append(f"| {batch} | {name} | {result['tokens_per_s']:.1f} | "
                        f"{result['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {alpha} | "
                        f"{result['tokens_per_forward']:.2f} | {result['drafting_s']:.3f} | {analytic} | "
                        f"{switched['tokens_per_s']:.1f} | {switched['tokens_per_s'] / plain['tokens_per_s']:.2f}x | "
                        f"{same} of {2 * len(plain['tokens'])} |")
            print(rows[-1], flush=True)
        del engines, results

    beam_llm = LLM(target, device=args.device, dtype=args.dtype, num_blocks=args.num_blocks)
    beams = beam_llm.beam_search(prompts[:4], BeamSearchParams(beam_width=4, max_tokens=args.max_tokens))
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else cpu_name()
    models = f"target {args.target}, draft {args.draft}" if args.target else "random-weight target and draft"
    text = "\n".join([
        f"### Decoding strategies — {datetime.date.today()}, {device_name}, commit {git_commit()}", "",
        f"`python bench/bench_decoding.py` — {models}; {len(prompts)} prompts "
        f"({'from ' + args.prompts if args.prompts else 'random, self-repeating'}), greedy, {args.max_tokens} "
        f"tokens each, {dtype}; every engine warmed up by one pass, then timed in turn over {args.rounds} rounds "
        "(at batch b a pass runs the prompts max(1, b/4) times), medians. On the GPU every forward but prompt prefill "
        "replays a CUDA graph: plain decode steps, verification (VarlenGraphs), the draft's catch-up and its "
        "greedy chain (DraftChainGraphs). Each method runs twice: as it is (the speculation switch off: its "
        "speed, α and compression) and as by default (the switch of pay_switch.py on: it stops drafting greedy "
        "requests while drafting does not pay).",
        "",
        "| batch | method | tokens/s | speedup | α | tokens/forward | drafting s/request | analytic (draft) "
        "| switch on: tokens/s | speedup | runs equal to plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Plain decoding's passes spread (slowest-fastest over their median): {', '.join(spreads)}.", "",
        f"KV memory saved by sharing blocks: beam search (width 4, {len(beams)} prompts) "
        f"{beams[0].metrics['kv_memory_saved']:.1%}; parallel sampling (n=4) "
        f"{parallel_sampling_saving(target, prompts[:4], 4, args):.1%}.", ""])
    write_results(text, args.out, args.append_results)


if __name__ == "__main__":
    main()
