"""LLM(tensor_parallel_size=2) on the CPU (gloo over loopback) against tensor_parallel_size=1:
tiny random Llama, Mistral and Qwen2 checkpoints (float32, a vocabulary of 97, which two ranks
split with one padding row) give the same tokens, greedy and seeded, with chunked prefill,
prefix caching, n > 1 and preemption, and logprobs within 1e-5; sizes that do not split are
refused. test_tensor_parallel_faults.py has the other dense families, the refused options,
faults and shutdown.

Each tensor-parallel LLM starts a worker process (a few seconds), so the tests of a family
share one; one tensor-parallel LLM per process at a time, so a fixture's goes before the next."""
import os

import pytest
import torch

from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.models import ModelArgs
from pagedlm.parallel import check_tensor_parallel
from test_models import FAMILIES, TINY, build

# Chunked prefill (prompts up to 40 tokens, 32 tokens a step) and a cache small enough that the
# preemption test's batch preempts.
ENGINE = dict(device="cpu", block_size=4, num_blocks=40, max_num_batched_tokens=32)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)


def save(family, folder):
    """The model tests' tiny random checkpoint of family, in folder."""
    build(family, folder)
    return folder


def prompts(count, seed=1, low=3, high=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


def worker_pids(llm):
    return [p.pid for p in llm._tp._workers.procs]


def _no_process(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module", params=list(FAMILIES))
def engines(request, tmp_path_factory):
    folder = save(request.param, tmp_path_factory.mktemp(request.param))
    single = LLM(folder, **ENGINE)
    parallel = LLM(folder, **ENGINE, tensor_parallel_size=2)
    yield single, parallel
    pids = worker_pids(parallel)
    parallel.close()
    assert all(_no_process(pid) for pid in pids)


def test_greedy_tokens_and_logprobs_match_one_rank(engines):
    single, parallel = engines
    batch = prompts(6)
    expected, got = single.generate(batch, GREEDY, use_tqdm=False), parallel.generate(batch, GREEDY, use_tqdm=False)
    assert tokens(got) == tokens(expected)
    for e, g in zip(expected, got):
        e, g = e.outputs[0], g.outputs[0]
        assert g.cumulative_logprob == pytest.approx(e.cumulative_logprob, abs=1e-5)
        for e_top, g_top in zip(e.logprobs, g.logprobs):
            assert list(g_top) == list(e_top)
            assert all(abs(g_top[t] - e_top[t]) <= 1e-5 for t in e_top)
    assert parallel.block_manager.stats()["used_blocks"] == 0


def test_prompt_logprobs_match_one_rank(engines):
    # The prompt rows' logits are gathered from the ranks like the sampled rows'.
    single, parallel = engines
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    batch = prompts(3)
    expected, got = single.generate(batch, params, use_tqdm=False), parallel.generate(batch, params, use_tqdm=False)
    for e, g in zip(expected, got):
        assert len(g.prompt_logprobs) == len(e.prompt_logprobs) and g.prompt_logprobs[0] is None
        for e_pos, g_pos in zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert list(g_pos) == list(e_pos)
            assert all(abs(g_pos[t] - e_pos[t]) <= 1e-5 for t in e_pos)


def test_seeded_sampling_with_n_samples_matches_one_rank(engines):
    single, parallel = engines
    params = SamplingParams(n=3, temperature=0.9, top_k=30, top_p=0.95, max_tokens=10, seed=1234, ignore_eos=True)
    batch = prompts(3, seed=5)
    assert tokens(parallel.generate(batch, params, use_tqdm=False)) == tokens(single.generate(batch, params,
                                                                                               use_tqdm=False))


def test_preemption_and_prefix_caching_change_nothing(engines, tmp_path):
    single, parallel = engines
    batch = prompts(10, seed=2)
    shared = batch[0][:20]
    batch += [shared + [5, 6, 7], shared + [9]]
    before = parallel.scheduler.preemptions
    expected = tokens(single.generate(batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                      use_tqdm=False))
    got = parallel.generate(batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert tokens(got) == expected
    assert parallel.scheduler.preemptions > before
    assert parallel.block_manager.stats()["used_blocks"] == 0


def test_beam_search_is_refused(engines):
    _, parallel = engines
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=2"):
        parallel.beam_search([[1, 2, 3]], BeamSearchParams(beam_width=2, max_tokens=3))


# -- refusals -----------------------------------------------------------------------------------

def args(**changes):
    return ModelArgs.from_hf({**TINY, "num_hidden_layers": 1, **changes})


@pytest.mark.parametrize("changes, size, field", [
    ({}, 3, "num_attention_heads"),
    ({}, 4, "num_key_value_heads"),
    (dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8, intermediate_size=100), 8, "intermediate_size"),
])
def test_sizes_that_do_not_split_are_refused(changes, size, field):
    with pytest.raises(ValueError, match=f"tensor_parallel_size: {size} ranks must divide the model's {field}"):
        check_tensor_parallel(args(**changes), size)


def test_a_vocabulary_that_does_not_split_is_padded():
    check_tensor_parallel(args(vocab_size=97), 2)  # no error: padded to 98, the extra logit dropped
