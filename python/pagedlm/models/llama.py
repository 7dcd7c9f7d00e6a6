"""LlamaForCausalLM over a paged KV cache: embeddings, decoder blocks, final norm, LM head.
Matmuls are torch's; attention and KV-cache writes are pagedlm's paged ops. One forward
takes a packed batch of new tokens from many sequences (prefill chunks and decode steps
mixed), described by an AttentionBatch built from the block manager.

The one class serves every supported family (config.SUPPORTED): what differs between them
(q/k norms, Gemma's sandwich norms, scaled embeddings and soft caps, per-layer windows and
rotary tables, mixture-of-experts MLPs) is read from ModelArgs when the model is built."""
from dataclasses import dataclass

import torch
from torch import nn

from pagedlm.models.layers import MLP, Attention, RMSNorm, rope_frequencies
from pagedlm.models.moe import SparseMoE


@dataclass
class AttentionBatch:
    """Where a forward's tokens go in the paged cache and what they attend to.

    slot_mapping int64 [tokens]; block_tables int32 [seqs, max_blocks]; seq_lens int32 [seqs]
    (cached tokens, the new ones included); cu_seqlens_q int32 [seqs + 1] (each sequence's
    new tokens are contiguous in the batch). decode_only: every sequence brings one token.
    custom_mask, mask_indptr: replace the causal mask (tree and lookahead verification), in
    paged_prefill_attention's layout; with decode_only, each token is its own row (its sequence's
    table and length) and mask_offsets int64 [tokens] locate the rows' masks instead, as
    paged_decode_attention takes them. cascade (engine.cascade.CascadeBatch): with decode_only,
    the rows' shared prefixes, which layers without a sliding window read once per group.
    decode_rows (DecodeRows): in a step whose prompt chunks follow decodes, the decode rows,
    which attend through the decode kernel (engine/forward.py, split_decode_rows).
    """
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    decode_only: bool
    custom_mask: torch.Tensor | None = None
    mask_indptr: torch.Tensor | None = None
    mask_offsets: torch.Tensor | None = None
    cascade: object = None
    decode_rows: object = None


@dataclass
class DecodeRows:
    """The first rows of a mixed step that decode: row i < len(seq_lens) is the one new token of
    a sequence of seq_lens[i] tokens (block_tables[i]) when seq_lens[i] > 0, and is not a decode
    row otherwise. In the prefill, the decode rows form one placeholder sequence, whose output
    these rows' decode replaces: rows where `decoding` (bool [rows, 1, 1]) holds, or every row
    when it is None. The split-K decode kernel reads each K/V row once per kv head; the prefill
    kernel would take a block of queries per row and query head."""
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    decoding: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, args, layer=0):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.sandwich = args.sandwich_norms
        if self.sandwich:  # Gemma: post_attention_layernorm normalises the attention output itself
            self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = SparseMoE(args) if args.is_moe_layer(layer) else MLP(args)

    def forward(self, x, residual, positions, inv_freqs, batch, kv_cache):
        """The residual stream is x + residual (residual None before the first layer), kept as
        a pair so that each add is fused into the norm after it (RMSNorm with residual).
        Returns the pair for the next layer; residual is updated in place."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, inv_freqs, batch, kv_cache)
        if not self.sandwich:
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class LlamaModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, layer) for layer in range(args.num_layers))
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
        for name, table in self.rope_tables().items():
            self.register_buffer(name, table, persistent=False)

    def rope_tables(self):
        """{buffer name: float32 inverse frequencies}: inv_freq for every layer, and for Gemma 3
        inv_freq_local, the sliding-window layers' own."""
        args = self.args
        rotary = args.rotary_dim or args.head_dim
        tables = {"inv_freq": rope_frequencies(rotary, args.rope_theta, args.rope_scaling)}
        if args.local_rope_theta is not None:
            tables["inv_freq_local"] = rope_frequencies(rotary, args.local_rope_theta, args.local_rope_scaling)
        return tables

    def make_kv_caches(self, num_blocks, block_size, *, dtype=None, device=None):
        """One (key_cache, value_cache) pair per layer: [num_blocks, block_size, kv_heads, head_dim]."""
        dtype = dtype or self.lm_head.weight.dtype
        device = device or self.lm_head.weight.device
        shape = (num_blocks, block_size, self.args.num_kv_heads, self.args.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.args.num_layers)]

    @torch.inference_mode()
    def forward(self, input_ids, positions, batch, kv_caches, logits_indices=None, logits_out=None,
                float_logits=True):
        """input_ids, positions int64 [tokens]; returns logits float32 [len(logits_indices) or tokens, vocab],
        written into logits_out if given (a CUDA graph's output buffer: one copy, not a cast and a copy).
        float_logits=False: the logits in the LM head's dtype (float32 under a final soft cap), for a
        caller that upcasts only the rows it needs as float32."""
        x, residual = self.model.embed_tokens(input_ids), None
        if self.args.embed_scale is not None:  # Gemma: the factor rounded to the weights' dtype, as transformers
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype).item()
        inv_freqs = (self.inv_freq, getattr(self, "inv_freq_local", None))
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, inv_freqs, batch, kv_cache)
        if logits_indices is not None:
            x, residual = x[logits_indices], None if residual is None else residual[logits_indices]
        x = self.model.norm(x) if residual is None else self.model.norm(x, residual)[0]
        logits = self.lm_head(x)
        cap = self.args.final_soft_cap
        if cap is not None:  # Gemma: cap * tanh(logits / cap), in float32
            logits = torch.tanh(logits.float() / cap) * cap
        if logits_out is None:
            return logits.float() if float_logits else logits
        return logits_out.copy_(logits)
