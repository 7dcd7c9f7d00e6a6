"""Online serving benchmark: requests arriving as a Poisson process at several rates against a
`pagedlm serve` server (started here as a subprocess, or --url for one already running),
streamed over HTTP (SSE), and the "all at once" case beside offline LLM.generate on the same
prompts.

    python bench/bench_serving.py --smoke                 # CPU, the shipped model, a minute or so
    python bench/bench_serving.py [--model DIR] [--rates 1,4,16,64,inf] [--num-prompts 400]
    python bench/bench_serving.py --url http://127.0.0.1:8000 --rates 8,inf   # a running server

Prompts are token ids: slices of the shipped model's held-out sample (random ids for another
model), input lengths uniform in --input-len, --output-len tokens each with EOS ignored, so
every run generates the same number of tokens. Per rate: request and output-token
throughput over the run (first request sent to last token received), TTFT and ITL p50/p99
(ITL: the gap between token-bearing chunks spread over the tokens they carry), end-to-end
latency p50, and KV-cache usage (the server's pagedlm_kv_cache_usage_perc, polled every
0.1 s: mean and max). Offline: LLM.generate on the same prompts in this process (the server
idle), output tokens/s.
"""
import argparse
import asyncio
import concurrent.futures
import datetime
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx

from bench_common import StepClock, cpu_name, git_commit, process_cpu_seconds, write_results


def workload(count, input_len, vocab_size, seed):
    """count prompts of token ids: held-out slices of the shipped model's data when it is the model."""
    rng = random.Random(seed)
    heldout = None
    try:
        import numpy as np

        from pagedlm.data import TINY_CODE
        heldout = np.load(TINY_CODE / "heldout.npy").reshape(-1).tolist()
    except (ImportError, OSError):
        pass
    prompts = []
    for _ in range(count):
        n = rng.randint(*input_len)
        if heldout is not None and vocab_size is None:
            start = rng.randrange(len(heldout) - n)
            prompts.append([int(t) for t in heldout[start:start + n]])
        else:
            prompts.append([rng.randrange(1, vocab_size or 4096) for _ in range(n)])
    return prompts


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client, url, model, prompt, output_len):
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0,
            "stream": True, "return_token_ids": True}
    start = time.perf_counter()
    ttft, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            count = sum(len(c.get("token_ids", ())) for c in chunk["choices"])
            if not count:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - start
            else:
                gaps += [(now - last) / count] * count
            last, tokens = now, tokens + count
    end = time.perf_counter()
    return dict(ttft=ttft, itl=gaps, e2e=end - start, tokens=tokens, start=start, end=end)


async def poll_kv(client, url, samples, stop):
    while not stop.is_set():
        try:
            text = (await client.get(f"{url}/metrics")).text
            samples.append(next(float(line.split()[-1]) for line in text.splitlines()
                                if line.startswith("pagedlm_kv_cache_usage_perc ")))
        except (httpx.HTTPError, StopIteration):
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass


