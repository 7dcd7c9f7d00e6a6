"""pagedlm.AsyncLLM without HTTP: incremental detokenization, stop strings, aborts, failures,
the waiting bound; and the chat template. CPU, the shipped code model, small max_tokens."""
import asyncio
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from pagedlm.data import tiny_model  # noqa: E402
from pagedlm.engine.sequence import SamplingParams  # noqa: E402
from pagedlm.llm import LLM  # noqa: E402
from pagedlm.serving import (AsyncLLM, EngineOverloaded, EngineStopped, PromptTooLong,  # noqa: E402
                             RequestFailed, RequestStream, SampleDelta, StreamOutput)
from pagedlm.serving.async_llm import merge_outputs  # noqa: E402
from pagedlm.serving.chat_template import (DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError,  # noqa: E402
                                           load_chat_template)
from pagedlm.serving.detokenizer import IncrementalDetokenizer, StopStrings  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("target"), device="cpu", num_blocks=256)


@pytest.fixture
def engine(llm):
    engine = AsyncLLM(llm)
    yield engine
    engine.shutdown()
    assert not engine._thread.is_alive()


def run(coroutine, timeout=60):
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def collect(engine, prompt, params=GREEDY, **kwargs):
    """(texts, token ids, finish reasons) per sample."""
    texts, ids, reasons = [[] for _ in range(params.n)], [[] for _ in range(params.n)], [None] * params.n
    async for out in engine.generate(prompt, params, **kwargs):
        for d in out.outputs:
            texts[d.index].append(d.text)
            ids[d.index] += d.token_ids
            reasons[d.index] = d.finish_reason or reasons[d.index]
    return ["".join(t) for t in texts], ids, reasons


# -- the detokenizer ----------------------------------------------------------------------------
def test_incremental_detokenizer_waits_out_split_characters(llm):
    tok = llm.tokenizer
    prompt = tok.encode("x = '").ids
    output = tok.encode("héllo 世界 😀 done'\n").ids
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add([t]) for t in output] + [detok.finish()]
    assert "".join(deltas) == llm._completion_text(prompt, output)
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some token ended inside a character and waited for the next


def test_detokenizer_final_text_keeps_invalid_bytes_as_the_offline_text_does(llm):
    tok = llm.tokenizer
    prompt = tok.encode("#").ids
    output = tok.encode("😀").ids[:2]  # half a character: it never completes
    detok = IncrementalDetokenizer(tok, prompt)
    streamed = "".join(detok.add([t]) for t in output) + detok.finish()
    assert streamed == llm._completion_text(prompt, output)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_deltas_add_up_to_the_offline_text_for_any_ids(llm, data):
    """Any token ids (byte tokens that split characters, special tokens), fed in groups of any
    size after any prompt: the deltas and finish() give the offline text, whether the stream
    is primed (the prompt ends on a character boundary) or the windowed decode runs."""
    vocab = llm.tokenizer.get_vocab_size()
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=12), label="prompt")
    output = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30), label="output")
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=len(output), max_size=len(output)), label="groups")
    detok = IncrementalDetokenizer(llm.tokenizer, prompt)
    streamed, i = "", 0
    for size in sizes:
        streamed += detok.add(output[i:i + size])
        i += size
    assert streamed + detok.finish() == llm._completion_text(prompt, output)


def test_detokenizer_streams_text_prompts_and_goes_on_when_the_stream_fails(llm):
    tok = llm.tokenizer
    prompt, output = tok.encode("s = '").ids, tok.encode("héllo 世界 😀 'done'\n").ids
    steps = []

    class FailingStream:  # DecodeStream as it raises InvalidPrefix at the fourth token
        def __init__(self, stream):
            self.stream = stream

        def step(self, tokenizer, token):
            steps.append(token)
            if len(steps) == 4:
                raise Exception("InvalidPrefix")
            return self.stream.step(tokenizer, token)

    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.stream is not None  # a text prompt ends on a character boundary: the stream is primed
    detok.stream = FailingStream(detok.stream)
    deltas = [detok.add([t]) for t in output] + [detok.finish()]
    assert len(steps) == 4 and detok.stream is None
    assert "".join(deltas) == llm._completion_text(prompt, output)
    assert not any("\ufffd" in d for d in deltas)


