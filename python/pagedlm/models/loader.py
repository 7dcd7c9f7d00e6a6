"""Building a model from a Hugging Face folder (config.json + *.safetensors, sharded or not)
or from a config with seeded random weights. Nothing is fetched from a hub; a missing or
malformed file raises an error naming it."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pagedlm.models.config import ModelArgs
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
# Each expert's (gate, up, down) projections as the checkpoint names them, and the name of the
# block holding the router ("gate") and the experts.
EXPERT_NAMES = {"mixtral": (("w1", "w3", "w2"), "block_sparse_moe"),
                "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), "mlp")}


def checkpoint_names(model):
    """{Hugging Face parameter name: (our parameter, the index of its part that holds it)}: most
    names map to a whole parameter of ours; q/k/v and gate/up map to row blocks of qkv_proj and
    gate_up_proj (unless the checkpoint stores them fused, as Phi-3's), and each expert's
    projections to its slices of the stacked w13 and w2."""
    args = model.args
    rows = {"qkv_proj": (args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim,
                         args.num_kv_heads * args.head_dim),
            "gate_up_proj": (args.intermediate_size, args.intermediate_size)}
    names = {}
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")        # ...self_attn.qkv_proj, weight
        parent, _, leaf = module.rpartition(".")
        if leaf == "experts":                         # ...mlp.experts, w13 or w2
            (gate, up, down), block = EXPERT_NAMES[args.model_type]
            layer = parent.rpartition(".")[0]         # ...layers.3
            inter = args.moe_intermediate_size
            for e in range(args.num_experts):
                prefix = f"{layer}.{block}.experts.{e}."
                if kind == "w13":
                    names[prefix + f"{gate}.weight"] = (param, (e, slice(0, inter)))
                    names[prefix + f"{up}.weight"] = (param, (e, slice(inter, 2 * inter)))
                else:
                    names[prefix + f"{down}.weight"] = (param, e)
        elif leaf == "gate" and args.model_type in EXPERT_NAMES:  # the router
            names[f"{parent.rpartition('.')[0]}.{EXPERT_NAMES[args.model_type][1]}.gate.{kind}"] = (param, slice(None))
        elif leaf not in FUSED or args.fused_checkpoint:
            names[name] = (param, slice(None))
        else:
            start = 0
            for part, size in zip(FUSED[leaf], rows[leaf]):
                names[f"{parent}.{part}.{kind}"] = (param, slice(start, start + size))
                start += size
    return names


def _stored_value(args, name, tensor):
    """The value our parameter holds for the checkpoint's tensor: Gemma's norm weights w scale
    by (1 + w), stored as such (in float32, then rounded once) so one RMSNorm kernel serves."""
    if args.norm_offset and name.endswith("norm.weight"):
        return tensor.float() + args.norm_offset
    return tensor


def load_model(folder, *, dtype=torch.float32, device="cpu", rope_factors="auto"):
    """A LlamaForCausalLM with the folder's weights, in dtype on device. rope_factors: which of
    a LongRoPE (Phi-3) checkpoint's factor sets every sequence uses (ModelArgs.from_hf)."""
    source = Path(folder) / "config.json"
    args = ModelArgs.from_hf(read_config(folder), source=str(source), rope_factors=rope_factors)
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
            if name in loaded:
                raise ValueError(f"{f}: {name} appears in more than one weight file")
            param, rows = expected[name]
            copy_weight(args, f, name, tensor, param[rows], f"{name} has shape")
            loaded.add(name)
    check_complete(args, folder, expected, loaded)
    return model.eval()


def copy_weight(args, f, name, tensor, target, what):
    """Checks a checkpoint tensor against the parameter (slice) it fills, then copies it in.
    copy_ would cast integers or bools silently, and a non-finite weight turns every logit it
    reaches into nan: answers that look like answers. what: how an error names the tensor."""
    if target.shape != tensor.shape:
        raise ValueError(f"{f}: {what} {tuple(tensor.shape)}, the config implies {tuple(target.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{f}: {name} has dtype {tensor.dtype}, weights must be floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{f}: {name} holds non-finite values (inf or nan)")
    with torch.no_grad():
        target.copy_(_stored_value(args, name, tensor))


def check_complete(args, folder, expected, loaded):
    """Every parameter the model expects came from the checkpoint (a tied LM head from the embedding)."""
    missing = sorted(set(expected) - loaded - ({"lm_head.weight"} if args.tie_word_embeddings else set()))
    if missing:
        raise ValueError(f"{folder}: weights missing from the checkpoint: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))


def expected_shapes(args):
    """(Hugging Face name, shape) of each checkpoint tensor LlamaForCausalLM(args) loads, in
    order, computed without building the model (generated: a bad config may claim 10**9 layers)."""
    h, d, i = args.hidden_size, args.head_dim, args.intermediate_size
    q, kv = args.num_heads * d, args.num_kv_heads * d
    yield "model.embed_tokens.weight", (args.vocab_size, h)
    for layer in range(args.num_layers):
        prefix = f"model.layers.{layer}."
        if args.fused_checkpoint:
            yield prefix + "self_attn.qkv_proj.weight", (q + 2 * kv, h)
        else:
            yield from [(prefix + "self_attn.q_proj.weight", (q, h)), (prefix + "self_attn.k_proj.weight", (kv, h)),
                        (prefix + "self_attn.v_proj.weight", (kv, h))]
        yield prefix + "self_attn.o_proj.weight", (h, q)
        if args.attention_bias:
            yield from [(prefix + "self_attn.q_proj.bias", (q,)), (prefix + "self_attn.k_proj.bias", (kv,)),
                        (prefix + "self_attn.v_proj.bias", (kv,))]
        if args.o_proj_bias:
            yield prefix + "self_attn.o_proj.bias", (h,)
        if args.qk_norm:
            yield from [(prefix + "self_attn.q_norm.weight", (d,)), (prefix + "self_attn.k_norm.weight", (d,))]
        if args.is_moe_layer(layer):
            (gate, up, down), block = EXPERT_NAMES[args.model_type]
            m = args.moe_intermediate_size
            yield prefix + f"{block}.gate.weight", (args.num_experts, h)
            for e in range(args.num_experts):
                expert = prefix + f"{block}.experts.{e}."
                yield from [(expert + f"{gate}.weight", (m, h)), (expert + f"{up}.weight", (m, h)),
                            (expert + f"{down}.weight", (h, m))]
        elif args.fused_checkpoint:
            yield from [(prefix + "mlp.gate_up_proj.weight", (2 * i, h)), (prefix + "mlp.down_proj.weight", (h, i))]
        else:
            yield from [(prefix + "mlp.gate_proj.weight", (i, h)), (prefix + "mlp.up_proj.weight", (i, h)),
                        (prefix + "mlp.down_proj.weight", (h, i))]
        norms = ["input_layernorm", "post_attention_layernorm"]
        if args.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            yield prefix + f"{norm}.weight", (h,)
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


def random_model(config, *, seed=0, dtype=torch.float32, device="cpu", std=0.02, rope_factors="auto"):
    """A model with seeded random weights, from a config.json dict (or a transformers config).
    Norm weights are ones (for Gemma, whose checkpoints store w for a scale of 1 + w: w = 0)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    args = ModelArgs.from_hf(config, source="config", rope_factors=rope_factors)
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
    for name, table in model.rope_tables().items():
        setattr(model, name, table.to(device))
