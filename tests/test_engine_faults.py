"""Faults at the engine's edges: bad arguments are refused up front with an error naming them,
a step that fails leaves the engine consistent and usable, generate leaves nothing behind
however it exits, and a second thread is told at once that an LLM is not shared."""
import dataclasses
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


class BadRequest:
    """Makes every step that computes or samples for one of the `bad` requests fail, once it has
    `after` output tokens, as a kernel would that chokes on those requests' input. At "step"
    (before the step's copy-on-write block copies) and "forward", garbage is written into every
    slot the step computes (the other sequences' included) before it raises; at "sample",
    sampling raises. `calls` counts the steps' runs, forwards or samplings; `fired`, the
    failures."""

    def __init__(self, monkeypatch, llm, bad, point="forward", after=0):
        # bad: request ids, or a test of a sequence (for requests generate queues itself)
        self.is_bad = bad if callable(bad) else (lambda seq, ids=frozenset(bad): seq.request_id in ids)
        self.llm, self.bad, self.after, self.armed = llm, bad, after, True
        self.calls = self.fired = 0
        if point == "step":
            step = llm.runner.step
            monkeypatch.setattr(llm.runner, "step", lambda scheduled, copies: (
                self._check([s.seq for s in scheduled], [s for s in scheduled if s.num_new]), step(scheduled, copies))[1])
        elif point == "forward":
            forward = llm.runner._forward
            monkeypatch.setattr(llm.runner, "_forward", lambda computing, *args: (
                self._check([s.seq for s in computing], computing), forward(computing, *args))[1])
        else:  # a step that waits samples on the host; a launched one (async scheduling) on the device
            for name in ("sample_step", "sampled_choices"):
                sample = getattr(pagedlm.engine.runner, name)
                monkeypatch.setattr(pagedlm.engine.runner, name, lambda logits, seqs, *args, sample=sample: (
                    self._check(seqs), sample(logits, seqs, *args))[1])

    def _check(self, seqs, computing=None):
        self.calls += 1
        # (A token in flight counts: with async scheduling it is emitted after the step launches.)
        if self.armed and any(self.is_bad(s) and len(s.output) + s.in_flight >= self.after for s in seqs):
            if computing is not None:
                slots = self.llm.block_manager.slot_mapping([s.seq.seq_id for s in computing],
                                                            [s.num_new for s in computing])
                for cache in self.llm.kv_caches:
                    for t in cache[:2]:
                        t.view(-1, *t.shape[2:])[torch.from_numpy(slots)] = 7.0
            self.fired += 1
            raise RuntimeError(f"kernel failure on {self.bad if callable(self.bad) else sorted(self.bad)}")


def run_to_the_end(llm):
    """Steps until nothing is left, checking the engine after each step; returns the errors raised."""
    errors = []
    while llm.scheduler.has_work() or llm._flights:
        try:
            llm.step()
        except RuntimeError as e:
            errors.append(e)
        check_consistent(llm)
    return errors


SEEDED = SamplingParams(temperature=0.9, seed=11, max_tokens=6, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10], [11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9],
           [14, 15, 16, 17, 18], [19, 20]]


@pytest.mark.parametrize("point", ["step", "forward", "sample"])
# In the step that admits them all; in the first decode step, where request 2's samples copy
# their shared last prompt block on write; or two decode steps later.
@pytest.mark.parametrize("after", [0, 1, 3])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_that_fails_steps_fails_alone(model, monkeypatch, point, after, prefix_caching, params):
    check_blamed_alone(model, monkeypatch, point, after, params, enable_prefix_caching=prefix_caching)


@pytest.mark.parametrize("point", ["forward", "sample"])
@pytest.mark.parametrize("after", [0, 1, 3])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_that_fails_launched_steps_fails_alone(model, monkeypatch, point, after, params):
    """The same with async scheduling: the failing step was launched while another was in flight
    (its prompts admitted, or its decodes fed on the device); it is rolled back, the step in
    flight lands, and the blame's retries run as steps that wait."""
    check_blamed_alone(model, monkeypatch, point, after, params, async_scheduling=True)


