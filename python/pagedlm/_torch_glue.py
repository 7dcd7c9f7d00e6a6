"""What the torch-facing op wrappers share: the caller's CUDA stream, the debug switch
that enables value checks on CUDA tensors, and type and range checks of the arguments that
name the argument (so nothing reaches the bindings that nanobind would refuse unclearly)."""
import math
import numbers
import operator
import os

import torch


def debug_checks():
    """PAGEDLM_DEBUG=1: check values inside CUDA tensors too (costs a synchronization)."""
    return os.environ.get("PAGEDLM_DEBUG") == "1"


def stream_of(t):
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def expect_tensors(**tensors):
    """TypeError naming the first argument that is neither a tensor nor None."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def int_arg(name, value):
    """A Python int (or anything with __index__, bools excluded), as an int of any size."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


_FLOAT32_MAX = 3.4028234663852886e38


def float_arg(name, value, *, positive=False):
    """A real number the kernels take as float32: finite there, >= 0 (> 0 with positive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf if value > 0 else -math.inf
    if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise ValueError(f"{name}: must be finite in float32, got {value!r}")
    if x < 0 or (positive and x == 0):
        raise ValueError(f"{name}: must be {'positive' if positive else 'at least 0'}, got {value!r}")
    return x


def bool_arg(name, value):
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
