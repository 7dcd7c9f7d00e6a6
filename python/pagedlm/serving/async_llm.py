"""pagedlm.AsyncLLM: pagedlm.LLM driven by a background thread, with an asyncio API.

One thread owns the LLM and loops: it applies the adds and aborts queued since the last
iteration (so a request joins the running batch at the next step, and an abort frees its
blocks before the next step), runs LLM.step, then reads every live request's new tokens and
text (the LLM detokenizes them incrementally and ends samples at their stop strings, the same
code as offline generation) and hands the deltas to the requests' asyncio queues (one
call_soon_threadsafe per event loop per step). The event loop never touches the LLM.

A step that raises ends the requests it was running with RequestFailed on their streams;
requests still waiting go on, and so does the loop. A sample that the engine finishes with a
reason other than stop, length or abort (a failed request) ends its stream the same way.
"""
import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from pagedlm.engine.sequence import SamplingParams, Status

__all__ = ["AsyncLLM", "RequestStream", "StreamOutput", "SampleDelta", "RequestFailed", "EngineOverloaded",
           "EngineStopped", "PromptTooLong"]

log = logging.getLogger("pagedlm.serving")

DEFAULT_MAX_WAITING = 1024
OK_REASONS = ("stop", "length", "abort")


class RequestFailed(RuntimeError):
    """The engine failed while running this request (its stream ends with this)."""


class EngineOverloaded(RuntimeError):
    """More requests are waiting than max_waiting allows: try again later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (or its thread died) and takes no more requests."""


class PromptTooLong(ValueError):
    """The prompt and max_tokens do not fit the model's context or the KV cache."""


@dataclass
class SampleDelta:
    index: int                  # which of the request's n samples
    text: str                   # text added since the last output
    token_ids: list             # token ids added since the last output
    finish_reason: str | None   # "stop", "length" or "abort" once the sample ended
    logprobs: list | None = None  # with params.logprobs: a {token_id: Logprob} per token of token_ids


@dataclass
class StreamOutput:
    request_id: str
    prompt_token_ids: list
    outputs: list               # SampleDeltas of the samples that changed
    finished: bool              # every sample has ended; nothing more comes
    # With params.prompt_logprobs, on the request's first output (its prompt is computed by then):
    # RequestOutput.prompt_logprobs, None and then a {token_id: Logprob} per prompt token.
    prompt_logprobs: list | None = None


