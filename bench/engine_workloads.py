"""The engine benchmarks' workloads (bench/README.md) and their roofline.

A workload is a list of Requests (prompt token ids, output tokens, samples n), served greedily
with EOS ignored, so every engine produces exactly the same number of tokens. The roofline is
the time an ideal engine would need on a card with the measured ceilings: every prompt's FLOPs
at the dense matmul rate, then one decode step per output position, each reading the weights
once and the KV of every sequence still decoding at the copy bandwidth (a prompt that n samples
share, once). Prefill and decode sharing steps
can only be faster than this sum where one of them is not at its ceiling, so tokens/s over the
roofline's tokens/s reads as a fraction of what the card allows.
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

TOKEN_RANGE = (1000, 100000)  # prompt tokens are drawn from here (inside any Llama-3 vocabulary)


class Request(NamedTuple):
    prompt: list
    output_tokens: int
    n: int = 1  # samples of the prompt, decoded side by side


def standard(seed=0, count=256, prompt_lens=(64, 512), output_tokens=128, token_range=TOKEN_RANGE, n=1):
    """256 prompts of 64-512 uniform random tokens, 128 outputs each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_lens[0], prompt_lens[1] + 1, count)
    return [Request(rng.integers(*token_range, length).tolist(), output_tokens, n) for length in lengths]


def sharegpt_like(seed=0, count=1000, prompt_mean=250, output_mean=200, sigma=1.0, max_len=2048,
                  token_range=TOKEN_RANGE):
    """Chat-like lengths: lognormal prompt and output lengths (means about 250 and 200 tokens),
    each clipped to [4, max_len]."""
    rng = np.random.default_rng(seed)

    def lognormal(mean):  # mean of a lognormal = exp(mu + sigma^2 / 2)
        return np.clip(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, count), 4, max_len).astype(int)

    prompts, outputs = lognormal(prompt_mean), lognormal(output_mean)
    return [Request(rng.integers(*token_range, p).tolist(), int(o)) for p, o in zip(prompts, outputs)]


def long_prompts(seed=0, count=256, output_tokens=64, token_range=TOKEN_RANGE):
    """256 prompts of 2K-8K tokens, 64 outputs each: prefill-bound."""
    return standard(seed, count, (2048, 8192), output_tokens, token_range)


def long_context(seed=0, count=64, prompt_len=16384, output_tokens=256, token_range=TOKEN_RANGE):
    """64 prompts of 16K tokens, 256 outputs each: decode reads about 1M tokens of KV a step,
    so the KV cache's bytes, not the weights, bound it (the FP8 cache's case)."""
    return standard(seed, count, (prompt_len, prompt_len), output_tokens, token_range)


def parallel_samples(seed=0, count=32, prompt_len=2048, output_tokens=128, n=8, token_range=TOKEN_RANGE):
    """32 prompts of 2K tokens, n = 8 samples of 128 tokens each: 256 sequences decoding, in
    groups of 8 that share a prompt (the cascade's case)."""
    return standard(seed, count, (prompt_len, prompt_len), output_tokens, token_range, n)


WORKLOADS = {"standard": standard, "sharegpt": sharegpt_like, "long-prompts": long_prompts,
             "long-context": long_context, "parallel-samples": parallel_samples}


def output_tokens(requests):
    return sum(r.output_tokens * r.n for r in requests)


@dataclass
class ModelShape:
    layers: int
    hidden: int
    heads: int
    head_dim: int
    vocab: int
    layer_parameters: int  # the decoder layers' weights a token computes with, all layers
    weight_bytes: int      # what a decode step reads: the layers' weights and the LM head
    kv_bytes_per_token: int

    @classmethod
    def of(cls, config, dtype_bytes=2, kv_bytes=None):
        """From a Hugging Face config dict (Llama and its relatives; for a mixture of experts,
        num_local_experts or num_experts, num_experts_per_tok and moe_intermediate_size when it
        differs). A token computes with its experts only, but a decode step of a large batch
        reads every expert. kv_bytes is the KV cache's element size (default: dtype_bytes; 1
        for an FP8 cache)."""
        layers, hidden = config["num_hidden_layers"], config["hidden_size"]
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        vocab = config["vocab_size"]
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads) + 2 * hidden
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        if experts:
            expert = 3 * hidden * (config.get("moe_intermediate_size") or config["intermediate_size"])
            computed = attention + hidden * experts + expert * config["num_experts_per_tok"]
            stored = attention + hidden * experts + expert * experts
        else:
            computed = stored = attention + 3 * hidden * config["intermediate_size"]
        weight_bytes = (layers * stored + vocab * hidden + hidden) * dtype_bytes
        return cls(layers, hidden, heads, head_dim, vocab, layers * computed, weight_bytes,
                   2 * layers * kv_heads * head_dim * (kv_bytes or dtype_bytes))

    def prefill_flops(self, prompt_len):
        """A prompt's forward: 2 FLOPs per layer weight per token, the LM head for the last
        token only, and causal attention's two products (2 * 2 * D FLOPs per head per visible
        query-key pair, L (L + 1) / 2 pairs)."""
        attention = 2 * self.layers * self.heads * self.head_dim * prompt_len * (prompt_len + 1)
        return 2 * self.layer_parameters * prompt_len + 2 * self.vocab * self.hidden + attention


def roofline_seconds(requests, shape, matmul_flops_per_s, copy_bytes_per_s):
    """(prefill seconds, decode seconds) of the ideal engine described in the module docstring."""
    prefill = sum(shape.prefill_flops(len(r.prompt)) for r in requests) / matmul_flops_per_s
    prompts = np.array([len(r.prompt) for r in requests])
    outputs = np.array([r.output_tokens for r in requests])
    samples = np.array([r.n for r in requests])
    decode_bytes = 0
    for step in range(1, int(outputs.max())):  # the first output token comes from the prefill
        active = outputs > step
        tokens = int((prompts[active] + samples[active] * step).sum())
        decode_bytes += shape.weight_bytes + shape.kv_bytes_per_token * tokens
    return prefill, decode_bytes / copy_bytes_per_s
