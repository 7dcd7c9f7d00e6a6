"""pagedlm.ops: the kernels, callable on CPU and CUDA tensors, also registered as
torch.ops.pagedlm.* (with fake implementations, so they trace under torch.compile).

Each op launches on the caller's current CUDA stream, never synchronizes and never
allocates device memory inside the kernel call: the split-K workspace of paged decode is
one buffer per device, allocated on first use, and a large prefill's work counter is a
4-byte tensor from torch's caching allocator, zeroed on the stream (graph-capturable).
cascade_decode_attention and merge_attention_states are compositions of these kernels and
torch arithmetic; their intermediates come from torch's caching allocator too.
Shapes, dtypes, devices and contiguity are always checked; values inside CUDA tensors (block
ids, lengths) only when PAGEDLM_DEBUG=1, since reading them costs a synchronization. What each
op checks, and what becomes of a bad value without the check, is in docs/errors.md.
"""
import math

import torch

from pagedlm import _C
from pagedlm._torch_glue import bool_arg, debug_checks, expect_tensors, float_arg, int_arg, stream_of
from pagedlm.verify import verify_greedy, verify_speculative, verify_tree_greedy, verify_tree_speculative  # noqa: F401

__all__ = ["write_kv_cache", "copy_blocks", "paged_decode_attention", "paged_prefill_attention",
           "cascade_decode_attention", "merge_attention_states", "rms_norm", "silu_and_mul", "apply_rope",
           "argmax_logprob", "verify_greedy", "verify_speculative", "verify_tree_greedy", "verify_tree_speculative"]

DECODE_WORKSPACE_BYTES = 32 << 20
_workspaces = {}
# CUDA prefill calls whose one-block-per-tile grid would cover at least this many (query row, head)
# pairs get a zeroed work counter, with which the Hopper kernel runs a persistent grid; below it the
# counter's memset would cost more than the blocks' start-up it saves. See persistent_prefill.
PERSISTENT_PREFILL_MIN_WORK = 1 << 16
PREFILL_QUERY_TILE = 128  # query rows per block of the CUDA prefill kernels


