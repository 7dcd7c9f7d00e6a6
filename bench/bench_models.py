"""Model families through the engine, and the grouped expert computation (docs/models.md).

1. The standard engine workload of bench_engine.py (256 requests, prompts of 64-512 random
   tokens, 128 greedy output tokens each, EOS ignored), in bf16 through pagedlm.LLM, on random
   models shaped like Qwen3-1.7B, Gemma-2-2B (sliding and global layers alternating, soft caps)
   and Mixtral (8 experts, top 2) scaled down to fit one GPU: output tokens/s.
2. The mixture-of-experts MLP alone at Mixtral's shape: the grouped computation (tokens sorted
   by expert, torch._grouped_mm; and the loop over sorted segments) against the naive loop that
   masks the tokens of each expert in turn (transformers' way), for decode-sized and
   prefill-sized batches.

    python bench/bench_models.py [--models qwen3,gemma2,mixtral] [--out FILE] [--append-results]
    python bench/bench_models.py --smoke     # tiny shapes and workload, any device (CPU included)
"""
import argparse
import datetime
import gc
import time

import torch

from bench_common import copy_bandwidth, cpu_name, git_commit, matmul_rate, write_results
from engine_workloads import ModelShape, output_tokens, roofline_seconds, standard
from pagedlm import LLM, SamplingParams
from pagedlm.models import LlamaForCausalLM, ModelArgs
from pagedlm.models.loader import _keep_rope_in_f32
from pagedlm.models.moe import expert_mlp, grouped_mm_available, naive_expert_mlp, route

QWEN3_1_7B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
GEMMA2_2B = dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, sliding_window=4096,
                 query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
# Mixtral-8x7B's layer (hidden 4096, 8 experts of 14336, top 2, 32/8 heads of 128) with 8 of its
# 32 layers: about 12B parameters, 23 GiB in bf16.
MIXTRAL_SCALED = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                      num_local_experts=8, num_experts_per_tok=2)
MODELS = {"qwen3": ("Qwen3-1.7B shape", QWEN3_1_7B), "gemma2": ("Gemma-2-2B shape", GEMMA2_2B),
          "mixtral": ("Mixtral-8x7B layers, 8 of 32", MIXTRAL_SCALED)}
SMOKE_DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=16)


def random_on_device(config, device, dtype, std=0.02):
    """pagedlm's model for config with seeded random weights (norms one), built in dtype straight
    on the device: no float32 copy on the host, no checkpoint on disk (a 12B model's would take
    minutes to write and read)."""
    args = ModelArgs.from_hf(config, source="config")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(args)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
    _keep_rope_in_f32(model, device)
    return model.eval()


def run_engine(model, prompts, max_tokens, device):
    llm = LLM(model, device=device)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                           use_tqdm=False)
    _sync(device)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    extra = dict(preemptions=llm.scheduler.preemptions, graphs=llm.runner.graphs.captures if llm.runner.graphs else 0)
    del llm
    return generated / elapsed, extra


def bench_experts(tokens_list, hidden, inter, experts, top_k, device, dtype, repeats):
    """{tokens: {method: milliseconds}} for the expert MLP alone, after checking the methods agree."""
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.02).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.02).to(device, dtype)
    results = {}
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
        weights, ids = route(torch.randn(tokens, experts, generator=g).to(device), top_k, renormalize=True)
        methods = {"naive loop": lambda: naive_expert_mlp(x, weights, ids, w13, w2, "silu"),
                   "sorted segments, loop": lambda: expert_mlp(x, weights, ids, w13, w2, "silu", method="loop")}
        if grouped_mm_available(x, hidden, inter, 2 * inter):
            methods["sorted, torch._grouped_mm"] = lambda: expert_mlp(x, weights, ids, w13, w2, "silu",
                                                                       method="grouped")
        reference = methods["naive loop"]().float()
        times = {}
        for name, fn in methods.items():
            error = ((fn().float() - reference).norm() / reference.norm()).item()
            if error > 2e-2:
                raise AssertionError(f"{name} differs from the naive loop by {error:.3g} at {tokens} tokens")
            times[name] = _time(fn, device, repeats)
        results[tokens] = times
    return results


def _time(fn, device, repeats):
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats * 1e3


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="qwen3,gemma2,mixtral")
    parser.add_argument("--out")
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    names = args.models.split(",")
    if args.smoke:
        requests = standard(count=8, prompt_lens=(5, 40), output_tokens=8, token_range=(1, 512))
    else:
        requests = standard(token_range=(1000, 32000))  # inside every vocabulary
    prompts, max_tokens = [r.prompt for r in requests], requests[0].output_tokens
    lines = [f"### Model families, {'smoke' if args.smoke else 'standard'} workload — {card}, "
             f"{datetime.date.today()}, commit {git_commit()}", "",
             f"{len(prompts)} requests, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} random tokens, "
             f"{max_tokens} greedy output tokens each (EOS ignored), {str(dtype).removeprefix('torch.')}, "
             f"pagedlm.LLM defaults (CUDA graphs on the GPU), random weights."]
    if device == "cuda":
        flops, bandwidth = matmul_rate(), copy_bandwidth()
        lines += ["", f"Rooflines as the engine bench computes them (bench/engine_workloads.py), at the measured "
                      f"{flops / 1e12:.0f} TFLOP/s and {bandwidth / 1e9:,.0f} GB/s."]
    lines += ["", "| model | parameters | output tokens/s | of the roofline | preemptions | CUDA graphs |",
              "|---|---|---|---|---|---|"]
    for name in names:
        label, config = MODELS[name]
        if args.smoke:
            config = {**config, **SMOKE_DIMS}
            config.pop("query_pre_attn_scalar", None)
            if name == "mixtral":
                config["num_local_experts"] = 4
        model = random_on_device(config, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        rate, extra = run_engine(model, prompts, max_tokens, device)
        del model
        gc.collect()
        print(f"{label}: {rate:,.0f} output tokens/s {extra}", flush=True)
        share = "—"
        if device == "cuda":
            prefill, decode = roofline_seconds(requests, ModelShape.of(config), flops, bandwidth)
            share = f"{rate / (output_tokens(requests) / (prefill + decode)):.0%}"
        lines.append(f"| {label} | {params / 1e9:.3g} B | {rate:,.0f} | {share} | {extra['preemptions']} "
                     f"| {extra['graphs']} |")
        if device == "cuda":
            torch.cuda.empty_cache()
    # The expert MLP alone, at Mixtral's layer shape (smoke: small).
    hidden, inter, experts, top_k = (64, 128, 4, 2) if args.smoke else (4096, 14336, 8, 2)
    token_counts = (1, 16, 64) if args.smoke else (1, 32, 256, 2048, 8192)
    results = bench_experts(token_counts, hidden, inter, experts, top_k, device, dtype, 3 if args.smoke else 20)
    methods = list(next(iter(results.values())))
    lines += ["", f"Expert MLP alone: hidden {hidden}, {experts} experts of {inter}, top {top_k}, "
                  f"{str(dtype).removeprefix('torch.')}; milliseconds per call (mean of repeats), "
                  f"outputs checked against the naive loop first.", "",
              "| tokens | " + " | ".join(methods) + " | naive / best |", "|---" * (len(methods) + 2) + "|"]
    for tokens, times in results.items():
        best = min(times.values())
        lines.append(f"| {tokens} | " + " | ".join(f"{times[m]:.3f}" for m in methods)
                     + f" | {times['naive loop'] / best:.2f}x |")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