async def send_all(url, model, prompts, output_len, rate, seed):
    """Sends prompts at Poisson arrivals of `rate` per second (inf: at once) and reads their
    streams; (per-request results, client CPU seconds). Each result has its start and end on
    the machine-wide monotonic clock (time.perf_counter), comparable across processes."""
    rng = random.Random(seed)
    cpu = time.process_time()
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(one_request(client, url, model, prompt, output_len)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return results, time.process_time() - cpu


def client_process(job):
    """send_all in a process of its own (client_procs > 1)."""
    return asyncio.run(send_all(*job))


async def run_rate(url, model, prompts, output_len, rate, seed, client_procs=1, server_pid=None):
    """All prompts sent at Poisson arrivals of `rate` per second (inf: at once), by client_procs
    processes, each sending every client_procs-th prompt at rate / client_procs (together a
    Poisson process of `rate`): one Python process parsing hundreds of streams is slower than
    the server it measures. server_pid: the server's process, whose CPU time per output token
    is reported (Linux)."""
    jobs = [(url, model, prompts[j::client_procs], output_len, rate / client_procs, seed * 1000 + j)
            for j in range(client_procs)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        kv, stop = [], asyncio.Event()
        poller = asyncio.ensure_future(poll_kv(client, url, kv, stop))
        server_cpu = process_cpu_seconds(server_pid)
        if client_procs == 1:
            parts = [await send_all(*jobs[0])]
        else:
            with concurrent.futures.ProcessPoolExecutor(client_procs) as pool:
                parts = await asyncio.gather(*(asyncio.wrap_future(pool.submit(client_process, job)) for job in jobs))
        server_cpu = process_cpu_seconds(server_pid) - server_cpu if server_cpu is not None else None
        stop.set()
        await poller
    results = [r for part, _ in parts for r in part]
    elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
    client_busy = sum(cpu for _, cpu in parts) / (elapsed * client_procs)
    tokens = sum(r["tokens"] for r in results)
    itl = [g for r in results for g in r["itl"]]
    return dict(rate=rate, requests=len(results), elapsed=elapsed, req_per_s=len(results) / elapsed,
                tok_per_s=tokens / elapsed, tokens=tokens,
                ttft_p50=percentile([r["ttft"] for r in results], 0.5),
                ttft_p99=percentile([r["ttft"] for r in results], 0.99),
                itl_p50=percentile(itl, 0.5), itl_p99=percentile(itl, 0.99),
                e2e_p50=percentile([r["e2e"] for r in results], 0.5),
                kv_mean=statistics.fmean(kv) if kv else float("nan"), kv_max=max(kv, default=float("nan")),
                client_busy=client_busy,
                server_us_per_token=None if server_cpu is None else server_cpu / tokens * 1e6)


def offline(args, prompts):
    """LLM.generate on prompts (the server idle): output tokens/s, and the median wall time of
    the steps that only decode (every scheduled sequence computing one token), the yardstick of
    the inter-token latency target."""
    from pagedlm import LLM, SamplingParams

    llm = LLM(args.model_folder, **engine_kwargs(args))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([p[:8] for p in prompts[:4]], params, use_tqdm=False)  # warm-up, not the prompts' blocks
    clock = StepClock(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return dict(elapsed=elapsed, tok_per_s=tokens / elapsed, req_per_s=len(prompts) / elapsed, tokens=tokens,
                decode_step_p50=clock.median("decode"), decode_steps=len(clock.times["decode"]))


def random_llama_folder():
    """A random-weight bf16 model shaped like Llama-3.2-1B (the engine bench's), saved to a
    temporary folder that lives as long as the process."""
    import tempfile

    from bench_engine import LLAMA_3_2_1B, save_model
    folder = tempfile.mkdtemp(prefix="pagedlm-bench-llama-")
    save_model(LLAMA_3_2_1B, folder, "cpu")
    return folder


def device_name(device):
    """The card (or CPU) the engine runs on, as the results tables name it."""
    import torch
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda":
        return torch.cuda.get_device_name()
    return cpu_name()


def engine_kwargs(args):
    kwargs = dict(device=args.device, max_num_seqs=args.max_num_seqs)
    if args.num_blocks:
        kwargs["num_blocks"] = args.num_blocks
    return kwargs


def start_server(args):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "pagedlm.serving.cli", *([args.model] if args.model else []),
               "--port", str(port), "--log-level", "warning", "--max-num-seqs", str(args.max_num_seqs),
               "--served-model-name", "bench"]
    if args.device:
        command += ["--device", args.device]
    if args.num_blocks:
        command += ["--num-blocks", str(args.num_blocks)]
    proc = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start ({command})")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a small CPU run: 24 prompts at 4/s, 16/s and at once")
    parser.add_argument("--url", help="a running server (default: start `pagedlm serve` here)")
    parser.add_argument("--model", help="model folder (default: the shipped code model)")
    parser.add_argument("--random-llama", action="store_true",
                        help="serve a random-weight model shaped like Llama-3.2-1B (the engine bench's model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rates", default="1,4,16,64,inf", help="requests per second, comma-separated")
    parser.add_argument("--num-prompts", type=int, default=400, help="requests per rate")
    parser.add_argument("--input-len", default="64,512", help="prompt tokens, min,max")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 1) // 4)),
                        help="client processes sending the requests (default: a quarter of the CPUs, at most 8)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate comparison")
    parser.add_argument("--out", help="append the table to this file")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if args.smoke:
        args.rates, args.num_prompts, args.input_len, args.output_len = "4,16,inf", 24, "16,64", 16
        args.device, args.num_blocks = args.device or "cpu", args.num_blocks or 512
    rates = [float(r) for r in args.rates.split(",")]
    input_len = tuple(int(x) for x in args.input_len.split(","))
    if args.random_llama:
        args.model = random_llama_folder()
    if args.model is None:
        from pagedlm.data import tiny_model
        args.model_folder, vocab = tiny_model("target"), None
    else:
        args.model_folder = args.model
        vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    # Fresh prompts for each rate (and the warm-up): the server's prefix cache must not serve
    # one rate's prompts from another's. Offline runs the at-once rate's prompts on a new engine.
    per_rate = [workload(args.num_prompts, input_len, vocab, args.seed + 1 + i) for i in range(len(rates))]

    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        warm_up = workload(4, input_len, vocab, args.seed + 10_000)
        asyncio.run(run_rate(url, model, warm_up, 4, math.inf, args.seed))
        rows = [asyncio.run(run_rate(url, model, prompts, args.output_len, rate, args.seed + i, args.client_procs,
                                     proc and proc.pid))
                for i, (rate, prompts) in enumerate(zip(rates, per_rate))]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    at_once = [i for i, rate in enumerate(rates) if math.isinf(rate)]
    ref = None if args.no_offline or args.url else offline(args, per_rate[at_once[0] if at_once else -1])

    what = ("a random Llama-3.2-1B-shaped model (bf16)" if args.random_llama else args.model
            or "the shipped code model")
    lines = [f"### Serving ({'smoke' if args.smoke else 'Poisson'}), {what} — {device_name(args.device)}, "
             f"commit {git_commit()}, "
             f"{datetime.date.today().isoformat()}",
             "",
             f"{args.num_prompts} requests per rate, prompts {input_len[0]}-{input_len[1]} tokens, "
             f"{args.output_len} output tokens each (EOS ignored), streamed over HTTP, read by "
             f"{args.client_procs} client process(es). Server CPU: the server process's CPU time per output "
             f"token; client CPU: the share of the client processes' time they were busy (near 100%, the "
             f"client, not the server, bounds the rate).",
             "",
             "| rate (req/s) | req/s | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 "
             "| KV mean | KV max | server CPU | client CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = "at once" if math.isinf(r["rate"]) else f"{r['rate']:g}"
        lines.append(f"| {rate} | {r['req_per_s']:.2f} | "
                     f"{r['tok_per_s']:.0f} | {r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | "
                     f"{r['itl_p50'] * 1e3:.1f} ms | {r['itl_p99'] * 1e3:.1f} ms | {r['e2e_p50']:.2f} s | "
                     f"{r['kv_mean']:.1%} | {r['kv_max']:.1%} | "
                     + ("—" if r["server_us_per_token"] is None else f"{r['server_us_per_token']:.0f} µs/token")
                     + f" | {r['client_busy']:.0%} |")
    if ref is not None:
        at_once = rows[at_once[0]] if at_once else None
        lines += ["", f"Offline LLM.generate, same prompts: {ref['tok_per_s']:.0f} output tok/s "
                      f"({ref['elapsed']:.2f} s)"
                  + (f"; the server at once: {at_once['tok_per_s']:.0f} tok/s "
                     f"({at_once['tok_per_s'] / ref['tok_per_s']:.0%} of offline)" if at_once else "")
                  + f". Median decode-only step offline: {ref['decode_step_p50'] * 1e3:.1f} ms "
                    f"(over {ref['decode_steps']} steps)."]
        near = [r for r in rows if r["tok_per_s"] >= 0.9 * ref["tok_per_s"]]
        if near:
            r = min(near, key=lambda r: r["rate"])
            rate = "at once" if math.isinf(r["rate"]) else f"{r['rate']:g} req/s"
            lines.append(f"The lowest rate at 90% of offline throughput: {rate}, ITL p99 "
                         f"{r['itl_p99'] / ref['decode_step_p50']:.1f}x the median decode-only step.")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
