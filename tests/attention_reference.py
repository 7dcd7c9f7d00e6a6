"""Float64 reference attention over a paged KV cache, written for clarity, not speed: gather
each sequence's K/V through its block table, then softmax(q k^T * scale) v per head."""
import math

import torch


def gather(cache, block_table, length, block_size):
    """[length, num_kv_heads, head_dim] rows of one sequence, in token order, as float64."""
    positions = torch.arange(length)
    blocks = block_table[positions // block_size].long()
    return cache[blocks, positions % block_size].double()


def decode_reference(query, key_cache, value_cache, block_tables, seq_lens, *, scale=None, sliding_window=None,
                     soft_cap=None):
    """Returns (out float64 [B, H, D], lse float64 [B, H]); an empty row gives zeros and -inf."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, num_heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        start = max(0, length - sliding_window) if sliding_window else 0
        if length - start <= 0:
            continue
        k = gather(key_cache, block_tables[b].cpu(), length, block_size)[start:]
        v = gather(value_cache, block_tables[b].cpu(), length, block_size)[start:]
        q = query[b].double().view(num_kv_heads, group, head_dim)
        logits = torch.einsum("kgd,tkd->kgt", q, k) * scale
        if soft_cap:
            logits = soft_cap * torch.tanh(logits / soft_cap)
        out[b] = torch.einsum("kgt,tkd->kgd", logits.softmax(-1), v).reshape(num_heads, head_dim)
        lse[b] = logits.logsumexp(-1).reshape(num_heads)
    return out, lse


def paged_inputs(seq_lens, *, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cpu", spare_blocks=3,
                 generator=None):
    """Random query and caches, with each sequence's blocks scattered through the cache in a
    random order (scrambled block tables), and some blocks belonging to nobody."""
    blocks_per_seq = [max(1, -(-n // block_size)) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    width = max(blocks_per_seq)
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used:used + n].int()
        used += n
    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)
    query = rand(len(seq_lens), num_heads, head_dim)
    key_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    value_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    return (query, key_cache, value_cache, tables.to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device))


# Absolute tolerances on outputs of magnitude ~1: rounding of the output dominates.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
