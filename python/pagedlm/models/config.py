"""ModelArgs: what the model needs from a Hugging Face config.json of the Llama family
(Llama 2/3 with llama3 rope scaling, Mistral with its sliding window, Qwen2 with q/k/v biases)."""
import functools
import math
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
        """From a config.json dict; errors name the source and the field. Every field is checked
        for its type and range here, so a malformed config fails with a ValueError naming it
        rather than deep inside the model's construction (a zero head count dividing, a string
        where a size belongs)."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        field = functools.partial(_field, config, source)
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED:
            raise ValueError(f"{source}: model_type {model_type!r} is not one of {SUPPORTED}")
        heads = field("num_attention_heads", int)
        hidden = field("hidden_size", int)
        kv_heads = field("num_key_value_heads", int, default=None) or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                             f"({kv_heads})")
        head_dim = field("head_dim", int, default=None)
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"{source}: hidden_size ({hidden}) must be a multiple of num_attention_heads "
                                 f"({heads}) when head_dim is not given")
            head_dim = hidden // heads
        if head_dim % 2:
            raise ValueError(f"{source}: head_dim {head_dim} must be even (rotary embeddings rotate pairs)")
        window = field("sliding_window", int, default=None, minimum=0)
        if model_type == "qwen2" and not field("use_sliding_window", bool, default=False):
            window = None  # Qwen2 configs carry a window that is off unless use_sliding_window
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older
        # checkpoints have rope_theta and rope_scaling at the top level.
        rope = field("rope_parameters", dict, default=None) or {}
        theta = _field(rope, source, "rope_theta", float, default=None, name="rope_parameters.rope_theta", above=0)
        if theta is None:
            theta = field("rope_theta", float, default=10000.0, above=0)
        scaling = field("rope_scaling", dict, default=None) or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if rope_type not in ("llama3", "default"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default or llama3)")
        if rope_type == "llama3":
            _check_llama3_scaling(scaling, source)
        return cls(
            vocab_size=field("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field("intermediate_size", int),
            num_layers=field("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=field("rms_norm_eps", float, default=1e-6, above=0),
            rope_theta=theta,
            rope_scaling=scaling if rope_type == "llama3" else None,
            tie_word_embeddings=field("tie_word_embeddings", bool, default=False),
            attention_bias=field("attention_bias", bool, default=model_type == "qwen2"),
            sliding_window=window or None,
            max_position_embeddings=field("max_position_embeddings", int, default=4096),
        )


_MISSING = object()


def _field(config, source, key, kind, default=_MISSING, *, name=None, minimum=1, above=None):
    """config[key] checked as kind (int: an integer >= minimum; float: a finite number > above;
    bool; dict), or default when absent or null. Errors name the source and the field."""
    name = name or key
    value = config.get(key)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"{source}: missing field {name!r}")
        return default
    if kind is int:
        # JSON has one number type: 64.0 is accepted as 64, 64.5 is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{source}: {name} must be an integer >= {minimum}, got {value!r}")
    elif kind is float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (above is not None and value <= above)):
            bound = f" > {above}" if above is not None else ""
            raise ValueError(f"{source}: {name} must be a finite number{bound}, got {value!r}")
        value = float(value)
    elif not isinstance(value, kind):
        raise ValueError(f"{source}: {name} must be a JSON {_JSON_NAMES[kind]}, got {value!r}")
    return value


_JSON_NAMES = {bool: "true or false", dict: "object"}


def _check_llama3_scaling(scaling, source):
    """The fields rope_frequencies reads from llama3 scaling: a factor > 0, and frequency
    factors with high > low (their difference divides)."""
    def number(key, default):
        return _field(scaling, source, key, float, default, name=f"rope_scaling.{key}", above=0)
    number("factor", _MISSING)
    low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
    number("original_max_position_embeddings", 8192)
    if high <= low:
        raise ValueError(f"{source}: rope_scaling.high_freq_factor ({high}) must exceed low_freq_factor ({low})")
