"""GPU memory of training and serving a ModelConfig: model states, activations, KV cache.

Model states per GPU follow the ZeRO paper (Rajbhandari et al. 2020, section 5 and Figure 1);
activations come from activations.py (Korthikanti et al. 2022). All results are bytes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from . import validate
from .activations import activation_bytes
from .config import ModelConfig
from .dtypes import dtype_bytes
from .params import count_params

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class TrainingMemory:
    weights: float
    gradients: float
    optimizer_states: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class InferenceMemory:
    weights: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def model_state_bytes(n_params: float, *, dtype: str = "bf16", optimizer: str = "adam", zero_stage: int = 0,
                      dp: int = 1) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes per GPU.

    Mixed precision (bf16/fp16) keeps 2-byte weights and gradients plus K bytes of optimizer
    state per parameter: K = 12 for Adam (fp32 master copy, momentum, variance; ZeRO section 3.1),
    8 for SGD with momentum. fp32 training has no master copy: 4 + 4 + (8 Adam | 4 SGD).
    ZeRO stage 1 partitions optimizer states over dp ranks, stage 2 also gradients, stage 3 also weights.
    """
    n_params = validate.positive_number("n_params", n_params)
    validate.choice("optimizer", optimizer, OPTIMIZERS)
    validate.choice("zero_stage", zero_stage, (0, 1, 2, 3))
    dp = validate.positive_int("dp", dp)
    e = dtype_bytes("dtype", dtype)
    if e == 4:
        state = 8 if optimizer != "sgd" else 4
    elif e == 2:
        state = 12 if optimizer != "sgd" else 8
    else:
        raise ValueError(f"dtype {dtype!r} is not a training precision; use bf16, fp16 or fp32")
    weights, grads, states = e * n_params, e * n_params, state * n_params
    return (weights / dp if zero_stage >= 3 else weights,
            grads / dp if zero_stage >= 2 else grads,
            states / dp if zero_stage >= 1 else states)


def training_memory(cfg: ModelConfig, batch: int, seq_len: int, *, dtype: str = "bf16", optimizer: str = "adam",
                    recompute: str = "none", flash_attention: bool = False, zero_stage: int = 0, dp: int = 1,
                    tp: int = 1, dropout: bool = False, sequence_parallel: bool = True) -> TrainingMemory:
    """Per-GPU bytes for training with `batch` sequences of `seq_len` tokens per GPU (micro-batch).

    Tensor parallelism splits weights tp ways (Megatron splits every matrix and the vocabulary;
    the small norm vectors are counted as split too) and activations as in Korthikanti et al.
    """
    tp = validate.positive_int("tp", tp)
    kv_heads_split_or_replicated = cfg.n_kv_heads % tp == 0 or tp % cfg.n_kv_heads == 0
    if cfg.n_heads % tp or not kv_heads_split_or_replicated:
        raise ValueError(f"tp ({tp}) must divide n_heads ({cfg.n_heads}) and divide or be a multiple of "
                         f"n_kv_heads ({cfg.n_kv_heads})")
    weights, grads, states = model_state_bytes(count_params(cfg) / tp, dtype=dtype, optimizer=optimizer,
                                               zero_stage=zero_stage, dp=dp)
    acts = activation_bytes(cfg, batch, seq_len, dtype=dtype, recompute=recompute, flash_attention=flash_attention,
                            dropout=dropout, tp=tp, sequence_parallel=sequence_parallel)
    return TrainingMemory(weights, grads, states, acts)


def kv_cache_bytes(cfg: ModelConfig, tokens: int = 1, dtype: str = "fp16") -> int:
    """K and V of every layer for `tokens` tokens: 2 * n_layers * n_kv_heads * head_dim * bytes each.
    Only the kv heads are stored, which is GQA's whole saving (Ainslie et al. 2023)."""
    tokens = validate.positive_int("tokens", tokens)
    elements = 2 * cfg.n_layers * cfg.kv_dim * tokens
    return math.ceil(elements * dtype_bytes("dtype", dtype))


def inference_memory(cfg: ModelConfig, batch: int, seq_len: int, *, dtype: str = "bf16",
                     kv_dtype: str | None = None) -> InferenceMemory:
    """Bytes to serve `batch` sequences of up to `seq_len` tokens on one GPU.

    Activations are the transient peak of prefilling all batch*seq_len tokens at once through
    one layer (chunked prefill needs less): the residual stream plus the widest intermediate
    (Q, K and V together, or the MLP's hidden: gate and up for a gated MLP, whose product and
    activation can be computed in place), plus fp32 logits of each sequence's last position.
    Nothing is kept across layers at inference.
    """
    batch = validate.positive_int("batch", batch)
    seq_len = validate.positive_int("seq_len", seq_len)
    e = dtype_bytes("dtype", dtype)
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    tokens = batch * seq_len
    widest = max(cfg.q_dim + 2 * cfg.kv_dim, (cfg.mlp_matrices - 1) * cfg.d_ff)
    acts = e * tokens * (cfg.d_model + widest) + 4 * batch * cfg.vocab_size
    return InferenceMemory(weights=e * count_params(cfg), kv_cache=kv_cache_bytes(cfg, tokens, kv_dtype),
                           activations=acts)
