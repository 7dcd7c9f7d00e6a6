"""Speculative decoding on pagedlm.LLM is lossless: for every method, alone and batched, with
a draft equal to the target (everything accepted) and an unrelated one (almost nothing),
greedy outputs equal plain greedy decoding token for token, also under chunked prefill,
preemption and prefix caching; seeded sampled outputs do not depend on the batch; and the
sampled tokens follow the target's distribution (chi-square tests against the exact
distribution, for the draft method with a deliberately broken variant that must fail)."""
import pytest
import torch

import pagedlm
from pagedlm import LLM, SamplingParams
from pagedlm.speculative.pay_switch import MAX_PROBE_INTERVAL, PROBE_COST, PROBE_LENGTH, PaySwitch

from llama_checkpoint import save_llama

transformers = pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
OTHER = dict(TINY, hidden_size=32, intermediate_size=48, num_hidden_layers=1)

GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
# The timing switch (pay_switch.py) is off here so that acceptance metrics are deterministic;
# test_the_pay_switch_changes_no_greedy_token turns it on.
METHODS = {
    "ngram": dict(method="ngram", num_tokens=3, max_ngram=3, adaptive=False),
    "draft-same": dict(method="draft", model="target", num_tokens=4, adaptive=False),
    "draft-other": dict(method="draft", model="other", num_tokens=3, adaptive=False),
    "jacobi": dict(method="jacobi", num_tokens=4, adaptive=False),
    "lookahead": dict(method="lookahead", window=4, ngram=3, guesses=3, adaptive=False),
    "lookahead-window-pool": dict(method="lookahead", window=4, ngram=3, guesses=3, pool_from_prompt=False,
                                  adaptive=False),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    save_llama(root / "target", TINY, 0)
    save_llama(root / "other", OTHER, 1)
    return {"target": root / "target", "other": root / "other"}


def speculative(name, models):
    config = dict(METHODS[name])
    if "model" in config:
        config["model"] = models[config["model"]]
    return config


def prompts(count, seed=1, low=3, high=40):
    g = torch.Generator().manual_seed(seed)
    # Repeated snippets give prompt lookup and the n-gram pool something to find.
    return [(torch.randint(97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist() * 2)[:high]
            for _ in range(count)]


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


@pytest.fixture(scope="module")
def plain(models):
    cache = {}

    def run(batch, params=GREEDY, **kwargs):
        key = (repr(batch), params, repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = tokens(LLM(models["target"], device="cpu", block_size=4, num_blocks=256, **kwargs)
                                .generate(batch, params, use_tqdm=False))
        return cache[key]
    return run


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("batch_size", [1, 5])
def test_greedy_equals_plain_decoding(models, plain, name, batch_size):
    batch = prompts(batch_size)
    llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=256, speculative=speculative(name, models))
    outputs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert tokens(outputs) == plain(batch)
    metrics = [o.metrics for o in outputs]
    assert all(m["tokens_per_forward"] >= 1 and 0 <= m["acceptance_rate"] <= 1 for m in metrics)
    if name == "draft-same":
        assert all(m["acceptance_rate"] > 0.95 and m["tokens_per_forward"] > 3 for m in metrics)
    if name == "draft-other":
        assert sum(m["acceptance_rate"] for m in metrics) / len(metrics) < 0.5
        # The switch: rejected outright again and again, a sequence stops drafting for a while.
        assert all(0 < m["draft_steps"] < GREEDY.max_tokens - 4 for m in metrics)
    assert llm.block_manager.stats()["used_blocks"] == 0


@pytest.mark.parametrize("name", METHODS)
def test_the_pay_switch_changes_no_greedy_token(models, plain, name):
    batch = prompts(5, seed=2)
    llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=256,
              speculative=dict(speculative(name, models), adaptive=True))
    assert tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == plain(batch)
    assert llm.speculator.switch.steps > 0


def test_the_pay_switch_ignores_steps_that_captured_a_graph(models, monkeypatch):
    """A step that captured a CUDA graph spent tens of milliseconds on it: timing it would make
    its mode look slow (on the GPU, each first probe of drafting captured new graphs)."""
    import itertools

    llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=256,
              speculative=dict(speculative("ngram", models), adaptive=True))
    llm.generate(prompts(2, seed=4), GREEDY, use_tqdm=False)
    assert sum(llm.speculator.switch.recorded.values()) > 0
    every_step_captures = itertools.count()
    monkeypatch.setattr(type(llm.runner), "captures", property(lambda runner: next(every_step_captures)))
    recorded = dict(llm.speculator.switch.recorded)
    llm.generate(prompts(2, seed=5), GREEDY, use_tqdm=False)
    assert llm.speculator.switch.recorded == recorded


