"""ModelArgs: what the model needs from a Hugging Face config.json of the Llama family
(Llama 2/3 with llama3 rope scaling, Mistral with its sliding window, Qwen2 with q/k/v biases)."""
from dataclasses import dataclass

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, config, source="config.json"):
        """From a config.json dict; errors name the source and the field."""
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise ValueError(f"{source}: model_type {model_type!r} is not one of {SUPPORTED}")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            window = config.get("sliding_window")
            if model_type == "qwen2" and not config.get("use_sliding_window", False):
                window = None  # Qwen2 configs carry a window that is off unless use_sliding_window
            # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older
            # checkpoints have rope_theta and rope_scaling at the top level.
            rope = config.get("rope_parameters") or {}
            theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
            scaling = config.get("rope_scaling") or rope
            rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
            if rope_type not in ("llama3", "default"):
                raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default or llama3)")
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling if rope_type == "llama3" else None,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
                sliding_window=int(window) if window else None,
                max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            )
        except KeyError as missing:
            raise ValueError(f"{source}: missing field {missing.args[0]!r}") from None
