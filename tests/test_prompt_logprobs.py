"""SamplingParams.prompt_logprobs through LLM.generate, against an independent reference:
transformers' forward of the whole prompt (teacher forcing), log_softmax in float64, gathered
at each prompt token. Whether the prompt is prefilled at once, in chunks, one token per step,
recomputed after a preemption, forked for n > 1, next to a prefix-cache hit, or under
speculative decoding, every request gets exactly one entry per prompt token; and the requests
beside it (and its own sampled tokens) are unchanged by it."""
import pickle
from dataclasses import replace

import pytest
import torch

from pagedlm import LLM, Logprob, SamplingParams

transformers = pytest.importorskip("transformers")

from test_engine import checkpoint  # noqa: E402,F401  (the engine tests' tiny model, as a fixture)

VOCAB = 97
TOL = 1e-4


def prompts(count, seed, low=3, high=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def reference_prompt_logprobs(model, prompt):
    """float64 [len(prompt) - 1, vocab]: row p is log p(. | prompt[:p + 1]), the distribution of
    prompt[p + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()
    return logits[:-1].log_softmax(-1)


def check_prompt_logprobs(model, prompt, got, k):
    """got: a RequestOutput's prompt_logprobs for prompt, asked with prompt_logprobs=k."""
    assert len(got) == len(prompt) and got[0] is None
    reference = reference_prompt_logprobs(model, prompt)
    for position, (entry, row) in enumerate(zip(got[1:], reference)):
        actual = prompt[position + 1]
        top = row.argsort(descending=True, stable=True)[:k].tolist()
        assert list(entry)[0] == actual, (position, entry)
        assert set(entry) == {actual, *top}, (position, entry, top)
        for token, value in entry.items():
            assert isinstance(value, Logprob) and value.logprob == float(value)
            assert value == pytest.approx(float(row[token]), abs=TOL)
        # The prompt token's rank: 1 + the tokens more likely (within the tolerance, for near ties).
        v = float(row[actual])
        rank = entry[actual].rank
        assert 1 + int((row > v + TOL).sum()) <= rank <= 1 + int((row > v - TOL).sum()), (position, rank)
        for place, token in enumerate(t for t in entry if t != actual):
            assert entry[token].rank == top.index(token) + 1 == place + 1 + (actual in top[:place + 1])
        if actual in top:
            assert rank == top.index(actual) + 1


def test_prompt_logprobs_are_the_reference_log_softmax(checkpoint):
    folder, model = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=256)
    batch = prompts(5, seed=1)
    for k in (0, 1, 5):
        outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                     prompt_logprobs=k), use_tqdm=False)
        for prompt, out in zip(batch, outputs):
            check_prompt_logprobs(model, prompt, out.prompt_logprobs, k)
            if k == 0:
                assert all(len(entry) == 1 for entry in out.prompt_logprobs[1:])
            assert out.outputs[0].logprobs is None  # the sampled tokens' are another option


def test_requests_without_them_and_the_sampled_tokens_are_unchanged(checkpoint):
    """Their rows join the forward's logits: every other row (the sampled ones, their logprobs)
    must be the same as in a run without them, whether the prompt is prefilled whole or in chunks."""
    folder, model = checkpoint
    batch = prompts(6, seed=2, low=10, high=40)
    base = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 2
    asking = [replace(p, prompt_logprobs=2) if i % 2 == 0 else p
              for i, p in enumerate(base)]
    for budget in (8192, 7):
        llm = LLM(folder, device="cpu", block_size=4, num_blocks=256, max_num_batched_tokens=budget)
        want = llm.generate(batch, base, use_tqdm=False)
        got = llm.generate(batch, asking, use_tqdm=False)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            assert g.outputs[0].cumulative_logprob == pytest.approx(w.outputs[0].cumulative_logprob, abs=1e-5)
            assert (g.outputs[0].logprobs is None) == (w.outputs[0].logprobs is None)
            for a, b in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or []):
                assert list(a) == list(b) and list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
            if i % 2 == 0:
                check_prompt_logprobs(model, batch[i], g.prompt_logprobs, 2)
            else:
                assert g.prompt_logprobs is None


@pytest.mark.parametrize("budget", [1, 5, 16])
def test_chunked_prefill_gathers_them_across_chunks(checkpoint, budget):
    """budget 1: every step computes one token per sequence (the decode path's forward), so the
    prompt's rows come one per step."""
    folder, model = checkpoint
    batch = prompts(3, seed=4, low=20, high=45)
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=256, max_num_batched_tokens=budget)
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3),
                           use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        check_prompt_logprobs(model, prompt, out.prompt_logprobs, 3)


