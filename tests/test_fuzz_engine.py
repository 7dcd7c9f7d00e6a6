"""Hypothesis-driven fuzzing of the engine and the loader.

The engine: random streams of requests (valid and invalid prompts and sampling params),
steps, aborts, outputs taken, generate calls, faults injected into steps (an error in the
scheduler, the forward or the sampler; an interrupt), and bad requests (each step that runs
one fails, after writing garbage into the KV slots the step computes), on a tiny random
model under random engine settings (async scheduling among them, over emulated decode graphs). After every step the block manager must hold exactly
the blocks of the running sequences and every live sequence must be in one queue; a failed
step must keep the block manager (and so the prefix cache), and fail no request but bad
ones unless an injected fault fired in it; a bad request must end with an error (or an
abort); a rejected call must leave no trace; every accepted request must finish exactly
once (its reason never changes once set), and a request that finished normally must have
produced the tokens it produces alone on a roomy engine. The loader: config.json fields replaced by random JSON values and
checkpoint tensors broken at random; every error must name the file.

Default runs take about a minute and a half on two cores; pytest --runslow runs many more
examples."""
import json
import math
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import pagedlm.engine.cuda_graphs as cuda_graphs
import pagedlm.engine.runner
from pagedlm import LLM, SamplingParams
from pagedlm.engine.cuda_graphs import DecodeGraphs
from pagedlm.engine.varlen_graphs import VarlenGraphs
from pagedlm.engine.sequence import Status
from pagedlm.models import load_model, random_model

from engine_checks import check_consistent, write_garbage_kv
from graph_stand_in import replay_eagerly
from llama_checkpoint import save_random_checkpoint

CONFIG = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, eos_token_id=2)
VOCAB = CONFIG["vocab_size"]
MODEL = random_model(CONFIG, seed=3, std=0.2)
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


# -- the engine -------------------------------------------------------------------------

class InjectedFault(RuntimeError):
    pass


class Faults:
    """Raises a chosen exception (a new one each time: an instance kept across examples would
    keep their frames alive through its traceback) at the n-th call of a chosen point."""

    def __init__(self, llm):
        self.armed = None  # (point, calls left before it fires, exception class)
        self.fired = 0
        self.bad = set()  # request ids: a step that runs one fails
        self._wrap_bad(llm)
        self._wrap(llm.runner, "step", "forward")
        self._wrap(llm.runner, "launch", "forward")
        self._wrap(llm.scheduler, "_reserve", "schedule")
        self.sample = self._wrapped(pagedlm.engine.runner.sample_step, "sample")

    def arm(self, point, after, exception):
        self.armed = (point, after, exception)

    def _wrap_bad(self, llm):
        step = llm.runner.step

        def call(scheduled, copies):
            if any(s.seq.request_id in self.bad for s in scheduled):
                computing = [s for s in scheduled if s.num_new]
                write_garbage_kv(llm, [s.seq.seq_id for s in computing], [s.num_new for s in computing])
                raise InjectedFault("a bad request")
            return step(scheduled, copies)
        llm.runner.step = call
        launch = llm.runner.launch

        def launch_call(scheduled, copies, in_flight):  # an asynchronous step's launch, the same way
            if any(s.seq.request_id in self.bad for s in scheduled):
                computing = [s for s in scheduled if s.num_new]
                write_garbage_kv(llm, [s.seq.seq_id for s in computing], [s.num_new for s in computing])
                raise InjectedFault("a bad request")
            return launch(scheduled, copies, in_flight)
        llm.runner.launch = launch_call

    def _wrap(self, obj, name, point):
        setattr(obj, name, self._wrapped(getattr(obj, name), point))

    def _wrapped(self, function, point):
        def call(*args, **kwargs):
            if self.armed and self.armed[0] == point:
                point_, left, exception = self.armed
                if left == 0:
                    self.armed = None
                    self.fired += 1
                    raise exception("injected")
                self.armed = (point_, left - 1, exception)
            return function(*args, **kwargs)
        return call


def snapshot(llm):
    """What a rejected call must leave as it was."""
    return (set(llm._requests), [s.seq_id for s in llm.scheduler.running],
            [[s.seq_id for s in g] for g in llm.scheduler.waiting], llm.block_manager.stats()["used_blocks"])


