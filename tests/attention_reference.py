"""Float64 reference attention over a paged KV cache, written for clarity, not speed: gather
each sequence's K/V through its block table, then softmax(q k^T * scale) v per head. Also the
attention tests' shared inputs and the question of which prefill kernels the device runs."""
import math

import torch

import pagedlm._C


def has_wgmma_prefill():
    """Whether this device and build run the Hopper wgmma prefill kernel (backend "sm90")."""
    return torch.cuda.get_device_capability() == (9, 0) and "90a" in pagedlm._C.cuda_architectures


def gather(cache, block_table, length, block_size):
    """[length, num_kv_heads, head_dim] rows of one sequence, in token order, as float64."""
    positions = torch.arange(length)
    blocks = block_table[positions // block_size].long()
    return cache[blocks, positions % block_size].double()


def attend_one(q, k, v, scale, soft_cap):
    """One query token's attention: q [H, D], k and v float64 [T > 0, KV, D] -> (out [H, D], lse [H])."""
    num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q.double().view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = torch.einsum("kgd,tkd->kgt", q, k) * scale
    if soft_cap:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    out = torch.einsum("kgt,tkd->kgd", logits.softmax(-1), v).reshape(num_heads, head_dim)
    return out, logits.logsumexp(-1).reshape(num_heads)


def decode_reference(query, key_cache, value_cache, block_tables, seq_lens, *, scale=None, sliding_window=None,
                     soft_cap=None):
    """Returns (out float64 [B, H, D], lse float64 [B, H]); an empty row gives zeros and -inf."""
    batch, num_heads, head_dim = query.shape
    block_size = key_cache.shape[1]
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
        out[b], lse[b] = attend_one(query[b], k, v, scale, soft_cap)
    return out, lse


def cascade_reference(query, key_cache, value_cache, prefix_block_tables, prefix_lens, group_indptr,
                      suffix_block_tables, suffix_lens, *, scale=None, soft_cap=None):
    """Returns (out float64 [B, H, D], lse float64 [B, H]): row b of group g attends over the first
    prefix_lens[g] tokens of prefix_block_tables[g] followed by the first suffix_lens[b] tokens of
    suffix_block_tables[b]; a row that sees nothing gives zeros and -inf."""
    batch, num_heads, head_dim = query.shape
    block_size = key_cache.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, num_heads), -math.inf, dtype=torch.float64)
    for g in range(len(prefix_lens)):
        prefix = [gather(cache, prefix_block_tables[g].cpu(), int(prefix_lens[g]), block_size)
                  for cache in (key_cache, value_cache)]
        for b in range(int(group_indptr[g]), int(group_indptr[g + 1])):
            suffix = [gather(cache, suffix_block_tables[b].cpu(), int(suffix_lens[b]), block_size)
                      for cache in (key_cache, value_cache)]
            k, v = torch.cat([prefix[0], suffix[0]]), torch.cat([prefix[1], suffix[1]])
            if len(k) > 0:
                out[b], lse[b] = attend_one(query[b], k, v, scale, soft_cap)
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


def prefill_reference(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, *, causal=True,
                      masks=None, scale=None, sliding_window=None, soft_cap=None):
    """Returns (out float64 [total_q, H, D], lse float64 [total_q, H]). masks: None or, per
    sequence, a bool [q_len, seq_len] matrix replacing the causal mask. Sequence i's queries
    are its last q_len positions; a row that sees nothing gives zeros and -inf."""
    total_q, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(total_q, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((total_q, num_heads), -math.inf, dtype=torch.float64)
    for b in range(len(seq_lens)):
        start, stop, length = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seq_lens[b])
        q_len = stop - start
        if q_len == 0:
            continue
        k = gather(key_cache, block_tables[b].cpu(), length, block_size).repeat_interleave(group, dim=1)
        v = gather(value_cache, block_tables[b].cpu(), length, block_size).repeat_interleave(group, dim=1)
        q = query[start:stop].double()
        logits = torch.einsum("qhd,thd->hqt", q, k) * scale
        if soft_cap:
            logits = soft_cap * torch.tanh(logits / soft_cap)
        positions = torch.arange(length - q_len, length).unsqueeze(1)  # [q_len, 1]
        keys = torch.arange(length).unsqueeze(0)                       # [1, length]
        if masks is not None:
            visible = masks[b].clone()
        elif causal:
            visible = keys <= positions
        else:
            visible = torch.ones(q_len, length, dtype=torch.bool)
        if sliding_window:
            visible &= keys > positions - sliding_window
        logits = logits.masked_fill(~visible, -math.inf)
        row_lse = logits.logsumexp(-1)                                 # [h, q]
        probs = torch.where(visible, (logits - row_lse.unsqueeze(-1)).exp(), torch.zeros((), dtype=torch.float64))
        out[start:stop] = torch.einsum("hqt,thd->qhd", probs.nan_to_num(0.0), v)
        lse[start:stop] = row_lse.transpose(0, 1)
    return out, lse


def pack_masks(masks):
    """FlashInfer's packing: each sequence's row-major bits, little-endian within a byte,
    starting on a byte boundary. Returns (uint8 tensor, int32 byte indptr)."""
    chunks, indptr = [], [0]
    for m in masks:
        bits = m.flatten().to(torch.uint8)
        pad = (-bits.numel()) % 8
        bits = torch.cat([bits, torch.zeros(pad, dtype=torch.uint8)]).view(-1, 8)
        packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
        chunks.append(packed)
        indptr.append(indptr[-1] + packed.numel())
    return torch.cat(chunks), torch.tensor(indptr, dtype=torch.int32)


def flat_masks(masks):
    """The unpacked format: all masks flattened and concatenated, indptr counting elements."""
    indptr = [0]
    for m in masks:
        indptr.append(indptr[-1] + m.numel())
    return torch.cat([m.flatten() for m in masks]), torch.tensor(indptr, dtype=torch.int32)