def test_the_pay_switch_gates_greedy_sequences_only(models, monkeypatch):
    monkeypatch.setattr(PaySwitch, "drafting", lambda self, batch_size: False)  # drafting never pays
    llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=256,
              speculative=dict(speculative("draft-same", models), adaptive=True))
    greedy, sampled = prompts(2, seed=3)
    ids = [llm.add_request(greedy, GREEDY),
           llm.add_request(sampled, SamplingParams(temperature=0.8, max_tokens=14, seed=1, ignore_eos=True))]
    while llm.scheduler.has_work():
        llm.step()
    greedy_out, sampled_out = (llm.take_output(i) for i in ids)
    assert greedy_out.metrics["draft_steps"] == 0 and sampled_out.metrics["draft_steps"] > 0
    assert greedy_out.metrics["tokens_per_forward"] == 1.0  # each of its steps the engine's plain step


def probe_starts(choices):
    return [i for i, drafted in enumerate(choices) if drafted and (i == 0 or not choices[i - 1])]


def test_pay_switch_drafts_while_drafting_emits_faster_and_probes_at_a_bounded_cost():
    switch = PaySwitch()
    assert switch.drafting(16) is True
    switch.record(16, True, tokens=2, seconds=1.0)    # drafting: 2 tokens/s
    assert switch.drafting(16) is False
    switch.record(16, False, tokens=3, seconds=1.0)   # plain: 3 tokens/s wins
    choices = [switch.drafting(16) for _ in range(2000)]
    # Probes of the losing mode last PROBE_LENGTH steps, spaced so that the time they lose
    # (each drafting step: 1 s for 2 tokens that plain decoding emits in 2/3 s) is about
    # PROBE_COST of all the time (every step lasts 1 s here).
    starts = probe_starts(choices)
    assert len(starts) > 10 and choices.count(True) == PROBE_LENGTH * len(starts)
    lost = choices.count(True) * (1 - 2 / 3) / len(choices)
    assert PROBE_COST * 0.9 < lost < PROBE_COST * 1.1
    for _ in range(20):                               # the text turns easy: drafting now emits 8 tokens/s
        switch.record(16, True, tokens=8, seconds=1.0)
    assert switch.rate(16, True) > switch.rate(16, False)
    choices = [switch.drafting(16) for _ in range(1000)]
    plain_probes = probe_starts([not drafted for drafted in choices])
    assert choices[0] is True and len(plain_probes) > 5  # now plain decoding is probed
    assert choices.count(False) == PROBE_LENGTH * len(plain_probes)


def test_pay_switch_spaces_probes_by_their_time_and_keeps_each_batch_size_apart():
    switch = PaySwitch()
    # Batch 16: a drafting step lasts 18 plain steps and emits 2 tokens/s against plain's 3.
    # Batch 1: drafting is hopeless, and its steps last 100 plain steps.
    for batch, tokens, seconds in ((16, 36, 18.0), (1, 1e-3, 100.0)):
        assert switch.drafting(batch) is True
        switch.record(batch, True, tokens=tokens, seconds=seconds)
        assert switch.drafting(batch) is False
        switch.record(batch, False, tokens=3, seconds=1.0)
    assert switch.drafting(4) is True                 # a batch size not yet measured starts over
    gaps = {}
    for batch in (16, 1):
        starts = probe_starts([switch.drafting(batch) for _ in range(10000)])
        gaps[batch] = [b - a for a, b in zip(starts, starts[1:])]
    lost = PROBE_LENGTH * 18.0 * (1 - 2 / 3)          # seconds a probe loses
    assert gaps[16] and all(abs(g - (lost / PROBE_COST + PROBE_LENGTH)) <= 1 for g in gaps[16])
    assert gaps[1] and all(g == MAX_PROBE_INTERVAL + PROBE_LENGTH for g in gaps[1])
    assert switch.drafting(17) is False               # 16 and 17 share a bucket


@pytest.mark.parametrize("name", METHODS)
def test_chunking_preemption_and_prefix_caching_change_nothing(models, plain, name):
    batch = prompts(8, seed=9, low=5, high=60)
    llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=40, max_num_batched_tokens=16,
              speculative=speculative(name, models))
    assert tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == plain(batch)
    assert llm.scheduler.preemptions > 0 and llm.block_manager.stats()["used_blocks"] == 0
    # Whatever speculation left in the prefix cache must serve these correctly: prompts that
    # extend the earlier ones (hits on committed blocks) and that diverge after their prompts.
    again = [p + [1, 2, 3] for p in batch[:4]] + [p + out[0][:5] for p, out in zip(batch[4:], plain(batch)[4:])]
    outputs = llm.generate(again, GREEDY, use_tqdm=False)
    assert tokens(outputs) == plain(again)
    assert sum(o.metrics["cached_prompt_tokens"] for o in outputs) > 0


