"""The `pagedlm` command: `info` (build, driver and GPUs), `demo` (the engine serving
synthetic requests, or the block manager alone on a simulated workload), `generate` (text
from a model folder, the shipped code model by default), `serve` (an OpenAI-compatible
server), `scaling` (parameter, FLOP and memory estimators, scaling laws).

Mistakes a user makes (a bad option, a missing folder, no GPU, a missing extra) end in one
line on stderr and exit status 2; PAGEDLM_TRACEBACK=1 shows the traceback instead."""
import argparse
import os
import statistics
import sys
import time

DEFAULT_PROMPT = "def fibonacci(n):"  # what the shipped code model writes when asked nothing


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, unless it has none (None or a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "%(default)" in text or "(default" in text or no_default or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class UsageError(Exception):
    """A mistake of the user's, reported as one line."""


def _info(args):
    import pagedlm
    from pagedlm import _C

    print(f"pagedlm {pagedlm.__version__}")
    print(f"python {sys.version.split()[0]}")
    if _C.cuda_compiled:
        major, minor = divmod(_C.cuda_runtime_version // 10, 100)
        print(f"CUDA kernels: compiled in for {_C.cuda_architectures} "
              f"(CUDA runtime {major}.{minor}, linked statically)")
    else:
        print("CUDA kernels: not compiled (CPU path only)")
    try:
        import torch
        print(f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})")
    except ImportError:
        print("torch: not installed (pip install torch)")
        return
    from pagedlm._device import cuda_driver_version, cuda_unavailable_reason

    driver = cuda_driver_version()
    print("NVIDIA driver: " + (f"supports CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "none found"))
    devices, _ = _C.cuda_devices()
    for d in devices:
        cc = ".".join(map(str, d["compute_capability"]))
        arch = d["kernel_architecture"]
        kernels = (f"kernels compiled for sm_{arch}" if arch else "no kernels in this build") if _C.cuda_compiled else ""
        print(f"GPU {d['index']}: {d['name']}, compute capability {cc}, {d['multiprocessors']} SMs, "
              f"{d['total_memory'] / 2**30:.1f} GiB" + (f"; {kernels}" if kernels else ""))
    reason = cuda_unavailable_reason()
    print(f"device: {'cuda' if reason is None else 'cpu'}" + (f" ({reason})" if reason else ""))


def _device(requested):
    from pagedlm._device import resolve_device
    try:
        return resolve_device(requested)
    except ValueError as err:
        raise UsageError(f"--{err}") from None


def _model_folder(args):
    """--model, checked to be a model folder, else the model shipped in the package."""
    if args.model is None:
        from pagedlm.data import tiny_model
        return tiny_model("target")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: no such folder")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model}: not a model folder (it has no config.json)")
    return args.model


# The engine demo's workload per device: a CPU finishes in well under a minute on 2 cores.
DEMO_WORKLOADS = {"cpu": dict(requests=48, max_prompt=192, max_new_tokens=32),
                  "cuda": dict(requests=300, max_prompt=512, max_new_tokens=64)}


def _demo(args):
    return _engine_demo(args) if not args.block_manager else _block_manager_demo(args)


def _block_manager_demo(args):
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
    _print_rows([
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
    ])


def _print_rows(rows):
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _engine_demo(args):
    """pagedlm.LLM serving synthetic requests on the device, sized to it, with the shipped
    model (or --model, or with --random-weights a small random Llama)."""
    import torch
    from tqdm import tqdm

    from pagedlm.llm import LLM, SamplingParams
    from pagedlm.models import random_model
    from pagedlm.workload import synthetic_requests

    device = _device(args.device)
    workload = DEMO_WORKLOADS[device.type]
    options = dict(device=device, block_size=args.block_size, num_blocks=args.num_blocks, seed=args.seed)
    print(f"Loading the model on {device} ...", flush=True)
    if args.random_weights:
        config = dict(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
        model = random_model(config, seed=args.seed, device=device,
                             dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        llm, what = LLM(model, **options), f"a random {model.args.num_layers}-layer Llama"
    else:
        folder = _model_folder(args)
        llm, what = LLM(folder, **options), f"the model in {folder}" if args.model else "the shipped code model"
    positions = llm.model.args.max_position_embeddings  # requests stay within what the model was trained on
    max_new = min(workload["max_new_tokens"], positions // 4)
    requests = synthetic_requests(args.requests or workload["requests"], seed=args.seed,
                                  max_prompt=min(workload["max_prompt"], positions - max_new),
                                  max_new_tokens=max_new, vocab_size=llm.model.args.vocab_size)
    params = [SamplingParams(n=r.num_samples, temperature=0.8, max_tokens=r.max_new_tokens, ignore_eos=True,
                             seed=i) for i, r in enumerate(requests)]
    expected = sum(p.n * p.max_tokens for p in params)
    print(f"Serving {len(requests)} synthetic requests ({expected:,} output tokens, 30% sampled 2-4 ways, "
          f"half behind shared system prompts) with {what}")
    start = time.perf_counter()
    ids = [llm.add_request(r.prompt, p) for r, p in zip(requests, params)]
    utilization, steps = [], 0
    with tqdm(total=expected, unit=" tokens", disable=args.quiet) as bar:
        while llm.scheduler.has_work():
            bar.update(llm.step())
            steps += 1
            utilization.append(llm.block_manager.stats()["utilization"])
    elapsed = time.perf_counter() - start
    outputs = [llm.take_output(r) for r in ids]
    generated = sum(len(o.token_ids) for r in outputs for o in r.outputs)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in outputs)
    cached = sum(r.metrics["cached_prompt_tokens"] for r in outputs)
    print()
    _print_rows([
        ("output tokens", f"{generated:,} in {elapsed:.1f} s: {generated / elapsed:,.0f} tokens/s on {device}"),
        ("engine steps", f"{steps:,}"),
        ("KV utilization", f"{statistics.fmean(utilization or [0]):.1%} of allocated slots hold tokens (mean step)"),
        ("preemptions", f"{llm.scheduler.preemptions:,}"),
        ("prefix-cache hits", f"{cached:,} of {prompt_tokens:,} prompt tokens ({cached / max(prompt_tokens, 1):.0%})"),
    ])


def _generate(args):
    from pagedlm.llm import LLM, SamplingParams

    llm = LLM(_model_folder(args), device=_device(args.device))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for output in llm.generate(args.prompts, params, use_tqdm=False):
        completion = output.outputs[0]
        print(f"{output.prompt}{completion.text}")
        print(f"[{len(completion.token_ids)} tokens, {completion.finish_reason}; "
              f"first token after {output.metrics['time_to_first_token'] * 1e3:.0f} ms]", file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(prog="pagedlm", formatter_class=HelpFormatter,
                                     description="Paged KV-cache kernels and an inference engine for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)

    info = command("info", "version, CUDA build, NVIDIA driver and visible GPUs")
    info.set_defaults(func=_info)

    demo = command("demo", "the engine serving synthetic requests with continuous batching, sized to the device "
                           "(--block-manager: the block manager alone, on a simulated workload)")
    demo.add_argument("--requests", type=int, help="how many requests (default: 48 on a CPU, 300 on a GPU; "
                                                   "1,000 with --block-manager)")
    demo.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is usable)")
    demo.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: the engine's sizing; "
                                                     "16384 with --block-manager)")
    demo.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    demo.add_argument("--seed", type=int, default=0, help="seed of the workload and of sampling")
    demo.add_argument("--model", help="a model folder instead of the shipped code model")
    demo.add_argument("--random-weights", action="store_true", help="a small random-weight Llama instead")
    demo.add_argument("--block-manager", action="store_true",
                      help="replay a simulated workload on the block manager alone (no model, no torch)")
    demo.add_argument("--max-running", type=int, default=256, help="with --block-manager: sequences at once")
    demo.add_argument("--no-prefix-caching", action="store_true", help="with --block-manager: no prefix cache")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    generate = command("generate", "generate text with a model folder (the shipped code model by default)")
    generate.add_argument("prompts", nargs="*", default=[DEFAULT_PROMPT],
                          help=f"one or more prompts (default: {DEFAULT_PROMPT!r})")
    generate.add_argument("--model", help="folder with config.json, *.safetensors and tokenizer.json "
                                           "(default: the code model shipped in the package)")
    generate.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, default=0, help="seed of sampling")
    generate.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is usable)")
    generate.set_defaults(func=_generate)

    from pagedlm.scaling.cli import add_parser as add_scaling_parser
    from pagedlm.serving.cli import add_parser as add_serve_parser
    add_serve_parser(sub)
    add_scaling_parser(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pagedlm._extras import MissingExtraError
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"pagedlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, MissingExtraError) as err:
        if os.environ.get("PAGEDLM_TRACEBACK") == "1":
            raise
        print(f"pagedlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
