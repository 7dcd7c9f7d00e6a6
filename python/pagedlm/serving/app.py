"""The OpenAI-compatible HTTP API over an AsyncLLM (FastAPI):

    POST /v1/completions        POST /v1/chat/completions     (stream: server-sent events)
    GET  /v1/models             GET  /health                  GET  /metrics (Prometheus)

Every error is OpenAI's error object, {"error": {"message", "type", "param", "code"}}: 400 for
a bad request (malformed JSON, wrong types, out-of-range values, unsupported parameters, a
prompt that does not fit), 404 for an unknown model or path, 503 when the waiting queue is
full or the server is shutting down, 500 only when the engine failed a request. A client that
disconnects has its request aborted (its blocks are freed before the engine's next step).
"""
import asyncio
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedlm.serving.async_llm import EngineOverloaded, EngineStopped, PromptTooLong, RequestFailed
from pagedlm.serving.chat_template import ChatTemplate, ChatTemplateError
from pagedlm.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, error_body,
                                      refuse_unsupported, sampling_params)

log = logging.getLogger("pagedlm.serving")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # as OpenAI's /v1/completions
_DONE = object()


def build_app(engine, *, served_model_name="pagedlm", chat_template=None):
    """engine: an AsyncLLM; chat_template: a ChatTemplate (default: the plain one)."""
    from pagedlm.serving.chat_template import DEFAULT_CHAT_TEMPLATE

    app = FastAPI(title="pagedlm", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.model_name = served_model_name
    app.state.chat_template = chat_template or ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, e):
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        return JSONResponse(_validation_body(e.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e):
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {e!r}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise ApiError(503, "the engine stopped", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if engine.metrics is None:
            raise ApiError(404, "metrics are off", type="not_found_error")
        return Response(engine.metrics.render(), media_type=engine.metrics.content_type)

    def model_card():
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "pagedlm",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name):
        if name is not None and name != served_model_name:
            raise ApiError(404, f"The model `{name}` does not exist (this server serves `{served_model_name}`)",
                           type="not_found_error", param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        refuse_unsupported(body)
        prompts = _prompts(body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        # As OpenAI: echo with max_tokens 0 returns the prompt alone (with logprobs, scored); the
        # engine samples one token, which the reply leaves out.
        prompt_only = bool(body.echo) and max_tokens == 0
        params = sampling_params(body, 1 if prompt_only else max_tokens, engine.vocab_size)
        streams = await _add_all(engine, prompts, params, "prompt")
        echoed = [_prompt_text(engine.tokenizer, p) for p in prompts] if body.echo else None
        reply = _Reply("cmpl", served_model_name, body, streams, params, engine.tokenizer, echoed, prompt_only)
        if body.stream:
            return _sse(reply.completion_events())
        return await _unless_disconnected(request, reply.completion(), streams)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        refuse_unsupported(body)
        messages = [_message(i, m) for i, m in enumerate(body.messages)]
        try:
            text = app.state.chat_template.render(messages, body.add_generation_prompt)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            ids = engine.prompt_token_ids(text, add_special_tokens=False)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as OpenAI: what the context leaves
            bm = engine.llm.block_manager
            max_tokens = min(engine.max_model_len, bm.num_blocks * bm.block_size) - len(ids)
            if max_tokens < 1:
                raise ApiError(400, f"This model's maximum context length is {engine.max_model_len} tokens; the "
                                    f"messages take {len(ids)}", param="messages", code="context_length_exceeded")
        params = sampling_params(body, max_tokens, engine.vocab_size)
        streams = await _add_all(engine, [ids], params, "messages")
        reply = _Reply("chatcmpl", served_model_name, body, streams, params, engine.tokenizer)
        if body.stream:
            return _sse(reply.chat_events())
        return await _unless_disconnected(request, reply.chat(), streams)

    return app


# -- requests ------------------------------------------------------------------------------
def _validation_body(errors):
    """OpenAI's error object for pydantic's errors: the first per field, named."""
    messages, params, seen = [], [], set()
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = loc[0] if loc and err.get("type") != "json_invalid" else None
        if field in seen:
            continue
        seen.add(field)
        if err.get("type") == "json_invalid":
            messages.append(f"We could not parse the JSON body of your request ({err.get('msg')})")
        elif err.get("type") == "extra_forbidden":
            messages.append(f"Unrecognized request argument supplied: {'.'.join(loc)}")
        elif err.get("type") == "missing" and not loc:
            messages.append("The request needs a JSON body")
        else:
            messages.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        params.append(field)
    return error_body("; ".join(messages) or "invalid request", param=params[0] if len(params) == 1 else None)


def _prompts(prompt):
    """A list of prompts: text or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt: empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _prompt_text(tokenizer, prompt):
    """The text echo puts before a completion: the prompt as sent, or its token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt) if tokenizer is not None else ""


def _message(i, m):
    content = m.content
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, got "
                                    f"{part.get('type')!r}", param="messages")
            texts.append(part["text"])
        content = "".join(texts)
    message = {"role": m.role, "content": content}
    if m.name is not None:
        message["name"] = m.name
    return message


async def _add_all(engine, prompts, params, what):
    streams = []
    try:
        for prompt in prompts:
            streams.append(await engine.add_request(prompt, params, add_special_tokens=what == "prompt"))
    except BaseException as e:
        for s in streams:
            s.abort()
        if isinstance(e, PromptTooLong):
            raise ApiError(400, str(e), param=what, code="context_length_exceeded") from None
        if isinstance(e, EngineOverloaded):
            raise ApiError(503, f"The server is overloaded: {e}", type="overloaded_error", code="overloaded") from None
        if isinstance(e, EngineStopped):
            raise ApiError(503, str(e), type="server_error", code="unavailable") from None
        if isinstance(e, (ValueError, TypeError)):
            message = str(e)
            raise ApiError(400, message, param=message.split(":", 1)[0] if ":" in message else None) from None
        raise
    return streams


async def _unless_disconnected(request, coroutine, streams):
    """Runs a non-streaming reply; if the client hangs up first, aborts its requests."""
    task = asyncio.ensure_future(coroutine)

    async def hung_up():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            for s in streams:
                s.abort()
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


async def _merged(streams):
    """(stream index, StreamOutput) of several streams as they come; aborts them on exit."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].abort()
        return
    queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


def _engine_error(e):
    if isinstance(e, RequestFailed):
        return 500, error_body(str(e), "server_error", code="engine_error")
    return 503, error_body(str(e), "server_error", code="unavailable")


def _sse(events):
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _finite(logprob):
    """A log-probability for JSON, which has no -inf or nan: at least -9999.0, as vLLM reports
    it (a nan, which only a model whose logits are nan gives, too)."""
    value = float(logprob)
    return value if value >= -9999.0 else -9999.0


class _Logprobs:
    """OpenAI's logprobs objects from the engine's per-token {token_id: Logprob} dicts (the
    token first, then the top N by rank, the token not repeated). An echoed prompt's entries
    start with None (its first token has no log-probability) and may rank more than N tokens
    (prompt_logprobs above logprobs): the top N of them are reported."""

    def __init__(self, tokenizer, top_n):
        self.tokenizer, self.top_n = tokenizer, top_n

    def token(self, token_id):
        # As vLLM: each token decoded alone (a piece of a multi-byte character shows as U+FFFD).
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def top(self, token_id, entry):
        """The entry's token and its top N (token_id, logprob) items."""
        return [(t, lp) for t, lp in entry.items() if t == token_id or lp.rank <= self.top_n]

    def ranked(self, entry):
        """The top N (token_id, logprob) by rank."""
        items = list(entry.items())
        if len(items) > self.top_n:  # the sampled token is not among them
            return items[1:]
        return sorted(items, key=lambda item: -item[1])

    def completion(self, token_ids, entries, offset):
        """/v1/completions' {tokens, token_logprobs, top_logprobs, text_offset}; offset: where
        the first token's text starts in the choice's text (the tokens' texts are added up)."""
        tokens = [self.token(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        pairs = list(zip(token_ids, entries))
        return {"tokens": tokens,
                "token_logprobs": [None if entry is None else _finite(entry[t]) for t, entry in pairs],
                "top_logprobs": [None if entry is None else {self.token(t): _finite(lp)
                                                             for t, lp in self.top(token, entry)}
                                 for token, entry in pairs],
                "text_offset": offsets}

    def chat(self, token_ids, entries):
        """/v1/chat/completions' {content: [{token, logprob, bytes, top_logprobs}]}."""
        def item(token_id, logprob):
            text = self.token(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}
        return {"content": [dict(item(t, entry[t]), top_logprobs=[item(*ranked) for ranked in self.ranked(entry)])
                            for t, entry in zip(token_ids, entries)]}


def _vllm_logprobs(entries):
    """A choice's prompt_logprobs as vLLM writes them: None, then per prompt token
    {token_id: {"logprob", "rank", "decoded_token"}}."""
    return [None if entry is None else {str(t): {"logprob": _finite(lp), "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for t, lp in entry.items()}
            for entry in entries]


class _Reply:
    """One request's response, whole or as events; choices are numbered prompt * n + sample."""

    def __init__(self, prefix, model, body, streams, params, tokenizer, echoed=None, prompt_only=False):
        """echoed: with echo, each prompt's text, put before its choices' text (and its tokens'
        logprobs before theirs); prompt_only: the samples are left out (echo, max_tokens 0)."""
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.body, self.streams = model, body, streams
        self.n = body.n
        self.token_ids = body.return_token_ids
        self.logprobs = None if params.logprobs is None else _Logprobs(tokenizer, params.logprobs)
        self.is_chat = prefix == "chatcmpl"
        self.offsets = [0] * (len(streams) * self.n)  # streamed completions: each choice's text_offset
        self.echoed, self.prompt_only = echoed, prompt_only
        self.echo_due = [echoed is not None] * (len(streams) * self.n)
        # Each prompt's prompt_logprobs (from its first output), and whether choices carry them (vLLM's field).
        self.prompt_logprobs = [None] * len(streams)
        self.vllm_prompt_logprobs = params.prompt_logprobs is not None and not body.stream

    def _with_prompt(self, k, text, token_ids, entries):
        """(text, token_ids, logprob entries) of choice k's next piece: its sample's (none when
        prompt_only), after the prompt's while an echo is due."""
        if self.prompt_only:
            text, token_ids, entries = "", [], []
        if self.echo_due[k]:
            self.echo_due[k] = False
            i = k // self.n
            prompt_ids = self.streams[i].prompt_token_ids
            if self.logprobs is not None:
                prompt_entries = list(self.prompt_logprobs[i] or [None])
                prompt_entries += [None] * (len(prompt_ids) - len(prompt_entries))  # an aborted prefill's
                entries = prompt_entries + list(entries)
            text, token_ids = self.echoed[i] + text, list(prompt_ids) + list(token_ids)
        return text, token_ids, entries

    def _choice_logprobs(self, k, token_ids, entries):
        """A choice's (or chunk's) logprobs object, None when none were asked for."""
        if self.logprobs is None:
            return None
        if self.is_chat:
            return self.logprobs.chat(token_ids, entries)
        result = self.logprobs.completion(token_ids, entries, self.offsets[k])
        self.offsets[k] += sum(len(t) for t in result["tokens"])
        return result

    def _usage(self, completion_tokens):
        prompt_tokens = sum(len(s.prompt_token_ids) for s in self.streams)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _collect(self):
        texts = [[] for _ in range(len(self.streams) * self.n)]
        ids = [[] for _ in texts]
        logprobs = [[] for _ in texts]
        reasons = [None] * len(texts)
        async for i, out in _merged(self.streams):
            if out.prompt_logprobs is not None:
                self.prompt_logprobs[i] = out.prompt_logprobs
            for d in out.outputs:
                k = i * self.n + d.index
                texts[k].append(d.text)
                ids[k] += d.token_ids
                logprobs[k] += d.logprobs or []
                reasons[k] = d.finish_reason or reasons[k]
        return ["".join(t) for t in texts], ids, logprobs, reasons

    async def _whole(self, choice):
        try:
            texts, ids, logprobs, reasons = await self._collect()
        except (RequestFailed, EngineStopped) as e:
            status, body = _engine_error(e)
            return JSONResponse(body, status_code=status)
        choices = []
        for k, (text, token_ids, entries, reason) in enumerate(zip(texts, ids, logprobs, reasons)):
            shown, shown_ids, entries = self._with_prompt(k, text, token_ids, entries)
            c = choice(k, shown, "length" if self.prompt_only else reason)
            c["logprobs"] = self._choice_logprobs(k, shown_ids, entries)
            if self.token_ids:
                c["token_ids"] = [] if self.prompt_only else token_ids
                c["prompt_token_ids"] = self.streams[k // self.n].prompt_token_ids
            if self.vllm_prompt_logprobs:
                c["prompt_logprobs"] = _vllm_logprobs(self.prompt_logprobs[k // self.n] or [None])
            choices.append(c)
        completion_tokens = 0 if self.prompt_only else sum(map(len, ids))
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(completion_tokens)}

    async def _events(self, chunk_choice, first_choice=None):
        """SSE lines: a chunk per delta with text (or tokens, with return_token_ids) or an end."""
        include_usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        completion_tokens = 0
        try:
            if first_choice is not None:
                for k in range(len(self.streams) * self.n):
                    yield _event(self._chunk([first_choice(k)], include_usage))
            async for i, out in _merged(self.streams):
                if out.prompt_logprobs is not None:
                    self.prompt_logprobs[i] = out.prompt_logprobs
                choices = []
                for d in out.outputs:
                    k = i * self.n + d.index
                    completion_tokens += 0 if self.prompt_only else len(d.token_ids)
                    wants_tokens = (self.token_ids or self.logprobs is not None) and not self.prompt_only
                    if not (d.text and not self.prompt_only or d.finish_reason or (wants_tokens and d.token_ids)
                            or self.echo_due[k]):
                        continue
                    text, token_ids, entries = self._with_prompt(k, d.text, d.token_ids, d.logprobs or [])
                    reason = "length" if self.prompt_only and d.finish_reason in ("stop", "length") else d.finish_reason
                    c = chunk_choice(k, text, reason)
                    if token_ids:
                        c["logprobs"] = self._choice_logprobs(k, token_ids, entries)
                    if self.token_ids:
                        c["token_ids"] = [] if self.prompt_only else d.token_ids
                    choices.append(c)
                if choices:
                    yield _event(self._chunk(choices, include_usage))
            if include_usage:
                chunk = self._chunk([], True)
                chunk["usage"] = self._usage(completion_tokens)
                yield _event(chunk)
        except (RequestFailed, EngineStopped) as e:
            yield _event(_engine_error(e)[1])
        yield "data: [DONE]\n\n"

    def _chunk(self, choices, include_usage):
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    # -- /v1/completions
    object, chunk_object = "text_completion", "text_completion"

    def completion(self):
        return self._whole(lambda k, text, reason: {"index": k, "text": text, "logprobs": None,
                                                    "finish_reason": reason})

    def completion_events(self):
        return self._events(lambda k, text, reason: {"index": k, "text": text, "logprobs": None,
                                                     "finish_reason": reason})

    # -- /v1/chat/completions
    def chat(self):
        self.object = "chat.completion"
        return self._whole(lambda k, text, reason: {"index": k, "message": {"role": "assistant", "content": text},
                                                    "logprobs": None, "finish_reason": reason})

    def chat_events(self):
        self.chunk_object = "chat.completion.chunk"

        def delta(k, text, reason):
            return {"index": k, "delta": {"content": text} if text else {}, "logprobs": None,
                    "finish_reason": reason}

        def first(k):
            return {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}

        return self._events(delta, first)