def persistent_prefill(total_q, num_seqs, num_heads):
    """Whether a CUDA prefill of total_q query rows over num_seqs sequences runs the persistent grid.
    The other grid has a block per query tile and head, bounded on the host by total_q / 128 + one
    per sequence: a step of many short sequences (decodes mixed with prompt chunks) makes most of
    those blocks spares. The Hopper kernel fits one block per SM, so spares run in waves, each
    walking cu_seqlens_q to find it has no tile; the persistent grid's blocks stop at their first."""
    grid_rows = (total_q // PREFILL_QUERY_TILE + num_seqs) * PREFILL_QUERY_TILE
    return grid_rows * num_heads >= PERSISTENT_PREFILL_MIN_WORK


_INT64_MAX = (1 << 63) - 1


def _attention_options(query, scale, sliding_window, soft_cap):
    """(scale, window, cap) as the kernels take them: head_dim**-0.5 by default, 0 for off.
    scale must be finite and >= 0, soft_cap finite and > 0 (in float32), sliding_window a
    positive int; a window past int64 hides nothing, as any window longer than the table."""
    if scale is None:
        scale = query.shape[-1] ** -0.5 if query.dim() == 3 and query.shape[-1] > 0 else 1.0
    scale = float_arg("scale", scale)
    window = 0
    if sliding_window is not None:
        window = int_arg("sliding_window", sliding_window)
        if window <= 0:
            raise ValueError(f"sliding_window: must be positive or None, got {window}")
    cap = 0.0 if soft_cap is None else float_arg("soft_cap", soft_cap, positive=True)
    return scale, min(window, _INT64_MAX), cap


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _scale_args(name, scale, cache):
    """A KV-cache scale as the bindings take it: (float, None) for a Python number (finite and > 0
    in float32), or (1.0, tensor) for a float32 tensor (0-d or one value per kv head). The values
    of a CUDA tensor are checked only with PAGEDLM_DEBUG=1 (a synchronization); those of a CPU
    tensor always, by the bindings."""
    if isinstance(scale, torch.Tensor):
        if debug_checks() and scale.is_cuda:
            _C.check_kv_scale(scale.detach().reshape(-1).cpu(), name)
        return 1.0, scale
    return float_arg(name, scale, positive=True), None


def _decode_workspace(device):
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    ws = _workspaces.get(index)
    if ws is None:
        ws = _workspaces[index] = torch.empty(DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def write_kv_cache(key, value, key_cache, value_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
    """Writes key/value [num_tokens, num_kv_heads, head_dim] into the paged caches at
    slot_mapping[t] = block * block_size + offset (int64; -1 skips the token).

    FP8 caches (torch.float8_e4m3fn, torch.float8_e5m2) store saturate(x / scale) rounded to
    nearest even (x / scale in float32; saturated to the format's largest finite value, infinities
    included; NaN stays NaN), and key/value may then be float32, float16 or bfloat16. k_scale and
    v_scale are Python numbers or float32 tensors (0-d, or [num_kv_heads]), finite and > 0; a
    tensor lets a CUDA graph replay with new scales. Other caches take only scale 1.0."""
    expect_tensors(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    k_value, k_tensor = _scale_args("k_scale", k_scale, key_cache)
    v_value, v_tensor = _scale_args("v_scale", v_scale, key_cache)
    if debug_checks() and slot_mapping.is_cuda and key_cache.dim() == 4:
        _C.check_slot_mapping(slot_mapping.cpu(), key_cache.shape[0] * key_cache.shape[1])
    _C.write_kv_cache(key, value, key_cache, value_cache, slot_mapping, k_value, v_value, k_tensor, v_tensor,
                      stream_of(key_cache))


def copy_blocks(key_caches, value_caches, block_mapping):
    """Copies whole blocks within each layer's caches: one (src, dst) pair per row of the
    int64 [n, 2] block_mapping (the copy-on-write pairs of BlockManager.append). Every layer's
    caches have one shape. All layers and block ids are checked before any block is copied; a
    destination may be neither written twice nor another pair's source (copies run in parallel).
    FP8 caches are copied as bytes: a block keeps its values and the layer's scales."""
    for name, caches in (("key_caches", key_caches), ("value_caches", value_caches)):
        if not isinstance(caches, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors, got {type(caches).__name__}")
        for i, t in enumerate(caches):
            expect_tensors(**{f"{name}[{i}]": t})
    expect_tensors(block_mapping=block_mapping)
    if len(key_caches) != len(value_caches):
        raise ValueError(f"value_caches: {len(value_caches)} layers, key_caches has {len(key_caches)}")
    if debug_checks() and block_mapping.is_cuda and len(key_caches) and key_caches[0].dim() == 4:
        _C.check_block_mapping(block_mapping.cpu(), key_caches[0].shape[0])
    stream = stream_of(key_caches[0]) if len(key_caches) else 0
    _C.copy_blocks(list(key_caches), list(value_caches), block_mapping, stream)


def paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, *, scale=None,
                           sliding_window=None, soft_cap=None, return_lse=False, out=None, custom_mask=None,
                           mask_offsets=None, k_scale=1.0, v_scale=1.0):
    """One new token per sequence attends to its cached tokens.

    query [batch, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables int32 [batch, max_blocks]; seq_lens int32 [batch] (the current token
    included). Returns out [batch, num_heads, head_dim], or (out, lse) with return_lse,
    lse being the natural-log sum of exp(logits), float32 [batch, num_heads].

    custom_mask (flat torch.bool) with mask_offsets (int64 [batch]): row b sees key t only where
    custom_mask[mask_offsets[b] + t] is true, so that the query rows of a masked prefill (tree or
    lookahead verification) can be computed one row each, by the split-K kernel; a row that sees
    nothing returns zeros (lse -inf).

    FP8 caches (torch.float8_e4m3fn, torch.float8_e5m2): keys and values are the stored values
    times k_scale / v_scale (numbers, or float32 tensors 0-d or [num_kv_heads]); the query is then
    float32, float16 or bfloat16, and its dtype is the output's.
    """
    expect_tensors(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                    seq_lens=seq_lens)
    expect_tensors(custom_mask=custom_mask, mask_offsets=mask_offsets)
    if (custom_mask is None) != (mask_offsets is None):
        raise ValueError("mask_offsets: custom_mask and mask_offsets go together")
    if out is None:
        out = torch.empty_like(query)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device) if return_lse else None
    _decode_into(query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window, soft_cap,
                 custom_mask, mask_offsets, k_scale, v_scale)
    return (out, lse) if return_lse else out


def _decode_into(query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window, soft_cap,
                 custom_mask=None, mask_offsets=None, k_scale=1.0, v_scale=1.0):
    scale, sliding_window, soft_cap = _attention_options(query, scale, sliding_window, soft_cap)
    k_value, k_tensor = _scale_args("k_scale", k_scale, key_cache)
    v_value, v_tensor = _scale_args("v_scale", v_scale, key_cache)
    if debug_checks() and query.is_cuda and key_cache.dim() == 4:
        _C.check_paged_decode_values(block_tables.cpu(), seq_lens.cpu(), key_cache.shape[1], key_cache.shape[0])
        if custom_mask is not None:
            _C.check_paged_decode_mask(mask_offsets.cpu(), seq_lens.cpu(), custom_mask.numel())
    _C.paged_decode(query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window, soft_cap,
                    custom_mask, mask_offsets, _decode_workspace(query.device), k_value, v_value, k_tensor, v_tensor,
                    stream_of(query))


def paged_prefill_attention(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, *, causal=True,
                            custom_mask=None, mask_indptr=None, scale=None, sliding_window=None, soft_cap=None,
                            return_lse=False, out=None, k_scale=1.0, v_scale=1.0, backend="auto"):
    """New query tokens of a packed batch attend to their sequences' cached tokens.

    query [total_q, num_heads, head_dim], sequence i's rows being cu_seqlens_q[i]:cu_seqlens_q[i+1]
    (int32 [batch+1]); they are the LAST q_len_i of its seq_lens[i] cached positions (the new
    tokens' K/V written first with write_kv_cache), so the causal mask is bottom-right aligned.
    custom_mask replaces the causal mask: per sequence a row-major [q_len_i, seq_len_i] boolean
    matrix, either a flat torch.bool tensor with mask_indptr (int32 [batch+1]) counting elements,
    or a uint8 tensor bit-packed as FlashInfer packs it with mask_indptr counting bytes. A row
    that sees no token returns zeros (lse -inf). Returns out, or (out, lse) with return_lse.
    FP8 caches and k_scale / v_scale: as in paged_decode_attention.

    backend picks the CUDA kernel: "auto" (the Hopper wgmma kernel where the GPU, the build and
    the call allow it, else the mma.sync kernel), "mma" (always the mma.sync kernel) or "sm90"
    (the wgmma kernel; a ValueError where it cannot run). The CPU path takes any of them.
    """
    expect_tensors(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                    cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    if (custom_mask is None) != (mask_indptr is None):
        raise ValueError("mask_indptr: custom_mask and mask_indptr go together")
    if out is None:
        out = torch.empty_like(query)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device) if return_lse else None
    _prefill_into(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, out, lse, causal, custom_mask,
                  mask_indptr, scale, sliding_window, soft_cap, k_scale, v_scale, backend)
    return (out, lse) if return_lse else out


def _prefill_into(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, out, lse, causal, custom_mask,
                  mask_indptr, scale, sliding_window, soft_cap, k_scale=1.0, v_scale=1.0, backend="auto"):
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, PREFILL_BACKENDS))}, got {backend!r}")
    scale, sliding_window, soft_cap = _attention_options(query, scale, sliding_window, soft_cap)
    k_value, k_tensor = _scale_args("k_scale", k_scale, key_cache)
    v_value, v_tensor = _scale_args("v_scale", v_scale, key_cache)
    causal = bool_arg("causal", causal)
    if debug_checks() and query.is_cuda and key_cache.dim() == 4 and query.dim() == 3:
        _C.check_paged_prefill_values(block_tables.cpu(), cu_seqlens_q.cpu(), seq_lens.cpu(),
                                      None if mask_indptr is None else mask_indptr.cpu(),
                                      0 if custom_mask is None else custom_mask.numel(),
                                      custom_mask is not None and custom_mask.dtype == torch.uint8,
                                      query.shape[0], key_cache.shape[1], key_cache.shape[0])
    large = (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.dim() == 3
             and cu_seqlens_q.dim() == 1
             and persistent_prefill(query.shape[0], cu_seqlens_q.shape[0] - 1, query.shape[1]))
    tile_counter = torch.zeros(1, dtype=torch.int32, device=query.device) if large else None
    _C.paged_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, out, lse, custom_mask,
                     mask_indptr, causal, scale, sliding_window, soft_cap, tile_counter, k_value, v_value, k_tensor,
                     v_tensor, PREFILL_BACKENDS.index(backend), stream_of(query))


ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREFILL_BACKENDS = ("auto", "mma", "sm90")  # the index is the C++ PrefillBackend


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, out=None):
    """Attention over the union of two disjoint key sets, from the attention over each part.

    out_a, out_b [rows, num_heads, head_dim] (float32, float16 or bfloat16, one dtype); lse_a, lse_b
    float32 [rows, num_heads], natural-log sums of exp(logits) as the attention ops return them.
    Returns (out, lse), out in out_a's dtype, computed in float32:

        lse = log(exp(lse_a) + exp(lse_b)),   out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

    A part with lse -inf (it saw no key) leaves the other part's out and lse exactly as they are;
    both -inf give zeros and lse -inf, as for a row that sees nothing. A NaN in either part's out
    or lse makes the result NaN there (even the out of a part of weight 0); a lse of +inf (a +inf
    score) gives NaN out and lse +inf, as the attention ops do. out: a tensor of out_a's shape,
    dtype and device to write into; out_a or out_b itself is fine (an in-place merge).
    Plain torch arithmetic: any device, no synchronization, graph-capturable."""
    expect_tensors(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b, out=out)
    if out_a.dim() != 3:
        raise ValueError(f"out_a: expected 3 dimensions [rows, num_heads, head_dim], got shape {list(out_a.shape)}")
    if out_a.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"out_a: dtype must be float32, float16 or bfloat16, got {out_a.dtype}")
    for name, t, like in (("out_b", out_b, out_a), ("out", out, out_a), ("lse_a", lse_a, None), ("lse_b", lse_b, None)):
        if t is None:
            continue
        shape, dtype = (like.shape, like.dtype) if like is not None else (out_a.shape[:2], torch.float32)
        if t.dtype != dtype:
            raise TypeError(f"{name}: dtype must be {str(dtype)[6:]}, got {t.dtype}")
        if t.shape != shape:
            raise ValueError(f"{name}: shape {list(t.shape)} must be {list(shape)}")
        if t.device != out_a.device:
            raise ValueError(f"{name}: must be on the same device as out_a ({out_a.device}), got {t.device}")
    # Exact where one part is -inf (logaddexp(x, -inf) = x); NaN and +inf carry through.
    lse = torch.logaddexp(lse_a, lse_b)
    # Each part's weight is exp(lse_part - lse). Where both parts are empty, lse is -inf and the
    # weights must be 0 (not exp(-inf + inf) = NaN): -inf is replaced by 0 there, NaN and +inf stay.
    base = lse.nan_to_num(nan=math.nan, posinf=math.inf, neginf=0.0)
    w_a = (lse_a - base).exp_().unsqueeze(-1)
    w_b = (lse_b - base).exp_().unsqueeze(-1)
    if out is None:
        out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    torch.add(out_a * w_a, out_b * w_b, out=out)  # in float32 (the weights'), rounded once into out
    return out, lse


