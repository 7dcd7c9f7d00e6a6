"""SamplingParams, and Sequence: one sample of a request, the state the scheduler, the runner
and the engine share."""
import zlib
from dataclasses import InitVar, dataclass, field
from enum import Enum

from pagedlm.engine.checks import check_bool, check_float, check_int, check_token_ids

# A token id in no prompt: a block holding it never matches one in the prefix cache. It holds
# the slot of a token in flight (async scheduling) until the token is known, and marks blocks a
# failed step may have left unwritten (LLM._cut).
UNMATCHABLE_TOKEN = -1


@dataclass(frozen=True)
class SamplingParams:
    """How a request samples, with vLLM's names and meanings; every field is checked at
    construction (a bad one raises a ValueError naming it).

    n: samples per prompt. temperature: 0 is greedy. top_k (-1: off), top_p (1: off), min_p
    (0: off; keeps the tokens whose probability is at least min_p times the largest one's, after
    temperature). max_tokens, min_tokens (until then EOS and stop_token_ids cannot be sampled and
    stop strings are not looked for). stop_token_ids, ignore_eos, seed.

    Penalties, applied to the logits in vLLM's order before anything else: repetition_penalty
    (1: off; > 0; the logit of every token in the prompt or the output so far is divided by it
    when positive, multiplied by it otherwise), then frequency_penalty (subtracted once per
    occurrence of a token in the output so far) and presence_penalty (subtracted once from every
    token in the output so far), each in [-2, 2] as OpenAI's. Before them, logit_bias: {token_id:
    bias}, each bias (finite) added to its token's logit at every step, as vLLM's and OpenAI's.

    stop: strings that end a sample where they appear in its text (across token boundaries);
    the text is cut before the stop string, or after it with include_stop_str_in_output. The
    token ids keep the token that completed it. Stop strings need the model's tokenizer.

    logprobs: None (off) or N >= 0: each output position gets a {token_id: logprob} dict with
    the sampled token and the N most likely ones (so N or N + 1 entries), as vLLM's; each
    logprob a Logprob (a float with vLLM's rank and decoded_token). These are the model's raw
    log-probabilities (log_softmax of its logits, before logit_bias, penalties, temperature,
    top-k, top-p and min_p), as vLLM's default; cumulative_logprob is instead the
    log-probability under the distribution each token was drawn from (after those transforms).

    prompt_logprobs: None (off) or N >= 0: the request's output gets, for every prompt token
    after the first, the same kind of dict under the model given the tokens before it (the
    prompt's token first, then the N most likely), and None for the first token, as vLLM's.
    They come from the prefill's logits, so such a request is not served from the prefix cache.
    """
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop: tuple = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict | None = field(default=None, hash=False)

    def __post_init__(self):
        # Checked here, so a request that reaches the engine cannot fail in the sampler. Values
        # are stored in plain Python types (numpy ints become ints, stop ids a tuple).
        def put(name, value):
            object.__setattr__(self, name, value)
        put("n", check_int("n", self.n, minimum=1))
        put("temperature", check_float("temperature", self.temperature, minimum=0))
        top_k = check_int("top_k", self.top_k, minimum=-1)
        if top_k == 0:
            raise ValueError("top_k: must be -1 (off) or >= 1, got 0")
        put("top_k", top_k)
        put("top_p", check_float("top_p", self.top_p, maximum=1, above=0))
        put("max_tokens", check_int("max_tokens", self.max_tokens, minimum=1))
        put("stop_token_ids", tuple(check_token_ids("stop_token_ids", self.stop_token_ids)))
        put("ignore_eos", check_bool("ignore_eos", self.ignore_eos))
        if self.seed is not None:
            put("seed", check_int("seed", self.seed))
        put("min_p", check_float("min_p", self.min_p, minimum=0, maximum=1))
        put("presence_penalty", check_float("presence_penalty", self.presence_penalty, minimum=-2, maximum=2))
        put("frequency_penalty", check_float("frequency_penalty", self.frequency_penalty, minimum=-2, maximum=2))
        put("repetition_penalty", check_float("repetition_penalty", self.repetition_penalty, above=0))
        put("min_tokens", check_int("min_tokens", self.min_tokens, minimum=0, maximum=self.max_tokens))
        put("stop", check_stop_strings("stop", self.stop))
        put("include_stop_str_in_output", check_bool("include_stop_str_in_output", self.include_stop_str_in_output))
        if self.logprobs is not None:
            put("logprobs", check_int("logprobs", self.logprobs, minimum=0))
        if self.prompt_logprobs is not None:
            put("prompt_logprobs", check_int("prompt_logprobs", self.prompt_logprobs, minimum=0))
        put("logit_bias", check_logit_bias("logit_bias", self.logit_bias))
        # What the sampler asks of every request each step, worked out once: whether the logits
        # are transformed before sampling (penalties, min_tokens), and whether the request needs
        # more than the plain path (those, or logprobs). A request with neither takes exactly
        # the plain path (and may draft, under speculative decoding).
        put("_transforms_logits", self.presence_penalty != 0 or self.frequency_penalty != 0
            or self.repetition_penalty != 1 or self.min_tokens > 0 or self.logit_bias is not None)
        put("_special", self._transforms_logits or self.logprobs is not None)


