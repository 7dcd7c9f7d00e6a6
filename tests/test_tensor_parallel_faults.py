"""LLM(tensor_parallel_size=2) on the CPU, each test with its own: the other dense families
(Qwen3, Gemma 2, Phi-3's fused checkpoint) match one rank; unsupported options are refused
before anything starts; a killed worker raises a clear error in the driver rather than hanging;
close(), collection and interpreter exit leave no process behind. (Apart from
test_tensor_parallel.py, whose shared LLMs live as long as its module: one tensor-parallel LLM
per process at a time.)"""
import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import pagedlm
from pagedlm import LLM, SamplingParams
from pagedlm.parallel import TensorParallelError

import model_families
from test_tensor_parallel import ENGINE, GREEDY, TINY, _no_process, save, tokens, worker_pids

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3-partial"])
def test_other_dense_families_match_one_rank(family, tmp_path):
    model_families.build(transformers, family, tmp_path)
    batch = model_families.prompts(4, 97, 3, 30, seed=3)
    expected = tokens(LLM(tmp_path, **ENGINE).generate(batch, GREEDY, use_tqdm=False))
    parallel = LLM(tmp_path, **ENGINE, tensor_parallel_size=2)
    try:
        assert tokens(parallel.generate(batch, GREEDY, use_tqdm=False)) == expected
    finally:
        parallel.close()


def test_llm_refuses_bad_sizes_and_unsupported_options_before_starting_anything(tmp_path):
    folder = save("llama3", tmp_path / "llama")
    for size, match in [(3, "num_attention_heads"), (4, "num_key_value_heads"), (0, "tensor_parallel_size")]:
        with pytest.raises(ValueError, match="tensor_parallel_size") as info:
            LLM(folder, device="cpu", tensor_parallel_size=size)
        assert match in str(info.value)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(folder, device="cpu", tensor_parallel_size=2, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="speculative"):
        LLM(folder, device="cpu", tensor_parallel_size=2, speculative={"method": "ngram", "num_speculative_tokens": 2})
    from pagedlm.models import random_model
    with pytest.raises(ValueError, match="model folder"):
        LLM(random_model({**TINY, "num_hidden_layers": 1}), device="cpu", tensor_parallel_size=2)
    moe = tmp_path / "moe"
    model_families.build(transformers, "mixtral", moe)
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 ranks: mixture-of-experts"):
        LLM(moe, device="cpu", tensor_parallel_size=2)
    assert not multiprocessing.active_children() and not dist.is_initialized()


# -- faults and shutdown ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save("llama3", tmp_path_factory.mktemp("llama-faults"))


def test_a_worker_killed_mid_generation_raises_in_the_driver(llama):
    llm = LLM(llama, device="cpu", block_size=4, tensor_parallel_size=2)
    (pid,) = worker_pids(llm)
    killer = threading.Timer(1.0, os.kill, (pid, signal.SIGKILL))
    killer.start()
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match=f"worker rank 1 \\(pid {pid}\\) was killed by signal SIGKILL"):
        llm.generate([[1, 2, 3, 4]] * 8, SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True),
                     use_tqdm=False)
    assert time.monotonic() - started < 60
    killer.join()
    # Broken for good, at once; the process group is left, so another may start.
    with pytest.raises(TensorParallelError, match="killed by signal SIGKILL.*create a new one"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not dist.is_initialized() and not multiprocessing.active_children()
    llm.close()


def test_a_worker_killed_between_steps_raises_before_the_next(llama):
    llm = LLM(llama, device="cpu", block_size=4, tensor_parallel_size=2)
    llm.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    llm.step()
    (pid,) = worker_pids(llm)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(TensorParallelError, match="killed by signal SIGKILL"):
        llm.step()
    llm.close()
    assert not multiprocessing.active_children()


def test_close_and_collection_leave_no_process(llama):
    llm = LLM(llama, device="cpu", block_size=4, tensor_parallel_size=2)
    pids = worker_pids(llm)
    llm.close()
    llm.close()  # again: nothing to do
    assert all(_no_process(pid) for pid in pids) and not dist.is_initialized()
    with pytest.raises(TensorParallelError, match="closed"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    llm = LLM(llama, device="cpu", block_size=4, tensor_parallel_size=2)
    pids = worker_pids(llm)
    del llm
    gc.collect()
    assert all(_no_process(pid) for pid in pids) and not dist.is_initialized()


@pytest.mark.parametrize("ending, status", [("", 0), ("os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL)])
def test_interpreter_exit_or_a_killed_driver_leaves_no_process(llama, ending, status):
    script = textwrap.dedent(f"""
        import os, signal
        from pagedlm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({str(llama)!r}, device="cpu", block_size=4, tensor_parallel_size=2)
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
            print([p.pid for p in llm._tp._workers.procs], flush=True)
            {ending}
    """)
    # The child imports the pagedlm these tests import (an installed wheel, or the source tree).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(pagedlm.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == status, done.stderr
    pids = eval(done.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_no_process(pid) for pid in pids):
        time.sleep(0.1)
    assert all(_no_process(pid) for pid in pids)