_MAX_TABLE_TOKENS = 1 << 30


def _index_arg(name, t, shape, device):
    """An int32 index tensor: contiguous, on the query's device, of the given shape (a None
    dimension may be any size)."""
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: dtype must be int32, got {t.dtype}")
    if t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
        want = ", ".join("*" if n is None else str(n) for n in shape)
        raise ValueError(f"{name}: shape must be [{want}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: must be on the same device as query ({device}), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def _byte_span(t):
    """The bytes [first, last] a tensor's elements span, or None for an empty tensor."""
    if t.numel() == 0:
        return None
    reach = [(n - 1) * s for n, s in zip(t.shape, t.stride())]
    lo, hi = sum(r for r in reach if r < 0), sum(r for r in reach if r > 0)
    return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size() - 1


def _expect_apart(name, t, **others):
    span = _byte_span(t)
    for other_name, other in others.items():
        other_span = None if other is None or not isinstance(other, torch.Tensor) else _byte_span(other)
        if span and other_span and span[0] <= other_span[1] and other_span[0] <= span[1]:
            raise ValueError(f"{name}: must not share memory with {other_name}")


def _check_table_values(tables_name, tables, lens_name, lens, block_size, num_blocks):
    """Host tensors: each length within its table row's capacity, each block id it uses in range."""
    capacity = tables.shape[1] * block_size
    lens = lens.long()
    bad = ((lens < 0) | (lens > capacity)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{lens_name}[{i}] = {int(lens[i])} is outside [0, {capacity}] "
                         f"({tables_name} width x block_size)")
    used = torch.arange(tables.shape[1]) < ((lens + block_size - 1) // block_size).unsqueeze(1)
    bad = (used & ((tables < 0) | (tables >= num_blocks))).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        raise ValueError(f"{tables_name}[{row}, {col}] = {int(tables[row, col])} is outside [0, {num_blocks})")


def _check_group_indptr(group_indptr, batch):
    if group_indptr[0] != 0:
        raise ValueError(f"group_indptr[0] must be 0, got {int(group_indptr[0])}")
    steps = (group_indptr[1:].long() - group_indptr[:-1].long() < 0).nonzero()
    if len(steps):
        raise ValueError(f"group_indptr must be non-decreasing (at index {int(steps[0]) + 1})")
    if group_indptr[-1] != batch:
        raise ValueError(f"group_indptr[-1] = {int(group_indptr[-1])} must equal the batch (query rows, {batch})")


def cascade_decode_attention(query, key_cache, value_cache, prefix_block_tables, prefix_lens, group_indptr,
                             suffix_block_tables, suffix_lens, *, scale=None, soft_cap=None, return_lse=False,
                             out=None, k_scale=1.0, v_scale=1.0):
    """Decode for a batch whose sequences share prefixes (parallel samples, beams, a common system
    prompt): the K/V of each group's prefix is read once for all of the group's queries.

    query [batch, num_heads, head_dim]; caches as in paged_decode_attention. The rows form groups:
    group g is rows group_indptr[g]:group_indptr[g + 1] (int32 [num_groups + 1], from 0 to batch,
    non-decreasing; a group may be empty or of one row). Row b of group g attends over
      - the first prefix_lens[g] tokens of prefix_block_tables[g] (int32 [num_groups] and
        [num_groups, max_prefix_blocks]), and
      - the first suffix_lens[b] tokens of suffix_block_tables[b] (int32 [batch] and
        [batch, max_suffix_blocks]),
    giving what paged_decode_attention gives over those tokens together. Each part counts its
    tokens from slot 0 of its own table's first block, so a prefix may end mid-block (its last
    block partly used) and the suffix's tokens are in blocks of its own. Either length may be 0; a
    row that sees no token gets zeros (lse -inf). After BlockManager.fork, a group's prefix is
    typically the full blocks its rows share, and each row's suffix the blocks after them.

    Returns out [batch, num_heads, head_dim], or (out, lse) with return_lse (lse as in
    paged_decode_attention). scale, soft_cap, FP8 caches and k_scale / v_scale: as in
    paged_decode_attention. No sliding window: the parts hold no positions.

    It runs paged_prefill_attention (causal=False) with one sequence per group over the prefixes,
    paged_decode_attention over the suffixes, and merge_attention_states. In the prefill the query
    heads that share a kv head are queries of one head (a group of r rows brings r * num_heads /
    num_kv_heads queries to each kv head), so a tile of queries fills up and reads its K/V once. A
    prefill sequence holds at most as many queries as keys, so a group with fewer prefix tokens
    than queries (an empty prefix included) runs there over block 0 instead, and that result is
    discarded: its rows' prefix is attended to row by row, by a second decode. Nothing synchronizes and the
    intermediates come from torch's caching allocator, so a call can be captured in a CUDA graph.
    Values inside CUDA index tensors are checked only with PAGEDLM_DEBUG=1, as for the other ops.
    """
    expect_tensors(query=query, key_cache=key_cache, value_cache=value_cache,
                    prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens, group_indptr=group_indptr,
                    suffix_block_tables=suffix_block_tables, suffix_lens=suffix_lens, out=out)
    if query.dim() != 3:
        raise ValueError(f"query: expected 3 dimensions [batch, num_heads, head_dim], got shape {list(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache: expected 4 dimensions [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {list(key_cache.shape)}")
    batch, device = query.shape[0], query.device
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    num_groups = prefix_lens.shape[0] if prefix_lens.dim() == 1 else None
    _index_arg("prefix_lens", prefix_lens, (None,), device)
    _index_arg("prefix_block_tables", prefix_block_tables, (num_groups, None), device)
    _index_arg("group_indptr", group_indptr, (num_groups + 1,), device)
    _index_arg("suffix_lens", suffix_lens, (batch,), device)
    _index_arg("suffix_block_tables", suffix_block_tables, (batch, None), device)
    if num_groups == 0 and batch > 0:
        raise ValueError(f"group_indptr: no groups for the batch's {batch} rows")
    if block_size == 0:
        raise ValueError(f"key_cache: block_size (dimension 1) must be at least 1, got shape {list(key_cache.shape)}")
    for name, tables in (("prefix_block_tables", prefix_block_tables), ("suffix_block_tables", suffix_block_tables)):
        if tables.shape[1] * block_size > _MAX_TABLE_TOKENS:
            raise ValueError(f"{name}: width x block_size = {tables.shape[1]} x {block_size} tokens is above 2^30")
    if out is not None:
        if out.shape != query.shape:
            raise ValueError(f"out: shape {list(out.shape)} must equal the shape of query {list(query.shape)}")
        if out.dtype != query.dtype:
            raise TypeError(f"out: dtype must match query ({query.dtype}), got {out.dtype}")
        if out.device != device:
            raise ValueError(f"out: must be on the same device as query ({device}), got {out.device}")
        if not out.is_contiguous():
            raise ValueError("out: must be contiguous")
        _expect_apart("out", out, query=query, key_cache=key_cache, value_cache=value_cache,
                      prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens, group_indptr=group_indptr,
                      suffix_block_tables=suffix_block_tables, suffix_lens=suffix_lens, k_scale=k_scale,
                      v_scale=v_scale)
    if not query.is_cuda or debug_checks():
        _check_group_indptr(group_indptr.cpu(), batch)
        _check_table_values("prefix_block_tables", prefix_block_tables.cpu(), "prefix_lens", prefix_lens.cpu(),
                            block_size, num_blocks)
        _check_table_values("suffix_block_tables", suffix_block_tables.cpu(), "suffix_lens", suffix_lens.cpu(),
                            block_size, num_blocks)

    options = dict(scale=scale, soft_cap=soft_cap, return_lse=True, k_scale=k_scale, v_scale=v_scale)
    # First: the suffixes' decode checks the query against the caches (heads, head dim, dtypes).
    suffix_out, suffix_lse = paged_decode_attention(query, key_cache, value_cache, suffix_block_tables, suffix_lens,
                                                    **options)
    num_heads, num_kv_heads, head_dim = query.shape[1], key_cache.shape[2], query.shape[2]
    per_kv = num_heads // num_kv_heads
    # Each row's group, and the groups with fewer prefix tokens than prefill queries ("short").
    rows = torch.arange(batch, dtype=torch.int32, device=device)
    group_of_row = torch.searchsorted(group_indptr[1:], rows, right=True).clamp_(max=max(num_groups - 1, 0))
    group_queries = (group_indptr[1:] - group_indptr[:-1]) * per_kv
    short = prefix_lens < group_queries
    short_row = short[group_of_row]
    # The short groups' prefixes, row by row (every other row sees nothing here).
    row_lens = torch.where(short_row, prefix_lens[group_of_row], 0)
    prefix_out, prefix_lse = paged_decode_attention(query, key_cache, value_cache, prefix_block_tables[group_of_row],
                                                    row_lens, **options)
    if num_blocks > 0:  # an empty cache has only empty prefixes: every group is short or has no rows
        # Every other group's prefix once for all its queries: row b's query head kv * per_kv + j is
        # query b * per_kv + j of kv head kv. A short group reads as many tokens as it has queries
        # from block 0 (a table wide enough for any group) and its result is dropped.
        queries = batch * per_kv
        tables, width = prefix_block_tables, prefix_block_tables.shape[1]
        if width * block_size < queries:
            tables = torch.nn.functional.pad(tables, (0, -(-queries // block_size) - width))
        tables = tables.masked_fill(short.unsqueeze(1), 0)
        by_kv_head = query.view(batch, num_kv_heads, per_kv, head_dim).transpose(1, 2).reshape(
            queries, num_kv_heads, head_dim)
        shared_out, shared_lse = paged_prefill_attention(by_kv_head, key_cache, value_cache, tables,
                                                         group_indptr * per_kv,
                                                         torch.where(short, group_queries, prefix_lens),
                                                         causal=False, **options)
        shared_out = shared_out.view(batch, per_kv, num_kv_heads, head_dim).transpose(1, 2).reshape(query.shape)
        shared_lse = shared_lse.view(batch, per_kv, num_kv_heads).transpose(1, 2).reshape(batch, num_heads)
        prefix_out = torch.where(short_row[:, None, None], prefix_out, shared_out)
        prefix_lse = torch.where(short_row[:, None], prefix_lse, shared_lse)
    out, lse = merge_attention_states(prefix_out, prefix_lse, suffix_out, suffix_lse, out=out)
    return (out, lse) if return_lse else out


def rms_norm(x, weight, eps, *, residual=None):
    """RMSNorm of each row of x [tokens, hidden] (contiguous; float32, float16 or bfloat16)
    in one kernel: weight * to_dtype(x * rsqrt(mean(x**2) + eps)), in float32 and rounded
    where pagedlm.models.layers.RMSNorm rounds. weight [hidden] has x's dtype. Returns a new
    tensor.

    With residual (x's shape and dtype), the add before the norm between two layers, as
    vLLM's fused_add_rms_norm: residual += x (rounded to the dtype), then x = the norm of
    the new residual, both in place. Returns (x, residual), the same tensors.
    """
    expect_tensors(x=x, weight=weight, residual=residual)
    eps = float_arg("eps", eps)
    if residual is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _C.rms_norm(x, weight, out, None, eps, stream_of(x))
        return out
    _C.rms_norm(x, weight, x, residual, eps, stream_of(x))
    return x, residual


def silu_and_mul(x):
    """The SwiGLU activation in one kernel: x [tokens, 2 * d] (contiguous) holds gate and up
    side by side; returns silu(gate) * up [tokens, d] in x's dtype, rounded as torch rounds
    nn.functional.silu(gate) * up (silu in float32, rounded, then the product rounded)."""
    expect_tensors(x=x)
    out = x.new_empty((x.shape[0], x.shape[1] // 2) if x.dim() == 2 else (0,))
    _C.silu_and_mul(x, out, stream_of(x))
    return out


def apply_rope(query, key, positions, inv_freq, *, query_out=None):
    """Rotary embedding (rotate-half convention, as Hugging Face's Llama) of query
    [tokens, num_heads, head_dim] and key [tokens, num_kv_heads, head_dim] in place, in one
    kernel. Their last dimension must be contiguous; token and head strides are free, so they
    may be views of one fused qkv output (but must not overlap). positions int64 [tokens];
    inv_freq float32 [head_dim / 2]. Angles, cos, sin and the rotation are float32, as
    pagedlm.models.layers computes them. query_out: a contiguous tensor of query's shape and
    dtype that receives the rotated query instead (query is left as it was), as the attention
    ops take it, sparing a copy of a strided query. Returns (query_out or query, key)."""
    expect_tensors(query=query, key=key, positions=positions, inv_freq=inv_freq, query_out=query_out)
    _C.apply_rope(query, key, positions, inv_freq, query_out, stream_of(query))
    return (query if query_out is None else query_out), key


def argmax_logprob(logits, *, out=None):
    """The greedy choice of each row of logits [rows, vocab] (contiguous; float32, float16 or
    bfloat16) in one kernel: float64 [rows, 2], each row's argmax (the first index of its
    maximum; a NaN counts as the maximum, as in torch.argmax) and that token's log-softmax,
    -log(sum(exp(row - max))), NaN when the row holds a NaN or its maximum is infinite.
    float64 holds any token id exactly, so the host reads both in one copy. out: a float64
    [rows, 2] tensor on logits' device to write into (a CUDA graph's static buffer)."""
    expect_tensors(logits=logits, out=out)
    if out is None:
        out = torch.empty((logits.shape[0] if logits.dim() else 0, 2), dtype=torch.float64, device=logits.device)
    _C.argmax_logprob(logits, out, stream_of(logits))
    return out


# ---- torch.library registration ------------------------------------------------------
_lib = torch.library.Library("pagedlm", "DEF")
_lib.define("write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
            "Tensor slot_mapping, *, Tensor? k_scale=None, Tensor? v_scale=None) -> ()")
_lib.define("copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()")
_lib.define("paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
            "Tensor seq_lens, float? scale=None, int? sliding_window=None, float? soft_cap=None, "
            "Tensor? custom_mask=None, Tensor? mask_offsets=None, *, Tensor? k_scale=None, Tensor? v_scale=None) "
            "-> (Tensor, Tensor)")
_lib.define("paged_prefill_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
            "Tensor cu_seqlens_q, Tensor seq_lens, bool causal=True, Tensor? custom_mask=None, "
            "Tensor? mask_indptr=None, float? scale=None, int? sliding_window=None, float? soft_cap=None, *, "
            "Tensor? k_scale=None, Tensor? v_scale=None, str backend=\"auto\") -> (Tensor, Tensor)")
_lib.define("paged_decode_attention_out(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
            "Tensor seq_lens, Tensor(a!) out, Tensor(b!)? lse, float? scale=None, int? sliding_window=None, "
            "float? soft_cap=None, Tensor? custom_mask=None, Tensor? mask_offsets=None, *, Tensor? k_scale=None, "
            "Tensor? v_scale=None) -> ()")
_lib.define("cascade_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
            "Tensor prefix_block_tables, Tensor prefix_lens, Tensor group_indptr, Tensor suffix_block_tables, "
            "Tensor suffix_lens, float? scale=None, float? soft_cap=None, *, Tensor? k_scale=None, "
            "Tensor? v_scale=None) -> (Tensor, Tensor)")
_lib.define("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)")
_lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_lib.define("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()")
_lib.define("silu_and_mul(Tensor x) -> Tensor")
_lib.define("apply_rope(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor inv_freq, *, "
            "Tensor(c!)? query_out=None) -> ()")
_lib.define("argmax_logprob(Tensor logits) -> Tensor")


# In the torch.ops schemas a scale is an optional float32 tensor (None: 1.0), so that a traced or
# captured call reads its scales from memory.
def _scale_or_one(scale):
    return 1.0 if scale is None else scale


def _write_kv_cache_op(key, value, key_cache, value_cache, slot_mapping, *, k_scale=None, v_scale=None):
    write_kv_cache(key, value, key_cache, value_cache, slot_mapping, k_scale=_scale_or_one(k_scale),
                   v_scale=_scale_or_one(v_scale))


def _decode_functional(query, key_cache, value_cache, block_tables, seq_lens, scale=None, sliding_window=None,
                       soft_cap=None, custom_mask=None, mask_offsets=None, *, k_scale=None, v_scale=None):
    return paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale=scale,
                                  sliding_window=sliding_window, soft_cap=soft_cap, return_lse=True,
                                  custom_mask=custom_mask, mask_offsets=mask_offsets,
                                  k_scale=_scale_or_one(k_scale), v_scale=_scale_or_one(v_scale))


def _decode_out(query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale=None, sliding_window=None,
                soft_cap=None, custom_mask=None, mask_offsets=None, *, k_scale=None, v_scale=None):
    _decode_into(query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale, sliding_window, soft_cap,
                 custom_mask, mask_offsets, _scale_or_one(k_scale), _scale_or_one(v_scale))


def _prefill_functional(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, causal=True,
                        custom_mask=None, mask_indptr=None, scale=None, sliding_window=None, soft_cap=None, *,
                        k_scale=None, v_scale=None, backend="auto"):
    return paged_prefill_attention(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
                                   causal=causal, custom_mask=custom_mask, mask_indptr=mask_indptr, scale=scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap, return_lse=True,
                                   k_scale=_scale_or_one(k_scale), v_scale=_scale_or_one(v_scale), backend=backend)


def _cascade_functional(query, key_cache, value_cache, prefix_block_tables, prefix_lens, group_indptr,
                        suffix_block_tables, suffix_lens, scale=None, soft_cap=None, *, k_scale=None, v_scale=None):
    return cascade_decode_attention(query, key_cache, value_cache, prefix_block_tables, prefix_lens, group_indptr,
                                    suffix_block_tables, suffix_lens, scale=scale, soft_cap=soft_cap, return_lse=True,
                                    k_scale=_scale_or_one(k_scale), v_scale=_scale_or_one(v_scale))


def _fused_add_rms_norm(x, residual, weight, eps):
    rms_norm(x, weight, eps, residual=residual)


def _apply_rope(query, key, positions, inv_freq, *, query_out=None):
    apply_rope(query, key, positions, inv_freq, query_out=query_out)


for _key in ("CPU", "CUDA"):
    _lib.impl("write_kv_cache", _write_kv_cache_op, _key)
    _lib.impl("copy_blocks", copy_blocks, _key)
    _lib.impl("paged_decode_attention", _decode_functional, _key)
    _lib.impl("paged_decode_attention_out", _decode_out, _key)
    _lib.impl("paged_prefill_attention", _prefill_functional, _key)
    _lib.impl("cascade_decode_attention", _cascade_functional, _key)
    _lib.impl("merge_attention_states", merge_attention_states, _key)
    _lib.impl("rms_norm", rms_norm, _key)
    _lib.impl("fused_add_rms_norm", _fused_add_rms_norm, _key)
    _lib.impl("silu_and_mul", silu_and_mul, _key)
    _lib.impl("apply_rope", _apply_rope, _key)
    _lib.impl("argmax_logprob", argmax_logprob, _key)


@torch.library.register_fake("pagedlm::write_kv_cache")
def _(key, value, key_cache, value_cache, slot_mapping, *, k_scale=None, v_scale=None):
    return None


@torch.library.register_fake("pagedlm::copy_blocks")
def _(key_caches, value_caches, block_mapping):
    return None


@torch.library.register_fake("pagedlm::paged_decode_attention")
def _(query, key_cache, value_cache, block_tables, seq_lens, scale=None, sliding_window=None, soft_cap=None,
      custom_mask=None, mask_offsets=None, *, k_scale=None, v_scale=None):
    return torch.empty_like(query), query.new_empty(query.shape[:2], dtype=torch.float32)


@torch.library.register_fake("pagedlm::paged_decode_attention_out")
def _(query, key_cache, value_cache, block_tables, seq_lens, out, lse, scale=None, sliding_window=None,
      soft_cap=None, custom_mask=None, mask_offsets=None, *, k_scale=None, v_scale=None):
    return None


@torch.library.register_fake("pagedlm::paged_prefill_attention")
def _(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, causal=True, custom_mask=None,
      mask_indptr=None, scale=None, sliding_window=None, soft_cap=None, *, k_scale=None, v_scale=None, backend="auto"):
    return torch.empty_like(query), query.new_empty(query.shape[:2], dtype=torch.float32)


@torch.library.register_fake("pagedlm::cascade_decode_attention")
def _(query, key_cache, value_cache, prefix_block_tables, prefix_lens, group_indptr, suffix_block_tables, suffix_lens,
      scale=None, soft_cap=None, *, k_scale=None, v_scale=None):
    return query.new_empty(query.shape), query.new_empty(query.shape[:2], dtype=torch.float32)


@torch.library.register_fake("pagedlm::merge_attention_states")
def _(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), out_a.new_empty(out_a.shape[:2], dtype=torch.float32)


@torch.library.register_fake("pagedlm::rms_norm")
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pagedlm::fused_add_rms_norm")
def _(x, residual, weight, eps):
    return None


@torch.library.register_fake("pagedlm::silu_and_mul")
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.register_fake("pagedlm::apply_rope")
def _(query, key, positions, inv_freq, *, query_out=None):
    return None


@torch.library.register_fake("pagedlm::argmax_logprob")
def _(logits):
    return logits.new_empty((logits.shape[0], 2), dtype=torch.float64)
