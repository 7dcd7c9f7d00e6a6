"""Faults at the engine's edges: bad arguments are refused up front with an error naming them,
a step that fails leaves the engine consistent and usable, generate leaves nothing behind
however it exits, and a second thread is told at once that an LLM is not shared."""
import threading
import warnings

import numpy as np
import pytest
import torch

import pagedlm.beam_search
import pagedlm.engine.runner
import pagedlm.llm
from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.engine.sequence import Sequence, Status
from pagedlm.models import random_model

from engine_checks import check_consistent
from llama_checkpoint import save_random_checkpoint

CONFIG = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=1, std=0.2)  # large enough weights that every token matters


def engine(model, **kwargs):
    return LLM(model, **{"device": "cpu", "block_size": 4, "num_blocks": 64, **kwargs})


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


def used_blocks(llm):
    return llm.block_manager.stats()["used_blocks"]


def assert_clean(llm):
    """Nothing left running, queued or held."""
    assert not llm.scheduler.has_work() and used_blocks(llm) == 0 and len(llm.block_manager) == 0


# -- engine arguments -------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("max_num_batched_tokens", 0), ("max_num_batched_tokens", -1), ("max_num_batched_tokens", 2.5),
    ("max_num_seqs", 0), ("max_num_seqs", 1.5), ("max_num_seqs", True),
    ("block_size", 0), ("block_size", "16"), ("num_blocks", 0), ("num_blocks", 2**40),
    ("gpu_memory_utilization", 0), ("gpu_memory_utilization", 1.5), ("gpu_memory_utilization", float("nan")),
    ("enable_prefix_caching", "yes"), ("enforce_eager", 1), ("seed", 1.5), ("seed", "0"),
    ("device", "gpu0"), ("device", "meta"), ("dtype", "int8"), ("dtype", "fp16"), ("dtype", torch.int32),
    ("speculative", {"method": "ngram", "num_tokens": 0, "max_ngram": 3}),
])
def test_every_engine_argument_is_checked_when_given(model, name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        engine(model, **{name: value})


def test_a_too_large_cache_is_refused_before_it_is_allocated(model):
    with pytest.raises(ValueError, match=r"num_blocks, block_size: .* GiB"):
        engine(model, num_blocks=2**31 - 1, block_size=2**12)


def test_model_of_the_wrong_kind_names_the_argument(model):
    with pytest.raises(TypeError, match="^model"):
        LLM(42, device="cpu")
    with pytest.raises(TypeError, match=r"^speculative\['model'\]"):
        engine(model, speculative={"method": "draft", "model": 42, "num_tokens": 2})


@pytest.mark.parametrize("dtype, expected", [
    ("auto", torch.float32), (None, torch.float32), ("float32", torch.float32), ("float", torch.float32),
    ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("half", torch.float16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_takes_vllm_spellings(tmp_path_factory, dtype, expected):
    folder = tmp_path_factory.getbasetemp() / "dtype-model"
    if not folder.exists():
        save_random_checkpoint(folder, CONFIG)
    llm = LLM(folder, device="cpu", dtype=dtype, block_size=4, num_blocks=16)
    assert llm.model.lm_head.weight.dtype == expected


def test_a_bad_dtype_lists_the_accepted_values(model):
    with pytest.raises(ValueError, match=r"dtype: must be one of 'auto', 'float16', 'half', 'bfloat16'.*got 'fp8'"):
        engine(model, dtype="fp8")


# -- sampling params and prompts ---------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(top_p=float("nan")), "top_p"), (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=1.5), "max_tokens"), (dict(max_tokens=True), "max_tokens"), (dict(n="2"), "n"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(seed=1.5), "seed"), (dict(ignore_eos="no"), "ignore_eos"),
])
def test_sampling_params_are_checked_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_keep_plain_python_values():
    params = SamplingParams(n=np.int64(2), stop_token_ids=[np.int32(3)], seed=np.int64(5))
    assert type(params.n) is int and params.stop_token_ids == (3,) and type(params.seed) is int
    hash(params)  # a list of stop ids became a tuple


def test_a_tiny_temperature_samples_the_greedy_tokens(model):
    llm = engine(model)
    greedy = tokens(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False))
    for temperature in (1e-45, 1e-30, 1e-8):
        params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True, seed=3)
        assert tokens(llm.generate([[1, 2, 3]], params, use_tqdm=False)) == greedy
    assert_clean(llm)


def test_a_prompt_token_outside_the_vocabulary_is_named_and_changes_nothing(model):
    llm = engine(model)
    with pytest.raises(ValueError, match=r"prompts\[1\]: token 50 at position 2 is outside the vocabulary \[0, 50\)"):
        llm.generate([[1, 2], [3, 4, 50]], GREEDY, use_tqdm=False)
    assert_clean(llm)
    assert not llm._requests  # the good prompt was not queued either
    with pytest.raises(ValueError, match=r"prompt: token -1 at position 0"):
        llm.add_request([-1], GREEDY)
    with pytest.raises(ValueError, match=r"prompt: token at position 1 is 2.5"):
        llm.add_request([1, 2.5], GREEDY)
    with pytest.raises(ValueError, match=r"params.stop_token_ids: token 99 at position 0"):
        llm.add_request([1], SamplingParams(stop_token_ids=[99]))
    assert not llm._requests
    assert tokens(llm.generate([[3, 4]], GREEDY, use_tqdm=False)) == tokens(engine(model).generate([[3, 4]], GREEDY,
                                                                                               use_tqdm=False))