class RequestStream:
    """The async iterator of one request's StreamOutputs. Iterating it raises RequestFailed if
    the engine failed the request, EngineStopped if the engine shut down under it."""

    def __init__(self, engine, request_id, prompt_token_ids, params, loop):
        self.engine = engine
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.finished = False
        self._loop = loop
        self._queue = asyncio.Queue()
        self._error = None  # an error queued after outputs, raised once they are taken
        self._accepted = loop.create_future()

    def __aiter__(self):
        return self

    async def __anext__(self):
        """The next output: every output queued since the last one, merged (merge_outputs), so a
        consumer that falls behind the engine (many streams on one event loop) takes several
        steps' tokens at once rather than lagging further; an error comes after the outputs
        queued before it."""
        if self.finished:
            raise StopAsyncIteration
        if self._error is None:
            queued = [await self._queue.get()]
            while not self._queue.empty():
                queued.append(self._queue.get_nowait())
            if isinstance(queued[-1], BaseException):
                self._error = queued.pop()
            if queued:
                item = merge_outputs(queued)
                self.finished = item.finished
                return item
        self.finished = True
        raise self._error

    def abort(self):
        """Ends the request now (its blocks are freed before the engine's next step)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    def _put(self, item):  # on the stream's event loop
        self._queue.put_nowait(item)


def merge_outputs(outputs):
    """One StreamOutput of a request's consecutive outputs: each sample's deltas joined (text,
    token ids and logprobs in order; the last finish reason), the prompt's logprobs from the
    one that has them, finished if the last one is."""
    if len(outputs) == 1:
        return outputs[0]
    samples = {}
    for out in outputs:
        for d in out.outputs:
            merged = samples.get(d.index)
            if merged is None:
                samples[d.index] = SampleDelta(d.index, d.text, list(d.token_ids), d.finish_reason,
                                               None if d.logprobs is None else list(d.logprobs))
                continue
            merged.text += d.text
            merged.token_ids += d.token_ids
            merged.finish_reason = d.finish_reason or merged.finish_reason
            if d.logprobs is not None:
                merged.logprobs = (merged.logprobs or []) + d.logprobs
    prompt_logprobs = next((out.prompt_logprobs for out in outputs if out.prompt_logprobs is not None), None)
    last = outputs[-1]
    return StreamOutput(last.request_id, last.prompt_token_ids, list(samples.values()), last.finished,
                        prompt_logprobs)


@dataclass(eq=False)
class _Live:
    """Engine-thread state of one request."""
    stream: RequestStream
    llm_id: str
    seqs: list
    arrival: float
    seen: list = field(default_factory=list)
    chars: list = field(default_factory=list)
    done: list = field(default_factory=list)
    last_token: list = field(default_factory=list)
    first_token: float | None = None
    outputs_sent: bool = False


class AsyncLLM:
    """model: a model folder (default: the shipped code model) or a pagedlm.LLM to drive;
    llm_kwargs go to pagedlm.LLM. max_model_len: prompt + max_tokens bound (default: the
    model's max_position_embeddings). max_waiting: requests waiting for admission beyond which
    add_request raises EngineOverloaded (None: no bound)."""

    def __init__(self, model=None, *, max_model_len=None, max_waiting=DEFAULT_MAX_WAITING, metrics=True,
                 **llm_kwargs):
        from pagedlm.llm import LLM

        if isinstance(model, LLM):
            if llm_kwargs:
                raise TypeError(f"engine options {sorted(llm_kwargs)} given with an LLM already built")
            self.llm = model
        else:
            if model is None:
                from pagedlm.data import tiny_model
                model = tiny_model("target")
            self.llm = LLM(model, **llm_kwargs)
        self.tokenizer = self.llm.tokenizer
        self.vocab_size = self.llm.model.args.vocab_size
        model_len = self.llm.model.args.max_position_embeddings
        if max_model_len is not None and not 1 <= max_model_len <= model_len:
            raise ValueError(f"max_model_len: must be in [1, {model_len}] (the model's positions), got {max_model_len}")
        self.max_model_len = max_model_len or model_len
        self.max_waiting = max_waiting
        if metrics:
            from pagedlm.serving.metrics import EngineMetrics
            self.metrics = EngineMetrics()
        else:
            self.metrics = None
        self._cv = threading.Condition()
        self._commands = []
        self._pending_adds = 0      # adds queued, not yet applied by the engine thread
        self._engine_waiting = 0    # live requests not yet admitted, as of the last iteration
        self._live = {}             # request id -> _Live (engine thread only)
        self._stopping = False
        self._draining = False
        self.dead = None            # the exception that killed the engine thread, if any
        self._thread = threading.Thread(target=self._run, name="pagedlm-engine", daemon=True)
        self._thread.start()

    # -- the asyncio side ----------------------------------------------------------------
    @property
    def num_waiting(self):
        return self._pending_adds + self._engine_waiting

    @property
    def alive(self):
        return self._thread.is_alive() and self.dead is None

    def prompt_token_ids(self, prompt, *, add_special_tokens=True):
        """Token ids of a prompt (text, or ids checked against the vocabulary); ValueError if bad."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer.json in the model folder; pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        else:
            ids = list(prompt)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)
                        or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt: token id {bad!r} is not in the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise ValueError("prompt: empty")
        return ids

    def check_fits(self, num_prompt_tokens, params):
        """PromptTooLong unless the prompt and params.max_tokens fit the context and the cache."""
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLong(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {total} tokens ({num_prompt_tokens} in the prompt, {params.max_tokens} "
                                f"for the completion). Please reduce the prompt or max_tokens.")
        bm = self.llm.block_manager
        needed = -(-total // bm.block_size)
        if needed > bm.num_blocks:
            raise PromptTooLong(f"The request needs {needed} KV-cache blocks ({total} tokens), the cache has "
                                f"{bm.num_blocks}. Please reduce the prompt or max_tokens.")
        if params.n > self.llm.scheduler.max_num_seqs:
            raise ValueError(f"n: {params.n} samples run at once, more than max_num_seqs "
                             f"({self.llm.scheduler.max_num_seqs})")

    async def add_request(self, prompt, params=None, *, stop=(), request_id=None, add_special_tokens=True):
        """Queues a prompt (text or token ids) and returns its RequestStream once the engine
        thread has taken it (it joins the batch at the next step). stop: strings that end a
        sample, cut from its text (added to params.stop). Raises ValueError (bad prompt or
        params), PromptTooLong, EngineOverloaded or EngineStopped."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        if isinstance(stop, str):
            stop = (stop,)
        if stop:
            params = dataclasses.replace(params, stop=params.stop + tuple(stop))
        if not self.alive or self._stopping or self._draining:
            raise EngineStopped("the server is shutting down" if self.alive else f"the engine stopped ({self.dead!r})")
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise EngineOverloaded(f"{self.num_waiting} requests are waiting (the bound is {self.max_waiting}); "
                                   "retry later")
        ids = self.prompt_token_ids(prompt, add_special_tokens=add_special_tokens)
        self.check_fits(len(ids), params)
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id or uuid.uuid4().hex, ids, params, loop)
        with self._cv:
            self._pending_adds += 1
            self._commands.append(("add", stream, time.perf_counter()))
            self._cv.notify()
        try:
            await stream._accepted
        except asyncio.CancelledError:
            self.abort(stream.request_id)
            raise
        return stream

    async def generate(self, prompt, params=None, **kwargs):
        """Async iterator of a prompt's StreamOutputs; leaving it early aborts the request."""
        stream = await self.add_request(prompt, params, **kwargs)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id):
        """Ends a request wherever it is; thread-safe, returns at once."""
        with self._cv:
            self._commands.append(("abort", request_id))
            self._cv.notify()

    def abort_all(self):
        """Ends every request (their streams raise EngineStopped): the end of a drain."""
        with self._cv:
            self._commands.append(("abort_all",))
            self._cv.notify()

    def start_draining(self):
        """New requests are refused (EngineStopped); running ones go on."""
        self._draining = True

    def num_unfinished(self):
        return len(self._live) + self._pending_adds

    def shutdown(self, timeout=10.0):
        """Aborts what is left (streams end with EngineStopped) and stops the engine thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------
    def _run(self):
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.llm.scheduler.has_work()):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                outbox = {}
                for command in commands:
                    self._apply(command, outbox)
                if stopping:
                    self._end_all(EngineStopped("the server shut down before the request finished"), outbox)
                    self._deliver(outbox)
                    return
                if self.llm.scheduler.has_work():
                    try:
                        self.llm.step()
                    except Exception as e:
                        log.exception("engine step failed; ending the requests it ran")
                        self._step_failed(e, outbox)
                self._collect(outbox)
                self._deliver(outbox)
                self._gauges()
        except BaseException as e:  # the loop itself broke: no stream may hang
            log.exception("the engine thread died")
            self.dead = e
            outbox = {}
            self._end_all(EngineStopped(f"the engine stopped ({e!r})"), outbox)
            self._deliver(outbox)
            raise

    def _apply(self, command, outbox):
        kind = command[0]
        if kind == "add":
            _, stream, arrival = command
            with self._cv:
                self._pending_adds -= 1
            try:
                llm_id = self.llm.add_request(stream.prompt_token_ids, stream.params, detokenize=True)
                seqs = self.llm.sequences(llm_id)
            except Exception as e:  # the engine's own checks
                _post(outbox, stream, _call(stream._accepted, "set_exception", e))
                return
            if any(s.finish_reason == "refused" for s in seqs):
                self.llm.take_output(llm_id)
                _post(outbox, stream, _call(stream._accepted, "set_exception",
                                            PromptTooLong("the engine refused the request: it can never fit")))
                return
            live = _Live(stream, llm_id, seqs, arrival)
            for seq in seqs:
                live.seen.append(0)
                live.chars.append(0)
                live.done.append(False)
                live.last_token.append(None)
            self._live[stream.request_id] = live
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(stream.prompt_token_ids))
            _post(outbox, stream, _call(stream._accepted, "set_result", None))
        elif kind == "abort":
            live = self._live.get(command[1])
            if live is not None:
                self._end(live, None, outbox, reason="abort")
        elif kind == "abort_all":  # the server's doing, not the clients': their streams say so
            self._end_all(EngineStopped("the server is shutting down and aborted the request"), outbox)

    def _end(self, live, error, outbox, reason=None):
        """Takes a request out of the engine (its blocks freed) and ends its stream: with error
        if given, else with `reason` on every sample still going."""
        self.llm.abort(live.llm_id)
        self.llm.take_output(live.llm_id)
        del self._live[live.stream.request_id]
        if error is not None:
            _post(outbox, live.stream, _call(live.stream, "_put", error))
            self._count_finished("error")
        else:
            deltas = [SampleDelta(i, "", [], reason) for i, done in enumerate(live.done) if not done]
            _post(outbox, live.stream, _call(live.stream, "_put", StreamOutput(
                live.stream.request_id, live.stream.prompt_token_ids, deltas, True)))
            self._count_finished(reason)

    def _end_all(self, error, outbox):
        for live in list(self._live.values()):
            self._end(live, error, outbox)

    def _step_failed(self, error, outbox):
        """The engine finished the failed step's requests with finish_reason "error" (and put
        the others back to wait): their streams end with RequestFailed naming the error."""
        failed = RequestFailed(f"the engine failed while running this request: {error!r}")
        for live in list(self._live.values()):
            if any(s.finish_reason == "error" for s in live.seqs):
                self._end(live, failed, outbox)

    def _collect(self, outbox):
        """New tokens of every live request since the last step, as deltas on their streams."""
        now, generated = time.perf_counter(), 0
        for live in list(self._live.values()):
            try:
                generated += self._collect_one(live, now, outbox)
            except Exception as e:  # a fault in one request's text handling fails that request only
                log.exception("request %s: reading its outputs failed", live.stream.request_id)
                if live.stream.request_id in self._live:
                    self._end(live, RequestFailed(f"the server failed on this request's output: {e!r}"), outbox)
        if generated and self.metrics:  # once a step: each update of a metric takes its lock
            self.metrics.generation_tokens.inc(generated)

    def _collect_one(self, live, now, outbox):
        """Posts live's deltas since the last step; returns how many tokens it generated."""
        metrics = self.metrics
        deltas, failure, generated = [], None, 0
        for i, seq in enumerate(live.seqs):
            if live.done[i]:
                continue
            new = seq.output[live.seen[i]:]
            logprobs = None if seq.logprobs is None else seq.logprobs[live.seen[i]:]
            live.seen[i] = len(seq.output)
            generated += len(new)
            reason = seq.finish_reason
            if new and metrics:
                if live.first_token is None:
                    metrics.ttft.observe(now - live.arrival)
                if live.last_token[i] is not None:
                    gap = (now - live.last_token[i]) / len(new)
                    for _ in new:
                        metrics.itl.observe(gap)
            if new:
                live.first_token = live.first_token or now
                live.last_token[i] = now
            # The engine keeps the sample's text (seq.text) and ends it at a stop string.
            text = self._text(seq)[live.chars[i]:]
            live.chars[i] += len(text)
            if reason is not None:
                live.done[i] = True
                if reason not in OK_REASONS:
                    failure = failure or RequestFailed(
                        f"the engine failed this request ({getattr(seq, 'error', None) or reason})")
            if new or text or reason is not None:
                deltas.append(SampleDelta(i, text, list(new), reason, logprobs))
        finished = all(live.done)
        if deltas and (failure is None or not finished):
            prompt_logprobs = live.seqs[0].prompt_logprobs
            if prompt_logprobs is not None and not live.outputs_sent:
                prompt_logprobs = list(prompt_logprobs)
            else:
                prompt_logprobs = None
            live.outputs_sent = True
            _post(outbox, live.stream, _call(live.stream, "_put", StreamOutput(
                live.stream.request_id, live.stream.prompt_token_ids, deltas, finished and failure is None,
                prompt_logprobs)))
        if failure is not None:
            self._end(live, failure, outbox)
        elif finished:
            self.llm.take_output(live.llm_id)
            del self._live[live.stream.request_id]
            self._count_finished(deltas[-1].finish_reason if deltas else "stop")
            if metrics:
                metrics.e2e.observe(now - live.arrival)
        return generated

    @staticmethod
    def _text(seq):
        return seq.text.text

    def _count_finished(self, reason):
        if self.metrics:
            self.metrics.finished.labels(finished_reason=reason).inc()

    def _gauges(self):
        running = sum(1 for live in self._live.values() if any(s.status == Status.RUNNING for s in live.seqs))
        self._engine_waiting = len(self._live) - running
        if self.metrics:
            bm = self.llm.block_manager
            self.metrics.running.set(running)
            self.metrics.waiting.set(self.num_waiting)
            self.metrics.kv_usage.set(bm.stats()["used_blocks"] / bm.num_blocks)
            self.metrics.preemptions.set(self.llm.scheduler.preemptions)

    @staticmethod
    def _deliver(outbox):
        for loop, calls in outbox.items():
            try:
                loop.call_soon_threadsafe(_run_calls, calls)
            except RuntimeError:  # the loop closed: nobody is listening
                pass


def _call(target, method, arg):
    return target, method, arg


def _post(outbox, stream, call):
    outbox.setdefault(stream._loop, []).append(call)


def _run_calls(calls):
    for target, method, arg in calls:
        if isinstance(target, asyncio.Future):
            if not target.done():
                getattr(target, method)(arg)
        else:
            getattr(target, method)(arg)
