"""The OpenAI-compatible server, end to end: uvicorn on 127.0.0.1 (a free port) in a thread of
the test process, the shipped code model on the CPU, the official openai client. Small
max_tokens keep the whole file to well under a minute on two cores."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from pagedlm.data import tiny_model  # noqa: E402
from pagedlm.engine.sequence import SamplingParams  # noqa: E402
from pagedlm.llm import LLM  # noqa: E402
from pagedlm.serving import AsyncLLM  # noqa: E402
from pagedlm.serving.app import build_app  # noqa: E402
from pagedlm.serving.chat_template import ChatTemplate  # noqa: E402

MODEL = "tiny-code"
ENGINE = dict(device="cpu", num_blocks=512, seed=0)
PROMPTS = ["def add(a, b):", "import os\n", "# 世界 😀 héllo\n", "class Foo:\n    def", "for i in range("]


def _free_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server():
    engine = AsyncLLM(tiny_model("target"), **ENGINE)
    app = build_app(engine, served_model_name=MODEL)
    sock = _free_socket()
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, engine=engine, app=app, bm=engine.llm.block_manager,
                          client=openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60))
    srv.should_exit = True
    thread.join(15)
    engine.shutdown()
    sock.close()


@pytest.fixture(scope="module")
def offline():
    return LLM(tiny_model("target"), **ENGINE)


def _idle(server, timeout=5.0):
    """True once the engine holds no request and no block."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.bm.stats()
        if not server.engine._live and stats["used_blocks"] == 0 and stats["num_seqs"] == 0:
            return True
        time.sleep(0.01)
    return False


def _metric(server, name):
    text = httpx.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- the happy paths --------------------------------------------------------------------------
def test_completions_equal_offline_generate(server, offline):
    params = SamplingParams(temperature=0, max_tokens=10)
    refs = offline.generate(PROMPTS, params, use_tqdm=False)
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0,
                                         extra_body={"return_token_ids": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert [c.index for c in r.choices] == list(range(len(PROMPTS)))
    for choice, ref in zip(r.choices, refs):
        assert choice.text == ref.outputs[0].text
        assert choice.token_ids == ref.outputs[0].token_ids
        assert choice.finish_reason == ref.outputs[0].finish_reason
    assert r.usage.completion_tokens == sum(len(x.outputs[0].token_ids) for x in refs)
    assert r.usage.prompt_tokens == sum(len(x.prompt_token_ids) for x in refs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=3, n=2)])