# Mostly valid input, so that streams run long; each invalid input breaks one thing.
good_prompts = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)
bad_tokens = st.sampled_from([-1, VOCAB, VOCAB + 5, 1.5, "a", None, True])
bad_prompts = st.one_of(
    st.tuples(good_prompts, st.integers(0, 24), bad_tokens).map(lambda t: t[0][:t[1]] + [t[2]] + t[0][t[1]:]),
    st.sampled_from([[], "text", None, 3, {"a": 1}]))
prompts = st.one_of(good_prompts, good_prompts, good_prompts, good_prompts, bad_prompts)
good_params = st.fixed_dictionaries({}, optional={
    "n": st.integers(1, 3),
    "temperature": st.sampled_from([0, 0, 0.7, 1.0, 1e-40, 5.0, 1e300]),
    "top_k": st.integers(-1, VOCAB + 3).filter(lambda k: k != 0),
    "top_p": st.floats(0.05, 1.0),
    "max_tokens": st.integers(1, 10),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
    "ignore_eos": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(0, 2**64)),
    "min_p": st.sampled_from([0.0, 0.05, 0.5]),
    "presence_penalty": st.sampled_from([0.0, 1.5, -2.0]),
    "frequency_penalty": st.sampled_from([0.0, 0.7]),
    "repetition_penalty": st.sampled_from([1.0, 1.3, 0.5, 1e-300, 1e300]),
    "min_tokens": st.integers(0, 1),
    "logprobs": st.sampled_from([None, 0, 3]),
    "prompt_logprobs": st.sampled_from([None, None, 0, 2]),
    "logit_bias": st.sampled_from([None, {}, {3: 2.0, 5: -100.0}]),
})
bad_values = st.sampled_from([
    ("n", 0), ("n", -1), ("n", 1.5), ("n", "2"), ("n", True), ("n", 10**8), ("n", 9), ("temperature", -0.5),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"), ("top_k", 0), ("top_k", -2),
    ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("max_tokens", 0), ("max_tokens", 1.5),
    ("max_tokens", 10**9), ("stop_token_ids", [-1]), ("stop_token_ids", [VOCAB]), ("stop_token_ids", 3),
    ("ignore_eos", "no"), ("seed", 2.5), ("min_p", 1.5), ("presence_penalty", 3.0), ("repetition_penalty", 0.0),
    ("min_tokens", -1), ("logprobs", -1), ("logprobs", VOCAB + 1), ("stop", "x"), ("prompt_logprobs", -1),
    ("prompt_logprobs", VOCAB + 1), ("logit_bias", {VOCAB: 1.0}), ("logit_bias", {1: float("nan")})])
bad_params = st.tuples(good_params, bad_values).map(lambda t: {**t[0], t[1][0]: t[1][1]})
params = st.one_of(good_params, good_params, good_params, good_params, bad_params)
engines = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 4, 8]), "num_blocks": st.integers(2, 20) | st.integers(1, 64),
    "max_num_seqs": st.integers(1, 6),
    "max_num_batched_tokens": st.integers(1, 40), "enable_prefix_caching": st.booleans(),
    "speculative": st.sampled_from([None, None, None, {"method": "ngram", "num_tokens": 2, "max_ngram": 2}]),
    "async_scheduling": st.booleans(),  # with decode graphs emulated (Run); not with speculation
}).map(lambda e: {**e, "async_scheduling": e["async_scheduling"] and e["speculative"] is None})
faults = st.tuples(st.sampled_from(["schedule", "forward", "sample"]), st.integers(0, 2),
                   st.sampled_from([InjectedFault, KeyboardInterrupt]))
# Requests without logprobs or penalties, mostly greedy: those whose decode steps async scheduling overlaps.
plain_params = st.fixed_dictionaries({"temperature": st.sampled_from([0, 0, 0.8])}, optional={
    "n": st.integers(1, 3), "max_tokens": st.integers(1, 12), "stop_token_ids": st.lists(st.integers(0, VOCAB - 1),
                                                                                         max_size=2),
    "ignore_eos": st.booleans(), "seed": st.integers(0, 99), "top_k": st.sampled_from([-1, 5])})


