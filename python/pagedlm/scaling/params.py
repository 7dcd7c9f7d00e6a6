"""Exact parameter counts of a ModelConfig, whole or broken down by component.

Counts every weight and bias: token embedding, learned position table, attention, MLP,
norms (RMSNorm: a scale; LayerNorm: scale and shift) and the output head (once if tied).
"""
from __future__ import annotations

from .config import ModelConfig


def count_params(cfg: ModelConfig, *, breakdown: bool = False):
    """Total parameters (int), or with breakdown=True a dict of components plus 'total'."""
    d = cfg.d_model
    attention = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d  # W_q, W_k, W_v, W_o
    if cfg.qkv_bias:
        attention += cfg.q_dim + 2 * cfg.kv_dim
    if cfg.attn_out_bias:
        attention += d
    mlp = cfg.mlp_matrices * d * cfg.d_ff
    if cfg.mlp_bias:
        mlp += (cfg.mlp_matrices - 1) * cfg.d_ff + d  # one bias per up/gate projection, one on the way down
    norm = d if cfg.norm == "rmsnorm" else 2 * d
    parts = {
        "embedding": cfg.vocab_size * d,
        "position": cfg.max_seq_len * d if cfg.position == "learned" else 0,
        "attention": cfg.n_layers * attention,
        "mlp": cfg.n_layers * mlp,
        "norms": (2 * cfg.n_layers + 1) * norm,  # two per layer (pre-attention, pre-MLP) and a final one
        "output_head": 0 if cfg.tied_embeddings else cfg.vocab_size * d,
    }
    total = sum(parts.values())
    return {**parts, "total": total} if breakdown else total


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameters excluding token/position embeddings and the output head: the N of
    Kaplan et al. 2020 (section 2.1), whose laws are fitted on this count."""
    parts = count_params(cfg, breakdown=True)
    return parts["total"] - parts["embedding"] - parts["position"] - parts["output_head"]
