"""LlamaForCausalLM over a paged KV cache: embeddings, decoder blocks, final norm, LM head.
Matmuls are torch's; attention and KV-cache writes are pagedlm's paged ops. One forward
takes a packed batch of new tokens from many sequences (prefill chunks and decode steps
mixed), described by an AttentionBatch built from the block manager."""
from dataclasses import dataclass

import torch
from torch import nn

from pagedlm.models.layers import MLP, Attention, RMSNorm, rope_frequencies


@dataclass
class AttentionBatch:
    """Where a forward's tokens go in the paged cache and what they attend to.

    slot_mapping int64 [tokens]; block_tables int32 [seqs, max_blocks]; seq_lens int32 [seqs]
    (cached tokens, the new ones included); cu_seqlens_q int32 [seqs + 1] (each sequence's
    new tokens are contiguous in the batch). decode_only: every sequence brings one token.
    custom_mask, mask_indptr: replace the causal mask (tree and lookahead verification), in
    paged_prefill_attention's layout; with decode_only, each token is its own row (its sequence's
    table and length) and mask_offsets int64 [tokens] locate the rows' masks instead, as
    paged_decode_attention takes them.
    """
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    decode_only: bool
    custom_mask: torch.Tensor | None = None
    mask_indptr: torch.Tensor | None = None
    mask_offsets: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, positions, inv_freq, batch, kv_cache):
        """The residual stream is x + residual (residual None before the first layer), kept as
        a pair so that each add is fused into the norm after it (RMSNorm with residual).
        Returns the pair for the next layer; residual is updated in place."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, inv_freq, batch, kv_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face's, except the fused qkv_proj and gate_up_proj, whose
    row blocks are the checkpoint's q/k/v_proj and gate/up_proj (loader.checkpoint_names)."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling),
                             persistent=False)

    def make_kv_caches(self, num_blocks, block_size, *, dtype=None, device=None):
        """One (key_cache, value_cache) pair per layer: [num_blocks, block_size, kv_heads, head_dim]."""
        dtype = dtype or self.lm_head.weight.dtype
        device = device or self.lm_head.weight.device
        shape = (num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.args.num_layers)]

    @torch.inference_mode()
    def forward(self, input_ids, positions, batch, kv_caches, logits_indices=None, logits_out=None):
        """input_ids, positions int64 [tokens]; returns logits float32 [len(logits_indices) or tokens, vocab],
        written into logits_out if given (a CUDA graph's output buffer: one copy, not a cast and a copy)."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.inv_freq, batch, kv_cache)
        if logits_indices is not None:
            x, residual = x[logits_indices], None if residual is None else residual[logits_indices]
        x = self.model.norm(x) if residual is None else self.model.norm(x, residual)[0]
        if logits_out is None:
            return self.lm_head(x).float()
        return logits_out.copy_(self.lm_head(x))