def test_preemption_by_recompute_adds_no_entries_twice(checkpoint):
    folder, model = checkpoint
    batch = prompts(8, seed=5, low=10, high=40)
    tight = LLM(folder, device="cpu", block_size=4, num_blocks=30, max_num_batched_tokens=12)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    outputs = tight.generate(batch, params, use_tqdm=False)
    assert tight.scheduler.preemptions > 0
    roomy = LLM(folder, device="cpu", block_size=4, num_blocks=512).generate(batch, params, use_tqdm=False)
    for prompt, out, ref in zip(batch, outputs, roomy):
        check_prompt_logprobs(model, prompt, out.prompt_logprobs, 1)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_a_repeated_prompt_skips_the_prefix_cache_only_for_them(checkpoint):
    folder, model = checkpoint
    shared = prompts(1, seed=6, low=30, high=31)[0]
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=256)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate([shared], replace(greedy, prompt_logprobs=2), use_tqdm=False)[0]
    check_prompt_logprobs(model, shared, first.prompt_logprobs, 2)
    # Its blocks entered the cache: a plain request hits them, one asking for prompt logprobs does not.
    plain, asking = llm.generate([shared + [5], shared + [5]],
                                 [greedy, replace(greedy, prompt_logprobs=2)], use_tqdm=False)
    assert plain.metrics["cached_prompt_tokens"] >= 28
    assert asking.metrics["cached_prompt_tokens"] == 0
    check_prompt_logprobs(model, shared + [5], asking.prompt_logprobs, 2)
    assert asking.prompt_logprobs[1:len(shared)] == first.prompt_logprobs[1:]
    assert asking.outputs[0].token_ids == plain.outputs[0].token_ids


def test_n_samples_share_one_list(checkpoint):
    folder, model = checkpoint
    batch = prompts(2, seed=7, low=10, high=30)
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=256)
    params = SamplingParams(n=3, temperature=1.0, seed=8, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    for prompt, out in zip(batch, llm.generate(batch, params, use_tqdm=False)):
        assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
        check_prompt_logprobs(model, prompt, out.prompt_logprobs, 2)


def test_a_one_token_prompt_has_only_none(checkpoint):
    folder, _ = checkpoint
    out = LLM(folder, device="cpu", block_size=4).generate([[7]], SamplingParams(max_tokens=2, prompt_logprobs=3),
                                                           use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("method", [dict(method="ngram", num_tokens=3, max_ngram=3, adaptive=False),
                                    dict(method="lookahead", window=3, ngram=3, guesses=2, adaptive=False)])
def test_under_speculation_they_equal_plain(checkpoint, method):
    folder, model = checkpoint
    batch = [(p * 3)[:30] for p in prompts(4, seed=9)]  # repeats: something for n-grams to draft
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    asking = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, prompt_logprobs=2)
    spec = LLM(folder, device="cpu", block_size=4, num_blocks=256, speculative=method, max_num_batched_tokens=16)
    got = spec.generate(batch + batch, [asking] * len(batch) + [plain] * len(batch), use_tqdm=False)
    want = LLM(folder, device="cpu", block_size=4, num_blocks=256).generate(batch, plain, use_tqdm=False)
    for g, w, prompt in zip(got, want + want, batch + batch):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
    for g, prompt in zip(got[:len(batch)], batch):
        check_prompt_logprobs(model, prompt, g.prompt_logprobs, 2)
    assert any(g.metrics["draft_steps"] > 0 for g in got)


def test_bad_values_are_refused_naming_it(checkpoint):
    for value in (-1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="^prompt_logprobs:"):
            SamplingParams(prompt_logprobs=value)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    llm = LLM(checkpoint[0], device="cpu", block_size=4)
    with pytest.raises(ValueError, match="prompt_logprobs: 98 asked for, the vocabulary has 97"):
        llm.generate([1, 2, 3], SamplingParams(prompt_logprobs=98), use_tqdm=False)


def test_logprob_is_a_float_with_vllms_fields():
    value = Logprob(-1.25, 3, "ab")
    assert value == -1.25 and value + 1 == -0.25 and value.logprob == -1.25 and isinstance(value.logprob, float)
    assert (value.rank, value.decoded_token) == (3, "ab")
    copy = pickle.loads(pickle.dumps(value))
    assert (copy, copy.rank, copy.decoded_token) == (-1.25, 3, "ab")
    assert repr(value) == "Logprob(logprob=-1.25, rank=3, decoded_token='ab')"


def test_decoded_tokens_come_from_the_tokenizer():
    """On the shipped code model (it has a tokenizer): each entry's decoded_token is its token
    decoded alone, for the prompt's entries and the sampled tokens' alike."""
    from pagedlm.data import tiny_model
    llm = LLM(tiny_model("target"), device="cpu", num_blocks=64)
    out = llm.generate("def add(a, b):", SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2),
                       use_tqdm=False)[0]
    entries = out.prompt_logprobs[1:] + out.outputs[0].logprobs
    assert len(entries) == len(out.prompt_token_ids) - 1 + 4
    for entry in entries:
        for token, value in entry.items():
            assert value.decoded_token == llm.tokenizer.decode([token])
    assert [list(e)[0] for e in out.prompt_logprobs[1:]] == out.prompt_token_ids[1:]
