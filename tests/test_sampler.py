"""The engine's sampler: sampled tokens follow the distribution after temperature, top-k and
top-p (chi-square over draws keyed by position, so every draw is a fresh Philox number), a test
that rejects a wrong distribution, and greedy rows taking the argmax with its log-probability."""
import pytest
import torch

from pagedlm.engine.sampler import greedy_choices, probabilities, sample
from pagedlm.engine.sequence import SamplingParams, Sequence

scipy_stats = pytest.importorskip("scipy.stats")

LOGITS = torch.tensor([2.0, 1.5, 0.3, -0.4, 1.0, 0.0, -2.0])
DRAWS = 6000


def draws(params, logits=LOGITS, count=DRAWS):
    """count samples from one logits row, one per position (the generator's counter)."""
    seqs = [Sequence(i, "r", 0, [1] * (i + 1), params) for i in range(count)]
    tokens, _ = sample(logits.expand(count, -1).contiguous(), seqs, engine_seed=0)
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).double()


def expected_probs(params, logits=LOGITS):
    scaled = logits / params.temperature
    if params.top_k > 0:
        scaled = scaled.masked_fill(scaled < scaled.topk(params.top_k).values[-1], float("-inf"))
    probs = scaled.softmax(-1).double()
    if params.top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered <= params.top_p
        probs = torch.zeros_like(probs).scatter(0, order, ordered * keep)
        probs /= probs.sum()
    return probs


def chi_square_p(observed, probs):
    expected = probs / probs.sum() * observed.sum()
    return scipy_stats.chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=3),
                                    SamplingParams(temperature=0.6, top_k=4, seed=4),
                                    SamplingParams(temperature=1.3, top_p=0.8, seed=5),
                                    SamplingParams(temperature=0.9, top_k=5, top_p=0.9, seed=6)])
def test_sampled_tokens_follow_the_truncated_distribution(params):
    probs = expected_probs(params)
    torch.testing.assert_close(probabilities(LOGITS[None], [params])[0].double(), probs, atol=1e-6, rtol=0)
    observed = draws(params)
    assert observed[probs == 0].sum() == 0  # truncated tokens are never drawn
    kept = probs > 0
    assert chi_square_p(observed[kept], probs[kept]) > 1e-4


def test_the_chi_square_test_rejects_a_wrong_distribution():
    observed = draws(SamplingParams(temperature=1.0, seed=3))
    wrong = expected_probs(SamplingParams(temperature=1.5))
    assert chi_square_p(observed, wrong) < 1e-6


def test_greedy_rows_take_the_argmax_with_its_log_probability():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(i, str(i), 0, [1, 2], SamplingParams(temperature=0)) for i in range(5)]
    tokens, logprobs = sample(logits, seqs, engine_seed=0)
    assert tokens == logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(logprobs), logits.log_softmax(-1).max(-1).values)


def test_greedy_choices_break_ties_low_and_are_what_sample_takes():
    """greedy_choices (computed inside the decode and verification graphs): the first maximal
    index and its log-probability; sample() given them emits exactly what it computes itself."""
    logits = torch.randn(6, 13, generator=torch.Generator().manual_seed(1))
    logits[2, [3, 7]] = logits[2].max() + 1.0  # a tie: the lower index wins
    choices = greedy_choices(logits)
    assert choices.dtype == torch.float64 and choices.shape == (6, 2)
    assert choices[:, 0].long().tolist() == [int(row.argmax()) for row in logits] and choices[2, 0] == 3
    torch.testing.assert_close(choices[:, 1], logits.double().log_softmax(-1).max(-1).values, rtol=1e-6, atol=1e-6)
    seqs = [Sequence(i, str(i), 0, [1, 2], SamplingParams(temperature=0)) for i in range(6)]
    assert sample(logits, seqs, engine_seed=0, choices=choices) == sample(logits, seqs, engine_seed=0)
