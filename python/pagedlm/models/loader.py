"""Building a model from a Hugging Face folder (config.json + *.safetensors, sharded or not)
or from a config with seeded random weights. Nothing is fetched from a hub; a missing or
malformed file raises an error naming it."""
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pagedlm.models.config import ModelArgs
from pagedlm.models.layers import rope_frequencies
from pagedlm.models.llama import LlamaForCausalLM


def read_config(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a model folder (no such directory)")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_json(path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def eos_token_ids(folder):
    """The config's eos_token_id as a frozenset: an id, a list of ids (Llama 3) or absent."""
    path = Path(folder) / "config.json"
    eos = read_config(folder).get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return frozenset(ids)


def _weight_files(folder):
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        listing = _read_json(index)
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: not a safetensors index (expected an object whose weight_map maps tensor "
                             f"names to file names)")
        names = sorted(set(weight_map.values()))
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in the index but missing")
    return files


# Our fused parameters and the checkpoint parameters stacked in them, in row order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_names(model):
    """{Hugging Face parameter name: (our parameter, its rows that hold it)}: most names map to a
    whole parameter of ours; q/k/v and gate/up map to row blocks of qkv_proj and gate_up_proj."""
    args = model.args
    rows = {"qkv_proj": (args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim,
                         args.num_kv_heads * args.head_dim),
            "gate_up_proj": (args.intermediate_size, args.intermediate_size)}
    names = {}
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")        # ...self_attn.qkv_proj, weight
        parent, _, leaf = module.rpartition(".")
        if leaf not in FUSED:
            names[name] = (param, slice(None))
            continue
        start = 0
        for part, size in zip(FUSED[leaf], rows[leaf]):
            names[f"{parent}.{part}.{kind}"] = (param, slice(start, start + size))
            start += size
    return names


def load_model(folder, *, dtype=torch.float32, device="cpu"):
    """A LlamaForCausalLM with the folder's weights, in dtype on device."""
    source = Path(folder) / "config.json"
    args = ModelArgs.from_hf(read_config(folder), source=str(source))
    files = _weight_files(folder)
    # Before the model is built: a config whose sizes the checkpoint does not hold (a typo'd
    # layer count, a vocabulary of 10**12) would otherwise build, then allocate, all of them.
    _check_shapes(args, folder, _stored_shapes(files))
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # to_empty made the two parameters separate again
        model.lm_head.weight = model.model.embed_tokens.weight
    _keep_rope_in_f32(model, device)
    expected = checkpoint_names(model)
    loaded = set()
    for f in files:
        try:
            tensors = load_file(str(f), device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
        for name, tensor in tensors.items():
            if name not in expected:
                continue  # e.g. rotary buffers some exporters include
            param, rows = expected[name]
            if param[rows].shape != tensor.shape:
                raise ValueError(f"{f}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                 f"{tuple(param[rows].shape)}")
            # copy_ would cast integers or bools silently, and a non-finite weight turns every
            # logit it reaches into nan: answers that look like answers.
            if not tensor.is_floating_point():
                raise ValueError(f"{f}: {name} has dtype {tensor.dtype}, weights must be floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{f}: {name} holds non-finite values (inf or nan)")
            if name in loaded:
                raise ValueError(f"{f}: {name} appears in more than one weight file")
            with torch.no_grad():
                param[rows].copy_(tensor)
            loaded.add(name)
    if args.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    return model.eval()


def expected_shapes(args):
    """(Hugging Face name, shape) of each checkpoint tensor LlamaForCausalLM(args) loads, in
    order, computed without building the model (generated: a bad config may claim 10**9 layers)."""
    h, d, i = args.hidden_size, args.head_dim, args.intermediate_size
    q, kv = args.num_heads * d, args.num_kv_heads * d
    yield "model.embed_tokens.weight", (args.vocab_size, h)
    for layer in range(args.num_layers):
        prefix = f"model.layers.{layer}."
        for name, shape in [("self_attn.q_proj.weight", (q, h)), ("self_attn.k_proj.weight", (kv, h)),
                            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, q)),
                            ("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)),
                            ("mlp.down_proj.weight", (h, i)), ("input_layernorm.weight", (h,)),
                            ("post_attention_layernorm.weight", (h,))]:
            yield prefix + name, shape
        if args.attention_bias:
            yield from [(prefix + "self_attn.q_proj.bias", (q,)), (prefix + "self_attn.k_proj.bias", (kv,)),
                        (prefix + "self_attn.v_proj.bias", (kv,))]
    yield "model.norm.weight", (h,)
    if not args.tie_word_embeddings:
        yield "lm_head.weight", (args.vocab_size, h)


def _stored_shapes(files):
    """{tensor name: (its file, its shape)} from the weight files' headers (no tensor is read)."""
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as weights:
                for name in weights.keys():
                    shapes[name] = (f, tuple(weights.get_slice(name).get_shape()))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
    return shapes


def _check_shapes(args, folder, stored):
    """Every tensor the config implies is stored, in the shape it implies."""
    missing = []
    for name, shape in expected_shapes(args):
        if name not in stored:
            missing.append(name)
            if len(missing) > 5:
                break
        elif stored[name][1] != shape:
            raise ValueError(f"{stored[name][0]}: {name} has shape {stored[name][1]}, the config implies {shape}")
    if missing:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def random_model(config, *, seed=0, dtype=torch.float32, device="cpu", std=0.02):
    """A model with seeded random weights, from a config.json dict (or a transformers config)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    args = ModelArgs.from_hf(config, source="config")
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model = model.to(dtype=dtype, device=device)
    _keep_rope_in_f32(model, device)
    return model.eval()


def _keep_rope_in_f32(model, device):
    """.to(dtype) also casts the rotary frequencies; recompute them in float32."""
    args = model.args
    model.inv_freq = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
