"""Next-token sampling for a whole step at once, on the logits' device, with one host sync.

Greedy rows (temperature 0) take the argmax, with its log-probability: greedy_choices, which
the CUDA graphs of decode and verification forwards compute with the logits, saving the step
its launches. Sampled rows apply temperature, top-k and top-p, then pick a token by inverse CDF
with a uniform drawn from Philox-4x32-10 (the generator of the verification kernels) keyed by
(request seed, sample index, position): a seeded request draws the same tokens alone or in any
batch, on CPU or GPU.
"""
import zlib

import numpy as np
import torch

import pagedlm.ops as ops
from pagedlm import _C

_DRAW_SAMPLE = 1  # the Philox word the kernels use for sampling a token (philox.h: kDrawSample)


def greedy_choices(logits, out=None):
    """float64 [rows, 2]: each row's argmax and its log-probability (float64 holds both
    exactly), in one kernel (pagedlm.ops.argmax_logprob); written into out if given. logits:
    contiguous [rows, vocab], float32, float16 or bfloat16."""
    return ops.argmax_logprob(logits, out=out)


def sample(logits, seqs, engine_seed, choices=None):
    """logits float32 [rows, vocab], one row per sequence in seqs; returns (tokens, logprobs)
    lists. choices: the logits' greedy_choices when already computed (by a graph)."""
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    if len(greedy) == len(seqs):  # the common step: one copy of the choices to the host
        both = (greedy_choices(logits) if choices is None else choices).cpu().numpy()
        return both[:, 0].astype(np.int64).tolist(), both[:, 1].tolist()
    tokens = torch.empty(len(seqs), dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(len(seqs), dtype=torch.float32, device=logits.device)
    if greedy:
        rows = _index(greedy, logits.device, len(seqs))
        choices = greedy_choices(logits[rows])
        tokens[rows], logprobs[rows] = choices[:, 0].long(), choices[:, 1].float()
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature != 0]
    if sampled:
        rows = _index(sampled, logits.device, len(seqs))
        chosen, logprob = _sample_rows(logits[rows], [seqs[i] for i in sampled], engine_seed)
        tokens[rows], logprobs[rows] = chosen, logprob
    return _to_host(tokens, logprobs)


def _to_host(tokens, logprobs):
    """Both as lists, through one device-to-host copy (as float64, which holds either exactly)."""
    both = torch.cat([tokens.double(), logprobs]).cpu().numpy()
    return both[:len(tokens)].astype(np.int64).tolist(), both[len(tokens):].tolist()


def _index(rows, device, total):
    if len(rows) == total:
        return slice(None)
    return torch.tensor(rows, device=device)


def probabilities(logits, params):
    """float32 [rows, vocab]: the distribution each row samples from (temperature, top-k, top-p),
    params holding one SamplingParams per row, none greedy. Speculative verification uses it too."""
    device = logits.device
    # Each row's largest logit is subtracted before dividing (softmax does not change), so the
    # quotient stays finite for any temperature > 0: a tiny one would take a logit to inf and
    # the softmax to nan, where this way the largest logit stays 0 and the others go to -inf at
    # worst (the greedy limit). Temperatures below float32's smallest normal count as it.
    temperature = torch.tensor([p.temperature for p in params], device=device)
    temperature = temperature.clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature[:, None]
    top_k = [p.top_k if p.top_k > 0 else scaled.shape[-1] for p in params]
    if min(top_k) < scaled.shape[-1]:
        # Keep the logits at least as large as the k-th largest (ties kept).
        kth_index = torch.tensor([min(k, scaled.shape[-1]) - 1 for k in top_k], device=device)
        kth = scaled.sort(-1, descending=True).values.gather(-1, kth_index[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(-1, descending=True)
        # The smallest nucleus: drop a token once the mass before it already exceeds top_p.
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _sample_rows(logits, seqs, engine_seed):
    device = logits.device
    probs = probabilities(logits, [s.params for s in seqs])
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    uniform = torch.tensor([_uniform(s, engine_seed) for s in seqs], dtype=torch.float32, device=device)
    # Kept below the total so rounding can never run past the last token.
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # The first token whose CDF exceeds the draw: never a zero-probability token, whose CDF
    # equals its predecessor's.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def _uniform(seq, engine_seed):
    """A uniform in [0, 1) keyed by (seed, sample index, position)."""
    seed = seq.params.seed if seq.params.seed is not None else engine_seed ^ zlib.crc32(seq.request_id.encode())
    seed &= (1 << 64) - 1
    position = len(seq)
    words = _C.philox4x32_10(seq.index & 0xFFFFFFFF, 0, position & 0xFFFFFFFF, 0,
                             seed & 0xFFFFFFFF, seed >> 32)
    return words[_DRAW_SAMPLE] / 2.0 ** 32