def streams(params):
    return st.lists(st.one_of(
        st.tuples(st.just("add"), prompts, params, st.sampled_from([False] * 5 + [True])),  # True: a bad request
        st.tuples(st.just("step"), st.integers(1, 8), st.one_of(st.none(), faults)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("take"), st.integers(0, 30)),
        st.tuples(st.just("bad"), st.integers(0, 30)),
        st.tuples(st.just("generate"), st.lists(st.tuples(prompts, params), min_size=1, max_size=3),
                  st.one_of(st.none(), faults)),
    ), min_size=3, max_size=30)


operations = streams(params)

_alone = {}  # (prompt, params) -> what that request produces alone on a roomy engine


def alone(prompt, sampling):
    """(each sample's tokens, the prompt's log-probability per prompt token or None)."""
    key = (tuple(prompt), sampling)
    if key not in _alone:
        roomy = LLM(MODEL, device="cpu", block_size=4, num_blocks=256, enable_prefix_caching=False)
        roomy.eos_token_ids = frozenset([CONFIG["eos_token_id"]])
        out = roomy.generate([prompt], sampling, use_tqdm=False)[0]
        logprobs = out.prompt_logprobs
        _alone[key] = ([o.token_ids for o in out.outputs],
                       None if logprobs is None else [e and e[t] for t, e in zip(prompt, logprobs)])
    return _alone[key]


