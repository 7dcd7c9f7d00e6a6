"""The layers of a decoder block: RMSNorm, rotary embeddings (llama3, linear and LongRoPE
scaling), attention over the paged KV cache through pagedlm.ops with each layer's window, scale
and soft cap, and the gated MLP (SwiGLU, or GeGLU for Gemma)."""
import math

import torch
from torch import nn
from torch.nn import functional as F

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
    """Inverse frequencies of the rotary embedding over head_dim (the rotated dims); llama3
    scaling stretches the low ones, linear divides all by its factor, LongRoPE divides each by
    its own factor."""
    # float32 throughout, as Hugging Face computes it, so the angles agree to the last bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if scaling and scaling["rope_type"] == "longrope":
        return 1.0 / (torch.tensor(scaling["ext_factors"], dtype=torch.float32) * theta ** exponents)
    inv_freq = 1.0 / theta ** exponents
    if not scaling:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between blended.
    blend = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, (1 - blend) * inv_freq / factor + blend * inv_freq, scaled)


def apply_rope(query, key, positions, inv_freq, query_out=None):
    """query [tokens, heads, head_dim] and key [tokens, kv_heads, head_dim] rotated in place
    (the query into query_out when given), rotate-half convention (as Hugging Face's Llama), in
    float32, by one kernel."""
    return ops.apply_rope(query, key, positions, inv_freq.to(device=query.device, dtype=torch.float32),
                          query_out=query_out)


class Attention(nn.Module):
    """One layer's attention. Its settings (window, scale, soft cap, rotary table) are plain
    Python values fixed at construction, so every forward, eager or captured in a CUDA graph,
    hands the kernels the same constants."""

    def __init__(self, args, layer=0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        # q, k and v in one matmul: the checkpoint's q_proj, k_proj and v_proj are its row blocks.
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_proj_bias)
        if args.qk_norm:  # Qwen3, Gemma 3: each query and key head normalised before the rotation
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.sliding_window = args.window(layer)
        self.soft_cap = args.attn_soft_cap
        self.rope_table = 0 if args.rope_table(layer) == "global" else 1
        self.rotary_dim = args.rotary_dim or args.head_dim
        scale = args.attn_scale if args.attn_scale is not None else args.head_dim ** -0.5
        # LongRoPE scales cos and sin, so the rotated dims of q and k, by its attention factor:
        # with every dim rotated, that is the scores times its square.
        self.rotated_factor = args.rope_attention_factor
        if self.rotary_dim == args.head_dim:
            scale, self.rotated_factor = scale * self.rotated_factor ** 2, 1.0
        self.scale = scale

    def forward(self, x, positions, inv_freqs, batch, kv_cache):
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(tokens, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(tokens, self.num_kv_heads, self.head_dim)
        rotary = self.rotary_dim
        if rotary == self.head_dim:  # the rotated query lands contiguous, as the attention kernels take it
            query_out = None if q.is_contiguous() else torch.empty(q.shape, dtype=q.dtype, device=q.device)
            q, k = apply_rope(q, k, positions, inv_freqs[self.rope_table], query_out)
        else:  # partial rotary: the leading dims of each head (views: the kernel takes strided heads)
            apply_rope(q[..., :rotary], k[..., :rotary], positions, inv_freqs[self.rope_table])
            if self.rotated_factor != 1.0:
                q[..., :rotary].mul_(self.rotated_factor)
                k[..., :rotary].mul_(self.rotated_factor)
        q = q.contiguous()  # the attention kernels take a contiguous query; write_kv_cache a strided key
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        k_scale, v_scale = kv_cache_scales(kv_cache, k, v)  # 1.0 unless the cache is FP8
        ops.write_kv_cache(k, v, key_cache, value_cache, batch.slot_mapping, k_scale=k_scale, v_scale=v_scale)
        if batch.decode_only and batch.cascade is not None and self.sliding_window is None:
            c = batch.cascade  # the rows in groups that share prefixes: each prefix read once per group
            out = torch.empty_like(q)
            out[c.order] = ops.cascade_decode_attention(q[c.order], key_cache, value_cache, c.prefix_tables,
                                                        c.prefix_lens, c.group_indptr, c.suffix_tables,
                                                        c.suffix_lens, scale=self.scale, soft_cap=self.soft_cap,
                                                        k_scale=k_scale, v_scale=v_scale)
        elif batch.decode_only:
            out = ops.paged_decode_attention(q, key_cache, value_cache, batch.block_tables, batch.seq_lens,
                                             scale=self.scale, sliding_window=self.sliding_window,
                                             soft_cap=self.soft_cap, custom_mask=batch.custom_mask,
                                             mask_offsets=batch.mask_offsets, k_scale=k_scale, v_scale=v_scale)
        else:
            out = ops.paged_prefill_attention(q, key_cache, value_cache, batch.block_tables, batch.cu_seqlens_q,
                                              batch.seq_lens, custom_mask=batch.custom_mask,
                                              mask_indptr=batch.mask_indptr, scale=self.scale,
                                              sliding_window=self.sliding_window, soft_cap=self.soft_cap,
                                              k_scale=k_scale, v_scale=v_scale)
            if batch.decode_rows is not None:
                d = batch.decode_rows
                rows = d.seq_lens.shape[0]
                decoded = ops.paged_decode_attention(q[:rows], key_cache, value_cache, d.block_tables, d.seq_lens,
                                                     scale=self.scale, sliding_window=self.sliding_window,
                                                     soft_cap=self.soft_cap, k_scale=k_scale, v_scale=v_scale,
                                                     out=out[:rows] if d.decoding is None else None)
                if d.decoding is not None:
                    out[:rows] = torch.where(d.decoding, decoded, out[:rows])
        return self.o_proj(out.view(tokens, -1))


def act_and_mul(x, hidden_act):
    """act(gate) * up of x [tokens, 2 * d], gate and up side by side: SwiGLU in one kernel, GeGLU
    (Gemma: gelu with the tanh approximation, or exact) in torch, rounded as transformers rounds."""
    if hidden_act == "silu":
        return ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh" if hidden_act == "gelu_pytorch_tanh" else "none") * up


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        # gate and up in one matmul: the checkpoint's gate_proj and up_proj are its row blocks.
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.hidden_act = args.hidden_act

    def forward(self, x):
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.hidden_act))  # act(gate) * up
