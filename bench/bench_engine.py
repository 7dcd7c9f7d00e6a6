"""End-to-end engine benchmark (bench/README.md): a random-weight Llama shaped like
Llama-3.2-1B in bf16 serving 256 greedy requests (prompts of 64-512 random tokens, 128
output tokens each, EOS ignored), through pagedlm.LLM and, side by side in the same run,
transformers' `generate` (static batching, batch 64) and `generate_batch` (continuous
batching, attention "paged|sdpa"). Both engines load the same weights from one folder.

    python bench/bench_engine.py [--workload standard|sharegpt|long-prompts] [--anchors vllm,transformers]
    python bench/bench_engine.py --smoke     # a tiny model and workload, any device
    python bench/bench_engine.py --async-scheduling both   # pagedlm without, then with async_scheduling
    python bench/bench_engine.py --workload long-prompts --async-scheduling on --anchors none --sync-debug

vLLM, when it imports, serves the same folder and requests in a process of its own
(bench/vllm_engine.py); on a GPU the table also gives the workload's roofline on that card
(bench/engine_workloads.py) and each engine's share of it.

Figures: output tokens/s over the whole run (wall clock, after a warm-up), KV utilization
(tokens stored / allocated slots, mean over every 8th step; pagedlm only), peak GPU memory, and how
many requests' first token and first 16 tokens equal transformers' static-batch output. On a
GPU, pagedlm's line also counts the caching allocator's retries and cudaFree calls during the
timed run: each synchronizes, so a step that meets one leaves the GPU idle. A
random-weight model's logits are nearly flat, so bf16 rounding flips near-ties and greedy
continuations part early in every engine (transformers' two paths included); correctness is
the GPU tests' job (tests/test_engine_gpu.py).
"""
import argparse
import datetime
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import transformers

import engine_workloads
from bench_common import StepClock, copy_bandwidth, cpu_name, git_commit, matmul_rate, write_results
from pagedlm import LLM, SamplingParams

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
COMPARED_TOKENS = 16