class Run:
    """One fuzzed stream against one engine, with the bookkeeping the checks need."""

    def __init__(self, engine):
        self.llm = LLM(MODEL, device="cpu", **engine)
        self.llm.eos_token_ids = frozenset([CONFIG["eos_token_id"]])  # as if loaded from a folder
        if engine["async_scheduling"]:  # the decode and varlen graphs a GPU engine has, which it overlaps
            llm, seqs = self.llm, engine["max_num_seqs"]
            llm.runner.graphs = DecodeGraphs(llm.model, llm.kv_caches, seqs, "cpu")
            llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, seqs, "cpu", None)
        self.faults = Faults(self.llm)
        self.accepted = {}  # request id -> (prompt token ids, params)
        self.reasons = {}  # (request id, sample index) -> the finish reason first seen
        self.bad_samples = set()  # (request id, sample index): unfinished when their request went bad
        self.step_original = self.llm.step
        self.llm.step = self.checked_step  # generate's steps are checked too
        self.sample_original = pagedlm.engine.runner.sample_step

    def checked_step(self):
        fired, bm, errors = self.faults.fired, self.llm.block_manager, self.errors()
        try:
            return self.step_original()
        finally:
            check_consistent(self.llm)
            self.check_reasons()
            if not (bm.block_size == 1 and bm.enable_prefix_caching):  # where recovery resets
                assert self.llm.block_manager is bm
            if self.faults.fired == fired:  # no injected fault: the bad requests alone may fail
                assert {r for r, _ in self.errors() - errors} <= self.faults.bad

    def errors(self):
        return {(r, s.index) for r, request in self.llm._requests.items() for s in request["seqs"]
                if s.finish_reason == "error"}

    def make_live_one_bad(self, pick):
        live = [r for r in self.accepted if any(s.status != Status.FINISHED for s in self.llm._requests[r]["seqs"])]
        if live:
            self.make_bad(live[pick % len(live)])

    def check_reasons(self):
        for request_id, request in self.llm._requests.items():
            for s in request["seqs"]:
                if s.finish_reason is not None:
                    assert self.reasons.setdefault((request_id, s.index), s.finish_reason) == s.finish_reason

    def expect_rejected_or(self, call):
        """call() either succeeds or raises a ValueError/TypeError naming an argument, and then
        changes nothing."""
        before = snapshot(self.llm)
        try:
            return True, call()
        except (ValueError, TypeError) as error:
            assert str(error).split(":")[0].split(".")[0].split("[")[0] in (
                "prompt", "prompts", "params", "sampling_params", "n", "temperature", "top_k", "top_p", "max_tokens",
                "stop_token_ids", "ignore_eos", "seed", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "min_tokens", "logprobs", "stop", "prompt_logprobs", "logit_bias"), str(error)
            assert snapshot(self.llm) == before
            return False, None

    def add(self, prompt, kwargs, bad=False):
        ok, sampling = self.expect_rejected_or(lambda: SamplingParams(**kwargs))
        if not ok:
            return
        ok, request_id = self.expect_rejected_or(lambda: self.llm.add_request(prompt, sampling))
        if ok:
            self.accepted[request_id] = (self.llm._requests[request_id]["token_ids"], sampling)
            if bad:
                self.make_bad(request_id)

    def make_bad(self, request_id):
        """From now on, every step that runs the request fails. A sample with a token in flight
        (async scheduling) ran before: that token lands, and may end it normally."""
        self.faults.bad.add(request_id)
        self.bad_samples |= {(request_id, s.index) for s in self.llm._requests[request_id]["seqs"]
                             if s.status != Status.FINISHED and not s.in_flight}

    def step(self, count, fault):
        """count steps, the fault (if any) armed for the first."""
        for i in range(count):
            if fault is not None and i == 0:
                self.faults.arm(*fault)
            try:
                self.llm.step()
            except (InjectedFault, KeyboardInterrupt):
                pass
            finally:
                self.faults.armed = None

    def generate(self, batch, fault):
        """A generate call: rejected (changing nothing), interrupted or failed by a fault
        (leaving none of its requests), or returning one finished output per prompt (some with
        finish_reason "error" when a fault fired and was blamed on them, with a warning)."""
        sampling = []
        for _, kwargs in batch:
            ok, sp = self.expect_rejected_or(lambda: SamplingParams(**kwargs))
            if not ok:
                return
            sampling.append(sp)
        known, fired = set(self.llm._requests), self.faults.fired
        if fault is not None:
            self.faults.arm(*fault)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                ok, outputs = self.expect_rejected_or(
                    lambda: self.llm.generate([p for p, _ in batch], sampling, use_tqdm=False))
        except (InjectedFault, KeyboardInterrupt):
            ok = False
        finally:
            self.faults.armed = None
        assert set(self.llm._requests) <= known  # none of its requests stays behind
        check_consistent(self.llm)
        if ok:
            reasons = {"stop", "length", "refused"} | ({"error"} if self.faults.fired > fired else set())
            errors = 0
            for output, sp in zip(outputs, sampling):
                assert [o.finish_reason in reasons for o in output.outputs] == [True] * sp.n
                errors += any(o.finish_reason == "error" for o in output.outputs)
                self.check_tokens(output.prompt_token_ids, sp, output)
            assert errors < len(outputs)  # generate raises when every request of the call fails
            assert bool(errors) == any("finish_reason 'error'" in str(w.message) for w in caught)

    def check_tokens(self, prompt, sampling, output):
        """A request that finished normally produced what it produces alone on a plain engine:
        greedy ones always, seeded ones without speculation (whose draws depend on the seed,
        the sample and the position only; speculation keeps their distribution, not their
        tokens); and its prompt logprobs, one entry per prompt token, whatever befell it."""
        outputs = output.outputs
        normal = all(o.finish_reason in ("stop", "length") for o in outputs)
        comparable = sampling.temperature == 0 or (sampling.seed is not None and self.llm.speculator is None)
        if comparable and normal:
            assert [o.token_ids for o in outputs] == alone(prompt, sampling)[0]
        assert (output.prompt_logprobs is None) == (sampling.prompt_logprobs is None)
        if sampling.prompt_logprobs is not None and normal:
            got = output.prompt_logprobs
            assert len(got) == len(prompt) and got[0] is None
            assert all(list(e)[0] == t and len(e) in (sampling.prompt_logprobs, sampling.prompt_logprobs + 1)
                       for t, e in zip(prompt[1:], got[1:]))
            assert [e[t] for t, e in zip(prompt[1:], got[1:])] == pytest.approx(alone(prompt, sampling)[1][1:],
                                                                             abs=1e-4)
        for o in outputs:
            assert (o.logprobs is None) == (sampling.logprobs is None)
            assert o.logprobs is None or [list(e)[0] for e in o.logprobs] == o.token_ids

    def take(self, pick):
        finished = [r for r in self.accepted if all(s.status == Status.FINISHED for s in self.llm._requests[r]["seqs"])]
        if finished:
            request_id = finished[pick % len(finished)]
            self.finish(request_id)

    def finish(self, request_id):
        self.check_reasons()
        prompt, sampling = self.accepted.pop(request_id)
        output = self.llm.take_output(request_id)
        outputs = output.outputs
        assert [o.finish_reason for o in outputs] == [self.reasons.pop((request_id, o.index)) for o in outputs]
        for o in outputs:
            if (request_id, o.index) in self.bad_samples:
                assert o.finish_reason in ("error", "abort", "refused")
        self.check_tokens(prompt, sampling, output)

    def drain(self):
        """Runs to the end: every accepted request finishes, and leaves with its output."""
        steps = 0
        while self.llm.scheduler.has_work():
            try:
                self.llm.step()
            except InjectedFault:  # a step that ran a bad request
                assert self.faults.bad
            steps += 1
            assert steps < 5000, "the engine stopped making progress"
        for request_id in list(self.accepted):
            self.finish(request_id)
        assert not self.llm._requests and len(self.llm.block_manager) == 0
        assert self.llm.block_manager.stats()["used_blocks"] == 0