def test_streaming_equals_non_streaming_token_for_token(server, sampling):
    args = dict(model=MODEL, prompt="def fib(n):", max_tokens=12, extra_body={"return_token_ids": True}, **sampling)
    whole = server.client.completions.create(**args)
    n = sampling.get("n", 1)
    texts, ids, reasons = [""] * n, [[] for _ in range(n)], [None] * n
    usage = None
    for chunk in server.client.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            ids[c.index] += c.token_ids
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.text for c in whole.choices]
    assert ids == [c.token_ids for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert usage.model_dump() == whole.usage.model_dump()


def test_chat_streaming_equals_non_streaming(server):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]}]
    args = dict(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    whole = server.client.chat.completions.create(**args)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    chunks = list(server.client.chat.completions.create(stream=True, **args))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_template(server, offline):
    """The prompt is the rendered template, tokenized without special tokens added."""
    template = ChatTemplate("{% for m in messages %}# {{ m['content'] }}\n{% endfor %}def")
    saved, server.app.state.chat_template = server.app.state.chat_template, template
    try:
        r = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "sum"}],
                                                  max_tokens=8, temperature=0)
    finally:
        server.app.state.chat_template = saved
    ref = offline.generate(["# sum\ndef"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert r.choices[0].message.content == ref.outputs[0].text


def test_n_with_a_seed_is_reproducible(server):
    args = dict(model=MODEL, prompt="import ", max_tokens=8, n=4, seed=11, temperature=1.0)
    first = [c.text for c in server.client.completions.create(**args).choices]
    second = [c.text for c in server.client.completions.create(**args).choices]
    assert first == second and len(first) == 4
    assert len(set(first)) > 1
    assert [c.text for c in server.client.completions.create(**{**args, "seed": 12}).choices] != first


def test_stop_strings_are_cut(server, offline):
    ref = offline.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    text = ref.outputs[0].text
    assert "return" in text
    for stream in (False, True):
        r = server.client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=12, temperature=0,
                                             stop=["return", "never seen"], stream=stream)
        if stream:
            chunks = list(r)
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (got, reason) == (text[:text.index("return")], "stop")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=7, n=2, min_p=0.05)])
def test_completion_logprobs_equal_offline(server, offline, stream, sampling):
    prompts = PROMPTS[:3]
    params = SamplingParams(max_tokens=8, logprobs=3, **sampling)
    refs = offline.generate(prompts, params, use_tqdm=False)
    r = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, logprobs=3, stream=stream,
                                         extra_body={"return_token_ids": True, **{k: v for k, v in sampling.items()
                                                                                  if k == "min_p"}},
                                         **{k: v for k, v in sampling.items() if k != "min_p"})
    n = sampling.get("n", 1)
    got = [dict(ids=[], tokens=[], lps=[], tops=[], offsets=[], text="") for _ in range(len(prompts) * n)]
    for chunk in (r if stream else [r]):
        for c in chunk.choices:
            g = got[c.index]
            g["text"] += c.text
            if c.logprobs is not None:
                g["ids"] += c.token_ids
                g["tokens"] += c.logprobs.tokens
                g["lps"] += c.logprobs.token_logprobs
                g["tops"] += c.logprobs.top_logprobs
                g["offsets"] += c.logprobs.text_offset
    tokenizer = offline.tokenizer
    for k, g in enumerate(got):
        ref = refs[k // n].outputs[k % n]
        assert g["ids"] == ref.token_ids and g["text"] == ref.text
        assert g["tokens"] == [tokenizer.decode([t]) for t in ref.token_ids]
        assert g["lps"] == pytest.approx([entry[t] for t, entry in zip(ref.token_ids, ref.logprobs)], abs=1e-4)
        for top, entry in zip(g["tops"], ref.logprobs):
            assert top == pytest.approx({tokenizer.decode([t]): lp for t, lp in entry.items()}, abs=1e-4)
            assert 3 <= len(entry) <= 4  # (string keys of byte pieces may collide: "\ufffd")
        assert g["offsets"] == [sum(len(t) for t in g["tokens"][:i]) for i in range(len(g["tokens"]))]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_offline(server, offline, stream):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    ids = server.engine.prompt_token_ids(server.app.state.chat_template.render(messages, True),
                                         add_special_tokens=False)
    ref = offline.generate(ids, SamplingParams(temperature=0, max_tokens=8, logprobs=2, repetition_penalty=1.3),
                           use_tqdm=False)[0].outputs[0]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=stream,
                                              extra_body={"repetition_penalty": 1.3})
    content, text = [], ""
    for chunk in (r if stream else [r]):
        for c in chunk.choices:
            text += (c.delta.content or "") if stream else c.message.content
            if c.logprobs is not None:
                content += c.logprobs.content
    assert text == ref.text and len(content) == len(ref.token_ids)
    for item, token, entry in zip(content, ref.token_ids, ref.logprobs):
        name = offline.tokenizer.decode([token])
        assert item.token == name and item.bytes == list(name.encode()) and item.logprob == pytest.approx(entry[token], abs=1e-4)
        ranked = sorted(entry.items(), key=lambda e: -e[1])[:2]  # greedy: the sampled token is the top one
        assert [(t.token, t.logprob) for t in item.top_logprobs] == [
            (offline.tokenizer.decode([t]), pytest.approx(lp, abs=1e-4)) for t, lp in ranked]