@pytest.mark.parametrize("name", METHODS)
def test_seeded_sampling_does_not_depend_on_the_batch(models, name):
    target = [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4, 1]
    params = SamplingParams(n=2, temperature=0.8, top_k=30, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    config = speculative(name, models)
    alone = LLM(models["target"], device="cpu", block_size=4, num_blocks=256, speculative=config).generate(
        [target], params, use_tqdm=False)
    crowd = LLM(models["target"], device="cpu", block_size=4, num_blocks=256, seed=5, speculative=config).generate(
        prompts(4, seed=4) + [target], params, use_tqdm=False)
    assert tokens(alone)[0] == tokens(crowd)[-1]
    assert tokens(alone)[0][0] != tokens(alone)[0][1]  # the two samples are drawn independently


@pytest.mark.parametrize("name", METHODS)
def test_greedy_and_sampled_requests_mixed_with_chunked_prefills(models, plain, name):
    """Greedy requests keep plain decoding's tokens next to sampled ones and to long prompts
    prefilling in chunks; the sampled ones are reproducible. (Their tokens may differ from a
    run alone: here the token budget drops some of their drafts, and the draft shapes which
    tokens speculative sampling emits, not their distribution.)"""
    def run():
        llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=256, max_num_batched_tokens=24,
                  speculative=speculative(name, models))
        sampled = SamplingParams(temperature=0.7, max_tokens=10, seed=3, ignore_eos=True)
        ids = [llm.add_request(p, GREEDY) for p in greedy] + [llm.add_request(p, sampled) for p in greedy]
        ids += [llm.add_request(p, GREEDY) for p in long_prompts]
        while llm.scheduler.has_work():
            llm.step()
        return tokens([llm.take_output(i) for i in ids])
    greedy, long_prompts = prompts(3, seed=6), prompts(2, seed=7, low=50, high=70)
    outputs = run()
    assert outputs[:3] == plain(greedy) and outputs[6:] == plain(long_prompts)
    assert all(len(o[0]) == 10 for o in outputs[3:6]) and run() == outputs


def test_lookahead_pools_the_sequences_own_ngrams():
    """With pool_from_prompt the prompt's n-grams are candidates from the first step, and the
    n-grams that committed tokens end join them, newest last; without it the pool starts empty."""
    from pagedlm.engine.sequence import Sequence
    from pagedlm.speculative.lookahead import LookaheadProposer

    def candidate_paths(proposer, seq):
        draft = proposer.propose([seq], [10])[seq]
        paths = []
        for node in draft.candidates:
            path = []
            while node >= 0:
                path.insert(0, draft.tokens[node])
                node = draft.parents[node]
            paths.append(path)
        return [p for p in paths if not any(q[:len(p)] == p and q != p for q in paths)]  # the trie's leaves

    seq = Sequence(0, "0", 0, [5, 6, 7, 9, 5, 8, 1, 5], GREEDY)
    assert candidate_paths(LookaheadProposer(2, 3, 4, pool_from_prompt=False), seq) == []
    proposer = LookaheadProposer(2, 3, 4)
    assert candidate_paths(proposer, seq) == [[6, 7], [8, 1]]
    seq.output += [2, 4, 5]
    assert candidate_paths(proposer, seq) == [[6, 7], [8, 1], [2, 4]]


def test_a_draft_models_cache_shares_the_memory_budget(models):
    plain_blocks = LLM(models["target"], device="cpu").block_manager.num_blocks
    config = speculative("draft-other", models)
    assert LLM(models["target"], device="cpu", speculative=config).block_manager.num_blocks < plain_blocks


def test_bad_speculative_configs_name_the_key(models):
    for config, key in [(dict(method="medusa"), "speculative"), (dict(method="ngram", num_tokens=3), "speculative"),
                        (dict(method="ngram", num_tokens=0, max_ngram=2), "num_tokens"),
                        (dict(method="lookahead", window=3, ngram=1, guesses=2), "ngram"),
                        (dict(method="jacobi", num_tokens=2.5), "num_tokens"),
                        (dict(method="jacobi", num_tokens=2, adaptive="yes"), "adaptive"),
                        (dict(method="lookahead", window=3, ngram=2, guesses=2, pool_from_prompt=1), "pool_from_prompt"),
                        (dict(method="ngram", num_tokens=3, max_ngram=2, pool_from_prompt=True), "speculative")]:
        with pytest.raises(ValueError, match=key):
            LLM(models["target"], device="cpu", num_blocks=8, speculative=config)