def check_logit_bias(name, bias):
    """logit_bias as a new {int token id: float} dict, None when empty."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"{name}: must be a dict of token id -> bias, got {type(bias).__name__}")
    checked = {}
    for token, value in bias.items():
        try:
            token = check_int(name, token, minimum=0)
        except ValueError:
            raise ValueError(f"{name}: keys must be token ids (ints >= 0), got {token!r}") from None
        checked[token] = check_float(name, value)
    return checked or None


def check_stop_strings(name, stop):
    """stop strings as a tuple: one string or a sequence of non-empty strings."""
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"{name}: must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stop):
        raise ValueError(f"{name}: empty strings are not allowed")
    return tuple(stop)


class Logprob(float):
    """One entry of a logprobs or prompt_logprobs dict: the token's log-probability, a float
    (what these dicts have always held), carrying vLLM's Logprob fields too: logprob (the same
    value), rank (1 + the number of tokens of larger log-probability; the top-N entries are
    ranked 1..N by their place) and decoded_token (the token decoded alone, None without a
    tokenizer)."""
    __slots__ = ("rank", "decoded_token")

    def __new__(cls, logprob, rank=None, decoded_token=None):
        self = super().__new__(cls, logprob)
        self.rank, self.decoded_token = rank, decoded_token
        return self

    @property
    def logprob(self):
        return float(self)

    def __repr__(self):
        return f"Logprob(logprob={float(self)!r}, rank={self.rank!r}, decoded_token={self.decoded_token!r})"

    def __reduce__(self):
        return type(self), (float(self), self.rank, self.decoded_token)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int                       # which of the request's n samples
    prompt: list
    params: SamplingParams
    output: list = field(default_factory=list)
    status: Status = Status.WAITING
    num_cached: int = 0              # tokens whose KV is in the cache
    cached_prompt_tokens: int = 0    # served from the prefix cache at admission
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    logprobs: list | None = None     # per output token, {token_id: logprob} (params.logprobs)
    # params.prompt_logprobs: None, then {token_id: logprob} per prompt token as the forwards reach
    # it; one list shared by the request's samples (whichever computes a position adds its entry).
    prompt_logprobs: list | None = None
    text: object = None              # a SampleText when stop strings (or a front end) need the text
    error: str | None = None         # why, when finish_reason is "error"
    forwards: int = 0                # steps that emitted its tokens (one forward each)
    in_flight: int = 0               # tokens sampled on the device, not yet emitted (async_scheduling)
    speculation: object = None       # a speculative engine's counters for it (SequenceRecord), from its first draft
    engine_seed: InitVar[int] = 0    # LLM(seed=...), which seeds the requests that bring none
    seed: int = field(init=False)    # the seed of its random draws (plain and speculative sampling)

    def __post_init__(self, engine_seed):
        # Worked out once: the request's own seed, else the engine's mixed with the request id.
        self.seed = (self.params.seed if self.params.seed is not None
                     else engine_seed ^ zlib.crc32(self.request_id.encode()))

    @property
    def tokens(self):
        return self.prompt + self.output

    @property
    def last_token(self):
        return self.output[-1] if self.output else self.prompt[-1]

    def token_range(self, start, stop):
        """tokens[start:stop] without building the whole list (the engine asks every step)."""
        prompt_len = len(self.prompt)
        if start >= prompt_len:
            return self.output[start - prompt_len:stop - prompt_len]
        return self.prompt[start:stop] + self.output[:max(0, stop - prompt_len)]

    def input_tokens(self, start, stop, placeholder):
        """token_range(start, stop), with `placeholder` at a position whose token is in flight
        (async scheduling: past the tokens known on the host)."""
        tokens = self.token_range(start, stop)
        if len(tokens) < stop - start:
            tokens = tokens + [placeholder] * (stop - start - len(tokens))
        return tokens

    @property
    def ends_in_flight(self):
        """Whether a token in flight is its last (max_tokens): it computes nothing more."""
        return self.in_flight and len(self.output) + self.in_flight >= self.params.max_tokens

    def __len__(self):
        return len(self.prompt) + len(self.output)