def test_penalties_and_min_tokens_equal_offline(server, offline):
    options = dict(presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.2, min_tokens=4)
    refs = offline.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12, stop=["\n"], **options),
                            use_tqdm=False)
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, temperature=0, stop=["\n"],
                                         presence_penalty=0.8, frequency_penalty=0.6,
                                         extra_body={"repetition_penalty": 1.2, "min_tokens": 4,
                                                     "return_token_ids": True})
    for choice, ref in zip(r.choices, refs):
        assert (choice.text, choice.token_ids, choice.finish_reason) == (
            ref.outputs[0].text, ref.outputs[0].token_ids, ref.outputs[0].finish_reason)
        assert len(choice.token_ids) >= 4


# -- echo and prompt logprobs -------------------------------------------------------------------
def _choices_of(r, stream, count):
    """Each choice's text, logprobs fields and finish reason, whole or gathered from the chunks."""
    got = [dict(text="", tokens=[], lps=[], tops=[], offsets=[], ids=[], reason=None) for _ in range(count)]
    for chunk in (r if stream else [r]):
        for c in chunk.choices:
            g = got[c.index]
            g["text"] += c.text
            g["reason"] = c.finish_reason or g["reason"]
            g["ids"] += getattr(c, "token_ids", None) or []
            if c.logprobs is not None:
                g["tokens"] += c.logprobs.tokens
                g["lps"] += c.logprobs.token_logprobs
                g["tops"] += c.logprobs.top_logprobs
                g["offsets"] += c.logprobs.text_offset
    return got


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_text(server, offline, stream):
    """Text prompts are echoed as sent; token-id prompts, decoded."""
    texts = PROMPTS[:2]
    refs = offline.generate(texts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for prompts in (texts, [ref.prompt_token_ids for ref in refs]):
        r = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, echo=True,
                                             stream=stream, extra_body={"return_token_ids": True})
        for g, text, ref in zip(_choices_of(r, stream, 2), texts, refs):
            assert g["text"] == text + ref.outputs[0].text
            assert g["ids"] == ref.outputs[0].token_ids and g["reason"] == ref.outputs[0].finish_reason
            assert g["tokens"] == []  # no logprobs asked for


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.8, seed=7, n=2)])
def test_echo_with_logprobs_reports_the_prompts_first(server, offline, stream, sampling):
    """As OpenAI: the prompt's tokens come first, the first with null logprobs, then the
    completion's; each equal to offline generation's prompt_logprobs and logprobs."""
    prompts = PROMPTS[:3]
    refs = offline.generate(prompts, SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=3, **sampling),
                            use_tqdm=False)
    r = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, logprobs=3, echo=True,
                                         stream=stream, **sampling)
    n = sampling.get("n", 1)
    decode = offline.tokenizer.decode
    for k, g in enumerate(_choices_of(r, stream, len(prompts) * n)):
        ref = refs[k // n]
        out = ref.outputs[k % n]
        ids = ref.prompt_token_ids + out.token_ids
        entries = ref.prompt_logprobs + out.logprobs
        assert g["text"] == prompts[k // n] + out.text
        assert g["tokens"] == [decode([t]) for t in ids]
        assert g["lps"][0] is None and g["tops"][0] is None
        assert g["lps"][1:] == pytest.approx([e[t] for t, e in zip(ids[1:], entries[1:])], abs=1e-4)
        for top, entry in zip(g["tops"][1:], entries[1:]):
            assert top == pytest.approx({decode([t]): lp for t, lp in entry.items()}, abs=1e-4)
        assert g["offsets"] == [sum(len(t) for t in g["tokens"][:i]) for i in range(len(ids))]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_zero_scores_the_prompt_alone(server, offline, stream):
    ref = offline.generate(PROMPTS[0], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    kwargs = dict(stream_options={"include_usage": True}) if stream else {}
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1,
                                         stream=stream, extra_body={"return_token_ids": True}, **kwargs)
    chunks = list(r) if stream else [r]
    [g] = _choices_of(chunks, True, 1)
    assert (g["text"], g["ids"], g["reason"]) == (PROMPTS[0], [], "length")
    assert g["lps"][0] is None and len(g["lps"]) == len(ref.prompt_token_ids)
    assert g["lps"][1:] == pytest.approx([e[t] for t, e in zip(ref.prompt_token_ids[1:], ref.prompt_logprobs[1:])],
                                         abs=1e-4)
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.prompt_token_ids), 0)


