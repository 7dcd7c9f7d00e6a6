"""Turn a FLOP budget into a concrete, trainable architecture.

The law gives the compute-optimal parameter count N_opt; this module searches widths
(multiples of 128, head_dim 128), depths and MLP widths (multiples of 256) for the config
whose exact parameter count is within 2% of N_opt and whose shape is most like real models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import validate
from .budget import cost_dollars, get_gpu, gpu_hours, training_days
from .config import ModelConfig
from .laws import CHINCHILLA, ChinchillaLaw, law_by_name
from .params import count_params

HEAD_DIM = 128
MAX_PARAM_ERROR = 0.02
# d_model / n_layers of published models runs from 33 (GPT-2 XL, 1600/48) through 64 (GPT-2),
# 102-128 (LLaMA, Llama 2/3, Mistral, Qwen2-7B) to 205 (Gopher 280B, 16384/80; Rae et al. 2021,
# Table 1). Kaplan et al. 2020 (section 3.1, Figure 5): at fixed N the loss moves only a few
# percent over a wide range of shapes, so any ratio in this range is a safe choice.
ASPECT_RANGE = (32.0, 208.0)
# Small models are built narrower for their size than large ones (GPT-2 124M: 64; 7B and up: ~128).
ASPECT_TARGET = ((3e8, 64.0), (1e10, 128.0))

FAMILIES = {
    # LLaMA (Touvron et al. 2023): SwiGLU at 8/3 d, RMSNorm, RoPE, untied; GQA as in Llama 2 70B / Llama 3.
    "llama": dict(kwargs=dict(mlp="swiglu", norm="rmsnorm", position="rope"), ffn_ratio=8 / 3, gqa=True),
    # GPT-2 (Radford et al. 2019): GELU at 4d, LayerNorm, learned positions, tied embeddings, biases, MHA.
    "gpt2": dict(kwargs=dict(mlp="gelu", norm="layernorm", position="learned", tied_embeddings=True,
                             qkv_bias=True, attn_out_bias=True, mlp_bias=True), ffn_ratio=4.0, gqa=False),
}
FFN_RATIO_SLACK = (0.85, 1.35)  # allowed d_ff / (ffn_ratio * d); Llama 3's 3.5 d is 1.31 x 8/3 d


@dataclass(frozen=True)
class ModelDesign:
    config: ModelConfig
    params: int
    tokens: float
    loss: float
    train_days: float
    gpu: str
    explanation: str
    compute_flops: float
    n_opt: float
    n_gpus: int
    gpu_hours: float
    cost_dollars: float


def kv_heads_for(n_heads: int) -> tuple[int, float] | None:
    """(kv heads, score penalty) for GQA over n_heads query heads; None if they group badly.

    Preferred: 8 kv heads once there are 16+ heads (Llama 2 70B, Llama 3, Mistral 7B; 8 also
    divides the usual tensor-parallel degrees); then groups of 4 query heads, then of 2.
    """
    if n_heads >= 16 and n_heads % 8 == 0:
        return 8, 0.0
    if n_heads % 4 == 0:
        return n_heads // 4, 0.0 if n_heads < 16 else 0.05
    if n_heads % 2 == 0:
        return n_heads // 2, 0.15
    return None


def _target_aspect(n_params: float) -> float:
    (n0, a0), (n1, a1) = ASPECT_TARGET
    t = min(max((math.log(n_params) - math.log(n0)) / (math.log(n1) - math.log(n0)), 0.0), 1.0)
    return a0 * (a1 / a0) ** t


def _best_config(n_opt: float, family: str, vocab_size: int, seq_len: int) -> ModelConfig | None:
    spec = FAMILIES[family]
    ideal_ratio = spec["ffn_ratio"]
    target = _target_aspect(n_opt)
    best, best_score = None, math.inf
    for d in range(HEAD_DIM, 64 * 1024 + 1, HEAD_DIM):
        heads = d // HEAD_DIM
        gqa = kv_heads_for(heads) if spec["gqa"] else (heads, 0.0)
        if gqa is None:
            continue
        kv_heads, kv_penalty = gqa
        common = dict(spec["kwargs"], d_model=d, n_heads=heads, n_kv_heads=kv_heads,
                      head_dim=HEAD_DIM, vocab_size=vocab_size, max_seq_len=seq_len)
        # Depths worth trying: those that reach n_opt with the widest and the narrowest allowed MLP.
        depths = []
        for slack in FFN_RATIO_SLACK:
            d_ff = 256 * max(1, round(slack * ideal_ratio * d / 256))
            one_layer = count_params(ModelConfig(n_layers=1, d_ff=d_ff, **common))
            per_layer = count_params(ModelConfig(n_layers=2, d_ff=d_ff, **common)) - one_layer
            depths.append((n_opt - (one_layer - per_layer)) / per_layer)
        shallowest = max(1, math.floor(min(depths)), math.ceil(d / ASPECT_RANGE[1]))
        deepest = min(math.ceil(max(depths)), math.floor(d / ASPECT_RANGE[0]))
        for n_layers in range(shallowest, deepest + 1):
            # Parameters are linear in d_ff: solve for the d_ff that hits n_opt, then round to 256.
            p_a = count_params(ModelConfig(n_layers=n_layers, d_ff=256, **common))
            p_b = count_params(ModelConfig(n_layers=n_layers, d_ff=512, **common))
            d_ff = 256 * max(1, round((256 + (n_opt - p_a) * 256 / (p_b - p_a)) / 256))
            ratio = d_ff / (ideal_ratio * d)
            if not FFN_RATIO_SLACK[0] <= ratio <= FFN_RATIO_SLACK[1]:
                continue
            cfg = ModelConfig(n_layers=n_layers, d_ff=d_ff, **common)
            error = abs(count_params(cfg) / n_opt - 1)
            if error > MAX_PARAM_ERROR:
                continue
            score = abs(math.log(d / n_layers / target)) + abs(math.log(ratio)) + kv_penalty + error
            if score < best_score:
                best, best_score = cfg, score
    return best


def _choose_n_gpus(flops: float, params: int, gpu, mfu: float, max_days: float) -> int:
    """Fewest GPUs (a power of two) that hold the model states and finish within max_days.
    Model states: 16 bytes/param (bf16 Adam, ZeRO section 3.1) sharded by ZeRO-3, under 70% of memory."""
    n = 1
    min_for_memory = 16 * params / (0.7 * gpu.memory_bytes)
    while n < 2**20 and (n < min_for_memory or training_days(flops, gpu, n, mfu=mfu) > max_days):
        n *= 2
    return n


def design_model(compute_flops: float, *, law=CHINCHILLA, family: str = "llama", gpu="H100", mfu: float = 0.4,
                 n_gpus: int | None = None, vocab_size: int = 32000, seq_len: int = 4096,
                 max_days: float = 90.0, price_per_hour: float | None = None) -> ModelDesign:
    """A compute-optimal model for `compute_flops` training FLOPs (C = 6ND), with its data,
    expected loss and training time on `n_gpus` GPUs (default: the fewest powers of two that
    fit the model states and finish within max_days)."""
    C = validate.positive_number("compute_flops", compute_flops)
    law = law_by_name(law) if isinstance(law, str) else law
    if not isinstance(law, ChinchillaLaw):
        raise ValueError("law must be a ChinchillaLaw (its N counts all parameters, as a config's does)")
    validate.choice("family", family, tuple(FAMILIES))
    validate.positive_int("vocab_size", vocab_size)
    validate.positive_int("seq_len", seq_len)
    validate.positive_number("max_days", max_days)
    gpu = get_gpu(gpu)
    n_opt, d_opt, _ = (float(x) for x in law.optimal(C))
    cfg = _best_config(n_opt, family, vocab_size, seq_len)
    if cfg is None:
        raise ValueError(f"compute_flops {C:.3g} gives N_opt = {n_opt:.3g} parameters, too small for a "
                         f"{family} model with head_dim {HEAD_DIM} and vocab_size {vocab_size}")
    params = count_params(cfg)
    tokens = C / (6.0 * params)
    why_gpus = "as given"
    if n_gpus is None:
        n_gpus = _choose_n_gpus(C, params, gpu, mfu, max_days)
        why_gpus = f"the fewest, as a power of two, that hold the model states and finish in {max_days:.0f} days"
    n_gpus = validate.positive_int("n_gpus", n_gpus)
    days = training_days(C, gpu, n_gpus, mfu=mfu)
    explanation = "\n".join([
        f"Law {law.name or 'custom'}: C = {C:.3g} FLOPs gives N_opt = {n_opt:.4g} params and "
        f"D_opt = {d_opt:.4g} tokens ({d_opt / n_opt:.1f} tokens/param), from the closed form under C = 6ND.",
        f"Width {cfg.d_model} = {cfg.n_heads} heads x {HEAD_DIM}; {cfg.n_kv_heads} KV heads "
        f"(group of {cfg.n_heads // cfg.n_kv_heads}) to shrink the KV cache.",
        f"Depth {cfg.n_layers}: d_model/n_layers = {cfg.aspect_ratio:.0f}, near the {_target_aspect(n_opt):.0f} that "
        f"models of this size use (allowed {ASPECT_RANGE[0]:.0f}-{ASPECT_RANGE[1]:.0f}).",
        f"MLP {cfg.d_ff} = {cfg.d_ff / cfg.d_model:.2f} x d_model (family {family}: "
        f"{FAMILIES[family]['ffn_ratio']:.2f}), a multiple of 256, tuned so the exact count "
        f"{params:,} is {100 * (params / n_opt - 1):+.2f}% from N_opt.",
        f"Tokens D = C / (6 N) = {tokens:.4g}; expected loss {float(law.loss(params, tokens)):.4f} nats/token.",
        f"{gpu.name} at {mfu:.0%} MFU of {gpu.peak_flops / 1e12:.0f} TFLOP/s: "
        f"{gpu_hours(C, gpu, mfu=mfu):,.0f} GPU-hours, {days:.1f} days on {n_gpus} GPUs ({why_gpus}).",
    ])
    return ModelDesign(config=cfg, params=params, tokens=tokens, loss=float(law.loss(params, tokens)),
                       train_days=days, gpu=gpu.name, explanation=explanation, compute_flops=C, n_opt=n_opt,
                       n_gpus=n_gpus, gpu_hours=gpu_hours(C, gpu, mfu=mfu),
                       cost_dollars=cost_dollars(C, gpu, price_per_hour=price_per_hour, mfu=mfu))
