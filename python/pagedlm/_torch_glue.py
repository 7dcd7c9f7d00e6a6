"""What the torch-facing op wrappers share: the caller's CUDA stream, the debug switch
that enables value checks on CUDA tensors, and type checks that name the argument."""
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