@pytest.mark.parametrize("speculative", ["ngram", "draft", "lookahead", "jacobi", None])
@pytest.mark.parametrize("point", ["step", "forward"])
def test_a_request_that_fails_steps_fails_alone_when_speculating_or_with_one_token_blocks(model, monkeypatch,
                                                                                          speculative, point):
    # Drafts hold slots in the failed step; with one-token blocks and prefix caching, recovery
    # cannot take a block out of the prefix cache and resets the block manager instead.
    kwargs = {None: dict(block_size=1, num_blocks=256),
              "ngram": dict(speculative={"method": "ngram", "num_tokens": 2, "max_ngram": 2}),
              "draft": dict(speculative={"method": "draft", "model": random_model(CONFIG, seed=2, std=0.2),
                                         "num_tokens": 2}),
              "lookahead": dict(speculative={"method": "lookahead", "window": 2, "ngram": 2, "guesses": 2}),
              "jacobi": dict(speculative={"method": "jacobi", "num_tokens": 2})}[speculative]
    check_blamed_alone(model, monkeypatch, point, 1, GREEDY, **kwargs)


def check_blamed_alone(model, monkeypatch, point, after, params, **kwargs):
    """Request 1 fails every step it is in, from its `after`-th token on; it shares 8 prompt
    tokens with requests 0 and 3, admitted in the same step, and request 2 has two samples."""
    all_params = [params, params, dataclasses.replace(params, n=2), params, params, params]
    clean = tokens(engine(model).generate(PROMPTS, all_params, use_tqdm=False))
    llm = engine(model, **kwargs)
    ids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS, all_params)]
    bad = BadRequest(monkeypatch, llm, [ids[1]], point, after)
    errors = run_to_the_end(llm)
    error = llm.sequences(ids[1])[0].error
    outputs = [llm.take_output(r) for r in ids]
    # The others produced what they produce without the bad request; it failed alone.
    assert tokens(outputs[:1] + outputs[2:]) == clean[:1] + clean[2:]
    assert [o.finish_reason for o in outputs[1].outputs] == ["error"]
    assert len(outputs[1].outputs[0].token_ids) == after
    assert len(errors) == 1 and bad.fired >= 2  # the step, and the bad request retried alone
    assert f"request(s) {ids[1]} were in the failed step" in str(errors[0].__notes__)
    assert "kernel failure" in error
    assert_clean(llm)
    bad.armed = False
    assert tokens(llm.generate(PROMPTS, all_params, use_tqdm=False)) == clean


def test_generate_returns_the_failed_request_with_an_error_and_the_others_finish(model, monkeypatch):
    all_params = [GREEDY, GREEDY, dataclasses.replace(GREEDY, n=2), GREEDY, GREEDY, GREEDY]
    clean = tokens(engine(model).generate(PROMPTS, all_params, use_tqdm=False))
    llm = engine(model)
    bad = BadRequest(monkeypatch, llm, lambda seq: seq.prompt == PROMPTS[1], "forward", after=1)
    with pytest.warns(RuntimeWarning, match=r"request\(s\) \d+ finished with finish_reason 'error'"):
        outputs = llm.generate(PROMPTS, all_params, use_tqdm=False)
    assert bad.fired >= 2
    assert [o.finish_reason for o in outputs[1].outputs] == ["error"] and len(outputs[1].outputs[0].token_ids) == 1
    assert tokens(outputs[:1] + outputs[2:]) == clean[:1] + clean[2:]
    assert_clean(llm)


def test_generate_raises_when_every_request_of_the_call_fails(model, monkeypatch):
    llm = engine(model)
    BadRequest(monkeypatch, llm, lambda seq: True, "forward")
    with pytest.raises(RuntimeError, match="kernel failure"):
        llm.generate([[1, 2, 3], [4, 5, 6]], GREEDY, use_tqdm=False)
    assert_clean(llm)


