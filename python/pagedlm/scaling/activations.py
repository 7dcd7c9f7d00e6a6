"""Activation memory kept for the backward pass, after Korthikanti et al. 2022.

Section 4.1 of "Reducing Activation Recomputation in Large Transformer Models" lists each
tensor a layer saves; this module keeps that list but sizes it for GQA (K and V are kv_dim
wide), SwiGLU (three d_ff-wide tensors instead of GELU's two), optional dropout and
FlashAttention, so that a GPT-3-style layer reproduces the paper's s*b*h*(34 + 5*a*s/h) bytes.
"""
from __future__ import annotations

from . import validate
from .config import ModelConfig
from .dtypes import dtype_bytes

RECOMPUTE = ("none", "selective", "full")


def _saved_tensors(cfg: ModelConfig, batch: int, seq_len: int, e: float, *, flash_attention: bool,
                   dropout: bool, keep_scores: bool) -> list[tuple[float, bool]]:
    """(bytes, split_by_tensor_parallelism) of every tensor one layer saves.

    The second item is False for tensors that Megatron tensor parallelism replicates
    (norm inputs, the inputs of the first linear of each block, the dropout masks after
    the last linear); sequence parallelism splits those too (Korthikanti et al., section 4.2.2).
    """
    sbh = seq_len * batch * cfg.d_model
    sb = seq_len * batch
    scores = cfg.n_heads * seq_len * seq_len * batch  # a*s^2*b elements
    saved = [
        (e * sbh, False),  # attention norm input
        (e * sbh, False),  # QKV projection input
        (e * sb * cfg.q_dim, True),  # Q, for Q K^T
        (e * sb * cfg.kv_dim, True),  # K
        (e * sb * cfg.kv_dim, True),  # V, for softmax . V
        (e * sb * cfg.q_dim, True),  # output projection input
        (e * sbh, False),  # MLP norm input
        (e * sbh, False),  # MLP input
        # GELU keeps its input and output (2*d_ff); SwiGLU keeps gate, up and their product (3*d_ff).
        (e * sb * cfg.d_ff * cfg.mlp_matrices, True),
    ]
    if flash_attention:
        saved.append((4 * cfg.n_heads * sb, True))  # fp32 log-sum-exp per row; scores are recomputed
    elif keep_scores:
        saved.append((e * scores, True))  # softmax output
        if dropout:
            saved += [(1 * scores, True), (e * scores, True)]  # attention dropout mask and output
    if dropout:
        saved += [(1 * sbh, False), (1 * sbh, False)]  # masks of the two residual-branch dropouts
    return saved


def activation_bytes_per_layer(cfg: ModelConfig, batch: int, seq_len: int, *, dtype: str = "bf16",
                               recompute: str = "none", flash_attention: bool = False, dropout: bool = False,
                               tp: int = 1, sequence_parallel: bool = True) -> float:
    """Bytes one transformer layer keeps for backward, per GPU.

    recompute="selective" recomputes the attention core (Q K^T, softmax, dropout, softmax . V),
    dropping the s^2 terms (Korthikanti et al., section 5); "full" keeps only the layer input.
    """
    validate.positive_int("batch", batch)
    validate.positive_int("seq_len", seq_len)
    validate.positive_int("tp", tp)
    validate.choice("recompute", recompute, RECOMPUTE)
    e = dtype_bytes("dtype", dtype)
    if recompute == "full":
        layer_input = e * seq_len * batch * cfg.d_model
        return layer_input / tp if sequence_parallel else layer_input
    saved = _saved_tensors(cfg, batch, seq_len, e, flash_attention=flash_attention, dropout=dropout,
                           keep_scores=recompute == "none")
    return sum(size / tp if (split or sequence_parallel) else size for size, split in saved)


def head_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, *, dtype: str = "bf16", tp: int = 1) -> float:
    """Final norm input, LM-head input and fp32 logits for the cross-entropy:
    4*s*b*h/t * (1 + v/h) bytes in 16-bit (Korthikanti et al., section 4, the output layer)."""
    e = dtype_bytes("dtype", dtype)
    sb = seq_len * batch
    return (2 * e * sb * cfg.d_model + 4 * sb * cfg.vocab_size) / tp


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, *, dtype: str = "bf16", recompute: str = "none",
                     flash_attention: bool = False, dropout: bool = False, tp: int = 1,
                     sequence_parallel: bool = True) -> float:
    """Peak activation bytes per GPU for one micro-batch: every layer, plus the head.

    Under full recomputation the backward pass rebuilds one layer at a time, so one layer's
    full set (selective-recompute sized) is added as working memory on top of the checkpoints.
    """
    kw = dict(dtype=dtype, flash_attention=flash_attention, dropout=dropout, tp=tp,
              sequence_parallel=sequence_parallel)
    per_layer = activation_bytes_per_layer(cfg, batch, seq_len, recompute=recompute, **kw)
    total = cfg.n_layers * per_layer + head_activation_bytes(cfg, batch, seq_len, dtype=dtype, tp=tp)
    if recompute == "full":
        total += activation_bytes_per_layer(cfg, batch, seq_len, recompute="none", **kw)
    return total
