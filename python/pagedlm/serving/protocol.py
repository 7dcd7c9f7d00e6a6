"""OpenAI's request shapes for /v1/completions and /v1/chat/completions, validated strictly
(wrong types are refused, not coerced; unknown fields are refused), and their translation into
SamplingParams. Parameters OpenAI names that pagedlm does not implement are accepted only at
their neutral value; any other value is refused with a 400 naming the parameter.
"""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedlm.engine.sequence import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token, at most (vLLM's default max_logprobs; OpenAI's chat limit)


class ApiError(Exception):
    """An error the client gets as OpenAI's error object."""

    def __init__(self, status, message, *, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self):
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # NaN and infinities (which Python's JSON parser reads) are refused: a NaN temperature
    # would reach the sampler.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # metadata; pagedlm does nothing with it
    # vLLM's extensions, sent by the openai client through extra_body
    top_k: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # each choice also carries its token ids (and the prompt's)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension, as min_p, min_tokens and the next
    min_p: float | None = None
    min_tokens: int | None = None
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100], as OpenAI


# parameter -> the values that mean "off" (what pagedlm does anyway)
UNSUPPORTED = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the sampled token's log-probability and this many alternatives
    best_of: int | None = None
    echo: bool | None = None  # the prompt before the completion (with logprobs: the prompt's too)
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM's extension: each choice's prompt_logprobs, as vLLM's


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ResponseFormat(_Strict):
    type: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True  # vLLM's extension
    logprobs: bool | None = None
    top_logprobs: int | None = None


def num_logprobs(request):
    """SamplingParams.logprobs of a request: None (none asked for) or how many alternatives."""
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            if request.top_logprobs == 0:
                return None
            raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
        count, name = (request.top_logprobs or 0) if request.logprobs else None, "top_logprobs"
    else:
        count, name = request.logprobs, "logprobs"
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise ApiError(400, f"{name}: must be in [0, {MAX_LOGPROBS}], got {count}", param=name)
    return count


def num_prompt_logprobs(request):
    """SamplingParams.prompt_logprobs of a request, as vLLM: its prompt_logprobs, else with echo
    its logprobs (the echoed prompt's tokens get theirs)."""
    if not isinstance(request, CompletionRequest):
        return None
    count = request.prompt_logprobs
    if count is not None:
        if not 0 <= count <= MAX_LOGPROBS:
            raise ApiError(400, f"prompt_logprobs: must be in [0, {MAX_LOGPROBS}], got {count}",
                           param="prompt_logprobs")
        if request.stream:
            raise ApiError(400, "prompt_logprobs: not available when stream is true (as vLLM; echo with logprobs "
                                "streams the prompt's log-probabilities)", param="prompt_logprobs")
        return count
    return request.logprobs if request.echo else None


def refuse_unsupported(request):
    for name, neutral in UNSUPPORTED.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if not any(value == v and type(value) is type(v) for v in neutral):
                raise ApiError(400, f"{name}: not supported by pagedlm yet (only {neutral[1]!r} is accepted, got "
                                    f"{value!r})", param=name, code="unsupported_parameter")
    if isinstance(request, CompletionRequest) and request.best_of not in (None, request.n):
        raise ApiError(400, f"best_of: not supported by pagedlm yet (only equal to n), got {request.best_of}",
                       param="best_of", code="unsupported_parameter")
    text_format = (None, ResponseFormat(type="text"))
    if isinstance(request, ChatCompletionRequest) and request.response_format not in text_format:
        raise ApiError(400, "response_format: only {'type': 'text'} is supported by pagedlm",
                       param="response_format", code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")


def stop_strings(request):
    stop = request.stop
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop: empty strings are not allowed", param="stop")
    return tuple(stop)


def logit_bias(request, vocab_size=None):
    """SamplingParams.logit_bias of a request: its {"token id": bias} with int keys, each id in
    the vocabulary and each bias in [-100, 100], as OpenAI's; None when empty."""
    if not request.logit_bias:
        return None
    bias = {}
    for key, value in request.logit_bias.items():
        token = int(key) if key.isascii() and key.isdigit() else None
        if token is None or (vocab_size is not None and token >= vocab_size):
            raise ApiError(400, f"logit_bias: {key!r} is not a token id" + (
                f" (the vocabulary is [0, {vocab_size}))" if token is not None else ""), param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias: the bias of token {key} must be in [-100, 100], got {value}",
                           param="logit_bias")
        bias[token] = value
    return bias


def sampling_params(request, max_tokens, vocab_size=None):
    """SamplingParams of a request (max_tokens already resolved; vocab_size: the model's, which
    logit_bias's ids must be in); ApiError 400 naming the parameter SamplingParams refuses."""
    kwargs = dict(n=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos, seed=request.seed,
                  stop=stop_strings(request), include_stop_str_in_output=request.include_stop_str_in_output,
                  logprobs=num_logprobs(request), prompt_logprobs=num_prompt_logprobs(request),
                  logit_bias=logit_bias(request, vocab_size))
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens"):
        if getattr(request, name) is not None:
            kwargs[name] = getattr(request, name)
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    if request.top_k is not None:
        kwargs["top_k"] = request.top_k
    if request.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(request.stop_token_ids)
    if request.seed is not None and not -2**63 <= request.seed < 2**64:
        raise ApiError(400, f"seed: must fit 64 bits, got {request.seed}", param="seed")
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        param = message.split(":", 1)[0] if ":" in message else None
        raise ApiError(400, message, param=param if param in kwargs else None) from None
