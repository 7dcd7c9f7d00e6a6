"""SamplingParams and the per-sequence state the scheduler and runner share."""
from dataclasses import dataclass, field
from enum import Enum

from pagedlm.engine.checks import check_bool, check_float, check_int, check_token_ids


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    seed: int | None = None

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

    def __len__(self):
        return len(self.prompt) + len(self.output)
