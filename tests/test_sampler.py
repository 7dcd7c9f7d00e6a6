"""The engine's sampler: sampled tokens follow the distribution after temperature, top-k, top-p
and min_p (chi-square over draws keyed by position, so every draw is a fresh Philox number), a
test that rejects a wrong distribution, and greedy rows taking the argmax with its
log-probability. Penalties, min_tokens and top logprobs against references written from their
definitions in numpy."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedlm.engine.sampler import apply_penalties, greedy_choices, probabilities, sample, sample_step
from pagedlm.engine.sequence import SamplingParams, Sequence

scipy_stats = pytest.importorskip("scipy.stats")

# Logits whose softmax is a known distribution, so every expected distribution below is worked
# out by hand from the definitions (temperature: p^(1/T) renormalised; top-k: the k most likely,
# ties at the k-th kept; top-p: the smallest most-likely-first set whose mass reaches top_p),
# not by re-running the sampler's own tensor code.
BASE = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=torch.float64)
LOGITS = BASE.log().float()
DRAWS = 6000


def normalised(values):
    values = torch.tensor(values, dtype=torch.float64)
    return values / values.sum()


CASES = [
    (SamplingParams(temperature=1.0, seed=3), normalised([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])),
    (SamplingParams(temperature=0.5, seed=4), normalised([0.4 ** 2, 0.25 ** 2, 0.15 ** 2, 0.1 ** 2, 0.06 ** 2,
                                                           0.04 ** 2])),
    (SamplingParams(temperature=2.0, seed=5), normalised([0.4 ** 0.5, 0.25 ** 0.5, 0.15 ** 0.5, 0.1 ** 0.5,
                                                           0.06 ** 0.5, 0.04 ** 0.5])),
    (SamplingParams(temperature=1.0, top_k=3, seed=6), normalised([0.4, 0.25, 0.15, 0, 0, 0])),
    (SamplingParams(temperature=1.0, top_p=0.6, seed=7), normalised([0.4, 0.25, 0, 0, 0, 0])),    # 0.65 >= 0.6
    (SamplingParams(temperature=1.0, top_p=0.66, seed=8), normalised([0.4, 0.25, 0.15, 0, 0, 0])),  # 0.65 < 0.66
    (SamplingParams(temperature=1.0, top_p=0.3, seed=9), normalised([1, 0, 0, 0, 0, 0])),
    (SamplingParams(temperature=0.5, top_k=4, top_p=0.9, seed=10),  # top 4 of p^2, then 0.8725 < 0.9 < 0.9608
     normalised([0.4 ** 2, 0.25 ** 2, 0.15 ** 2, 0, 0, 0])),
    # min_p: keep p >= min_p * max p (here 0.3 * 0.4 = 0.12), after the temperature.
    (SamplingParams(temperature=1.0, min_p=0.3, seed=11), normalised([0.4, 0.25, 0.15, 0, 0, 0])),
    (SamplingParams(temperature=1.0, min_p=0.25, seed=12), normalised([0.4, 0.25, 0.15, 0.1, 0, 0])),  # 0.1 >= 0.1
    # p^2 / sum = [.5, .195, .070, .031, ...]: 0.3 * 0.5 = 0.15 keeps two.
    (SamplingParams(temperature=0.5, min_p=0.3, seed=13), normalised([0.4 ** 2, 0.25 ** 2, 0, 0, 0, 0])),
    (SamplingParams(temperature=1.0, min_p=1.0, seed=14), normalised([1, 0, 0, 0, 0, 0])),
    # min_p (0.12) then top_p over what is left: 0.4 / 0.8 = 0.5 >= 0.45.
    (SamplingParams(temperature=1.0, min_p=0.3, top_p=0.45, seed=15), normalised([1, 0, 0, 0, 0, 0])),
]


def draws(params, logits=LOGITS, count=DRAWS):
    """count samples from one logits row, one per position (the generator's counter), and their
    reported log-probabilities."""
    seqs = [Sequence(i, "r", 0, [1] * (i + 1), params) for i in range(count)]
    tokens, logprobs = sample(logits.expand(count, -1).contiguous(), seqs)
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).double(), tokens, logprobs


def chi_square_p(observed, probs):
    expected = probs / probs.sum() * observed.sum()
    return scipy_stats.chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("params, probs", CASES)
def test_sampled_tokens_follow_the_truncated_distribution(params, probs):
    torch.testing.assert_close(probabilities(LOGITS[None], [params])[0].double(), probs, atol=1e-6, rtol=0)
    observed, tokens, logprobs = draws(params)
    assert observed[probs == 0].sum() == 0  # truncated tokens are never drawn
    kept = probs > 0
    if kept.sum() > 1:
        assert chi_square_p(observed[kept], probs[kept]) > 1e-4
    # The reported log-probability is the token's under the distribution it was drawn from.
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), probs[tokens].log(), atol=1e-5, rtol=0)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0])
    probs = probabilities(logits[None], [SamplingParams(top_k=2)])[0].double()
    e = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64).exp() * torch.tensor([1, 1, 1, 0, 1])
    torch.testing.assert_close(probs, e / e.sum(), atol=1e-6, rtol=0)


def test_the_chi_square_test_rejects_a_wrong_distribution():
    observed, _, _ = draws(SamplingParams(temperature=1.0, seed=3))
    wrong = CASES[2][1]  # the temperature-2 distribution
    assert chi_square_p(observed, wrong) < 1e-6


def test_a_draw_is_keyed_by_position_not_by_how_the_tokens_are_split():
    """A sequence with prompt P and output O draws at position len(P + O), exactly as one whose
    prompt is P + O; the sample index keys the draw too, so n > 1 samples differ."""
    params = SamplingParams(temperature=1.0, seed=21)
    logits = LOGITS.expand(200, -1).contiguous()
    split = [Sequence(i, "r", 0, [1] * 5, params, output=[2] * (i + 1)) for i in range(200)]
    joined = [Sequence(i, "r", 0, [1] * 5 + [2] * (i + 1), params) for i in range(200)]
    assert sample(logits, split)[0] == sample(logits, joined)[0]
    same_position = [Sequence(i, "r", 0, [1] * 5 + [2] * 7, params) for i in range(200)]
    assert len(set(sample(logits, same_position)[0])) == 1
    samples = [Sequence(i, "r", i, [1] * 5 + [2] * 7, params) for i in range(200)]
    assert len(set(sample(logits, samples)[0])) > 1


def test_greedy_rows_take_the_argmax_with_its_log_probability():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(i, str(i), 0, [1, 2], SamplingParams(temperature=0)) for i in range(5)]
    tokens, logprobs = sample(logits, seqs)
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
    assert sample(logits, seqs, choices=choices) == sample(logits, seqs)


# -- penalties, min_tokens, logprobs -----------------------------------------------------------
def reference_penalties(logits, prompt, output, params, eos=()):
    """vLLM's logit_bias and penalties from their definitions, one row in numpy float64."""
    out = np.array(logits, dtype=np.float64)
    for token, bias in (params.logit_bias or {}).items():
        out[token] += bias
    for token in set(prompt) | set(output):
        r = params.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token in set(output):
        out[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    if len(output) < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos)):
            out[token] = -np.inf
    return out


