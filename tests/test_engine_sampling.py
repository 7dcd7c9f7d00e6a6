"""SamplingParams' OpenAI/vLLM options through LLM.generate, against references computed apart
from the engine: transformers' logits of the final sequences (teacher forcing) for logprobs and
penalties, the decoded text for stop strings; and under speculative decoding, where these
requests decode without drafts and equal plain decoding."""
import numpy as np
import pytest
import torch

from pagedlm import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

from test_engine import checkpoint  # noqa: E402,F401  (the engine tests' tiny model, as a fixture)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint[0], device="cpu", block_size=4, num_blocks=256)


def prompts(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def reference_logits(model, prompt, output):
    """float64 [len(output), vocab]: the logits each output token was chosen from."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].double()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(output)].numpy()


def log_softmax(row):
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5),
    SamplingParams(temperature=0.9, top_k=20, seed=4, max_tokens=12, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=1.3, min_p=0.05, n=2, seed=5, max_tokens=12, ignore_eos=True, logprobs=0),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5, logprobs=2),
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={5: 3.0, 9: 2.0}, logprobs=2),
])
def test_logprobs_are_the_models_raw_log_softmax(checkpoint, llm, params):
    _, model = checkpoint
    batch = prompts(4, seed=1)
    outputs = llm.generate(batch, params, use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        for completion in out.outputs:
            assert len(completion.logprobs) == len(completion.token_ids)
            rows = reference_logits(model, prompt, completion.token_ids)
            for token, entry, row in zip(completion.token_ids, completion.logprobs, rows):
                expected = log_softmax(row)
                top = np.argsort(-expected, kind="stable")[:params.logprobs].tolist()
                assert list(entry)[0] == token
                assert set(entry) == {token, *top}
                for t, value in entry.items():
                    assert value == pytest.approx(expected[t], abs=1e-4)


def penalized(row, prompt, output, params):
    """vLLM's logit_bias and penalties on one logits row, from their definitions."""
    row = row.copy()
    for t, bias in (params.logit_bias or {}).items():
        row[t] += bias
    for t in set(prompt) | set(output):
        row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
    for t in set(output):
        row[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return row


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=2.0),
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=1.5),
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=2.0),
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=0.5, presence_penalty=-1.0),
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                   logit_bias={t: 0.3 * (t % 7) - 0.9 for t in range(0, 97, 3)}),
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias={5: 0.4, 9: -100.0, 11: 0.2},
                   repetition_penalty=3.0),
])
def test_greedy_tokens_are_the_argmax_of_the_penalized_reference_logits(checkpoint, llm, params):
    _, model = checkpoint
    batch = prompts(3, seed=2)
    plain = llm.generate(batch, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] != [o.outputs[0].token_ids for o in plain]
    for prompt, out in zip(batch, outputs):
        completion = out.outputs[0]
        for i, row in enumerate(reference_logits(model, prompt, completion.token_ids)):
            want = penalized(row, prompt, completion.token_ids[:i], params)
            chosen = completion.token_ids[i]
            assert want[chosen] >= want.max() - 1e-4, (i, chosen, int(want.argmax()))
        # cumulative_logprob: under the distribution the tokens were chosen from (penalized).
        rows = reference_logits(model, prompt, completion.token_ids)
        expected = sum(log_softmax(penalized(row, prompt, completion.token_ids[:i], params))[t]
                       for i, (row, t) in enumerate(zip(rows, completion.token_ids)))
        assert completion.cumulative_logprob == pytest.approx(expected, abs=1e-3)


def test_min_tokens_holds_back_stop_ids(llm):
    prompt = prompts(1, seed=3)[0]
    first = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    stop = first[0]
    assert llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]),
                        use_tqdm=False)[0].outputs[0].token_ids == [stop]
    held = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop], min_tokens=4),
                        use_tqdm=False)[0].outputs[0]
    assert stop not in held.token_ids[:4] and len(held.token_ids) >= 4


@pytest.mark.parametrize("method", [dict(method="ngram", num_tokens=3, max_ngram=3, adaptive=False),
                                    dict(method="jacobi", num_tokens=4, adaptive=False)])
