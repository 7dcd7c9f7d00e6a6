"""End-to-end engine benchmark (bench/README.md): a random-weight Llama shaped like
Llama-3.2-1B in bf16 serving 256 greedy requests (prompts of 64-512 random tokens, 128
output tokens each, EOS ignored), through pagedlm.LLM and, side by side in the same run,
transformers' `generate` (static batching, batch 64) and `generate_batch` (continuous
batching, attention "paged|sdpa"). Both engines load the same weights from one folder.

    python bench/bench_engine.py [--out FILE] [--append-results] [--no-anchors]
    python bench/bench_engine.py --smoke     # a tiny model and workload, any device

Figures: output tokens/s over the whole run (wall clock, after a warm-up), KV utilization
(tokens stored / allocated slots, mean over steps; pagedlm only), peak GPU memory, and how
many requests' first token and first 16 tokens equal transformers' static-batch output. A
random-weight model's logits are nearly flat, so bf16 rounding flips near-ties and greedy
continuations part early in every engine (transformers' two paths included); correctness is
the GPU tests' job (tests/test_engine_gpu.py).
"""
import argparse
import datetime
import gc
import tempfile
import time

import torch
import transformers

from bench_common import cpu_name, git_commit, write_results
from pagedlm import LLM, SamplingParams

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
COMPARED_TOKENS = 16


def workload(count, seed=0, prompt_lens=(64, 512), token_range=(1000, 100000)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (count,), generator=g)
    return [torch.randint(*token_range, (int(n),), generator=g).tolist() for n in lengths]


def save_model(config, folder, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    return model


def run_pagedlm(folder, prompts, max_tokens, device):
    llm = LLM(folder, device=device, dtype=torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync(device)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    start = time.perf_counter()
    ids = [llm.add_request(p, params) for p in prompts]
    utilization, steps = [], 0
    while llm.scheduler.has_work():
        llm.step()
        steps += 1
        utilization.append(llm.block_manager.stats()["utilization"])
    _sync(device)
    elapsed = time.perf_counter() - start
    outputs = [llm.take_output(r).outputs[0].token_ids for r in ids]
    extra = dict(utilization=sum(utilization) / len(utilization), steps=steps,
                 preemptions=llm.scheduler.preemptions, kv_blocks=llm.block_manager.num_blocks,
                 graphs=llm.runner.graphs.captures if llm.runner.graphs else 0)
    del llm
    return outputs, elapsed, extra


def run_static(model, prompts, max_tokens, batch_size):
    """transformers generate, batches of batch_size in the given order, left-padded."""
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0)
        outputs += out[:, width:].tolist()
    _sync(model.device.type)
    return outputs, time.perf_counter() - start


def run_continuous(model, prompts, max_tokens):
    """transformers generate_batch (continuous batching over its paged cache)."""
    model.set_attn_implementation("paged|sdpa")
    config = transformers.GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                           eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    _sync(model.device.type)
    elapsed = time.perf_counter() - start
    return [r.generated_tokens for r in results.values()], elapsed


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    if args.smoke:
        config, prompts, max_tokens = TINY, workload(12, prompt_lens=(5, 40), token_range=(1, 512)), 8
    else:
        config, prompts, max_tokens = LLAMA_3_2_1B, workload(256), 128
    total = len(prompts) * max_tokens
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(config, folder, device)
        model.cpu()  # out of the way while pagedlm sizes its cache from free memory
        torch.cuda.empty_cache() if device == "cuda" else None
        ours, elapsed, extra = run_pagedlm(folder, prompts, max_tokens, device)
        rows.append(["pagedlm.LLM", total / elapsed, f"{extra['utilization']:.1%}", _peak_gib(device), ours])
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
        print(f"pagedlm: {elapsed:.2f} s, {extra}", flush=True)
    if not args.no_anchors:
        model.to(device)
        for name, fn in [("transformers generate (static, batch 64)", lambda: run_static(model, prompts, max_tokens, 64)),
                         ("transformers generate_batch (paged|sdpa)", lambda: run_continuous(model, prompts, max_tokens))]:
            torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
            try:
                theirs, elapsed = fn()
            except Exception as e:  # an anchor that cannot run here is reported, not fatal
                rows.append([name, None, f"failed: {type(e).__name__}: {str(e)[:80]}", None, None])
                continue
            rows.append([name, total / elapsed, "", _peak_gib(device), theirs])
            print(f"{name}: {elapsed:.2f} s", flush=True)
    lines = [f"### Engine, {'smoke' if args.smoke else 'standard'} workload — {card}, "
             f"{datetime.date.today()}, commit {git_commit()}",
             "",
             f"{len(prompts)} requests, {max_tokens} output tokens each (greedy, EOS ignored), bf16. "
             f"pagedlm: {extra['steps']} steps, {extra['graphs']} CUDA graphs captured, "
             f"{extra['kv_blocks']:,} KV blocks preallocated (in its peak memory), "
             f"{extra['preemptions']} preemptions.",
             "",
             f"| engine | output tokens/s | KV utilization | peak memory (GiB) | equal to transformers generate: "
             f"first token / first {COMPARED_TOKENS} tokens |",
             "|---|---|---|---|---|"]
    reference = rows[1][4] if len(rows) > 1 else None
    for name, rate, util, peak, outputs in rows:
        rate_text = f"{rate:,.0f}" if rate else "—"
        peak_text = f"{peak:.1f}" if peak is not None and peak == peak else "—"
        agree = "—"
        if reference and outputs:
            agree = " / ".join(str(sum(a[:n] == b[:n] for a, b in zip(outputs, reference))) + f" of {len(outputs)}"
                               for n in (1, COMPARED_TOKENS))
        lines.append(f"| {name} | {rate_text} | {util} | {peak_text} | {agree} |")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
