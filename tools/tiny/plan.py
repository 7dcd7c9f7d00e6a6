"""What one GPU job trains, and the wall-clock share each run gets.

Sizes and budgets assume one H100 and the throughput of small eager-mode models: a fixed
~8 ms of launch and Python overhead per step plus the 6ND FLOPs at an effective 1e14 FLOP/s
(10% of bf16 peak). Every run also stops at its wall-clock cap; its schedule then follows
elapsed time instead of tokens, so a capped run still ends its cosine decay and records the
tokens it really saw."""
from dataclasses import dataclass, field

from .models import Shape

STEP_OVERHEAD_S = 8e-3
EFFECTIVE_FLOPS = 1e14

# Widths and depths growing ~1.8x in parameters (4,096-token vocabulary, tied embeddings):
# 0.36M 0.73M 1.33M 2.56M 4.94M 8.75M 15.7M.
LADDER = [Shape(64, 2), Shape(96, 3), Shape(128, 4), Shape(192, 4), Shape(256, 5), Shape(320, 6), Shape(384, 8)]


@dataclass
class Plan:
    vocab: int = 4096
    seq_len: int = 512
    corpus_bytes: float = 120e6
    tokenizer_sample_bytes: float = 24e6
    held_out_per_mille: int = 15
    # isoFLOP budget (FLOPs, 6ND) -> five sizes around its expected optimum.
    sweep: dict = field(default_factory=lambda: {6e13: LADDER[0:5], 2e14: LADDER[1:6], 6e14: LADDER[2:7]})
    sweep_batch_range: tuple = (32, 128)  # sequences per step; fewer when a run has few tokens
    target: Shape = Shape(320, 6)
    draft: Shape = Shape(160, 4)
    final_batch: int = 128
    final_tokens: float = 300e6
    target_cap_s: float = 150.0
    draft_cap_s: float = 60.0
    distill_weight: float = 0.8  # the draft learns mostly the target's distribution: its job is to agree with it
    eval_windows: int = 64
    final_eval_windows: int = 256
    shipped_windows: int = 16  # held-out windows shipped with the models for the tests
    reserve_s: float = 15.0  # kept at the end for writing results
    time_limit_s: float = 470.0  # from start to the end of the sweep: the GPU job must end within 9 minutes
    lr_base: float = 2e-3  # peak learning rate at d_model 256, scaled by 256/d_model


SMOKE = Plan(vocab=384, seq_len=64, corpus_bytes=1.5e6, tokenizer_sample_bytes=0.5e6, held_out_per_mille=100,
             sweep={3e8: [Shape(16, 1), Shape(32, 1), Shape(32, 2)], 1e9: [Shape(16, 1), Shape(32, 2), Shape(48, 2)]},
             sweep_batch_range=(4, 8), target=Shape(64, 2), draft=Shape(32, 1), final_batch=8, final_tokens=3e4,
             target_cap_s=1.0, draft_cap_s=0.7, eval_windows=8, final_eval_windows=8, shipped_windows=4,
             reserve_s=0.5, time_limit_s=12.0)


def peak_lr(plan, shape):
    return min(6e-3, plan.lr_base * 256 / shape.d_model)


def sweep_batch(plan, tokens):
    """Sequences per step: about 150 steps or more, within sweep_batch_range, a power of two."""
    low, high = plan.sweep_batch_range
    batch = low
    while batch * 2 <= high and tokens / (batch * 2 * plan.seq_len) >= 150:
        batch *= 2
    return batch


def estimated_seconds(plan, shape, tokens, batch):
    steps = tokens / (batch * plan.seq_len)
    return steps * STEP_OVERHEAD_S + 6 * shape.params(plan.vocab) * tokens / EFFECTIVE_FLOPS


def sweep_runs(plan):
    """(budget, shape, tokens, batch, estimated seconds) for every sweep run, smallest budget first."""
    runs = []
    for budget, shapes in sorted(plan.sweep.items()):
        for shape in shapes:
            tokens = budget / (6 * shape.params(plan.vocab))
            batch = sweep_batch(plan, tokens)
            runs.append((budget, shape, tokens, batch, estimated_seconds(plan, shape, tokens, batch)))
    return runs
