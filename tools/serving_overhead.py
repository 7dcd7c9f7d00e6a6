"""The server's host cost per streamed token, measured on the CPU: `pagedlm serve`'s app over
an engine whose decode forward is a stub that sleeps as a GPU step would (releasing the GIL,
as waiting for the device does) and returns fixed logits with real text tokens as their
greedy choices, against offline LLM.generate over the same stub. What is left is what the
server adds: HTTP, SSE chunks, the engine thread's reading of each request's new tokens,
incremental detokenization, metrics.

    python tools/serving_overhead.py [--requests 256] [--output-len 64] [--step-ms 3] [--rounds 3]

The client sends every request at once over raw sockets and only counts chunks (a Python
HTTP client parsing hundreds of streams would be slower than the server it measures). Per
round: output tokens/s, SSE chunks per token (below 1 when the server falls behind the
engine and a chunk carries several steps' tokens) and the server process's CPU time per
token; then offline tokens/s per round. Host noise only ever adds time: compare the best
rounds.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE, tiny_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_common import process_cpu_seconds  # noqa: E402


def stub_engine(step_ms):
    """The shipped model's LLM on the CPU with every decode forward replaced: it sleeps step_ms
    and returns zero logits whose greedy choices walk the held-out text (97 tokens apart per
    row), so detokenization sees real text. Prompt forwards return zero logits at once."""
    torch.set_num_threads(1)
    llm = LLM(tiny_model("target"), device="cpu", num_blocks=8192)
    vocab, rows = llm.model.args.vocab_size, llm.scheduler.max_num_seqs
    logits, choices = torch.zeros(rows, vocab), torch.zeros(rows, 2, dtype=torch.float64)
    text = torch.from_numpy(np.load(TINY_CODE / "heldout.npy").reshape(-1).astype(np.float64))
    steps = [0]

    def forward(input_ids, positions, batch, kv_caches, logits_indices=None, **_):
        return torch.zeros(len(input_ids) if logits_indices is None else len(logits_indices), vocab)

    def decode(computing, in_flight=None):
        time.sleep(step_ms / 1e3)
        n = len(computing)
        choices[:n, 0] = text[(steps[0] + 97 * torch.arange(n)) % len(text)]
        steps[0] += 1
        return logits[:n], choices[:n]

    llm.model.forward = forward
    llm.runner._decode = decode
    return llm


def serve(port, step_ms):
    """The server process: the app over a stub engine, on uvicorn."""
    import uvicorn

    from pagedlm.serving.app import build_app
    from pagedlm.serving.async_llm import AsyncLLM
    engine = AsyncLLM(stub_engine(step_ms), max_waiting=None)
    uvicorn.run(build_app(engine), host="127.0.0.1", port=port, log_level="warning")


async def stream_one(port, prompt, output_len):
    """Sends one streamed completion; returns how many SSE chunks with data came back."""
    body = json.dumps({"model": "pagedlm", "prompt": prompt, "max_tokens": output_len, "ignore_eos": True,
                       "temperature": 0, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    chunks, tail = 0, b""
    while b"[DONE]" not in tail:
        data = await reader.read(1 << 16)
        if not data:
            raise RuntimeError("the server closed a stream before [DONE]")
        chunks += data.count(b"data: {")
        tail = (tail + data)[-16:]
    writer.close()
    return chunks


async def stream_all(port, prompts, output_len):
    start = time.perf_counter()
    chunks = await asyncio.gather(*(stream_one(port, p, output_len) for p in prompts))
    return time.perf_counter() - start, sum(chunks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=3.0, help="the stub decode step's sleep (a GPU step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process, on this port
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.step_ms)
    windows = np.load(TINY_CODE / "heldout.npy")
    prompts = [windows[i % len(windows), :64 + i % 192].tolist() for i in range(args.requests)]
    tokens = args.requests * args.output_len
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--step-ms", str(args.step_ms)])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        asyncio.run(stream_all(port, prompts[:8], 4))  # warm-up
        for _ in range(args.rounds):
            cpu = process_cpu_seconds(server.pid)
            elapsed, chunks = asyncio.run(stream_all(port, prompts, args.output_len))
            cpu = process_cpu_seconds(server.pid) - cpu
            print(f"server  {tokens / elapsed:8.0f} output tok/s  {chunks / tokens:.2f} chunks/token  "
                  f"{cpu / tokens * 1e6:5.0f} us CPU/token")
    finally:
        server.terminate()
        server.wait(30)
    llm = stub_engine(args.step_ms)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.rounds):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        print(f"offline {tokens / (time.perf_counter() - start):8.0f} output tok/s")


if __name__ == "__main__":
    main()