def test_stop_strings_across_deltas_are_cut_and_never_streamed_in_part():
    stop = StopStrings(["STOP", "\n\n"])
    released = []
    for delta in ["abc S", "T", "O", "xyz ST", "OP tail"]:
        text, hit = stop.feed(delta)
        released.append(text)
        if hit:
            break
    assert hit and "".join(released) == "abc STOxyz "
    assert released[1] == ""  # "ST" might have begun STOP: held back
    assert stop.feed("more")[0] == ""


def test_stop_strings_release_the_held_tail_at_the_end():
    stop = StopStrings(["STOP"])
    assert stop.feed("abc ST") == ("abc ", False)
    assert stop.feed("", final=True) == ("ST", False)


# -- AsyncLLM -----------------------------------------------------------------------------------
def test_streamed_outputs_equal_offline_generate(engine, llm):
    prompts = ["def add(a, b):", "import os\n", "# 世界 😀 héllo\n", "class Foo:\n    def"]

    async def main():
        return await asyncio.gather(*[collect(engine, p) for p in prompts])

    streamed = run(main())
    offline = LLM(tiny_model("target"), device="cpu", num_blocks=256).generate(prompts, GREEDY, use_tqdm=False)
    for (texts, ids, reasons), ref in zip(streamed, offline):
        assert ids[0] == ref.outputs[0].token_ids
        assert texts[0] == ref.outputs[0].text
        assert reasons[0] == ref.outputs[0].finish_reason


def test_streams_with_async_scheduling_equal_offline_generate(monkeypatch):
    """The engine thread over an LLM with async scheduling (decode graphs emulated): tokens land
    a step late, text and stop strings follow them, and the streams equal offline generate."""
    import pagedlm.engine.cuda_graphs as cuda_graphs
    from graph_stand_in import replay_eagerly
    monkeypatch.setattr(cuda_graphs, "capture", replay_eagerly)
    overlapped = LLM(tiny_model("target"), device="cpu", num_blocks=256, max_num_seqs=8, async_scheduling=True)
    overlapped.runner.graphs = cuda_graphs.DecodeGraphs(overlapped.model, overlapped.kv_caches, 8, "cpu")
    fed = []
    launch = overlapped.runner.launch
    overlapped.runner.launch = lambda *args: fed.append(args[2] is not None) or launch(*args)
    prompts = ["def add(a, b):", "import os\n", "class Foo:\n    def", "for i in range(10):"]
    params = SamplingParams(temperature=0, max_tokens=24, stop=["\n\n", "warnings"])  # the first two stop
    engine = AsyncLLM(overlapped)
    try:
        async def main():
            return await asyncio.gather(*[collect(engine, p, params) for p in prompts])
        streamed = run(main())
    finally:
        engine.shutdown()
    offline = LLM(tiny_model("target"), device="cpu", num_blocks=256).generate(prompts, params, use_tqdm=False)
    for (texts, ids, reasons), ref in zip(streamed, offline):
        assert (ids[0], texts[0], reasons[0]) == (ref.outputs[0].token_ids, ref.outputs[0].text,
                                                  ref.outputs[0].finish_reason)
    assert [reasons[0] for _, _, reasons in streamed] == ["stop", "stop", "length", "length"]
    assert any(fed), "no step launched while another was in flight"
    assert overlapped.block_manager.stats()["used_blocks"] == 0


def test_merge_outputs_joins_each_samples_deltas_in_order():
    first = StreamOutput("r", [1, 2], [SampleDelta(0, "a", [5], None, [{5: -0.5}]), SampleDelta(1, "x", [7], None)],
                         False, prompt_logprobs=[None, {2: -1.0}])
    second = StreamOutput("r", [1, 2], [SampleDelta(1, "yz", [8, 9], "stop")], False)
    third = StreamOutput("r", [1, 2], [SampleDelta(0, "b", [6], "length", [{6: -0.25}])], True)
    merged = merge_outputs([first, second, third])
    assert merged.finished and merged.prompt_logprobs == [None, {2: -1.0}]
    assert [(d.index, d.text, d.token_ids, d.finish_reason, d.logprobs) for d in merged.outputs] == [
        (0, "ab", [5, 6], "length", [{5: -0.5}, {6: -0.25}]), (1, "xyz", [7, 8, 9], "stop", None)]
    assert first.outputs[0].token_ids == [5] and first.outputs[0].logprobs == [{5: -0.5}]  # the inputs unchanged
    assert merge_outputs([second]) is second


