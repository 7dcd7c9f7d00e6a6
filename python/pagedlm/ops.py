"""pagedlm.ops: the kernels, callable on CPU and CUDA tensors, also registered as
torch.ops.pagedlm.* (with fake implementations, so they trace under torch.compile).

Each op launches on the caller's current CUDA stream, never synchronizes and never
allocates device memory inside the kernel call: the split-K workspace of paged decode is
one buffer per device, allocated on first use, and a large prefill's work counter is a
4-byte tensor from torch's caching allocator, zeroed on the stream (graph-capturable).
Shapes, dtypes, devices and contiguity are always checked; values inside CUDA tensors (block
ids, lengths) only when PAGEDLM_DEBUG=1, since reading them costs a synchronization. What each
op checks, and what becomes of a bad value without the check, is in docs/errors.md.
"""
import torch

from pagedlm import _C
from pagedlm._torch_glue import bool_arg, debug_checks, expect_tensors, float_arg, int_arg, stream_of
from pagedlm.verify import verify_greedy, verify_speculative, verify_tree_greedy, verify_tree_speculative  # noqa: F401

__all__ = ["write_kv_cache", "copy_blocks", "paged_decode_attention", "paged_prefill_attention",
           "merge_attention_states", "rms_norm", "silu_and_mul", "apply_rope",
           "argmax_logprob", "verify_greedy", "verify_speculative", "verify_tree_greedy", "verify_tree_speculative"]

DECODE_WORKSPACE_BYTES = 32 << 20
_workspaces = {}
# CUDA prefill calls with at least this many (query row, head) pairs get a zeroed work counter, with
# which the Hopper kernel runs a persistent grid; below it the counter's memset would cost more than
# the blocks' start-up it saves.
PERSISTENT_PREFILL_MIN_WORK = 1 << 16


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
                            return_lse=False, out=None, k_scale=1.0, v_scale=1.0):
    """New query tokens of a packed batch attend to their sequences' cached tokens.

    query [total_q, num_heads, head_dim], sequence i's rows being cu_seqlens_q[i]:cu_seqlens_q[i+1]
    (int32 [batch+1]); they are the LAST q_len_i of its seq_lens[i] cached positions (the new
    tokens' K/V written first with write_kv_cache), so the causal mask is bottom-right aligned.
    custom_mask replaces the causal mask: per sequence a row-major [q_len_i, seq_len_i] boolean
    matrix, either a flat torch.bool tensor with mask_indptr (int32 [batch+1]) counting elements,
    or a uint8 tensor bit-packed as FlashInfer packs it with mask_indptr counting bytes. A row
    that sees no token returns zeros (lse -inf). Returns out, or (out, lse) with return_lse.
    FP8 caches and k_scale / v_scale: as in paged_decode_attention.
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
                  mask_indptr, scale, sliding_window, soft_cap, k_scale, v_scale)
    return (out, lse) if return_lse else out


def _prefill_into(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, out, lse, causal, custom_mask,
                  mask_indptr, scale, sliding_window, soft_cap, k_scale=1.0, v_scale=1.0):
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
             and key_cache.dtype not in FP8_DTYPES
             and query.shape[0] * query.shape[1] >= PERSISTENT_PREFILL_MIN_WORK)
    tile_counter = torch.zeros(1, dtype=torch.int32, device=query.device) if large else None
    _C.paged_prefill(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, out, lse, custom_mask,
                     mask_indptr, causal, scale, sliding_window, soft_cap, tile_counter, k_value, v_value, k_tensor,
                     v_tensor, stream_of(query))


ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    # Weights relative to the larger lse; a non-finite maximum is replaced by 0 so that two -inf
    # parts weigh 0 each (not exp(-inf + inf) = NaN) while NaN and +inf still reach the result.
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(top.isfinite(), top, 0.0)
    w_a, w_b = (lse_a - top).exp(), (lse_b - top).exp()
    total = w_a + w_b
    lse = top + total.log()
    merged = out_a.float() * w_a.unsqueeze(-1) + out_b.float() * w_b.unsqueeze(-1)
    if out is None:
        out = torch.empty(out_a.shape, dtype=out_a.dtype, device=out_a.device)
    # total >= 1 wherever the maximum is finite; it is 0 only where both parts are empty, and
    # clamping it there to 1 leaves their zeros (times weight 0) as the result.
    torch.div(merged, total.clamp_min(1.0).unsqueeze(-1), out=out)
    return out, lse


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


def apply_rope(query, key, positions, inv_freq):
    """Rotary embedding (rotate-half convention, as Hugging Face's Llama) of query
    [tokens, num_heads, head_dim] and key [tokens, num_kv_heads, head_dim] in place, in one
    kernel. Their last dimension must be contiguous; token and head strides are free, so they
    may be views of one fused qkv output (but must not overlap). positions int64 [tokens];
    inv_freq float32 [head_dim / 2]. Angles, cos, sin and the rotation are float32, as
    pagedlm.models.layers computes them. Returns (query, key), the same tensors."""
    expect_tensors(query=query, key=key, positions=positions, inv_freq=inv_freq)
    _C.apply_rope(query, key, positions, inv_freq, stream_of(query))
    return query, key


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
            "Tensor? k_scale=None, Tensor? v_scale=None) -> (Tensor, Tensor)")
_lib.define("paged_decode_attention_out(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
            "Tensor seq_lens, Tensor(a!) out, Tensor(b!)? lse, float? scale=None, int? sliding_window=None, "
            "float? soft_cap=None, Tensor? custom_mask=None, Tensor? mask_offsets=None, *, Tensor? k_scale=None, "
            "Tensor? v_scale=None) -> ()")
_lib.define("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)")
_lib.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_lib.define("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()")
_lib.define("silu_and_mul(Tensor x) -> Tensor")
_lib.define("apply_rope(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor inv_freq) -> ()")
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
                        k_scale=None, v_scale=None):
    return paged_prefill_attention(query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens,
                                   causal=causal, custom_mask=custom_mask, mask_indptr=mask_indptr, scale=scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap, return_lse=True,
                                   k_scale=_scale_or_one(k_scale), v_scale=_scale_or_one(v_scale))


def _fused_add_rms_norm(x, residual, weight, eps):
    rms_norm(x, weight, eps, residual=residual)


def _apply_rope(query, key, positions, inv_freq):
    apply_rope(query, key, positions, inv_freq)


for _key in ("CPU", "CUDA"):
    _lib.impl("write_kv_cache", _write_kv_cache_op, _key)
    _lib.impl("copy_blocks", copy_blocks, _key)
    _lib.impl("paged_decode_attention", _decode_functional, _key)
    _lib.impl("paged_decode_attention_out", _decode_out, _key)
    _lib.impl("paged_prefill_attention", _prefill_functional, _key)
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
      mask_indptr=None, scale=None, sliding_window=None, soft_cap=None, *, k_scale=None, v_scale=None):
    return torch.empty_like(query), query.new_empty(query.shape[:2], dtype=torch.float32)


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
def _(query, key, positions, inv_freq):
    return None


@torch.library.register_fake("pagedlm::argmax_logprob")
def _(logits):
    return logits.new_empty((logits.shape[0], 2), dtype=torch.float64)