def save_model(config, folder, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    return model


UTILIZATION_EVERY = 8  # steps between two samples of the KV utilization


def greedy(request):
    return SamplingParams(n=request.n, temperature=0, max_tokens=request.output_tokens, ignore_eos=True)


def run_pagedlm(folder, requests, device, tensor_parallel_size=1, kv_cache_dtype="auto", disable_cascade_attn=True,
                async_scheduling=False, sync_debug=False):
    started = time.perf_counter()
    llm = LLM(folder, device=device, dtype=torch.bfloat16, tensor_parallel_size=tensor_parallel_size,
              kv_cache_dtype=kv_cache_dtype, disable_cascade_attn=disable_cascade_attn,
              async_scheduling=async_scheduling)
    start_up = time.perf_counter() - started
    prompts = [r.prompt for r in requests]
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync(device)
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    allocator = _allocator_counts(device)
    if sync_debug and device == "cuda":  # every synchronizing torch call of the timed run warns, once per place
        torch.cuda.set_sync_debug_mode("warn")
    start = time.perf_counter()
    ids = [llm.add_request(r.prompt, greedy(r)) for r in requests]
    utilization, steps, clock, captured = [], 0, StepClock(llm), llm.runner.captures
    while llm.scheduler.has_work():
        llm.step()
        steps += 1
        if steps % UTILIZATION_EVERY == 1:  # stats() walks every block: not on every timed step
            utilization.append(llm.block_manager.stats()["utilization"])
    if sync_debug and device == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    elapsed = time.perf_counter() - start
    allocator = {key: count - allocator[key] for key, count in _allocator_counts(device).items()}
    captured_in_run = llm.runner.captures - captured
    clock.remove()  # the profiled re-run below is not the timed run's
    step_times = clock.summary()
    outputs = [llm.take_output(r).outputs[0].token_ids for r in ids]
    busy = ""
    if device == "cuda" and not async_scheduling:  # (its steps overlap: the run without it measures the device)
        try:
            busy = device_busy_per_step(llm, requests)
        except Exception as e:  # a diagnostic: never the reason a run has no figures
            busy = f", device busy not measured ({type(e).__name__}: {str(e)[:80]})"
    extra = dict(utilization=sum(utilization) / len(utilization), steps=steps,
                 preemptions=llm.scheduler.preemptions, kv_blocks=llm.block_manager.num_blocks,
                 kv_tokens=llm.block_manager.num_blocks * llm.block_manager.block_size,
                 graphs=llm.runner.captures, graphs_in_run=captured_in_run, start_up=start_up, step_times=step_times + busy,
                 cascade_steps=llm.runner.cascade_steps, allocator=allocator)
    llm.close()
    del llm
    return outputs, elapsed, extra


def device_busy_per_step(llm, requests, steps=5, max_steps=400):
    """After the timed run: the workload again, each prompt's tokens shifted by one so that no
    prompt is a prefix-cache hit, until a few steps of each kind (decode, and prefill chunks
    mixed with decodes) have been profiled or max_steps have run, then everything aborted.
    Returns ', device busy per decode step X ms (...), per prefill step ...': the kernels' time
    in a step whose wall time the timed run gives; the rest is the device waiting for the host."""
    clock = StepClock(llm, profile=steps)
    vocab = llm.model.args.vocab_size
    ids = [llm.add_request([(t + 1) % vocab for t in r.prompt], greedy(r)) for r in requests]
    for _ in range(max_steps):
        if not llm.scheduler.has_work() or clock.profiled_enough():
            break
        llm.step()
    for request_id in ids:
        llm.abort(request_id)
    for kind, table in clock.kernels.items():  # to the log: where a step's device time goes
        print(f"Kernels of one profiled {kind} step:\n{table}")
    return ", " + clock.busy_summary() if clock.busy_summary() else ""


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


def run_vllm(folder, requests, site=None, log_path=None):
    """vLLM in a process of its own (bench/vllm_engine.py): (seconds, its version, how it ran).
    vLLM's defaults first (its engine core in a child process); if that fails, once more with
    the engine core in the same process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    env = dict(os.environ)
    if site:  # a folder vLLM was installed into with pip --target
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(requests, f)
    errors = []
    try:
        for mode, extra_env in [("defaults", {}), ("engine core in-process", {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})]:
            done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "vllm_engine.py"), folder,
                                   f.name], capture_output=True, text=True, timeout=1800, env={**env, **extra_env})
            if log_path:
                with open(log_path, "a") as log:
                    log.write(f"=== vLLM, {mode}: exit {done.returncode}\n{done.stdout}\n{done.stderr}\n")
            if done.returncode == 0:
                # vLLM logs to stdout too, after the result: the result is its line of JSON
                result = json.loads(next(line for line in reversed(done.stdout.splitlines())
                                         if line.startswith('{"seconds"')))
                return result["seconds"], result["version"], mode
            lines = done.stderr.strip().splitlines()
            errors.append(lines[-1] if lines else f"exit {done.returncode}")
    finally:
        os.unlink(f.name)
    raise RuntimeError(" / ".join(errors))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _allocator_counts(device):
    """The CUDA caching allocator's counts that mean a synchronization: a retry (an allocation
    that failed, freed the cached blocks and tried again) and each cudaFree, which waits for the
    device. A step that meets one idles the GPU while the host catches up."""
    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {"allocator retries": stats.get("num_alloc_retries", 0), "cudaFree calls": stats.get("num_device_free", 0)}


def _peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="standard", choices=list(engine_workloads.WORKLOADS),
                        help="requests to serve (bench/README.md)")
    parser.add_argument("--anchors", default="vllm,transformers",
                        help="comma-separated engines beside pagedlm: vllm, transformers (standard workload only), "
                             "or none")
    parser.add_argument("--kv-cache-dtypes", default="auto",
                        help="comma-separated: pagedlm runs once with each KV cache dtype (auto, fp8, fp8_e5m2)")
    parser.add_argument("--cascade", default="off", choices=["on", "off", "both"],
                        help="pagedlm with cascade attention (disable_cascade_attn=False: shared prefixes read "
                             "once per group), without (the default), or both in turn")
    parser.add_argument("--async-scheduling", default="off", choices=["on", "off", "both"],
                        help="pagedlm with async_scheduling=True (steps launched while the one before "
                             "runs), without (the default), or both in turn")
    parser.add_argument("--vllm-site", default=os.environ.get("VLLM_SITE"),
                        help="a folder vLLM was pip-installed into with --target (default: $VLLM_SITE, else the "
                             "environment's vllm)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and workload, any device")
    parser.add_argument("--sync-debug", action="store_true",
                        help="warn at each synchronizing torch call in pagedlm's timed run (its time then means "
                             "little): where an overlapped step waits for the one before")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="pagedlm over this many GPUs (its peak memory is the first GPU's)")
    parser.add_argument("--out", help="also write the table to this file (and vLLM's log beside it)")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    anchors = set(args.anchors.split(",")) - {"none", ""}
    kv_dtypes = args.kv_cache_dtypes.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    if args.smoke:
        config = TINY
        requests = engine_workloads.standard(count=12, prompt_lens=(5, 40), output_tokens=8, token_range=(1, 512))
    else:
        config, requests = LLAMA_3_2_1B, engine_workloads.WORKLOADS[args.workload]()
    total = engine_workloads.output_tokens(requests)
    tp = args.tensor_parallel_size
    rows, runs = [], []  # rows: [name, tokens/s, KV utilization, peak GiB, outputs, KV element bytes]
    with tempfile.TemporaryDirectory() as folder:
        model = save_model(config, folder, device)
        model.cpu()  # out of the way while pagedlm sizes its cache from free memory
        torch.cuda.empty_cache() if device == "cuda" else None
        cascades = {"on": [False], "off": [True], "both": [False, True]}[args.cascade]
        overlaps = {"on": [True], "off": [False], "both": [False, True]}[args.async_scheduling]
        for kv_dtype, disable_cascade, overlap in itertools.product(kv_dtypes, cascades, overlaps):
            ours, elapsed, extra = run_pagedlm(folder, requests, device, tp, kv_dtype, disable_cascade, overlap,
                                               args.sync_debug)
            name = "pagedlm.LLM" + (f" (tensor_parallel_size={tp})" if tp > 1 else "")
            name += f", kv_cache_dtype={kv_dtype}" if kv_dtype != "auto" else ""
            name += "" if disable_cascade else ", disable_cascade_attn=False"
            name += ", async_scheduling=True" if overlap else ""
            kv_bytes = 2 if kv_dtype == "auto" else 1
            rows.append([name, total / elapsed, f"{extra['utilization']:.1%}", _peak_gib(device), ours, kv_bytes])
            runs.append((f"{kv_dtype} KV" + (", cascade off" if disable_cascade else "")
                         + (", async scheduling" if overlap else ""), extra))
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
            print(f"pagedlm ({runs[-1][0]}): {elapsed:.2f} s, {extra}", flush=True)
        if "vllm" in anchors:
            log_path = args.out + ".vllm.log" if args.out else None
            try:
                seconds, version, mode = run_vllm(folder, requests, args.vllm_site, log_path)
                rows.append([f"vLLM {version} ({mode})", total / seconds, "", None, None, 2])
                print(f"vLLM: {seconds:.2f} s", flush=True)
            except Exception as e:  # an anchor that cannot run here is reported, not fatal
                rows.append(["vLLM", None, f"failed: {str(e)[:160]}", None, None, 2])
    uniform = len({(r.output_tokens, r.n) for r in requests}) == 1 and requests[0].n == 1
    if "transformers" in anchors and uniform:
        model.to(device)
        prompts, max_tokens = [r.prompt for r in requests], requests[0].output_tokens
        for name, fn in [("transformers generate (static, batch 64)", lambda: run_static(model, prompts, max_tokens, 64)),
                         ("transformers generate_batch (paged|sdpa)", lambda: run_continuous(model, prompts, max_tokens))]:
            torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
            try:
                theirs, elapsed = fn()
            except Exception as e:  # an anchor that cannot run here is reported, not fatal
                rows.append([name, None, f"failed: {type(e).__name__}: {str(e)[:80]}", None, None, 2])
                continue
            rows.append([name, total / elapsed, "", _peak_gib(device), theirs, 2])
            print(f"{name}: {elapsed:.2f} s", flush=True)
    command = (f"python bench/bench_engine.py --workload {args.workload}"
               + (f" --kv-cache-dtypes {args.kv_cache_dtypes}" if kv_dtypes != ["auto"] else "")
               + (f" --cascade {args.cascade}" if args.cascade != "off" else "")
               + (f" --async-scheduling {args.async_scheduling}" if args.async_scheduling != "off" else "")
               + (f" --tensor-parallel-size {tp}" if tp > 1 else ""))
    lines = [f"### Engine, {'smoke' if args.smoke else args.workload} workload — {card}, "
             f"{datetime.date.today()}, commit {git_commit()}",
             "",
             f"`{command}` — {len(requests)} requests"
             + (f" of n = {requests[0].n} samples" if requests[0].n > 1 else "")
             + f", {total:,} output tokens (greedy, EOS ignored), bf16 weights."]
    for label, extra in runs:
        lines.append(f"pagedlm ({label}): started in {extra['start_up']:.1f} s; {extra['steps']} steps, "
                     f"{extra['graphs']} CUDA graphs captured "
                     f"({extra['graphs_in_run']} during the timed run), "
                     f"{extra['kv_blocks']:,} KV blocks ({extra['kv_tokens']:,} tokens) preallocated (in its peak "
                     f"memory), {extra['preemptions']} preemptions, {extra['cascade_steps']} cascade steps"
                     + "".join(f", {count} {key}" for key, count in extra["allocator"].items())
                     + f"; {extra['step_times']}.")
    rooflines = {}
    if device == "cuda":
        flops, bandwidth = matmul_rate(), copy_bandwidth()
        lines.append("")
        for kv_bytes in sorted({row[5] for row in rows}, reverse=True):
            shape = engine_workloads.ModelShape.of(config, kv_bytes=kv_bytes)
            prefill, decode = engine_workloads.roofline_seconds(requests, shape, flops, bandwidth)
            rooflines[kv_bytes] = total / (prefill + decode)
            lines.append(f"Roofline on this card (bench/engine_workloads.py), {'bf16' if kv_bytes == 2 else 'FP8'} KV: "
                         f"prefill {prefill:.3f} s at the measured {flops / 1e12:.0f} TFLOP/s, decode {decode:.3f} s "
                         f"at the measured {bandwidth / 1e9:,.0f} GB/s: **{rooflines[kv_bytes]:,.0f} output tokens/s**.")
    lines += ["", f"| engine | output tokens/s | of the roofline | KV utilization | peak memory (GiB) | equal to "
                  f"transformers generate: first token / first {COMPARED_TOKENS} tokens |",
              "|---|---|---|---|---|---|"]
    reference = next((r[4] for r in rows if r[0].startswith("transformers generate (") and r[4]), None)
    for name, rate, util, peak, outputs, kv_bytes in rows:
        rate_text = f"{rate:,.0f}" if rate else "—"
        share = f"{rate / rooflines[kv_bytes]:.0%}" if rate and kv_bytes in rooflines else "—"
        peak_text = f"{peak:.1f}" if peak is not None and peak == peak else "—"
        agree = "—"
        if reference and outputs:
            agree = " / ".join(str(sum(a[:n] == b[:n] for a, b in zip(outputs, reference))) + f" of {len(outputs)}"
                               for n in (1, COMPARED_TOKENS))
        lines.append(f"| {name} | {rate_text} | {share} | {util} | {peak_text} | {agree} |")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