def test_a_stream_that_falls_behind_takes_its_queued_outputs_at_once_then_the_error():
    async def main():
        stream = RequestStream(None, "r", [1], GREEDY, asyncio.get_running_loop())
        for token in (3, 4, 5):
            stream._put(StreamOutput("r", [1], [SampleDelta(0, str(token), [token], None)], False))
        stream._put(RequestFailed("boom"))
        merged = await stream.__anext__()
        with pytest.raises(RequestFailed, match="boom"):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return merged
    merged = run(main())
    assert [(d.text, d.token_ids) for d in merged.outputs] == [("345", [3, 4, 5])] and not merged.finished


def test_generation_tokens_metric_counts_every_streamed_token(engine):
    def generated():
        return engine.metrics.registry.get_sample_value("pagedlm_generation_tokens_total") or 0.0
    before = generated()
    params = SamplingParams(temperature=0, max_tokens=7, n=2)
    _, ids, _ = run(collect(engine, "def f(x):", params))
    assert [len(i) for i in ids] == [7, 7]
    assert generated() - before == 14


def test_stop_string_ends_the_sample_and_frees_its_blocks(engine, llm):
    ref_text = llm.generate(["def add(a, b):"], GREEDY, use_tqdm=False)[0].outputs[0].text
    assert "return" in ref_text

    async def main():
        return await collect(engine, "def add(a, b):", stop=["return"])

    texts, ids, reasons = run(main())
    assert texts[0] == ref_text[:ref_text.index("return")]
    assert reasons == ["stop"] and len(ids[0]) < GREEDY.max_tokens
    assert llm.block_manager.stats()["num_seqs"] == 0


def test_abort_frees_the_blocks_at_once(engine, llm):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        stream = await engine.add_request("def f(x):", params)
        await stream.__anext__()
        assert llm.block_manager.stats()["used_blocks"] > 0
        stream.abort()
        for _ in range(200):
            if llm.block_manager.stats()["used_blocks"] == 0 and not engine._live:
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(main())


def test_draining_refuses_new_requests_and_abort_all_ends_the_rest(llm):
    engine = AsyncLLM(llm, metrics=False)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        stream = await engine.add_request("def f(x):", long)
        await stream.__anext__()
        engine.start_draining()
        with pytest.raises(EngineStopped, match="shutting down"):
            await engine.add_request("x", GREEDY)
        engine.abort_all()
        with pytest.raises(EngineStopped, match="aborted"):
            async for _ in stream:
                pass

    try:
        run(main())
        assert llm.block_manager.stats()["num_seqs"] == 0
    finally:
        engine.shutdown()


def test_prompt_that_cannot_fit_is_refused_before_it_queues(engine):
    async def main():
        with pytest.raises(PromptTooLong, match="maximum context length is 512"):
            await engine.add_request("x " * 600, GREEDY)
        with pytest.raises(PromptTooLong, match="KV-cache blocks"):
            small = AsyncLLM(LLM(tiny_model("target"), device="cpu", num_blocks=4), metrics=False)
            try:
                await small.add_request("x", SamplingParams(max_tokens=100))
            finally:
                small.shutdown()
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_request([1, 2, 10**6], GREEDY)

    run(main())


def test_waiting_bound_raises_overloaded():
    engine = AsyncLLM(LLM(tiny_model("target"), device="cpu", num_blocks=64, max_num_seqs=1), max_waiting=1,
                      metrics=False)
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)

    async def main():
        running = await engine.add_request("a", long)
        await running.__anext__()           # admitted
        waiting = await engine.add_request("b", long)
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloaded):
            await engine.add_request("c", long)
        running.abort()
        waiting.abort()

    try:
        run(main())
    finally:
        engine.shutdown()


POISON = 4000  # a prompt holding this token makes every step it is in fail