def test_blame_takes_at_most_twice_log2_retries(model, monkeypatch):
    # 8 requests in the step, the last one bad: 3 halvings of 2 retries each.
    llm = engine(model)
    ids = [llm.add_request([1 + i, 2, 3], GREEDY) for i in range(8)]
    bad = BadRequest(monkeypatch, llm, [ids[-1]], "forward", after=1)
    llm.step()
    calls = bad.calls
    with pytest.raises(RuntimeError, match="kernel failure"):
        llm.step()
    assert bad.calls - calls == 1 + 2 * 3
    check_consistent(llm)
    assert [s.finish_reason for r in ids for s in llm.sequences(r)] == [None] * 7 + ["error"]
    # The retries that went through emitted the others' second tokens.
    assert [len(llm.sequences(r)[0].output) for r in ids] == [2] * 7 + [1]


def test_blame_isolates_culprits_in_both_halves(model, monkeypatch):
    # 4 requests, the 2nd and 4th bad: both halves fail, a retry goes through ([0]), and the
    # retries extend to every culprit's: the two bad requests fail, the others go on.
    llm = engine(model)
    ids = [llm.add_request([1 + i, 2, 3], GREEDY) for i in range(4)]
    bad = BadRequest(monkeypatch, llm, [ids[1], ids[3]], "forward", after=1)
    llm.step()
    calls = bad.calls
    with pytest.raises(RuntimeError, match="kernel failure") as failure:
        llm.step()
    assert bad.calls - calls == 1 + 2 * 3  # halves, the first half's halves, the second's
    assert f"request(s) {ids[1]}, {ids[3]} were in the failed step" in str(failure.value.__notes__)
    check_consistent(llm)
    assert [s.finish_reason for r in ids for s in llm.sequences(r)] == [None, "error", None, "error"]
    assert [len(llm.sequences(r)[0].output) for r in ids] == [2, 1, 2, 1]


def test_a_failure_every_request_meets_alone_fails_the_step(model, monkeypatch):
    # Every request fails alone (the whole engine is broken): blame falls back to failing the
    # step's requests, within its retries; a request the step did not run is untouched.
    prompts = [[1 + i, 2, 3] for i in range(5)]
    clean = tokens(engine(model).generate(prompts, GREEDY, use_tqdm=False))
    llm = engine(model, max_num_seqs=4)
    ids = [llm.add_request(p, GREEDY) for p in prompts]
    bad = BadRequest(monkeypatch, llm, ids, "forward")
    with pytest.raises(RuntimeError, match="kernel failure") as failure:
        llm.step()
    assert bad.calls == 1 + 2 * 2
    assert f"request(s) {', '.join(ids[:4])} were in the failed step" in str(failure.value.__notes__)
    check_consistent(llm)
    assert [s.finish_reason for r in ids for s in llm.sequences(r)] == ["error"] * 4 + [None]
    bad.armed = False
    assert not run_to_the_end(llm)
    assert tokens([llm.take_output(ids[4])]) == clean[4:]


def test_a_failed_step_keeps_the_prefix_cache(model, monkeypatch):
    prompt = list(range(1, 14))  # 13 tokens: 3 whole blocks of 4 can come from the cache
    clean = tokens(engine(model).generate([prompt, [20, 21, 22]], GREEDY, use_tqdm=False))
    llm = engine(model)
    assert tokens(llm.generate([prompt], GREEDY, use_tqdm=False)) == clean[:1]
    ids = [llm.add_request([20, 21, 22], GREEDY), llm.add_request([30, 31, 32, 33, 34], GREEDY)]
    llm.step()
    bad = BadRequest(monkeypatch, llm, [ids[1]], "forward")
    with pytest.raises(RuntimeError, match="kernel failure"):
        llm.step()
    # Recovery freed exactly the failed request's blocks: the running one keeps its own, and
    # the prompt's blocks stay in the prefix cache.
    check_consistent(llm)
    stats = llm.block_manager.stats()
    assert stats["used_blocks"] == 1 and stats["cached_blocks"] >= 4
    bad.armed = False
    outputs = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert tokens(outputs) == clean[:1] and outputs[0].metrics["cached_prompt_tokens"] == 12
    assert not run_to_the_end(llm)
    assert tokens([llm.take_output(ids[0])]) == clean[1:]
    assert [o.finish_reason for o in llm.take_output(ids[1]).outputs] == ["error"]
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
