"""ModelArgs: what the model needs from a Hugging Face config.json. Families: Llama 2/3 (llama3
rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm per head),
Gemma 2 and Gemma 3 text (soft caps, alternating sliding-window and global layers, GeGLU,
sandwich norms, (1 + weight) norms, scaled embeddings), Phi-3 (fused checkpoint projections,
LongRoPE), Mixtral and Qwen3-MoE (top-k routed experts). docs/models.md lists what each field
does. Everything per layer (window, rotary table, expert or dense MLP) is resolved here into
plain Python values, so the forward holds no data-dependent branch (CUDA graphs replay it)."""
import functools
import math
from dataclasses import dataclass

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
MOE = ("mixtral", "qwen3_moe")
ROPE_TYPES = ("default", "llama3", "linear", "longrope")


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
    model_type: str = "llama"
    # Per layer (empty: every layer alike): the attention window (None: global) and the rotary
    # table ("global" or "local": Gemma 3 rotates its sliding-window layers by another base).
    layer_windows: tuple = ()
    layer_rope: tuple = ()
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    rotary_dim: int | None = None          # rotated leading dims of each head (None: all of head_dim)
    rope_attention_factor: float = 1.0     # LongRoPE: cos and sin scaled by it
    attn_scale: float | None = None        # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_soft_cap: float | None = None     # Gemma 2: cap * tanh(score / cap) on attention scores
    final_soft_cap: float | None = None    # Gemma 2/3: the same on the output logits
    qk_norm: bool = False                  # Qwen3, Gemma 3: RMSNorm of each query and key head
    norm_offset: float = 0.0               # Gemma: a checkpoint norm weight w scales by (1 + w)
    sandwich_norms: bool = False           # Gemma: norms after attention and around the MLP
    embed_scale: float | None = None       # Gemma: embeddings times sqrt(hidden_size)
    hidden_act: str = "silu"
    o_proj_bias: bool = False
    fused_checkpoint: bool = False         # Phi-3: the checkpoint stores qkv_proj and gate_up_proj
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True            # renormalise the top-k routing weights to sum to 1
    moe_layers: tuple = ()                 # per layer: True where the MLP is the mixture of experts

    def window(self, layer):
        """Layer's attention window, or None for global attention."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def rope_table(self, layer):
        return self.layer_rope[layer] if self.layer_rope else "global"

    def is_moe_layer(self, layer):
        return bool(self.moe_layers) and self.moe_layers[layer]

    @classmethod
    def from_hf(cls, config, source="config.json", *, rope_factors="auto"):
        """From a config.json dict; errors name the source and the field. Every field is checked
        for its type and range here, so a malformed config fails with a ValueError naming it
        rather than deep inside the model's construction (a zero head count dividing, a string
        where a size belongs). rope_factors: LongRoPE's "short" or "long" factors, or "auto"
        (long when max_position_embeddings exceeds original_max_position_embeddings)."""
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
        # Per-layer settings are built from the count before the checkpoint can contradict it.
        num_layers = field("num_hidden_layers", int, maximum=MAX_LAYERS)
        gemma = model_type in GEMMA
        window = field("sliding_window", int, default=4096 if gemma else None, minimum=0) or None
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not field("use_sliding_window", bool, default=False):
            window = None  # Qwen configs carry a window that is off unless use_sliding_window
        extra = dict(model_type=model_type)
        extra["layer_windows"] = _layer_windows(config, source, model_type, num_layers, window)
        if model_type == "gemma3_text" and field("use_bidirectional_attention", bool, default=False):
            raise ValueError(f"{source}: use_bidirectional_attention is not supported (pagedlm's attention is causal)")

        # Rotary embeddings. transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}
        # (Gemma 3: one such object per layer type); older checkpoints have rope_theta and
        # rope_scaling at the top level (Gemma 3: rope_local_base_freq for the local layers).
        rope = field("rope_parameters", dict, default=None) or {}
        nested = model_type == "gemma3_text" and any(k in rope for k in ("full_attention", "sliding_attention"))
        global_rope = _field(rope, source, "full_attention", dict, default={}, name="rope_parameters.full_attention") \
            if nested else rope
        prefix = "rope_parameters.full_attention" if nested else "rope_parameters"
        theta = _field(global_rope, source, "rope_theta", float, default=None, name=f"{prefix}.rope_theta", above=0)
        if theta is None:
            theta = field("rope_theta", float, default=1e6 if model_type == "gemma3_text" else 10000.0, above=0)
        scaling = field("rope_scaling", dict, default=None) or global_rope
        max_positions = field("max_position_embeddings", int, default=4096)
        scaling, rotary_dim, attention_factor = _rope_scaling(
            config, source, model_type, scaling, head_dim, max_positions, rope_factors)
        if model_type == "gemma3_text":
            local = (_field(rope, source, "sliding_attention", dict, default={}, name="rope_parameters.sliding_attention")
                     if nested else {})
            local_theta = _field(local, source, "rope_theta", float, default=None,
                                 name="rope_parameters.sliding_attention.rope_theta", above=0)
            if local_theta is None:
                local_theta = field("rope_local_base_freq", float, default=10000.0, above=0)
            local_scaling, _, _ = _rope_scaling(config, source, model_type, local, head_dim, max_positions, rope_factors)
            extra.update(local_rope_theta=local_theta, local_rope_scaling=local_scaling,
                         layer_rope=tuple("local" if w else "global" for w in extra["layer_windows"]))
        extra.update(rotary_dim=rotary_dim, rope_attention_factor=attention_factor)

        act_key = "hidden_activation" if gemma and config.get("hidden_activation") is not None else "hidden_act"
        act = config.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
        if act not in (("gelu_pytorch_tanh", "gelu") if gemma else ("silu",)):
            raise ValueError(f"{source}: {act_key} {act!r} is not supported for {model_type} "
                             f"({'gelu_pytorch_tanh or gelu' if gemma else 'silu'})")
        extra["hidden_act"] = act
        bias = field("attention_bias", bool, default=model_type == "qwen2")
        # Llama, Qwen3 and Gemma put the bias on o_proj too; Qwen2 (q/k/v only) and Phi-3 (none) do not.
        extra["o_proj_bias"] = bias and model_type not in ("qwen2", "mistral", "mixtral", "phi3")
        if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
            extra["qk_norm"] = True
        if gemma:
            extra.update(norm_offset=1.0, sandwich_norms=True, embed_scale=hidden ** 0.5,
                         attn_scale=field("query_pre_attn_scalar", float, default=256, above=0) ** -0.5,
                         final_soft_cap=field("final_logit_softcapping", float, default=None, above=0))
            if model_type == "gemma2":  # transformers' Gemma 3 reads attn_logit_softcapping but never applies it
                extra["attn_soft_cap"] = field("attn_logit_softcapping", float, default=None, above=0)
        if model_type == "phi3":
            extra["fused_checkpoint"] = True
        if model_type in MOE:
            extra.update(_moe_fields(field, source, model_type, num_layers))
        return cls(
            vocab_size=field("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field("intermediate_size", int),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=field("rms_norm_eps", float, default=1e-6, above=0),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=field("tie_word_embeddings", bool, default=gemma),
            attention_bias=bias,
            sliding_window=window,
            max_position_embeddings=max_positions,
            **extra,
        )


def _layer_windows(config, source, model_type, num_layers, window):
    """Each layer's window (None: global), from layer_types when the config lists them, else by
    the family's rule: Gemma 2 alternates sliding and global layers (sliding first), Gemma 3 has
    one global layer in each sliding_window_pattern (6), Qwen2/Qwen3 slide from layer
    max_window_layers on; the other families use the window (if any) in every layer."""
    types = config.get("layer_types")
    if types is not None:
        if (not isinstance(types, list) or len(types) != num_layers
                or any(t not in ("sliding_attention", "full_attention") for t in types)):
            raise ValueError(f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each of "
                             f"the {num_layers} layers, got {types!r}")
        sliding = [t == "sliding_attention" for t in types]
    elif model_type == "gemma2":
        sliding = [i % 2 == 0 for i in range(num_layers)]
    elif model_type == "gemma3_text":
        pattern = _field(config, source, "sliding_window_pattern", int, default=6)
        sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
    elif model_type in ("qwen2", "qwen3"):
        first = _field(config, source, "max_window_layers", int, default=28, minimum=0)
        sliding = [i >= first for i in range(num_layers)]
    else:
        sliding = [True] * num_layers
    return tuple(window if s and window else None for s in sliding)


def _rope_scaling(config, source, model_type, scaling, head_dim, max_positions, rope_factors):
    """(scaling as rope_frequencies takes it or None, rotary_dim or None, attention factor)."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "su":  # Phi-3's first name for LongRoPE
        rope_type = "longrope"
    partial = _field(scaling or {}, source, "partial_rotary_factor", float, default=None,
                     name="rope_parameters.partial_rotary_factor", above=0)
    if partial is None:
        partial = _field(config, source, "partial_rotary_factor", float, default=1.0, above=0)
    if partial > 1:
        raise ValueError(f"{source}: partial_rotary_factor must be at most 1, got {partial}")
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim == 0:
        raise ValueError(f"{source}: partial_rotary_factor {partial} rotates {rotary_dim} of head_dim {head_dim}, "
                         f"which must be even and positive")
    rotary_dim = None if rotary_dim == head_dim else rotary_dim
    if rope_type not in ROPE_TYPES or (rope_type == "longrope" and model_type != "phi3"):
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported "
                         f"({', '.join(t for t in ROPE_TYPES if t != 'longrope')}; longrope for phi3)")
    if rope_type == "llama3":
        return _llama3_scaling(scaling, source), rotary_dim, 1.0
    if rope_type == "linear":
        factor = _field(scaling, source, "factor", float, name="rope_scaling.factor", above=0)
        return {"rope_type": "linear", "factor": factor}, rotary_dim, 1.0
    if rope_type == "longrope":
        scaling, attention_factor = _longrope(config, source, scaling, rotary_dim or head_dim, max_positions,
                                              rope_factors)
        return scaling, rotary_dim, attention_factor
    return None, rotary_dim, 1.0


