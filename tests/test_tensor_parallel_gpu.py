"""LLM(tensor_parallel_size=2) over two GPUs with NCCL (run on a machine with two or more:
`pytest -m gpu tests/test_tensor_parallel_gpu.py`): float32 tokens equal to one GPU's, bfloat16
ones close to them, and a killed worker raising in the driver (NCCL waits for a dead peer,
so the group aborts its communicators) rather than hanging."""
import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.parallel import TensorParallelError

from model_families import GPU_TINY, build, prompts

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
ENGINE = dict(device="cuda", block_size=16, num_blocks=256, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-tp-gpu")
    build(transformers, "qwen3", folder, dims=GPU_TINY)
    return folder


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_gpus_match_one(folder, dtype):
    batch = prompts(8, GPU_TINY["vocab_size"], 3, 120, seed=1)
    one = LLM(folder, dtype=dtype, **ENGINE)
    expected = one.generate(batch, GREEDY, use_tqdm=False)
    sampled = SamplingParams(n=2, temperature=0.8, max_tokens=16, seed=5, ignore_eos=True)
    expected_sampled = tokens(one.generate(batch, sampled, use_tqdm=False))
    del one
    two = LLM(folder, dtype=dtype, **ENGINE, tensor_parallel_size=2)
    try:
        got = two.generate(batch, GREEDY, use_tqdm=False)
        got_sampled = tokens(two.generate(batch, sampled, use_tqdm=False))
    finally:
        two.close()
    if dtype == torch.float32:
        assert tokens(got) == tokens(expected) and got_sampled == expected_sampled
        for e, g in zip(expected, got):
            assert g.outputs[0].cumulative_logprob == pytest.approx(e.outputs[0].cumulative_logprob, abs=1e-3)
    else:  # bf16: the sums run in another order, so near-ties may flip; the first tokens hold
        assert [t[0][0] for t in tokens(got)] == [t[0][0] for t in tokens(expected)]


def test_a_killed_worker_raises_in_the_driver(folder):
    llm = LLM(folder, dtype=torch.bfloat16, **ENGINE, tensor_parallel_size=2)
    pid = llm._tp._workers.procs[0].pid
    threading.Timer(2.0, os.kill, (pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="killed by signal SIGKILL"):
        llm.generate([[1, 2, 3]] * 8, SamplingParams(temperature=0, max_tokens=200_000, ignore_eos=True),
                     use_tqdm=False)
    assert time.monotonic() - started < 120
    llm.close()
    assert not multiprocessing.active_children()
