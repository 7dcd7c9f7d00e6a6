"""Loading one tensor-parallel rank's shard straight from a Hugging Face folder: each
checkpoint tensor is read through safetensors' get_slice, only the rows or columns the rank
holds, so no process ever holds the whole model."""
from pathlib import Path

import torch
from safetensors import safe_open

from pagedlm.models.config import ModelArgs
from pagedlm.models.loader import (_check_shapes, _keep_rope_in_f32, _stored_shapes, _weight_files, check_complete,
                                   checkpoint_names, copy_weight, read_config)
from pagedlm.parallel.shard import build_shard, check_tensor_parallel, vocab_range

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def read_args(folder, size):
    """The folder's ModelArgs, after checking that the model splits over size ranks and that
    the checkpoint holds every tensor the config implies (headers only: nothing is loaded)."""
    source = Path(folder) / "config.json"
    args = ModelArgs.from_hf(read_config(folder), source=str(source))
    check_tensor_parallel(args, size, str(source))
    _check_shapes(args, folder, _stored_shapes(_weight_files(folder)))
    return args


def source_index(name, args, rank, size):
    """The parts of checkpoint tensor `name` that rank holds, in order, each an index into it
    (a tuple of slices; () for the whole tensor); several parts (a fused qkv_proj or
    gate_up_proj, Phi-3) are concatenated along the rows."""
    q, kv, inter = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.intermediate_size

    def block(total, offset=0):
        per = total // size
        return slice(offset + rank * per, offset + (rank + 1) * per)

    if name in VOCAB:
        start, end, _ = vocab_range(args.vocab_size, rank, size)
        return [(slice(start, end),)]
    module, _, kind = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if leaf in ("q_proj",):
        return [(block(q),)]
    if leaf in ("k_proj", "v_proj"):
        return [(block(kv),)]
    if leaf in ("gate_proj", "up_proj"):
        return [(block(inter),)]
    if leaf == "o_proj":
        return [(slice(None), block(q))] if kind == "weight" else [()]
    if leaf == "down_proj":
        return [(slice(None), block(inter))]
    if leaf == "qkv_proj":    # Phi-3's fused checkpoint tensor: q, k and v row blocks
        return [(block(q),), (block(kv, q),), (block(kv, q + kv),)]
    if leaf == "gate_up_proj":
        return [(block(inter),), (block(inter, inter),)]
    return [()]


def load_shard(folder, rank, size, *, dtype=torch.float32, device="cpu", args=None):
    """Rank's ShardedLlamaForCausalLM with its slices of the folder's weights, in dtype on
    device. args: the folder's ModelArgs if already read (read_args)."""
    args = args or read_args(folder, size)
    model = build_shard(args, rank, size).to_empty(device=device).to(dtype)
    if args.tie_word_embeddings:  # to_empty made the two parameters separate again
        model.lm_head.weight = model.model.embed_tokens.weight
    _keep_rope_in_f32(model, device)
    with torch.no_grad():  # padding rows of the last rank's vocabulary slice: zero, never looked up
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
    expected = checkpoint_names(model)
    loaded = set()
    for f in _weight_files(folder):
        try:
            weights = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
        with weights:
            for name in weights.keys():
                if name not in expected:
                    continue
                if name in loaded:
                    raise ValueError(f"{f}: {name} appears in more than one weight file")
                tensor = _read_part(weights, f, name, source_index(name, args, rank, size))
                param, rows = expected[name]
                target = param[:tensor.shape[0]] if name in VOCAB else param[rows]
                copy_weight(args, f, name, tensor, target, f"{name}: rank {rank}'s part has shape")
                loaded.add(name)
    check_complete(args, folder, expected, loaded)
    return model.eval()


def _read_part(weights, f, name, parts):
    try:
        tensor_slice = weights.get_slice(name)
        tensors = [tensor_slice[index] if index else tensor_slice[:] for index in parts]
    except Exception as e:
        raise ValueError(f"{f}: cannot read {name} ({e})") from None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