@contextlib.contextmanager
def poisoned_steps(llm):
    """While inside: a step that runs a sequence whose prompt holds POISON raises."""
    real_step = llm.runner.step

    def step(scheduled, copies):
        if any(POISON in s.seq.prompt for s in scheduled):
            raise RuntimeError("injected fault")
        return real_step(scheduled, copies)

    llm.runner.step = step
    try:
        yield
    finally:
        llm.runner.step = real_step


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine, llm):
    async def main():
        with poisoned_steps(llm), pytest.raises(RequestFailed, match="injected fault"):
            await collect(engine, [5, 6, POISON])
        return await collect(engine, "def add(a, b):")

    texts, ids, reasons = run(main())
    assert reasons == ["length"] and len(ids[0]) == GREEDY.max_tokens
    assert llm.block_manager.stats()["num_seqs"] == 0 and engine.alive


def test_a_step_that_one_request_fails_fails_only_that_request(engine, llm):
    """The engine blames the request that makes a step fail: its stream fails, and the others
    that ran in the step go on with the tokens they produce alone."""
    async def main():
        alone = await collect(engine, "def add(a, b):")
        with poisoned_steps(llm):
            good = [asyncio.ensure_future(collect(engine, prompt)) for prompt in ("def add(a, b):", [7, 8, 9])]
            bad = asyncio.ensure_future(collect(engine, [5, 6, POISON]))
            with pytest.raises(RequestFailed, match="injected fault"):
                await bad
            return alone, await asyncio.gather(*good)

    alone, (first, second) = run(main())
    assert first == alone and second[2] == ["length"] and len(second[1][0]) == GREEDY.max_tokens
    assert llm.block_manager.stats()["num_seqs"] == 0 and engine.alive


def test_a_sample_the_engine_finishes_with_an_error_fails_only_its_request(engine, llm):
    """The engine's contract for a failed request: its samples finish with a reason other
    than stop, length or abort; the others in the batch carry on."""
    real_step = llm.step

    def step():
        count = real_step()
        for seq in list(llm.scheduler.running):
            if seq.prompt[-1] == 4000 and seq.output:
                llm.finish_sequence(seq, "error")
        return count

    async def main():
        llm.step = step
        try:
            bad = asyncio.ensure_future(collect(engine, [5, 6, 4000]))
            good = asyncio.ensure_future(collect(engine, "def add(a, b):"))
            with pytest.raises(RequestFailed, match="error"):
                await bad
            return await good
        finally:
            del llm.step

    texts, ids, reasons = run(main())
    assert reasons == ["length"] and len(ids[0]) == GREEDY.max_tokens


def test_a_fault_in_one_requests_text_fails_only_that_request(engine, llm):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    def broken(new_ids):
        raise RuntimeError("injected detokenizer fault")

    async def main():
        bad = await engine.add_request("def f(x):", long)
        engine._live[bad.request_id].seqs[0].text.detokenizer.add = broken
        good = asyncio.ensure_future(collect(engine, "def add(a, b):"))
        with pytest.raises(RequestFailed, match="injected detokenizer fault"):
            async for _ in bad:
                pass
        return await good

    texts, ids, reasons = run(main())
    assert reasons == ["length"] and len(ids[0]) == GREEDY.max_tokens and engine.alive
    assert llm.block_manager.stats()["num_seqs"] == 0


def test_n_samples_with_a_seed_reproduce(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7)

    async def main():
        return await collect(engine, "def f(x):", params), await collect(engine, "def f(x):", params)

    first, second = run(main())
    assert first == second
    assert len({tuple(ids) for ids in first[1]}) > 1


# -- chat templates -----------------------------------------------------------------------------
def test_chat_template_from_tokenizer_config(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    source, variables = load_chat_template(tmp_path)
    text = ChatTemplate(source, variables).render([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>hi</s><|assistant|>"


def test_default_chat_template_and_raise_exception(tmp_path):
    source, _ = load_chat_template(tmp_path)
    assert source == DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ChatTemplate(source).render(messages) == "system: be brief\nuser: hi\nassistant:"
    strict = ChatTemplate("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="no system"):
        strict.render(messages)


# -- the serve subcommand -------------------------------------------------------------------------
def test_serve_subcommand_parses_with_its_defaults(capsys):
    import argparse

    from pagedlm.serving.cli import add_parser, run
    parser = argparse.ArgumentParser(prog="pagedlm")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "9001"])
    assert args.func is run and args.model is None
    assert (args.host, args.port, args.max_num_seqs, args.max_waiting) == ("127.0.0.1", 9001, 256, 1024)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "(default: 30.0)" in capsys.readouterr().out