def test_bad_prompt_lists_name_the_argument(model):
    llm = engine(model)
    with pytest.raises(TypeError, match="^prompts"):
        llm.generate(None, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompts\[0\]: empty prompt"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(TypeError, match=r"^sampling_params\[1\]"):
        llm.generate([[1], [2]], [GREEDY, {"temperature": 0}], use_tqdm=False)
    assert not llm._requests


def test_many_samples_are_refused_before_any_sequence_is_built(model, monkeypatch):
    llm = engine(model)
    built = []

    def counting_sequence(*args, **kwargs):
        built.append(1)
        assert len(built) < 100, "built sequences for a request that cannot run"
        return Sequence(*args, **kwargs)

    monkeypatch.setattr(pagedlm.llm, "Sequence", counting_sequence)
    with pytest.raises(ValueError, match=r"params\.n: 100000000 samples run at once, max_num_seqs is 256"):
        llm.add_request([1, 2, 3], SamplingParams(n=10**8))
    assert not built and not llm._requests


def test_forks_that_can_never_be_admitted_together_are_refused_before_they_are_built(model, monkeypatch):
    # 6 prompt tokens + 3 forks need 3 blocks of 4 to be admitted; the cache has 2.
    llm = engine(model, num_blocks=2)
    monkeypatch.setattr(pagedlm.llm, "Sequence", None)  # building one would fail
    with pytest.raises(ValueError, match=r"params\.n: 3 samples of a 6-token prompt need 3 KV blocks to start "
                                         r"together, the cache has 2"):
        llm.add_request([1, 2, 3, 4, 5, 6], SamplingParams(n=3, max_tokens=1))
    assert not llm._requests
    assert_clean(llm)


def test_take_output_of_an_unfinished_request_changes_nothing(model):
    llm = engine(model)
    request = llm.add_request([1, 2, 3], GREEDY)
    llm.step()
    with pytest.raises(ValueError, match="has not finished"):
        llm.take_output(request)
    with pytest.raises(KeyError, match="no request"):
        llm.take_output("nope")
    while llm.scheduler.has_work():
        llm.step()
    assert len(llm.take_output(request).outputs[0].token_ids) == 6


# -- a step that fails ------------------------------------------------------------------

def fail_on_call(monkeypatch, obj, name, call, exception):
    """obj.name raises exception on its call-th call, then behaves again."""
    original, calls = getattr(obj, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise exception
        return original(*args, **kwargs)
    monkeypatch.setattr(obj, name, patched)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_failed_step_fails_its_requests_and_the_others_go_on(model, monkeypatch, prefix_caching):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10]]
    expected = tokens(engine(model).generate(prompts, GREEDY, use_tqdm=False))
    # One sequence at a time: the second request waits while the first fails.
    llm = engine(model, max_num_seqs=1, enable_prefix_caching=prefix_caching)
    first, second = (llm.add_request(p, GREEDY) for p in prompts)
    # The forward of the first step fails after its prompt blocks entered the prefix cache.
    fail_on_call(monkeypatch, llm.runner, "_forward", 1, RuntimeError("kernel failure"))
    with pytest.raises(RuntimeError, match="kernel failure") as failure:
        llm.step()
    assert f"request(s) {first} were in the failed step" in str(failure.value.__notes__)
    assert [s.finish_reason for s in llm._requests[first]["seqs"]] == ["error"]
    assert used_blocks(llm) == 0 and llm.scheduler.has_work()
    while llm.scheduler.has_work():
        llm.step()
    assert [o.finish_reason for o in llm.take_output(first).outputs] == ["error"]
    assert tokens([llm.take_output(second)]) == expected[1:]  # shares 8 prompt tokens with the failed one
    assert_clean(llm)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_a_failure_in_sampling_fails_the_batch_and_the_engine_goes_on(model, monkeypatch):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    expected = tokens(engine(model).generate(prompts, GREEDY, use_tqdm=False))
    llm = engine(model)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    llm.step()
    fail_on_call(monkeypatch, pagedlm.engine.runner, "sample_step", 1, IndexError("sampler"))
    with pytest.raises(IndexError):
        llm.step()
    assert [o.finish_reason for r in ids for o in llm.take_output(r).outputs] == ["error", "error"]
    assert_clean(llm)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_a_failed_step_keeps_the_prefix_cache(model, monkeypatch):
    prompt = list(range(1, 14))  # 13 tokens: 3 whole blocks of 4 can come from the cache
    clean = tokens(engine(model).generate([prompt], GREEDY, use_tqdm=False))
    llm = engine(model)
    assert tokens(llm.generate([prompt], GREEDY, use_tqdm=False)) == clean
    failed = llm.add_request([30, 31, 32, 33, 34], GREEDY)
    fail_on_call(monkeypatch, llm.runner, "_forward", 1, RuntimeError("kernel failure"))
    with pytest.raises(RuntimeError, match="kernel failure"):
        llm.step()
    # Recovery freed exactly the failed request's blocks; the prompt's stay in the prefix cache.
    check_consistent(llm)
    assert used_blocks(llm) == 0 and llm.block_manager.stats()["cached_blocks"] >= 4
    outputs = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert tokens(outputs) == clean and outputs[0].metrics["cached_prompt_tokens"] == 12
    assert [o.finish_reason for o in llm.take_output(failed).outputs] == ["error"]
    assert_clean(llm)


