"""Held-out evaluation: mean next-token loss over fixed windows of the held-out stream, and the
draft's greedy agreement with the target (the fraction of positions where their argmax tokens
match: the per-token acceptance of greedy speculative decoding)."""
import numpy as np
import torch
import torch.nn.functional as F

from .train import autocast


def eval_windows(stream, count, seq_len):
    """count [seq_len + 1] windows spread evenly over a 1-D token array (numpy), as int64 numpy."""
    if len(stream) < seq_len + 1:
        raise ValueError(f"held-out stream: {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(np.int64)
    return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64)


@torch.no_grad()
def window_losses(model, windows, batch=32):
    """Mean loss of each window (numpy float64), computed in the model's dtype under bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(windows), batch):
        w = torch.as_tensor(windows[i:i + batch], device=device)
        with autocast(device):
            logits = model(input_ids=w[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").mean(1)
        out.append(loss.double().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def greedy_agreement(draft, target, windows, batch=32):
    """Fraction of positions where draft and target predict the same next token."""
    device = next(target.parameters()).device
    same = total = 0
    for i in range(0, len(windows), batch):
        x = torch.as_tensor(windows[i:i + batch, :-1], device=device)
        with autocast(device):
            a = draft(input_ids=x).logits.argmax(-1)
            b = target(input_ids=x).logits.argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return same / total