def test_prompt_logprobs_field_as_vllm(server, offline):
    """vLLM's extension: each choice's prompt_logprobs, None and then per prompt token
    {token_id: {logprob, rank, decoded_token}}; beside echo's logprobs, which keep their own N."""
    ref = offline.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=5),
                           use_tqdm=False)[0]
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, temperature=0, n=2, echo=True,
                                         logprobs=1, extra_body={"prompt_logprobs": 5})
    for choice in r.choices:
        got = choice.model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == len(ref.prompt_token_ids)
        for entry, want in zip(got[1:], ref.prompt_logprobs[1:]):
            assert list(entry) == [str(t) for t in want]
            for t, lp in want.items():
                assert entry[str(t)] == {"logprob": pytest.approx(lp, abs=1e-4), "rank": lp.rank,
                                         "decoded_token": offline.tokenizer.decode([t])}
        tops = choice.logprobs.top_logprobs[1:len(ref.prompt_token_ids)]
        assert all(1 <= len(top) <= 2 for top in tops)  # the prompt's token and the most likely one
    plain = server.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=2)
    assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})


def test_logit_bias_equals_offline(server, offline):
    """OpenAI's logit_bias ({"token id": bias}), on both endpoints: the same tokens as offline
    generation with SamplingParams.logit_bias, and not those of a request without it."""
    plain = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    bias = {plain.token_ids[0]: -100.0, plain.token_ids[2]: -100.0, 10: 3.0}
    ref = offline.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8, logit_bias=bias),
                           use_tqdm=False)[0].outputs[0]
    assert ref.token_ids != plain.token_ids and plain.token_ids[0] not in ref.token_ids
    body = {str(t): b for t, b in bias.items()}
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logit_bias=body,
                                         extra_body={"return_token_ids": True})
    assert (r.choices[0].token_ids, r.choices[0].text) == (ref.token_ids, ref.text)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    ids = server.engine.prompt_token_ids(server.app.state.chat_template.render(messages, True),
                                         add_special_tokens=False)
    chat_ref = offline.generate(ids, SamplingParams(temperature=0, max_tokens=8, logit_bias=bias),
                                use_tqdm=False)[0].outputs[0]
    chat = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 logit_bias=body)
    assert chat.choices[0].message.content == chat_ref.text