def test_under_speculation_these_requests_decode_without_drafts_and_equal_plain(checkpoint, llm, method):
    batch = [(p * 3)[:30] for p in prompts(4, seed=4)]  # repeats: something for n-grams to draft
    special = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, repetition_penalty=1.4),
               SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=2),
               SamplingParams(temperature=0.8, seed=9, max_tokens=14, ignore_eos=True, frequency_penalty=0.7,
                              logprobs=1),
               SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, min_tokens=3)]
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    spec = LLM(checkpoint[0], device="cpu", block_size=4, num_blocks=256, speculative=method)
    params = special + [plain] * len(batch)
    got = spec.generate(batch + batch, params, use_tqdm=False)
    want = llm.generate(batch + batch, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert (g.outputs[0].logprobs is None) == (w.outputs[0].logprobs is None)
        for a, b in zip(g.outputs[0].logprobs or [], w.outputs[0].logprobs or []):
            assert list(a) == list(b) and np.allclose(list(a.values()), list(b.values()), atol=1e-5)
    assert all(g.metrics["draft_steps"] == 0 for g in got[:len(special)])
    assert any(g.metrics["draft_steps"] > 0 for g in got[len(special):])


# -- stop strings, on the shipped code model (it has a tokenizer) ---------------------------------
@pytest.fixture(scope="module")
def code_llm():
    from pagedlm.data import tiny_model
    return LLM(tiny_model("target"), device="cpu")


def spanning_stop(llm, prompt, params):
    """A plain run's text and a stop string in it that spans a token boundary."""
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    pieces = [llm.tokenizer.decode(out.token_ids[:i]) for i in range(len(out.token_ids) + 1)]
    for i in range(2, len(out.token_ids)):
        # the last 2 characters of tokens[:i] and the first 2 of the next token's text
        before, after = pieces[i], pieces[i + 1]
        if len(before) >= 2 and len(after) >= len(before) + 2 and after.startswith(before):
            stop = before[-2:] + after[len(before):len(before) + 2]
            if out.text.find(stop) == len(before) - 2:
                return out, stop, i + 1
    pytest.skip("no token boundary to span")


def test_stop_strings_across_tokens_cut_the_text(code_llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = "def fibonacci(n):"
    out, stop, completing = spanning_stop(code_llm, prompt, params)
    cut = code_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "zzz"]),
                            use_tqdm=False)[0].outputs[0]
    at = out.text.find(stop)
    assert cut.finish_reason == "stop" and cut.text == out.text[:at]
    assert cut.token_ids == out.token_ids[:completing]  # up to the token that completed the stop string
    kept = code_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                                    include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == out.text[:at + len(stop)] and kept.token_ids == cut.token_ids
    # n > 1 sampled: each sample is cut at its own first stop string.
    sampled = code_llm.generate(prompt, SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=40, stop="\n"),
                                use_tqdm=False)[0].outputs
    free = code_llm.generate(prompt, SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=40),
                             use_tqdm=False)[0].outputs
    for s, f in zip(sampled, free):
        if "\n" in f.text:
            assert s.text == f.text[:f.text.find("\n")] and s.finish_reason == "stop"


def test_min_tokens_defers_stop_strings(code_llm):
    prompt = "def fibonacci(n):"
    free = code_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert free.text.startswith("\n")
    first = code_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop="\n"),
                              use_tqdm=False)[0].outputs[0]
    assert first.text == "" and len(first.token_ids) == 1
    later = code_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, stop="\n", min_tokens=3),
                              use_tqdm=False)[0].outputs[0]
    assert len(later.token_ids) > 3 and later.finish_reason == "stop"
    released = code_llm.tokenizer.decode(free.token_ids[:3])  # text of the first min_tokens tokens
    assert later.text.startswith(released) and "\n" not in free.text[len(released):len(later.text)]
    assert later.text == free.text[:len(later.text)]


def test_bad_options_are_refused_naming_them(llm):
    for kwargs, name in [(dict(min_p=1.5), "min_p"), (dict(presence_penalty=2.5), "presence_penalty"),
                         (dict(frequency_penalty=float("nan")), "frequency_penalty"),
                         (dict(repetition_penalty=0.0), "repetition_penalty"),
                         (dict(min_tokens=-1), "min_tokens"), (dict(max_tokens=4, min_tokens=5), "min_tokens"),
                         (dict(logprobs=-1), "logprobs"), (dict(logprobs=True), "logprobs"),
                         (dict(stop=[""]), "stop"), (dict(stop=5), "stop"),
                         (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
                         (dict(logit_bias={-1: 1.0}), "logit_bias"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
                         (dict(logit_bias={5: float("inf")}), "logit_bias"), (dict(logit_bias=[5]), "logit_bias")]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="stop: stop strings need a tokenizer"):
        llm.generate([1, 2, 3], SamplingParams(stop="x"), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs: 98 asked for"):
        llm.generate([1, 2, 3], SamplingParams(logprobs=98), use_tqdm=False)
    with pytest.raises(ValueError, match=r"logit_bias: token id 97 is not in the vocabulary \[0, 97\)"):
        llm.generate([1, 2, 3], SamplingParams(logit_bias={3: 1.0, 97: 1.0}), use_tqdm=False)
