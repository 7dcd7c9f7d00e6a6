"""Forward and training FLOP counts of a ModelConfig.

A multiply-add is 2 FLOPs. The attention-score terms use the full seq_len x seq_len matrix,
as Kaplan et al. 2020 (Table 1), Hoffmann et al. 2022 (Appendix F) and Narayanan et al. 2021 do.
"""
from __future__ import annotations

from . import validate
from .config import ModelConfig
from .params import count_params


def forward_flops(cfg: ModelConfig, seq_len: int, batch: int = 1, *, per_layer: bool = False):
    """Matmul FLOPs of one forward pass over `batch` sequences of `seq_len` tokens.

    Element-wise work (norms, softmax, activations) is left out: about 1% or less at real
    sizes (softmax is 3 FLOPs per score against 4*head_dim for computing and applying it).
    For a GPT-style MHA model with d_ff = 4d this equals the forward part of Narayanan et al.
    2021 (appendix, eq. for F): 24*B*s*L*h^2 + 4*B*s^2*L*h + 2*B*s*h*V.
    With per_layer=True, returns a dict: one layer's terms, 'layers' (all of them), 'lm_head', 'total'.
    """
    s = validate.positive_int("seq_len", seq_len)
    b = validate.positive_int("batch", batch)
    tokens = b * s
    d = cfg.d_model
    layer = {
        "qkv_proj": 2 * tokens * d * (cfg.q_dim + 2 * cfg.kv_dim),
        # GQA shares K/V between heads but every query head still does its own s x s products.
        "attention_scores": 2 * b * s * s * cfg.q_dim,
        "attention_values": 2 * b * s * s * cfg.q_dim,
        "out_proj": 2 * tokens * cfg.q_dim * d,
        "mlp": 2 * tokens * cfg.mlp_matrices * d * cfg.d_ff,
    }
    layers = cfg.n_layers * sum(layer.values())
    lm_head = 2 * tokens * d * cfg.vocab_size
    if per_layer:
        return {**layer, "layers": layers, "lm_head": lm_head, "total": layers + lm_head}
    return layers + lm_head


def chinchilla_forward_flops(cfg: ModelConfig, seq_len: int) -> dict:
    """Forward FLOPs of one sequence, term by term, as Hoffmann et al. 2022, Appendix F counts them.

    The appendix assumes MHA and a two-matrix MLP; here K/V use kv_dim (GQA) and the MLP has
    cfg.mlp_matrices matrices, so an MHA/GELU config gives the appendix's numbers exactly.
    """
    s = validate.positive_int("seq_len", seq_len)
    d, v = cfg.d_model, cfg.vocab_size
    attention = {
        "qkv_proj": 2 * s * d * (cfg.q_dim + 2 * cfg.kv_dim),  # appendix: 2*3*s*d*(key_size*heads)
        "qk_logits": 2 * s * s * cfg.q_dim,
        "softmax": 3 * cfg.n_heads * s * s,
        "softmax_values": 2 * s * s * cfg.q_dim,  # the appendix's "softmax @ query reductions"
        "final_linear": 2 * s * cfg.q_dim * d,
    }
    dense = 2 * s * cfg.mlp_matrices * d * cfg.d_ff  # appendix: 2*s*(d*ffw + d*ffw)
    terms = {
        "embeddings": 2 * s * v * d,  # the appendix counts the embedding as a matmul
        "attention": cfg.n_layers * sum(attention.values()),
        "dense": cfg.n_layers * dense,
        "logits": 2 * s * d * v,
    }
    return {**terms, "total": sum(terms.values())}


def training_flops(cfg: ModelConfig, tokens: float, *, method: str = "6ND", seq_len: int | None = None) -> float:
    """Training FLOPs for `tokens` tokens.

    "6ND": 6 * N * D with N all parameters, embeddings included (Hoffmann et al. 2022, section 3;
           the 6 is 2 forward + 4 backward FLOPs per parameter per token, Kaplan et al. 2020, 2.1).
    "detailed": Appendix F of Hoffmann et al. 2022: forward per sequence of seq_len
           (default cfg.max_seq_len) times 3, the backward pass costing twice the forward.
    """
    tokens = validate.positive_number("tokens", tokens)
    validate.choice("method", method, ("6ND", "detailed"))
    if method == "6ND":
        return 6.0 * count_params(cfg) * tokens
    s = cfg.max_seq_len if seq_len is None else validate.positive_int("seq_len", seq_len)
    return 3.0 * chinchilla_forward_flops(cfg, s)["total"] * tokens / s
