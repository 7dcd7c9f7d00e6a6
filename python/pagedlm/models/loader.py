"""Building a model from a Hugging Face folder (config.json + *.safetensors, sharded or not)
or from a config with seeded random weights. Nothing is fetched from a hub; a missing or
malformed file raises an error naming it."""
import json
from pathlib import Path

import torch
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
    args = ModelArgs.from_hf(read_config(folder), source=str(Path(folder) / "config.json"))
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    model = model.to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # to_empty made the two parameters separate again
        model.lm_head.weight = model.model.embed_tokens.weight
    _keep_rope_in_f32(model, device)
    expected = checkpoint_names(model)
    loaded = set()
    for f in _weight_files(folder):
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