PENALIZED = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(frequency_penalty=0.8),
    SamplingParams(presence_penalty=-1.5),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=1.2),
    SamplingParams(),  # a plain row in the batch: unchanged
    SamplingParams(min_tokens=4, stop_token_ids=[7]),
    SamplingParams(min_tokens=4, stop_token_ids=[7], ignore_eos=True),
    SamplingParams(min_tokens=2, stop_token_ids=[7]),  # its output is longer: nothing masked
    SamplingParams(logit_bias={2: 3.5, 5: -4.0, 19: 0.25}),
    SamplingParams(logit_bias={3: 6.0, 4: -2.0}, repetition_penalty=1.8, frequency_penalty=0.4),  # bias first
]


def test_penalties_and_min_tokens_equal_their_definitions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(len(PENALIZED), 20, generator=g) * 3
    seqs = []
    for i, params in enumerate(PENALIZED):
        prompt = torch.randint(20, (6,), generator=g).tolist()
        output = [3, 3, 9, prompt[0]] if i != 8 else [3, 3, 9]
        seqs.append(Sequence(i, str(i), 0, prompt, params, output=output[:3] if params.min_tokens else output))
    got = apply_penalties(logits, seqs, eos_token_ids={11})
    for i, seq in enumerate(seqs):
        want = reference_penalties(logits[i].tolist(), seq.prompt, seq.output, seq.params, eos={11})
        np.testing.assert_allclose(got[i].double().numpy(), want, rtol=1e-6, atol=1e-6)
    assert torch.isinf(got[6, [7, 11]]).all() and torch.isinf(got[7, 7]) and not torch.isinf(got[7, 11])
    assert not torch.isinf(got[8]).any()
    assert torch.equal(got[5], logits[5])


