"""The layers of a Llama-family block: RMSNorm, rotary embeddings (with llama3 scaling),
attention over the paged KV cache through pagedlm.ops, and the SwiGLU MLP."""
import math

import torch
from torch import nn

import pagedlm.ops as ops
from pagedlm.kv_cache import kv_cache_scales


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """weight * x / rms(x) in one kernel (ops.rms_norm): in float32, rounded to x's dtype,
        then times the weight. With residual, the add before the norm, both in place:
        residual += x, x = the norm of it; returns (x, residual)."""
        if x.dtype == self.weight.dtype and x.is_contiguous():
            return ops.rms_norm(x, self.weight, self.eps, residual=residual)
        if residual is not None:  # a weight in another dtype (a model cast by hand): unfused
            return self.forward(residual.add_(x)), residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(head_dim, theta, scaling):
    """Inverse frequencies of the rotary embedding; llama3 scaling stretches the low ones."""
    # float32 throughout, as Hugging Face computes it, so the angles agree to the last bit.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if not scaling:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between blended.
    blend = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, (1 - blend) * inv_freq / factor + blend * inv_freq, scaled)


def apply_rope(query, key, positions, inv_freq):
    """query [tokens, heads, head_dim] and key [tokens, kv_heads, head_dim] rotated in place,
    rotate-half convention (as Hugging Face's Llama), in float32, by one kernel."""
    return ops.apply_rope(query, key, positions, inv_freq.to(device=query.device, dtype=torch.float32))


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        # q, k and v in one matmul: the checkpoint's q_proj, k_proj and v_proj are its row blocks.
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        self.sliding_window = args.sliding_window

    def forward(self, x, positions, inv_freq, batch, kv_cache):
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = apply_rope(q.view(tokens, self.num_heads, self.head_dim),
                          k.view(tokens, self.num_kv_heads, self.head_dim), positions, inv_freq)
        q = q.contiguous()  # the attention kernels take a contiguous query; write_kv_cache a strided key
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        k_scale, v_scale = kv_cache_scales(kv_cache, k, v)  # 1.0 unless the cache is FP8
        ops.write_kv_cache(k, v, key_cache, value_cache, batch.slot_mapping, k_scale=k_scale, v_scale=v_scale)
        if batch.decode_only:
            out = ops.paged_decode_attention(q, key_cache, value_cache, batch.block_tables, batch.seq_lens,
                                             sliding_window=self.sliding_window, custom_mask=batch.custom_mask,
                                             mask_offsets=batch.mask_offsets, k_scale=k_scale, v_scale=v_scale)
        else:
            out = ops.paged_prefill_attention(q, key_cache, value_cache, batch.block_tables, batch.cu_seqlens_q,
                                              batch.seq_lens, custom_mask=batch.custom_mask,
                                              mask_indptr=batch.mask_indptr, sliding_window=self.sliding_window,
                                              k_scale=k_scale, v_scale=v_scale)
        return self.o_proj(out.view(tokens, -1))


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        # gate and up in one matmul: the checkpoint's gate_proj and up_proj are its row blocks.
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))  # silu(gate) * up