def test_models_health_metrics(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    server.client.completions.create(model=MODEL, prompt="x = ", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("pagedlm_num_requests_running", "pagedlm_num_requests_waiting", "pagedlm_kv_cache_usage_perc",
                 "pagedlm_prompt_tokens_total", "pagedlm_generation_tokens_total",
                 "pagedlm_time_to_first_token_seconds_bucket", "pagedlm_inter_token_latency_seconds_bucket"):
        assert name in text
    assert _metric(server, "pagedlm_generation_tokens_total") >= 3


# -- bad input ------------------------------------------------------------------------------------
BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "x", ', 400, None),
    ("not an object", "/v1/completions", b'[1, 2]', 400, None),
    ("no body", "/v1/completions", b'', 400, None),
    ("prompt missing", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("max_tokens a string", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature a string", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("stream not a bool", "/v1/completions", {"prompt": "x", "stream": 1}, 400, "stream"),
    ("NaN temperature", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("infinite top_p", "/v1/completions", b'{"prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p above 1", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("n zero", "/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("n above max_num_seqs", "/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("unknown parameter", "/v1/completions", {"prompt": "x", "temprature": 0}, 400, "temprature"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "model"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("longer than the context", "/v1/completions", {"prompt": "x " * 600, "max_tokens": 4}, 400, "prompt"),
    ("max_tokens past the context", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "prompt"),
    ("logprobs above 20", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("logprobs a bool", "/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("presence_penalty above 2", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency_penalty below -2", "/v1/completions", {"prompt": "x", "frequency_penalty": -3.0}, 400,
     "frequency_penalty"),
    ("repetition_penalty zero", "/v1/completions", {"prompt": "x", "repetition_penalty": 0.0}, 400,
     "repetition_penalty"),
    ("min_p above 1", "/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("min_tokens above max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400,
     "min_tokens"),
    ("logit_bias key not a token id", "/v1/completions", {"prompt": "x", "logit_bias": {"a": 1.0}}, 400,
     "logit_bias"),
    ("logit_bias above 100", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 100.5}}, 400, "logit_bias"),
    ("logit_bias past the vocabulary", "/v1/completions", {"prompt": "x", "logit_bias": {"4096": 1.0}}, 400,
     "logit_bias"),
    ("logit_bias a list", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                   "logit_bias": [5]}, 400, "logit_bias"),
    ("echo a string", "/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("prompt_logprobs above 20", "/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("prompt_logprobs negative", "/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ("prompt_logprobs streamed", "/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400,
     "prompt_logprobs"),
    ("echo with logprobs above 20", "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ("chat prompt_logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("best_of", "/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("five stop strings", "/v1/completions", {"prompt": "x", "stop": list("abcde")}, 400, "stop"),
    ("stream_options without stream", "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages"),
    ("chat logprobs an int", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 2},
     400, "logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("top_logprobs above 20", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("chat context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}, 400, "messages"),
    ("unknown path", "/v1/embeddings", {"input": "x"}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(server, path, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_logprobs_in_json_are_never_infinite_or_nan():
    from pagedlm.serving.app import _finite
    assert [_finite(x) for x in (-1.5, 0.0, float("-inf"), float("nan"), -1e6)] == [-1.5, 0.0, -9999.0, -9999.0,
                                                                                        -9999.0]


def test_openai_client_raises_its_errors(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_template_refusal_is_a_400(server):
    saved = server.app.state.chat_template
    server.app.state.chat_template = ChatTemplate("{{ raise_exception('system messages are not supported') }}")
    try:
        with pytest.raises(openai.BadRequestError, match="system messages are not supported"):
            server.client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "x"}])
    finally:
        server.app.state.chat_template = saved


def test_full_waiting_queue_answers_503(server):
    saved, server.engine.max_waiting = server.engine.max_waiting, 0
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"})
    finally:
        server.engine.max_waiting = saved
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


# -- clients that hang up ----------------------------------------------------------------------
def test_hung_up_stream_frees_its_blocks(server):
    assert _idle(server)
    aborted = _metric(server, 'pagedlm_request_success_total{finished_reason="abort"}')
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 450, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.bm.stats()["used_blocks"] > 0
    assert _idle(server, timeout=3.0), server.bm.stats()
    assert _metric(server, 'pagedlm_request_success_total{finished_reason="abort"}') == aborted + 1


def test_hung_up_non_streaming_request_is_aborted(server):
    assert _idle(server)
    aborted = _metric(server, 'pagedlm_request_success_total{finished_reason="abort"}')
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    assert _idle(server, timeout=3.0), server.bm.stats()
    assert _metric(server, 'pagedlm_request_success_total{finished_reason="abort"}') == aborted + 1


# -- many clients at once ----------------------------------------------------------------------
def test_200_concurrent_streams_get_exactly_their_tokens(server, offline):
    prompts = [f"def func_{i}(a, b):\n    " if i % 3 else f"x_{i} = [" for i in range(200)]
    max_tokens = [4 + i % 5 for i in range(200)]
    refs = offline.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens],
                            use_tqdm=False)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

    async def one(prompt, m):
        text, ids, reason = "", [], None
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=m, temperature=0,
                                                 stream=True, extra_body={"return_token_ids": True})
        async for chunk in stream:
            for c in chunk.choices:
                assert c.index == 0
                text += c.text
                ids += c.token_ids
                reason = c.finish_reason or reason
        return text, ids, reason

    async def main():
        try:
            return await asyncio.gather(*[one(p, m) for p, m in zip(prompts, max_tokens)])
        finally:
            await client.close()

    results = asyncio.run(asyncio.wait_for(main(), 120))
    for (text, ids, reason), ref in zip(results, refs):
        assert ids == ref.outputs[0].token_ids
        assert text == ref.outputs[0].text
        assert reason == ref.outputs[0].finish_reason
    assert _idle(server)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(plan=st.lists(st.tuples(st.integers(1, 40), st.none() | st.integers(0, 6)), min_size=1, max_size=12))
def test_streams_that_hang_up_at_any_point_leave_the_others_exact_and_the_server_idle(server, offline, plan):
    """Concurrent greedy streams (max_tokens each), some hanging up after a few chunks: the
    others get exactly offline generate's tokens, and the server ends holding nothing."""
    prompts = [f"def f_{i}(x):" for i in range(len(plan))]

    async def one(i, max_tokens, hang_up_after):
        body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "return_token_ids": True}
        ids, chunks = [], 0
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunks += 1
                    ids += json.loads(line[len("data: "):])["choices"][0].get("token_ids", [])
                    if hang_up_after is not None and chunks > hang_up_after:
                        return None
        return ids

    async def main():
        return await asyncio.gather(*[one(i, m, h) for i, (m, h) in enumerate(plan)])

    results = asyncio.run(asyncio.wait_for(main(), 120))
    refs = offline.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m, _ in plan], use_tqdm=False)
    for ids, ref in zip(results, refs):
        assert ids is None or ids == ref.outputs[0].token_ids
    assert _idle(server), server.bm.stats()


