"""The `pagedlm` command: `info` (build and GPU), `demo` (pagedlm.LLM serving synthetic
requests, or the block manager alone on a simulated workload), `generate` (text from a model
folder, the shipped one by default), `scaling` (parameter, FLOP and memory estimators, scaling
laws)."""
import argparse
import statistics
import sys

DEFAULT_PROMPT = "def fibonacci(n):"  # what the shipped code model writes when asked nothing


def _info(args):
    import pagedlm
    from pagedlm import _C

    print(f"pagedlm {pagedlm.__version__}")
    print(f"python {sys.version.split()[0]}")
    if _C.cuda_compiled:
        major, minor = divmod(_C.cuda_runtime_version // 10, 100)
        print(f"CUDA kernels: compiled in (CUDA runtime {major}.{minor}, linked statically)")
    else:
        print("CUDA kernels: not compiled (CPU path only)")
    devices, why_none = _C.cuda_devices()
    if devices:
        for d in devices:
            cc = ".".join(map(str, d["compute_capability"]))
            print(f"GPU {d['index']}: {d['name']}, compute capability {cc}, "
                  f"{d['multiprocessors']} SMs, {d['total_memory'] / 2**30:.1f} GiB")
    else:
        print(f"GPU: none visible ({why_none})")
    try:
        import torch
        print(f"torch {torch.__version__}")
    except ImportError:
        print("torch: not installed (needed for pagedlm.ops)")


def _demo(args):
    if not args.block_manager:
        return _engine_demo(args)
    from tqdm import tqdm

    import pagedlm
    from pagedlm.workload import simulate, synthetic_requests

    requests = synthetic_requests(args.requests or 1000, seed=args.seed)
    bm = pagedlm.BlockManager(args.num_blocks, args.block_size, enable_prefix_caching=not args.no_prefix_caching)
    print(f"Serving {len(requests)} simulated requests with {bm!r}")
    with tqdm(unit=" steps", disable=args.quiet) as bar:
        stats = simulate(bm, requests, max_running=args.max_running, seed=args.seed,
                         on_step=lambda step, s: bar.update(1))
    kv = bm.stats()
    print()
    rows = [
        ("decode steps", f"{stats.steps:,}"),
        ("tokens generated", f"{stats.generated_tokens:,}"),
        ("prompt tokens", f"{stats.prompt_tokens:,}"),
        ("  served from the prefix cache", f"{stats.cached_prompt_tokens:,} "
                                           f"({stats.cached_prompt_tokens / max(stats.prompt_tokens, 1):.0%})"),
        ("copy-on-write block copies", f"{stats.cow_copies:,}"),
        ("preemptions (recomputed later)", f"{stats.preemptions:,}"),
        ("KV utilization, paged (median step)", f"{statistics.median(stats.paged_utilization):.1%}"),
        ("KV utilization, max-length reservation", f"{statistics.median(stats.reserved_utilization):.1%}"),
        ("blocks cached for reuse at the end", f"{kv['cached_blocks']:,}"),
        ("cached blocks evicted (LRU)", f"{kv['evictions']:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _model_folder(args):
    """--model, else the model shipped in the package; None (after printing why) when neither exists."""
    if args.model:
        return args.model
    from pagedlm.data import tiny_model
    try:
        return tiny_model("target")
    except FileNotFoundError as err:
        print(f"pagedlm {args.command}: error: no --model given and {err}", file=sys.stderr)
        return None


def _engine_demo(args):
    """pagedlm.LLM serving synthetic requests on whatever device is present, with the shipped
    model (or --model, or with --random-weights a small random Llama)."""
    import time

    import torch

    from pagedlm.llm import LLM, SamplingParams
    from pagedlm.models import random_model
    from pagedlm.workload import synthetic_requests

    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = dict(device=device, block_size=args.block_size, num_blocks=args.num_blocks, seed=args.seed)
    if args.random_weights:
        config = dict(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
        model = random_model(config, seed=args.seed, device=device,
                             dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        llm, what = LLM(model, **options), f"a random {model.args.num_layers}-layer Llama"
    else:
        folder = _model_folder(args)
        if folder is None:
            return 2
        llm, what = LLM(folder, **options), str(folder)
    positions = llm.model.args.max_position_embeddings  # requests stay within what the model was trained on
    max_new = min(64, positions // 4)
    requests = synthetic_requests(args.requests or 300, seed=args.seed, max_prompt=min(512, positions - max_new),
                                  max_new_tokens=max_new, vocab_size=llm.model.args.vocab_size)
    params = [SamplingParams(n=r.num_samples, temperature=0.8, max_tokens=r.max_new_tokens, ignore_eos=True,
                             seed=i) for i, r in enumerate(requests)]
    print(f"Serving {len(requests)} synthetic requests with {what} on {device}")
    start = time.perf_counter()
    ids = [llm.add_request(r.prompt, p) for r, p in zip(requests, params)]
    utilization = []
    while llm.scheduler.has_work():
        llm.step()
        utilization.append(llm.block_manager.stats()["utilization"])
    elapsed = time.perf_counter() - start
    outputs = [llm.take_output(r) for r in ids]
    generated = sum(len(o.token_ids) for r in outputs for o in r.outputs)
    print(f"output tokens        {generated:,} in {elapsed:.1f} s ({generated / elapsed:,.0f} tokens/s)")
    print(f"KV utilization       {sum(utilization) / max(len(utilization), 1):.1%} of allocated slots (mean step)")
    print(f"preemptions          {llm.scheduler.preemptions}")
    print(f"cached prompt tokens {sum(r.metrics['cached_prompt_tokens'] for r in outputs):,}")


def _generate(args):
    from pagedlm.llm import LLM, SamplingParams

    folder = _model_folder(args)
    if folder is None:
        return 2
    llm = LLM(folder, device=args.device)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for output in llm.generate(args.prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        print(f"{output.prompt}{completion.text}")
        print(f"[{len(completion.token_ids)} tokens, {completion.finish_reason}; "
              f"first token after {output.metrics['time_to_first_token'] * 1e3:.0f} ms]", file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(prog="pagedlm", description="Paged KV-cache kernels for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, CUDA build and visible GPUs")
    info.set_defaults(func=_info)

    demo = sub.add_parser("demo", help="pagedlm.LLM serving synthetic requests with continuous batching "
                                       "(--block-manager: the block manager alone, on a simulated workload)")
    demo.add_argument("--requests", type=int, help="default: 300 (engine), 1000 (--block-manager)")
    demo.add_argument("--num-blocks", type=int, default=16384)
    demo.add_argument("--block-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", help="a model folder instead of the shipped one")
    demo.add_argument("--random-weights", action="store_true", help="a small random-weight Llama instead")
    demo.add_argument("--block-manager", action="store_true",
                      help="replay a simulated workload on the block manager alone (no model, no torch)")
    demo.add_argument("--max-running", type=int, default=256, help="with --block-manager")
    demo.add_argument("--no-prefix-caching", action="store_true", help="with --block-manager")
    demo.add_argument("--quiet", action="store_true", help="with --block-manager: no progress bar")
    demo.set_defaults(func=_demo)

    generate = sub.add_parser("generate", help="generate text with a Llama-family model folder")
    generate.add_argument("prompts", nargs="*", default=[DEFAULT_PROMPT],
                          help=f"one or more prompts (default: {DEFAULT_PROMPT!r})")
    generate.add_argument("--model", help="folder with config.json, *.safetensors, tokenizer.json "
                                           "(default: the code model shipped in the package)")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    generate.set_defaults(func=_generate)

    from pagedlm.scaling.cli import add_parser as add_scaling_parser
    add_scaling_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
