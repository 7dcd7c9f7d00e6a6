"""SamplingParams and the per-sequence state the scheduler and runner share."""
from dataclasses import dataclass, field
from enum import Enum


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
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k: must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")


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