# -- shutting down -------------------------------------------------------------------------------
def test_sigterm_drains_and_exits_cleanly(tmp_path):
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pagedlm.serving.cli", "--port", str(port), "--device", "cpu",
                             "--num-blocks", "128", "--log-level", "warning", "--drain-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "def f(x):", "max_tokens": 60, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"  # drained: the request finished
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read().decode()
        assert "leaked" not in output and "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serving_overhead_tool_streams_every_token():
    """tools/serving_overhead.py (the server's host cost over a stub engine) runs end to end: its
    stub still fits the runner, and every stream ends with [DONE]."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "serving_overhead.py"
    result = subprocess.run([sys.executable, str(tool), "--requests", "6", "--output-len", "5", "--rounds", "1",
                             "--step-ms", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    server, offline = result.stdout.splitlines()
    assert server.startswith("server") and "us CPU/token" in server and offline.startswith("offline")


# -- fuzzing ----------------------------------------------------------------------------------
# Request bodies: a usable base (a prompt or messages of the shipped model) with a few fields
# the endpoints know (or a stray one) set to a value a client might mean or to any other JSON
# value; sizes stay small so that an accepted body runs in a few steps.
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                  st.lists(st.integers(-5, 5000), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-3, 3),
                                                                               max_size=2))
def _one_of(low, high):
    """Each integer in [low, high] equally likely (st.integers favours a few)."""
    return st.sampled_from(range(low, high + 1))


_TOKEN_IDS = st.lists(st.integers(-2, 4200), min_size=0, max_size=6)
_COMMON = {
    "model": st.one_of(st.just(MODEL), st.text(max_size=4)),
    "max_tokens": _one_of(-2, 6), "temperature": st.floats(-1, 3), "top_p": st.floats(0, 1.5),
    "top_k": st.integers(-2, 50), "min_p": st.floats(-0.5, 1.5), "n": _one_of(-1, 3),
    "seed": st.integers(-2**64, 2**64), "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5)),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop_token_ids": _TOKEN_IDS, "ignore_eos": st.booleans(), "return_token_ids": st.booleans(),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3), "repetition_penalty": st.floats(-1, 3),
    "min_tokens": _one_of(-1, 8), "include_stop_str_in_output": st.booleans(),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-1, 4200).map(str), st.text(max_size=3)), st.floats(-150, 150),
                                  max_size=3),
    "user": st.text(max_size=4), "unknown_field": _JUNK,
}
_COMPLETION = {**_COMMON,
               "prompt": st.one_of(st.text(max_size=12), _TOKEN_IDS, st.lists(st.text(max_size=6), max_size=3),
                                   st.lists(_TOKEN_IDS, max_size=3)),
               "logprobs": _one_of(-1, 22), "echo": st.booleans(), "best_of": _one_of(0, 3),
               "suffix": st.text(max_size=2), "prompt_logprobs": _one_of(-1, 22)}
_ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"])
_CHAT = {**_COMMON,
         "messages": st.lists(st.fixed_dictionaries({"role": _ROLES, "content": st.one_of(st.text(max_size=12),
                                                                                            st.none(), _JUNK)}),
                              max_size=3),
         "max_completion_tokens": _one_of(-1, 6), "logprobs": st.booleans(), "top_logprobs": _one_of(-1, 22),
         "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
         "tools": st.just([]), "add_generation_prompt": st.booleans()}
_BASES = {"/v1/completions": st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=12)}),
          "/v1/chat/completions": st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
              {"role": st.just("user"), "content": st.text(max_size=12)}), min_size=1, max_size=2)})}


@st.composite
def _bodies(draw, path, fields):
    """The base, streamed or not, with up to six fields set (max_tokens 4 unless one of them),
    each to a plausible value three times in four, else to any JSON value."""
    body = {"max_tokens": 4, "stream": draw(st.booleans()), **draw(_BASES[path])}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True)):
        body[key] = draw(_JUNK if draw(st.sampled_from([False, False, False, True])) else fields[key])
    return body


@pytest.mark.parametrize("path,fields", [("/v1/completions", _COMPLETION), ("/v1/chat/completions", _CHAT)],
                         ids=["completions", "chat"])
def test_any_request_body_gets_an_answer_or_an_openai_error_and_leaves_the_server_idle(server, path, fields):
    """No body makes the server fail (a 5xx, an error event, an engine step that fails) or hang:
    it answers 200 with OpenAI's shape (a whole response, or server-sent events ending in
    [DONE]) or 4xx with OpenAI's error object, and afterwards holds no request and no block."""
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=_bodies(path, fields))
    def check(body):
        failures.clear()
        r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        event(f"HTTP {r.status_code}")
        assert r.status_code in (200, 400, 404), (body, r.status_code, r.text)
        if r.status_code != 200:
            error = r.json()["error"]
            assert error["message"] and error["type"], body
        elif body.get("stream") is True:
            events = [line[len("data: "):] for line in r.text.split("\n\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]", (body, r.text)
            assert not any("error" in json.loads(e) for e in events[:-1]), (body, r.text)
        else:
            assert r.json()["choices"], body
        assert _idle(server), (body, server.bm.stats())
        assert not failures, (body, failures)
    failures = []
    step_failed = server.engine._step_failed
    server.engine._step_failed = lambda error, outbox: failures.append(repr(error)) or step_failed(error, outbox)
    try:
        check()
    finally:
        del server.engine._step_failed
    assert httpx.get(f"{server.url}/health").status_code == 200