def _longrope(config, source, scaling, rotary_dim, max_positions, rope_factors):
    """Phi-3's LongRoPE: the base frequencies divided by per-frequency factors, short ones for
    contexts up to original_max_position_embeddings, long ones beyond; cos and sin times an
    attention factor. transformers switches a sequence to the long factors once it grows past
    the original context, recomputing its cache; a paged cache cannot, so one set is used for
    every sequence (rope_factors). Returns (scaling, attention factor)."""
    original = _field(config, source, "original_max_position_embeddings", int, default=None)
    if original is None:
        original = _field(scaling, source, "original_max_position_embeddings", int, default=max_positions,
                          name="rope_scaling.original_max_position_embeddings")
    if rope_factors not in ("auto", "short", "long"):
        raise ValueError(f"rope_factors: expected 'auto', 'short' or 'long', got {rope_factors!r}")
    use_long = rope_factors == "long" or (rope_factors == "auto" and max_positions > original)
    key = "long_factor" if use_long else "short_factor"
    factors = scaling.get(key)
    if (not isinstance(factors, list) or len(factors) != rotary_dim // 2
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in factors)):
        raise ValueError(f"{source}: rope_scaling.{key} must be a list of {rotary_dim // 2} positive numbers, "
                         f"got {factors!r}")
    factor = _field(scaling, source, "factor", float, default=max_positions / original, name="rope_scaling.factor",
                    above=0)
    attention = _field(scaling, source, "attention_factor", float, default=None, name="rope_scaling.attention_factor",
                       above=0)
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "ext_factors": [float(f) for f in factors], "uses": key}, attention


