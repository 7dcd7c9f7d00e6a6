"""Argument checks shared by the engine's entry points (LLM, SamplingParams, requests). Each
returns the value in its plain Python type or raises a ValueError that names the argument,
so a bad value is refused before anything is built or queued."""
import math
import numbers
import operator

import numpy as np
import torch


def check_int(name, value, minimum=None, maximum=None):
    """value as an int within [minimum, maximum] (None: unbounded). Bools and floats are
    refused rather than rounded: 1.5 tokens or True samples are a mistake, not a request."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        raise ValueError(f"{name}: must be an int{_range(minimum, maximum)}, got {value!r}")
    return int(value)


def check_float(name, value, minimum=None, maximum=None, *, above=None):
    """value as a finite float within [minimum, maximum], and > above when given."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)
            or (above is not None and value <= above)):
        raise ValueError(f"{name}: must be a finite number{_range(minimum, maximum, above)}, got {value!r}")
    return float(value)


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: must be True or False, got {value!r}")
    return bool(value)


def _range(minimum, maximum, above=None):
    parts = ([f"> {above}"] if above is not None else []) + ([f">= {minimum}"] if minimum is not None else []) \
        + ([f"<= {maximum}"] if maximum is not None else [])
    return (" " + " and ".join(parts)) if parts else ""


def check_token_ids(name, tokens, vocab_size=None):
    """A prompt's (or a stop list's) token ids as a list of ints, each in [0, vocab_size)
    (vocab_size None: any id >= 0); the error names the first bad token and its position. A
    token id past the vocabulary would otherwise fail deep inside the model's embedding lookup."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise ValueError(f"{name}: must be a sequence of token ids, got {type(tokens).__name__}")
    ids = []
    for position, token in enumerate(tokens):
        try:
            if isinstance(token, (bool, np.bool_)):
                raise TypeError
            token = operator.index(token)  # ints, numpy ints and integer 0-d tensors; not floats
        except TypeError:
            raise ValueError(f"{name}: token at position {position} is {token!r}, not an integer token id") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            if vocab_size is None:
                raise ValueError(f"{name}: token {token} at position {position} is negative")
            raise ValueError(f"{name}: token {token} at position {position} is outside the vocabulary "
                             f"[0, {vocab_size})")
        ids.append(token)
    return ids


# The dtypes LLM(dtype=...) takes, in vLLM's spellings; "auto": bfloat16 on a GPU, float32 on the CPU.
DTYPES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
          "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype, device):
    """The torch dtype that LLM(dtype=...) names: "auto" (or None), a name in DTYPES or one of
    their torch dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    accepted = ", ".join(repr(d) for d in ["auto", *DTYPES]) + ", torch.float16, torch.bfloat16, torch.float32"
    raise ValueError(f"dtype: must be one of {accepted}; got {dtype!r}")


def resolve_device(device):
    """The torch.device that LLM(device=...) names: None or "auto" (a GPU when there is one),
    "cpu", "cuda" or "cuda:N" (as a string or torch.device)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device: pagedlm runs on 'cpu' or 'cuda', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    return resolved
