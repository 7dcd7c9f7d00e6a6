"""Translate Hugging Face config.json dictionaries into ModelConfig keyword arguments.

Defaults follow the transformers config classes of each family (LlamaConfig, MistralConfig,
Qwen2Config, GPT2Config), since a config.json leaves out any field equal to its default.
"""
from __future__ import annotations

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")


def kwargs_from_hf(hf: dict) -> dict:
    if not isinstance(hf, dict):
        raise ValueError(f"path_or_dict must be a dict or a path to config.json, got {type(hf).__name__}")
    model_type = hf.get("model_type") or ("gpt2" if "n_embd" in hf else "llama" if "hidden_size" in hf else None)
    if model_type not in SUPPORTED:
        raise ValueError(f"model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED)}")
    kwargs = _gpt2(hf) if model_type == "gpt2" else _llama_like(hf, model_type)
    kwargs["name"] = hf.get("_name_or_path") or model_type
    kwargs["source"] = "Hugging Face config.json"
    return kwargs


def _get(hf: dict, *keys, default=None, required=False):
    """First present, non-null key of several spellings."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    if required:
        raise ValueError(f"{keys[0]} is missing from config.json")
    return default


def _llama_like(hf: dict, model_type: str) -> dict:
    act = _get(hf, "hidden_act", default="silu")
    if "silu" not in act and "swish" not in act and "gelu" not in act:
        raise ValueError(f"hidden_act {act!r} is not a gated MLP activation this reader knows")
    heads = _get(hf, "num_attention_heads", required=True)
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False  # Qwen2Attention: bias on q/k/v only
    else:
        qkv_bias = out_bias = bool(_get(hf, "attention_bias", default=False))
    return dict(
        n_layers=_get(hf, "num_hidden_layers", required=True),
        d_model=_get(hf, "hidden_size", required=True),
        n_heads=heads,
        n_kv_heads=_get(hf, "num_key_value_heads", default=heads),
        head_dim=_get(hf, "head_dim"),
        d_ff=_get(hf, "intermediate_size", required=True),
        vocab_size=_get(hf, "vocab_size", required=True),
        max_seq_len=_get(hf, "max_position_embeddings", default=2048),
        tied_embeddings=bool(_get(hf, "tie_word_embeddings", default=False)),
        mlp="swiglu", norm="rmsnorm", position="rope",
        qkv_bias=qkv_bias, attn_out_bias=out_bias,
        mlp_bias=bool(_get(hf, "mlp_bias", default=False)),
    )


def _gpt2(hf: dict) -> dict:
    d_model = _get(hf, "n_embd", "hidden_size", required=True)
    return dict(
        n_layers=_get(hf, "n_layer", "num_hidden_layers", required=True),
        d_model=d_model,
        n_heads=_get(hf, "n_head", "num_attention_heads", required=True),
        d_ff=_get(hf, "n_inner", default=4 * d_model),  # GPT2Config: n_inner=None means 4*n_embd
        vocab_size=_get(hf, "vocab_size", required=True),
        max_seq_len=_get(hf, "n_positions", "n_ctx", default=1024),
        tied_embeddings=bool(_get(hf, "tie_word_embeddings", default=True)),
        mlp="gelu", norm="layernorm", position="learned",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True,
    )
