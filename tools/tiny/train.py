"""One training run: a transformers LlamaForCausalLM on random windows of the token stream,
fp32 master weights under bf16 autocast (on CUDA), AdamW, linear warm-up then cosine decay to
10%, stopping at a token target or a wall-clock cap, whichever comes first."""
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RunResult:
    model: torch.nn.Module
    tokens: int
    steps: int
    wall_s: float
    train_loss: float
    stopped_by: str  # "tokens" or "time"


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def lr_at(step, progress, peak, warmup_steps):
    """Linear warm-up over warmup_steps, then cosine from peak to peak/10 as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / warmup_steps)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def random_windows(stream, batch, seq_len, generator):
    """[batch, seq_len + 1] windows of the on-device token stream at random offsets."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch, 1), device=stream.device, generator=generator)
    return stream[starts + torch.arange(seq_len + 1, device=stream.device)].long()


def train(model, stream, *, batch, seq_len, tokens, cap_s, peak_lr, seed, teacher=None, distill_weight=0.0,
          log=print, log_every_s=10.0, compile_model=False):
    """Train model in place on windows of stream (int tensor on the model's device). With a
    teacher, the loss is (1 - w) * cross-entropy + w * KL(teacher || model), w = distill_weight."""
    device = stream.device
    total_steps = max(1, round(tokens / (batch * seq_len)))
    warmup_steps = max(1, min(100, total_steps // 20))
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=peak_lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    generator = torch.Generator(device=device).manual_seed(seed)
    model.train()
    start = last_log = time.perf_counter()
    step, running = 0, torch.zeros((), device=device)
    stopped_by = "tokens"
    while step < total_steps:
        elapsed = time.perf_counter() - start
        if elapsed >= cap_s:
            stopped_by = "time"
            break
        lr = lr_at(step, max(step / total_steps, elapsed / cap_s), peak_lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        window = random_windows(stream, batch, seq_len, generator)
        x, y = window[:, :-1], window[:, 1:]
        with autocast(device):
            logits = forward(input_ids=x).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            if teacher is not None:
                with torch.no_grad():
                    target_logp = F.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), target_logp, log_target=True, reduction="none").sum(-1).mean()
                loss = (1 - distill_weight) * loss + distill_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running = 0.9 * running + 0.1 * loss.detach() if step else loss.detach()
        step += 1
        now = time.perf_counter()
        if now - last_log >= log_every_s:
            seen = step * batch * seq_len
            log(f"  step {step}/{total_steps}  loss {running.item():.3f}  lr {lr:.2e}  "
                f"{seen / (now - start) / 1e6:.2f}M tokens/s  {now - start:.0f}s")
            last_log = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.eval()
    return RunResult(model, step * batch * seq_len, step, time.perf_counter() - start,
                     float(running.item()) if step else float("nan"), stopped_by)