def run_stream(engine, ops):
    capture, cuda_graphs.capture = cuda_graphs.capture, replay_eagerly
    run = Run(engine)
    pagedlm.engine.runner.sample_step = run.faults.sample
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # refusals warn
            for op in ops:
                if op[0] == "add":
                    run.add(op[1], op[2], op[3])
                elif op[0] == "step":
                    run.step(op[1], op[2])
                elif op[0] == "abort":
                    ids = list(run.accepted) or ["unknown"]
                    run.llm.abort(ids[op[1] % len(ids)])
                elif op[0] == "take":
                    run.take(op[1])
                elif op[0] == "bad":
                    run.make_live_one_bad(op[1])
                else:
                    run.generate(op[1], op[2])
                check_consistent(run.llm)
                run.check_reasons()
            run.drain()
    finally:
        cuda_graphs.capture = capture
        pagedlm.engine.runner.sample_step = run.sample_original
        del run.llm.step  # the instance's wrapper: a reference cycle through run
    return run.faults.fired


@settings(FUZZ, max_examples=800)
@given(engine=engines, ops=operations)
def test_fuzzed_request_streams_keep_the_engine_consistent(engine, ops):
    run_stream(engine, ops)


@pytest.mark.slow
@settings(FUZZ, max_examples=2000)
@given(engine=engines, ops=operations)
def test_fuzzed_request_streams_keep_the_engine_consistent_deep(engine, ops):
    run_stream(engine, ops)


@settings(FUZZ, max_examples=300)
@given(engine=engines.map(lambda e: {**e, "speculative": None, "async_scheduling": True}),
       ops=streams(st.one_of(plain_params, plain_params, plain_params, params)))
def test_fuzzed_plain_streams_with_async_scheduling(engine, ops):
    """Mostly requests whose decode steps overlap, so that steps launch ahead, land late, meet
    faults, aborts, EOS and new requests in flight."""
    run_stream(engine, ops)


# -- the loader -------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([0, 1, 2, 10**12, -(10**9)]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=3)),
    max_leaves=6)
config_keys = st.sampled_from(sorted(CONFIG) + ["head_dim", "rope_theta", "rope_scaling", "rope_parameters",
                                                "tie_word_embeddings", "sliding_window", "model_type",
                                                "rms_norm_eps", "attention_bias", "use_sliding_window"])
