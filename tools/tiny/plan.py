"""What the GPU jobs train, and the wall-clock share each sweep run gets.

Run times are estimated from eager-mode throughput measured on an H200 (batch 128 x 512, bf16
autocast; docs/tiny-code/train.log): a step costs ~3.8 ms plus ~2.4 ms per layer of launch and
Python overhead, plus its 6*N*tokens FLOPs at an effective 1.1e14 FLOP/s. The estimate adds the
two (on the GPU they partly overlap) and rounds the fixed part up to 5 ms, so it errs long,
most for small batches. Every run also stops at its wall-clock cap; its schedule then follows
elapsed time instead of tokens, so a capped run still ends its cosine decay and records the
tokens it really saw."""
from dataclasses import dataclass, field

from .models import Shape

STEP_OVERHEAD_S = 5e-3
LAYER_OVERHEAD_S = 2.4e-3
EFFECTIVE_FLOPS = 1.12e14

# Widths and depths growing ~1.6x in parameters (4,096-token vocabulary, tied embeddings):
# 0.22M 0.36M 0.61M 0.93M 1.56M 2.56M 4.16M 6.27M. Shallow, because at these sizes each layer's
# launch overhead costs more step time than its FLOPs.
LADDER = [Shape(48, 1), Shape(64, 2), Shape(96, 2), Shape(128, 2), Shape(160, 3), Shape(192, 4), Shape(256, 4),
          Shape(320, 4)]


@dataclass
class Plan:
    vocab: int = 4096
    seq_len: int = 512
    corpus_bytes: float = 120e6
    tokenizer_sample_bytes: float = 24e6
    held_out_per_mille: int = 15
    # isoFLOP budget (FLOPs, 6ND) -> sizes from ~200-400 down to ~3 tokens per parameter, so each
    # budget brackets its optimum wherever it falls in between (Chinchilla's is ~20). 1e15 skips
    # d96-l2: 440 tokens per parameter would repeat the 38M-token train split 7 times.
    sweep: dict = field(default_factory=lambda: {1e14: LADDER[0:6], 3e14: LADDER[1:7], 1e15: LADDER[3:8]})
    sweep_batch_range: tuple = (16, 256)  # sequences per step
    sweep_min_steps: int = 600  # with fewer steps, warm-up and schedule rather than size decide the loss
    target: Shape = Shape(320, 6)
    draft: Shape = Shape(192, 3)  # head_dim 64: pagedlm's CUDA kernels serve 64, 128 and 256
    final_batch: int = 128
    final_tokens: float = 300e6
    target_cap_s: float = 150.0
    draft_cap_s: float = 55.0
    distill_weight: float = 0.8  # the draft learns mostly the target's distribution: its job is to agree with it
    final_eval_windows: int = 256
    shipped_windows: int = 16  # held-out windows shipped with the models for the tests
    reserve_s: float = 10.0  # kept at the end for the last evaluation and writing results
    time_limit_s: float = 330.0  # from start to the end of the sweep: --mode sweep must end within 6 minutes
    lr_base: float = 2e-3  # peak learning rate at d_model 256, scaled by 256/d_model ...
    lr_max: float = 8e-3  # ... up to this, for the narrowest sweep models


SMOKE = Plan(vocab=384, seq_len=64, corpus_bytes=1.5e6, tokenizer_sample_bytes=0.5e6, held_out_per_mille=100,
             sweep={3e8: [Shape(16, 1), Shape(32, 1), Shape(32, 2)], 1e9: [Shape(16, 1), Shape(32, 2), Shape(48, 2)]},
             sweep_batch_range=(4, 8), sweep_min_steps=20, target=Shape(64, 2), draft=Shape(32, 1), final_batch=8,
             final_tokens=3e4, target_cap_s=1.0, draft_cap_s=0.7, final_eval_windows=8, shipped_windows=4,
             reserve_s=0.5, time_limit_s=12.0)


def peak_lr(plan, shape):
    return min(plan.lr_max, plan.lr_base * 256 / shape.d_model)


def sweep_batch(plan, tokens):
    """Sequences per step: the largest power of two within sweep_batch_range that leaves at
    least sweep_min_steps steps (big batches cut the per-step overhead, well below these models'
    critical batch)."""
    low, high = plan.sweep_batch_range
    batch = low
    while batch * 2 <= high and tokens / (batch * 2 * plan.seq_len) >= plan.sweep_min_steps:
        batch *= 2
    return batch


def estimated_seconds(plan, shape, tokens, batch):
    steps = tokens / (batch * plan.seq_len)
    return steps * (STEP_OVERHEAD_S + LAYER_OVERHEAD_S * shape.layers) + 6 * shape.params(plan.vocab) * tokens / EFFECTIVE_FLOPS


def sweep_runs(plan):
    """(budget, shape, tokens, batch, estimated seconds) for every sweep run, smallest budget first."""
    runs = []
    for budget, shapes in sorted(plan.sweep.items()):
        for shape in shapes:
            tokens = budget / (6 * shape.params(plan.vocab))
            batch = sweep_batch(plan, tokens)
            runs.append((budget, shape, tokens, batch, estimated_seconds(plan, shape, tokens, batch)))
    return runs