def _moe_fields(field, source, model_type, num_layers):
    if model_type == "mixtral":
        experts, top_k = field("num_local_experts", int), field("num_experts_per_tok", int)
        size, renormalize, moe_layers = field("intermediate_size", int), True, (True,) * num_layers
    else:
        # The hub's Qwen3-MoE configs say num_experts; transformers >= 5 writes num_local_experts.
        experts = field("num_experts", int, default=None) or field("num_local_experts", int)
        top_k = field("num_experts_per_tok", int)
        size, renormalize = field("moe_intermediate_size", int), field("norm_topk_prob", bool, default=False)
        step = field("decoder_sparse_step", int, default=1)
        dense = _index_list(field, source, "mlp_only_layers")
        moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    if top_k > experts:
        raise ValueError(f"{source}: num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=size,
                norm_topk_prob=renormalize, moe_layers=moe_layers)


def _index_list(field, source, key):
    value = field(key, list, default=[])
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ValueError(f"{source}: {key} must be a list of layer indices, got {value!r}")
    return set(value)


_MISSING = object()


def _field(config, source, key, kind, default=_MISSING, *, name=None, minimum=1, maximum=None, above=None):
    """config[key] checked as kind (int: an integer >= minimum; float: a number > above that is
    finite in float32, the precision the kernels compute in; bool; dict), or default when
    absent or null. Errors name the source and the field."""
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
        if maximum is not None and value > maximum:
            raise ValueError(f"{source}: {name} must be at most {maximum}, got {value!r}")
    elif kind is float:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or abs(value) > FLOAT32_MAX or (above is not None and value <= above)):
            bound = f" > {above}" if above is not None else ""
            raise ValueError(f"{source}: {name} must be a finite number{bound} (in float32), got {value!r}")
        value = float(value)
    elif not isinstance(value, kind):
        raise ValueError(f"{source}: {name} must be a JSON {_JSON_NAMES[kind]}, got {value!r}")
    return value


MAX_LAYERS = 4096  # far beyond any released model
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32; a larger float rounds to inf

_JSON_NAMES = {bool: "true or false", dict: "object", list: "array"}


def _llama3_scaling(scaling, source):
    """llama3 scaling as rope_frequencies reads it, every field a number: a factor > 0, and
    frequency factors with high > low (their difference divides); a field that is absent or
    null takes its default, as in the check of every other field."""
    def number(key, default):
        return _field(scaling, source, key, float, default, name=f"rope_scaling.{key}", above=0)
    factor = number("factor", _MISSING)
    low, high = number("low_freq_factor", 1.0), number("high_freq_factor", 4.0)
    context = number("original_max_position_embeddings", 8192)
    if high <= low:
        raise ValueError(f"{source}: rope_scaling.high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": context}
