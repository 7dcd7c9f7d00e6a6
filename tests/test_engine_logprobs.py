"""The engine's log-probabilities and its scheduling promises, checked against an independent
reference: transformers' forward of the final token sequence (teacher forcing) gives each
emitted token's log-probability, so cumulative_logprob must be their sum whether the run was
preempted, chunked, prefix-cached or forked, and not merely produce the same tokens. Also: stop
tokens, max_tokens, ignore_eos, aborting a waiting request, the token budget and max_num_seqs,
observed on every step."""
import math

import pytest
import torch

from pagedlm import LLM, SamplingParams

from llama_checkpoint import save_llama

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-logprobs")
    return folder, save_llama(folder, TINY)


def prompts(count, seed, low, high):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def reference_logprob(model, prompt, output, temperature=0.0):
    """Sum of log p(output[i] | prompt + output[:i]) from transformers' logits (divided by the
    temperature for a sampled request without top-k or top-p)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].double()
    rows = logits[len(prompt) - 1:len(prompt) - 1 + len(output)]
    if temperature:
        rows = rows / temperature
    return float(rows.log_softmax(-1)[torch.arange(len(output)), torch.tensor(output)].sum())


def check_against_reference(model, batch, outputs, temperature=0.0):
    for prompt, out in zip(batch, outputs):
        for completion in out.outputs:
            expected = reference_logprob(model, prompt, completion.token_ids, temperature)
            assert math.isclose(completion.cumulative_logprob, expected, rel_tol=1e-4, abs_tol=1e-4), (
                completion.cumulative_logprob, expected)


def test_preempted_runs_report_the_reference_log_probabilities(checkpoint):
    folder, model = checkpoint
    batch = prompts(8, seed=2, low=3, high=40)
    tight = LLM(folder, device="cpu", block_size=4, num_blocks=30)
    outputs = tight.generate(batch, GREEDY, use_tqdm=False)
    assert tight.scheduler.preemptions > 0
    assert all(len(o.outputs[0].token_ids) == 10 for o in outputs)
    check_against_reference(model, batch, outputs)


def test_chunked_and_prefix_cached_runs_report_the_reference_log_probabilities(checkpoint):
    folder, model = checkpoint
    shared = prompts(1, seed=3, low=30, high=31)[0]
    batch = [shared + [5, 6, 7], shared + [9]] + prompts(3, seed=5, low=20, high=60)
    llm = LLM(folder, device="cpu", block_size=4, max_num_batched_tokens=16)
    llm.generate([shared], GREEDY, use_tqdm=False)
    outputs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert llm.block_manager.stats()["prefix_hit_tokens"] > 0
    check_against_reference(model, batch, outputs)


def test_forked_samples_report_their_own_log_probabilities(checkpoint):
    folder, model = checkpoint
    batch = prompts(2, seed=6, low=10, high=20)
    params = SamplingParams(n=3, temperature=0.7, max_tokens=8, seed=11, ignore_eos=True)
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=40)
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert len({tuple(c.token_ids) for c in outputs[0].outputs}) > 1  # the forks sampled apart
    check_against_reference(model, batch, outputs, temperature=0.7)


def test_preemption_with_forked_samples_keeps_tokens_and_log_probabilities(checkpoint):
    folder, model = checkpoint
    batch = prompts(6, seed=8, low=5, high=15)
    params = SamplingParams(n=2, temperature=0.9, max_tokens=20, seed=5, ignore_eos=True)
    roomy = LLM(folder, device="cpu", block_size=4).generate(batch, params, use_tqdm=False)
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=16, max_num_batched_tokens=16)
    tight = llm.generate(batch, params, use_tqdm=False)
    assert llm.scheduler.preemptions > 0
    for a, b in zip(roomy, tight):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        for x, y in zip(a.outputs, b.outputs):
            assert math.isclose(x.cumulative_logprob, y.cumulative_logprob, rel_tol=1e-4, abs_tol=1e-4)
    check_against_reference(model, batch, tight, temperature=0.9)


def test_every_step_keeps_to_the_token_budget_and_max_num_seqs(checkpoint):
    folder, _ = checkpoint
    budget, max_seqs = 16, 3
    llm = LLM(folder, device="cpu", block_size=4, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    seen = []
    step = llm.runner.step

    def recording_step(scheduled, copies):
        seen.append((sum(s.num_new for s in scheduled), len(llm.scheduler.running)))
        return step(scheduled, copies)

    llm.runner.step = recording_step
    batch = prompts(5, seed=10, low=20, high=50)
    outputs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 10 for o in outputs)
    assert max(tokens for tokens, _ in seen) == budget  # prompts were chunked to fill it
    assert all(tokens <= budget and running <= max_seqs for tokens, running in seen)


def test_stop_tokens_max_tokens_and_eos(checkpoint):
    folder, _ = checkpoint
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    llm = LLM(folder, device="cpu", block_size=4)
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop,)),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    llm.eos_token_ids = frozenset([stop])
    eos = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert eos.token_ids == free.token_ids[:first + 1] and eos.finish_reason == "stop"
    ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"
    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert short.token_ids == free.token_ids[:1] and short.finish_reason == "length"


def test_aborting_a_waiting_request_drops_it_and_the_others_finish(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, max_num_seqs=1)
    running = llm.add_request([1, 2, 3], GREEDY)
    waiting = llm.add_request([4, 5, 6], GREEDY)
    llm.step()
    llm.abort(waiting)
    steps = 0
    while llm.scheduler.has_work():
        llm.step()
        steps += 1
    assert steps == 9                          # the running request's 9 remaining tokens, nothing else
    assert len(llm.take_output(running).outputs[0].token_ids) == 10
    aborted = llm.take_output(waiting).outputs[0]
    assert aborted.finish_reason == "abort" and aborted.token_ids == []
    assert llm.block_manager.stats()["used_blocks"] == 0


def test_aborting_a_running_request_frees_its_blocks_at_once(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, enable_prefix_caching=False)
    request = llm.add_request(list(range(1, 10)), GREEDY)
    llm.step()
    assert llm.block_manager.stats()["used_blocks"] == 3
    llm.abort(request)
    assert llm.block_manager.stats()["used_blocks"] == 0 and not llm.scheduler.has_work()
    assert llm.take_output(request).outputs[0].finish_reason == "abort"