def test_an_interrupted_step_fails_no_request(model, monkeypatch):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    expected = tokens(engine(model).generate(prompts, GREEDY, use_tqdm=False))
    llm = engine(model)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    llm.step()
    llm.step()
    fail_on_call(monkeypatch, llm.runner, "step", 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    check_consistent(llm)  # both cut back to what an earlier step cached, to be recomputed from there
    assert all(s.finish_reason is None for r in ids for s in llm.sequences(r))
    while llm.scheduler.has_work():
        llm.step()
    assert tokens([llm.take_output(r) for r in ids]) == expected
    assert_clean(llm)


def test_an_interrupted_generate_leaves_no_request_behind(model, monkeypatch):
    llm = engine(model)
    expected = tokens(engine(model).generate([[7, 8, 9]], GREEDY, use_tqdm=False))
    fail_on_call(monkeypatch, llm.runner, "step", 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5, 6]], GREEDY, use_tqdm=False)
    assert_clean(llm)
    assert not llm._requests
    outputs = llm.generate([[7, 8, 9]], GREEDY, use_tqdm=False)  # nothing of the interrupted call resumes
    assert tokens(outputs) == expected and not llm._requests


def test_a_failed_beam_search_leaves_the_engine_clean(model, monkeypatch):
    params = BeamSearchParams(beam_width=3, max_tokens=5)
    llm = engine(model)
    expected = [[o.token_ids for o in r.outputs] for r in llm.beam_search([[1, 2, 3, 4, 5]], params)]
    fail_on_call(monkeypatch, pagedlm.beam_search, "paged_forward", 3, RuntimeError("kernel failure"))
    with pytest.raises(RuntimeError, match="kernel failure"):
        llm.beam_search([[1, 2, 3, 4, 5]], params)
    assert_clean(llm)
    assert [[o.token_ids for o in r.outputs] for r in llm.beam_search([[1, 2, 3, 4, 5]], params)] == expected


@pytest.mark.parametrize("kwargs, field", [(dict(length_penalty=float("nan")), "length_penalty"),
                                           (dict(ignore_eos="no"), "ignore_eos"), (dict(beam_width=2.0), "beam_width")])
def test_beam_search_params_are_checked(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})


# -- threads ----------------------------------------------------------------------------

def test_a_second_thread_is_refused_at_once(model, monkeypatch):
    llm = engine(model)
    inside, release = threading.Event(), threading.Event()
    original = llm.runner.step

    def slow_step(*args):
        inside.set()
        release.wait(timeout=10)
        return original(*args)
    monkeypatch.setattr(llm.runner, "step", slow_step)
    results = []
    worker = threading.Thread(target=lambda: results.append(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)))
    worker.start()
    assert inside.wait(timeout=10)
    try:
        for call in (lambda: llm.generate([[4, 5]], GREEDY, use_tqdm=False), lambda: llm.add_request([4], GREEDY),
                     llm.step, lambda: llm.abort("0")):
            with pytest.raises(RuntimeError, match="in use by another thread.*AsyncLLM"):
                call()
    finally:
        release.set()
        worker.join(timeout=30)
    assert len(results) == 1 and len(results[0][0].outputs[0].token_ids) == 6
    assert_clean(llm)
    assert not llm._requests


def test_every_accepted_request_finishes_once_with_a_known_reason(model):
    llm = engine(model, num_blocks=12, max_num_batched_tokens=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [llm.add_request([1 + i, 2, 3], SamplingParams(n=1 + i % 3, max_tokens=4 + i, seed=i)) for i in range(6)]
        ids.append(llm.add_request(list(range(1, 49)), GREEDY))  # 48 + 6 tokens: more than the cache; refused
    llm.abort(ids[2])
    while llm.scheduler.has_work():
        llm.step()
    reasons = [o.finish_reason for r in ids for o in llm.take_output(r).outputs]
    assert set(reasons) <= {"stop", "length", "abort", "refused"} and reasons[-1] == "refused"
    assert all(s.status == Status.FINISHED for r in llm._requests.values() for s in r["seqs"])
    assert_clean(llm)