rope_scalings = st.fixed_dictionaries({"rope_type": st.sampled_from(["llama3", "default", "yarn", 3])}, optional={
    k: json_values for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-model")
    save_random_checkpoint(folder, CONFIG)
    return folder


def fresh_copy(good, scratch):
    folder = scratch / "model"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(good, folder)
    return folder


def expect_named_error_or_model(folder, named):
    """LLM(folder) builds a working engine, or raises an error naming one of the files."""
    try:
        llm = LLM(folder, device="cpu", block_size=4, num_blocks=16)
    except (ValueError, FileNotFoundError) as error:
        assert any(str(error).startswith(f"{path}:") for path in named), str(error)
        return False
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    return True


def fuzz_configs(good, scratch, edits):
    folder = fresh_copy(good, scratch)
    config = dict(CONFIG)
    for key, value in edits:
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    # A size that disagrees with the checkpoint is reported at the tensor, naming its file.
    expect_named_error_or_model(folder, [folder / "config.json", folder / "model.safetensors", folder])


@settings(FUZZ, max_examples=300)
@given(edits=st.lists(st.tuples(config_keys, json_values) | st.tuples(st.just("rope_scaling"), rope_scalings),
                      min_size=1, max_size=3))
@example(edits=[("rms_norm_eps", 3.402823466385289e38)])  # finite in float64, inf in float32: found by the fuzz
@example(edits=[("num_hidden_layers", 15394264739849.0)])  # per-layer lists of that length: found by the fuzz
def test_fuzzed_config_values_fail_naming_the_file(good_folder, tmp_path_factory, edits):
    fuzz_configs(good_folder, tmp_path_factory.getbasetemp(), edits)


tensor_edits = st.tuples(
    st.integers(0, 100),  # which tensor
    st.sampled_from(["shape", "dtype", "nan", "inf", "drop", "duplicate", "scalar"]))


def fuzz_tensors(good, scratch, edits):
    folder = fresh_copy(good, scratch)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    names = sorted(tensors)
    extra = {}
    for pick, kind in edits:
        name = names[pick % len(names)]
        if name not in tensors:
            continue
        t = tensors[name]
        if kind == "shape":
            tensors[name] = torch.zeros(tuple(s + 1 for s in t.shape) or (2,))  # a scalar edited before: 1-d
        elif kind == "dtype":
            tensors[name] = t.to(torch.int32)
        elif kind in ("nan", "inf"):
            tensors[name] = t.float().view(-1).index_fill_(0, torch.tensor([0]), float(kind)).view(t.shape)
        elif kind == "drop":  # from every file: a duplicate made before would otherwise complete it again
            del tensors[name]
            extra.pop(name, None)
        elif kind == "duplicate":
            extra[name] = t.clone()
        else:
            tensors[name] = torch.tensor(1.0)
    save_file(tensors, str(path))
    if extra:
        save_file(extra, str(folder / "z-extra.safetensors"))
    # Every edit breaks the checkpoint (the first always applies), so none may load.
    assert not expect_named_error_or_model(folder, [folder, path, folder / "z-extra.safetensors"]), edits


@settings(FUZZ, max_examples=100)
@given(edits=st.lists(tensor_edits, min_size=1, max_size=3))
@example(edits=[(0, "scalar"), (0, "shape")])  # found by the fuzz: each was a bug of the test itself
@example(edits=[(0, "duplicate"), (0, "drop")])
def test_fuzzed_checkpoint_tensors_fail_naming_the_file(good_folder, tmp_path_factory, edits):
    fuzz_tensors(good_folder, tmp_path_factory.getbasetemp(), edits)


@pytest.mark.slow
@settings(FUZZ, max_examples=1500)
@given(edits=st.lists(st.tuples(config_keys, json_values) | st.tuples(st.just("rope_scaling"), rope_scalings),
                      min_size=1, max_size=4))
def test_fuzzed_config_values_fail_naming_the_file_deep(good_folder, tmp_path_factory, edits):
    fuzz_configs(good_folder, tmp_path_factory.getbasetemp(), edits)


def test_the_fuzzed_stream_checks_can_fail():
    """The consistency check is not vacuous: a block leaked past a finished sequence fails it."""
    llm = LLM(MODEL, device="cpu", block_size=4, num_blocks=16)
    request = llm.add_request([1, 2, 3], SamplingParams(max_tokens=3))
    llm.step()
    check_consistent(llm)
    seq = llm._requests[request]["seqs"][0]
    llm.scheduler.running.remove(seq)  # forgotten by the scheduler, its blocks still held
    with pytest.raises(AssertionError):
        check_consistent(llm)
    assert math.isfinite(llm.block_manager.stats()["utilization"])
