"""The target's sampling distribution over several rows of one request, as the engine's
sampler forms it, and the key of each sequence's speculative draws: what lossless
verification needs to accept or correct drafts as plain sampling would draw."""
import torch

from pagedlm.engine.sampler import probabilities


def processed_probs(logits, params):
    """float32 [rows, vocab]: what plain sampling would draw from at each row, for one request."""
    return probabilities(logits.float(), [params] * logits.shape[0])


def token_logprobs(logits, params, tokens):
    """Log-probabilities of tokens[i] under row i, as the engine's sampler reports them."""
    probs = torch.log_softmax(logits.float(), -1) if params.temperature == 0 else processed_probs(logits, params).log()
    return probs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


def sample_seed(seq):
    """The key of a sequence's speculative draws: its seed (Sequence.seed, as plain sampling
    uses it) mixed with its sample index so n > 1 samples differ. (Plain sampling puts the
    index in Philox's counter; the verification kernels' counter has no place for it.)"""
    return ((seq.seed * 1_000_003 + seq.index) * 1_000_003) & ((1 << 63) - 1)
