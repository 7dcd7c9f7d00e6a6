"""A model's shard on one tensor-parallel rank (Megatron-style): each rank holds
num_attention_heads / N query heads and num_key_value_heads / N KV heads (its column blocks of
qkv_proj, its rows of o_proj), intermediate_size / N of the MLP (column blocks of gate_up_proj,
rows of down_proj), and a 1 / N slice of the vocabulary (embedding and LM head). o_proj and
down_proj end in one all-reduce each, the embedding in another; the LM head gathers the logits
rows the forward returns onto rank 0. Norms, rotary tables and the router stay whole.

The shard is a LlamaForCausalLM built from ModelArgs with the per-rank head counts and MLP
width, so attention, the KV cache ([blocks, block_size, kv_heads / N, head_dim]) and every
family's extras (q/k norms, soft caps, windows, sandwich norms) run unchanged; only the four
layers above are replaced. model.args keeps the full vocabulary; model.full_args is the whole
model's ModelArgs."""
import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from pagedlm.models.config import MOE
from pagedlm.models.llama import LlamaForCausalLM


def check_tensor_parallel(args, size, source="config.json"):
    """A ValueError naming tensor_parallel_size unless the model splits evenly over size ranks.
    The vocabulary need not divide: it is padded to a multiple of size (padded rows are zero
    and their logits are dropped before sampling)."""
    if args.model_type in MOE:
        raise ValueError(f"tensor_parallel_size: {size} ranks: mixture-of-experts models ({args.model_type}, "
                         f"{source}) are not supported with tensor parallelism; use tensor_parallel_size=1")
    for name, value in (("num_attention_heads", args.num_heads), ("num_key_value_heads", args.num_kv_heads),
                        ("intermediate_size", args.intermediate_size)):
        if value % size:
            raise ValueError(f"tensor_parallel_size: {size} ranks must divide the model's {name} ({value}, "
                             f"{source}); each rank holds 1/{size} of it")


def shard_args(args, size):
    """The per-rank ModelArgs: heads, KV heads and MLP width divided by size (vocabulary whole)."""
    return dataclasses.replace(args, num_heads=args.num_heads // size, num_kv_heads=args.num_kv_heads // size,
                               intermediate_size=args.intermediate_size // size)


def vocab_range(vocab_size, rank, size):
    """(start, end, rows): the vocabulary ids [start, end) rank holds, in a table of rows =
    ceil(vocab_size / size) rows (the last rank's may end in zero padding)."""
    rows = -(-vocab_size // size)
    start = min(rank * rows, vocab_size)
    return start, min(start + rows, vocab_size), rows


class RowParallelLinear(nn.Linear):
    """x [tokens, in / N] @ weight.T, summed over the ranks (one all-reduce), plus the bias
    (whole on every rank, added once after the sum)."""

    def forward(self, x):
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table: each rank looks up the ids it holds
    (zeros for the others), and one all-reduce assembles every token's row."""

    def __init__(self, vocab_size, hidden_size, rank, size):
        super().__init__()
        self.start, self.end, rows = vocab_range(vocab_size, rank, size)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, input_ids):
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out)
        return out


class ParallelLMHead(nn.Module):
    """The LM head's rows for this rank's vocabulary slice: each rank computes its logits
    columns, and rank 0 gathers them into [rows, vocab_size] (the padding dropped). Other ranks
    return their own columns, which nothing reads."""

    def __init__(self, vocab_size, hidden_size, rank, size):
        super().__init__()
        self.vocab_size, self.rank, self.size = vocab_size, rank, size
        self.weight = nn.Parameter(torch.empty(vocab_range(vocab_size, rank, size)[2], hidden_size))

    def forward(self, x):
        local = F.linear(x, self.weight).contiguous()
        if self.rank != 0:
            dist.gather(local, dst=0)
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.gather(local, parts, dst=0)
        widths = [vocab_range(self.vocab_size, r, self.size) for r in range(self.size)]
        return torch.cat([part[:, :end - start] for part, (start, end, _) in zip(parts, widths)], dim=-1)


class ShardedLlamaForCausalLM(LlamaForCausalLM):
    """One rank's shard. On rank 0, `driver` (a TensorParallelGroup) hands each forward's inputs
    to the other ranks before running it, so that every rank runs the same forward."""
    driver = None

    def forward(self, input_ids, positions, batch, kv_caches, logits_indices=None, logits_out=None):
        if self.driver is None:
            return super().forward(input_ids, positions, batch, kv_caches, logits_indices, logits_out)
        return self.driver.run_forward(super().forward, input_ids, positions, batch, kv_caches, logits_indices,
                                       logits_out)


def build_shard(args, rank, size):
    """The rank's shard of a model of args, on the meta device (to_empty it, then load)."""
    with torch.device("meta"):
        model = ShardedLlamaForCausalLM(shard_args(args, size))
        model.full_args = args
        model.tp_rank, model.tp_size = rank, size
        model.model.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, rank, size)
        model.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, rank, size)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj = RowParallelLinear(attn.o_proj.in_features, attn.o_proj.out_features,
                                            bias=attn.o_proj.bias is not None)
            mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    return model
