"""The target's sampling distribution over several rows of one request, as the engine's
sampler forms it, and each request's seed: what lossless verification needs to accept or
correct drafts as plain sampling would draw."""
import zlib

import torch

from pagedlm.engine.sampler import probabilities


def processed_probs(logits, params):
    """float32 [rows, vocab]: what plain sampling would draw from at each row, for one request."""
    return probabilities(logits.float(), [params] * logits.shape[0])


def token_logprobs(logits, params, tokens):
    """Log-probabilities of tokens[i] under row i, as the engine's sampler reports them."""
    probs = torch.log_softmax(logits.float(), -1) if params.temperature == 0 else processed_probs(logits, params).log()
    return probs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


def request_seed(seq, engine_seed):
    """The seed of a sequence's random draws: the request's, else derived from the engine's
    seed and the request id; mixed with the sample index so n > 1 samples differ."""
    seed = seq.params.seed if seq.params.seed is not None else engine_seed ^ zlib.crc32(seq.request_id.encode())
    return ((seed * 1_000_003 + seq.index) * 1_000_003) & ((1 << 63) - 1)