@pytest.mark.parametrize("penalty", [1e-40, 1e-300])  # below float32's normals; 0 in float32
def test_a_vanishing_repetition_penalty_keeps_every_row_a_distribution(penalty):
    """Positive logits divided by a penalty near 0 leave float32's range: they saturate (tied for
    the most likely), so greedy and sampled rows draw a token of the vocabulary with a finite
    log-probability rather than from a nan distribution."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 30, generator=g)
    logits += logits.sign() * 0.1  # |logit| >= 0.1: each positive one over the penalty passes float32's range
    params = [SamplingParams(temperature=t, repetition_penalty=penalty, seed=i) for i, t in enumerate((0, 0, 1, 0.5))]
    seqs = [Sequence(i, str(i), 0, list(range(30)), p) for i, p in enumerate(params)]
    penalized = apply_penalties(logits, seqs)
    assert not torch.isnan(penalized).any() and not torch.isposinf(penalized).any()
    saturated = logits > 0  # every token is in the prompt, so each positive logit is divided by the penalty
    assert torch.equal(penalized == torch.finfo(torch.float32).max, saturated)
    tokens, logprobs, _ = sample_step(logits, seqs)
    assert all(saturated[i, token] for i, token in enumerate(tokens))
    assert tokens[:2] == [int(saturated[i].nonzero()[0]) for i in range(2)]  # greedy ties: the lowest id
    assert np.isfinite(logprobs).all()


_EXTREMES = st.sampled_from([0.0, 1e-300, 1e-40, 1e-3, 0.7, 1.0, 3.0, 1e40, 1e300])


@settings(max_examples=150, deadline=None)
@given(temperature=_EXTREMES, repetition=_EXTREMES.filter(lambda x: x > 0), frequency=st.sampled_from([-2.0, 0.0, 2.0]),
       top_k=st.sampled_from([-1, 1, 3, 40]), top_p=st.sampled_from([1e-300, 0.5, 1.0]),
       min_p=st.sampled_from([0.0, 0.5, 1.0]), min_tokens=st.sampled_from([0, 5]),
       bias=st.sampled_from([None, {0: 100.0, 1: -100.0}]), seed=st.integers(0, 2**32 - 1))
def test_any_sampling_params_draw_a_token_of_the_vocabulary(temperature, repetition, frequency, top_k, top_p, min_p,
                                                            min_tokens, bias, seed):
    """Whatever the params (temperatures and penalties at float32's limits and past them), over
    logits with zeros and -inf: each row draws a token of the vocabulary, never one its
    transforms ruled out, with a log-probability that is not nan."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 12, generator=g) * 4
    logits[0, :4] = 0.0
    logits[1, 5] = float("-inf")
    params = SamplingParams(temperature=temperature, repetition_penalty=repetition, frequency_penalty=frequency,
                            top_k=top_k, top_p=top_p, min_p=min_p, min_tokens=min_tokens, stop_token_ids=[2],
                            logit_bias=bias, seed=seed)
    seqs = [Sequence(i, str(i), 0, [1, 3, 7, 9], params, output=[3, 3, 8]) for i in range(3)]
    tokens, logprobs, _ = sample_step(logits, seqs, eos_token_ids={4})
    assert all(0 <= t < 12 for t in tokens), tokens
    assert not np.isnan(logprobs).any(), logprobs
    assert tokens[1] != 5  # -inf: never drawn
    if min_tokens:
        assert not {2, 4} & set(tokens)  # held back: 3 tokens out of min_tokens


def test_greedy_rows_with_penalties_take_the_penalized_argmax_and_report_raw_logprobs():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 30, generator=g)
    top = int(logits[0].argmax())
    params = [SamplingParams(temperature=0, repetition_penalty=4.0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    seqs = [Sequence(i, str(i), 0, [top, 1], p) for i, p in enumerate(params)]
    choices = greedy_choices(logits)  # as a graph gives them: of the raw logits
    tokens, logprobs, tops = sample_step(logits, seqs, choices)
    penalized = reference_penalties(logits[0].tolist(), [top, 1], [], params[0])
    assert tokens[0] == int(np.argmax(penalized)) != top
    assert tokens[1:] == logits[1:].argmax(-1).tolist()
    # cumulative logprob: the distribution the token was chosen from; tops: the raw one.
    shifted = penalized - penalized.max()
    assert logprobs[0] == pytest.approx(shifted[tokens[0]] - np.log(np.exp(shifted).sum()), abs=1e-5)
    raw = logits.double().log_softmax(-1)
    order = raw[0].argsort(descending=True)[:3].tolist()
    assert list(tops[0]) == [tokens[0]] + [t for t in order if t != tokens[0]]
    for token, value in tops[0].items():
        assert value == pytest.approx(float(raw[0, token]), abs=1e-5)
    assert tops[1] is None and tops[2] == {tokens[2]: pytest.approx(float(raw[2].max()), abs=1e-5)}


def test_sampled_rows_report_raw_top_logprobs_with_the_sampled_token_first():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(40, 25, generator=g)
    params = SamplingParams(temperature=1.5, top_k=10, seed=3, logprobs=4)
    seqs = [Sequence(i, "r", 0, [1] * (i + 1), params) for i in range(40)]
    tokens, logprobs, tops = sample_step(logits, seqs)
    raw = logits.double().log_softmax(-1)
    assert any(t not in raw[i].argsort(descending=True)[:4].tolist() for i, t in enumerate(tokens))
    for i, token in enumerate(tokens):
        order = raw[i].argsort(descending=True)[:4].tolist()
        assert list(tops[i])[0] == token and list(tops[i])[1:] == [t for t in order if t != token]
        assert len(tops[i]) == (4 if token in order else 5)
        for t, value in tops[i].items():
            assert value == pytest.approx(float(raw[i, t]), abs=1e-5)


def test_plain_rows_take_the_plain_path():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(8))
    seqs = [Sequence(i, str(i), 0, [1, 2], SamplingParams(temperature=0.7 * (i % 2), seed=i)) for i in range(4)]
    assert sample_step(logits, seqs) == (*sample(logits, seqs), None)
