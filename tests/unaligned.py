"""GPU tensors that the kernels' 16-byte accesses cannot take: a copy placed a few elements into
its storage, so the kernels under test run their scalar path."""
import torch


def cuda_at_offset(x, offset):
    """x copied to the GPU as a view `offset` elements into a fresh storage (offset 0: aligned)."""
    storage = torch.empty(x.numel() + offset, dtype=x.dtype, device="cuda")
    view = storage[offset:].view(x.shape)
    view.copy_(x)
    return view