# ---- the sampled distribution ------------------------------------------------------------
VOCAB = 4
SMALL = dict(TINY, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A target and a draft over 4 tokens whose distributions differ clearly (half the drafts
    are rejected), so a verification that trusted the draft would be caught."""
    root = tmp_path_factory.mktemp("small")
    torch.manual_seed(2)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(20)
    target.save_pretrained(root / "target")
    torch.manual_seed(3)
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(OTHER, vocab_size=VOCAB))).eval()
    with torch.no_grad():
        draft.lm_head.weight.mul_(8)
    draft.save_pretrained(root / "draft")
    return root / "target", root / "draft", target


def exact_distribution(model, prompt, length):
    """P(first `length` generated tokens) for every sequence, from transformers' logits."""
    sequences = torch.cartesian_prod(*[torch.arange(VOCAB)] * length).reshape(-1, length)
    inputs = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences], 1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(inputs).logits[:, len(prompt) - 1:-1].double(), -1)
    return logprobs.gather(-1, sequences.unsqueeze(-1)).sum((1, 2)).exp()


def sampled_p_value(llm, prompt, expected, samples):
    """Chi-square p-value of the first 3 tokens of `samples` samples against `expected`. Six
    are generated, so that verified drafts (lookahead's pool fills after one step) decide some
    of the first three; and the acceptance rate."""
    params = SamplingParams(n=samples, temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    request = llm.generate([prompt], params, use_tqdm=False)[0]
    outputs = request.outputs
    codes = torch.tensor([(o.token_ids[0] * VOCAB + o.token_ids[1]) * VOCAB + o.token_ids[2] for o in outputs])
    observed = torch.bincount(codes, minlength=VOCAB ** 3).double()
    keep = expected * samples >= 5  # pool the rare outcomes into one cell
    observed = torch.cat([observed[keep], observed[~keep].sum(0, keepdim=True)])
    expected = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)]) * samples
    p_value = scipy_stats.chisquare(observed.numpy(), expected.numpy()).pvalue
    return p_value, request.metrics["acceptance_rate"]


PROMPT = [1, 3, 0, 2, 2, 1, 3, 0]


def small_engine(target_dir, config):
    return LLM(target_dir, device="cpu", block_size=4, num_blocks=8192, max_num_seqs=4096, speculative=config)


@pytest.mark.parametrize("config", [dict(method="ngram", num_tokens=2, max_ngram=2),
                                    dict(method="lookahead", window=3, ngram=2, guesses=3)])
def test_deterministic_drafts_keep_the_target_distribution(small_pair, config):
    target_dir, _, target = small_pair
    p_value, acceptance = sampled_p_value(small_engine(target_dir, config), PROMPT,
                                          exact_distribution(target, PROMPT, 3), 2000)
    assert p_value > 1e-3 and acceptance > 0.05


def test_draft_sampling_follows_the_target_distribution(small_pair, monkeypatch):
    target_dir, draft_dir, target = small_pair
    expected = exact_distribution(target, PROMPT, 3)
    config = dict(method="draft", model=draft_dir, num_tokens=2)
    p_value, acceptance = sampled_p_value(small_engine(target_dir, config), PROMPT, expected, 3000)
    assert p_value > 1e-3
    assert 0.1 < acceptance < 0.9  # both accepted drafts and residual draws are exercised

    # Broken: a verification that trusts the draft (q taken to be p, so every draft is accepted)
    # emits the draft's distribution. (A one-hot q would not be broken: that is still exact.)
    verify = pagedlm.ops.verify_speculative
    monkeypatch.setattr(pagedlm.ops, "verify_speculative",
                        lambda drafted, q, p, **kw: verify(drafted, p[:, :-1].contiguous(), p, **kw))
    assert sampled_p_value(small_engine(target_dir, config), PROMPT, expected, 3000)[0] < 1e-6


def test_a_draft_models_cache_is_freed_when_its_sequence_finishes_or_is_aborted(models):
    """The engine reports finished and aborted sequences to the speculator at once (not when
    their outputs are taken), so the draft model's blocks go back while the batch runs on."""
    llm = LLM(models["target"], device="cpu", block_size=4, num_blocks=256,
              speculative=speculative("draft-other", models))
    draft_bm = llm.speculator.proposer.bm
    short, long_, aborted = (llm.add_request(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
                             for p, m in zip(prompts(3, seed=7), (3, 40, 40)))
    for _ in range(6):
        llm.step()
    holders = lambda: {s for s in llm.speculator.proposer.cached}  # noqa: E731
    seqs = {r: llm._requests[r]["seqs"][0] for r in (short, long_, aborted)}
    assert seqs[short].finish_reason == "length" and seqs[short] not in holders()
    assert {seqs[long_], seqs[aborted]} <= holders()
    used = draft_bm.num_blocks - draft_bm.num_free_blocks
    llm.abort(aborted)
    assert seqs[aborted] not in holders() and draft_bm.num_blocks - draft_bm.num_free_blocks < used
    while llm.scheduler.has_work():
        llm.step()
    assert not holders() and draft_bm.num_free_blocks == draft_bm.num_blocks
    assert all(llm.take_output(r).outputs[0].finish_reason in ("length", "abort") for r in (short, long_, aborted))
