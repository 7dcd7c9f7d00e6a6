"""Shared-prefix (cascade) decode in the engine (engine/cascade.py): the groups plan() finds in
block tables, and engines that cascade emitting exactly what engines that do not emit, for the
three ways rows come to share a prefix: n > 1 samples, beam search, prefix-cache hits."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.engine import cascade

from llama_checkpoint import save_random_checkpoint

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
BLOCK = 16


@pytest.fixture(autouse=True)
def small_savings_cascade(monkeypatch):
    """These engines are small: let any saving cascade (the default waits for 16K tokens)."""
    monkeypatch.setattr(cascade, "MIN_SAVED_TOKENS", 0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cascade") / "model"
    save_random_checkpoint(folder, TINY, seed=3)
    return folder


def prompt(length, seed):
    return torch.randint(97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def engines(model, **kwargs):
    """(an LLM that cascades, one that does not), otherwise alike."""
    return (LLM(model, device="cpu", block_size=BLOCK, num_blocks=1024, disable_cascade_attn=False, **kwargs),
            LLM(model, device="cpu", block_size=BLOCK, num_blocks=1024, disable_cascade_attn=True, **kwargs))


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


def test_parallel_samples_cascade_and_emit_what_plain_decode_emits(model):
    """n = 4 seeded samples (and greedy ones) of a 300-token prompt share 18 full blocks (288
    tokens, past MIN_PREFIX_TOKENS): their decode steps cascade and give the same tokens."""
    prompts = [prompt(300, 1), prompt(40, 2)]
    params = [SamplingParams(n=4, temperature=0.8, seed=7, max_tokens=12, ignore_eos=True, logprobs=0),
              SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)]
    on, off = engines(model)
    ours, theirs = on.generate(prompts, params, use_tqdm=False), off.generate(prompts, params, use_tqdm=False)
    assert tokens(ours) == tokens(theirs)
    assert_same_logprobs(ours, theirs)
    assert on.runner.cascade_steps > 0 and off.runner.cascade_steps == 0


def assert_same_logprobs(ours, theirs):
    """The sampled tokens' log-probabilities agree to float32 rounding: the cascade attends to
    exactly the tokens plain decode does."""
    for a, b in zip(ours, theirs):
        for x, y in zip(a.outputs, b.outputs):
            got = [d[t].logprob for d, t in zip(x.logprobs, x.token_ids)]
            want = [d[t].logprob for d, t in zip(y.logprobs, y.token_ids)]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_prefix_cache_hits_cascade(model):
    """Five requests for one 280-token prompt: the later ones take the first's blocks from the
    prefix cache, so their decodes share them."""
    prompts = [prompt(280, 5)] * 5
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    on, off = engines(model)
    ours, theirs = on.generate(prompts, params, use_tqdm=False), off.generate(prompts, params, use_tqdm=False)
    assert tokens(ours) == tokens(theirs)
    assert_same_logprobs(ours, theirs)
    assert on.runner.cascade_steps > 0


def test_beam_search_cascades_to_the_same_beams(model, monkeypatch):
    calls = []
    plan = cascade.plan
    monkeypatch.setattr("pagedlm.engine.forward.cascade_plan", lambda *a: calls.append(plan(*a)) or calls[-1])
    params = BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True)
    on, off = engines(model)
    ours, theirs = on.beam_search([prompt(270, 9)], params), off.beam_search([prompt(270, 9)], params)
    assert [o.token_ids for o in ours[0].outputs] == [o.token_ids for o in theirs[0].outputs]
    assert any(p is not None for p in calls)


def test_disable_cascade_attn_is_checked(model):
    with pytest.raises(ValueError, match="disable_cascade_attn"):
        LLM(model, device="cpu", num_blocks=64, disable_cascade_attn="no")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_plan_covers_each_row_exactly(data):
    """Rows built as groups sharing leading blocks (some groups of one, some prefixes short):
    when plan() cascades, each row's prefix then suffix is exactly its own blocks and lengths,
    a prefix holds only blocks before the row's new token, and groups are contiguous runs of
    rows with one first block."""
    block_size = data.draw(st.sampled_from([1, 4, 16]))
    rows, lens, next_block = [], [], 0
    for _ in range(data.draw(st.integers(1, 6))):
        shared = data.draw(st.integers(1, 40))
        common = list(range(next_block, next_block + shared))
        next_block += shared
        for _ in range(data.draw(st.integers(1, 4))):
            extra = data.draw(st.integers(0, 5))
            own = list(range(next_block, next_block + extra))
            next_block += extra
            table = common[:data.draw(st.integers(1, shared))] + own
            rows.append(table)
            lens.append((len(table) - 1) * block_size + data.draw(st.integers(1, block_size)))
    order = data.draw(st.permutations(range(len(rows))))
    rows, lens = [rows[i] for i in order], [lens[i] for i in order]
    width = max(map(len, rows))
    tables = np.full((len(rows), width), -1, dtype=np.int32)
    for i, table in enumerate(rows):
        tables[i, :len(table)] = table
    result = cascade.plan(tables, lens, block_size, min_prefix_tokens=0, min_saved_tokens=0)
    if result is None:  # only when each group (one first block) has a row with no full block before its token
        firsts = tables[:, 0].tolist()
        assert all(min((lens[i] - 1) // block_size for i in range(len(rows)) if firsts[i] == t) == 0
                   for t in set(firsts) if firsts.count(t) > 1)
        return
    groups = np.searchsorted(result.group_indptr[1:], np.arange(len(rows)), side="right")
    assert sorted(result.order.tolist()) == list(range(len(rows)))
    for i, row in enumerate(result.order):
        g = groups[i]
        prefix_blocks = result.prefix_lens[g] // block_size
        assert result.prefix_lens[g] % block_size == 0 and prefix_blocks * block_size < lens[row]
        prefix = result.prefix_tables[g, :prefix_blocks].tolist()
        suffix = result.suffix_tables[i, :-(-int(result.suffix_lens[i]) // block_size)].tolist()
        assert prefix + suffix == rows[row]
        assert result.prefix_lens[g] + result.suffix_lens[i] == lens[row]
        assert tables[row, 0] == tables[result.order[result.group_indptr[g]], 0]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    """TINY with head dim 64, which the CUDA kernels take."""
    folder = tmp_path_factory.mktemp("cascade-gpu") / "model"
    save_random_checkpoint(folder, dict(TINY, hidden_size=256, intermediate_size=224), seed=3)
    return folder


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cascade_on_the_gpu_equals_plain_decode(gpu_model, enforce_eager):
    """On CUDA, in float32, through the cascade graphs (and eagerly): n = 4 seeded samples and a
    prefix-cache hit emit plain decode's tokens, with log-probabilities equal to float32 rounding."""
    prompts = [prompt(300, 1), prompt(300, 1), prompt(30, 2)]
    params = [SamplingParams(n=4, temperature=0.8, seed=7, max_tokens=16, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0),
              SamplingParams(n=2, temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)]
    on, off = (LLM(gpu_model, device="cuda", dtype="float32", block_size=BLOCK, num_blocks=1024,
                   enforce_eager=enforce_eager, disable_cascade_attn=disable) for disable in (False, True))
    ours, theirs = on.generate(prompts, params, use_tqdm=False), off.generate(prompts, params, use_tqdm=False)
    assert tokens(ours) == tokens(theirs)
    assert_same_logprobs(ours, theirs)
    assert on.runner.cascade_steps > 0


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_random_batches_emit_what_plain_decode_emits(model, data):
    """Random batches where prompts share leading tokens (a common stem, repeated prompts, n > 1
    samples), random block sizes and lengths: an engine that cascades every shared block emits
    the tokens and log-probabilities of one that never does."""
    block_size = data.draw(st.sampled_from([1, 3, 8, 16]))
    stem = prompt(data.draw(st.integers(1, 90)), data.draw(st.integers(0, 99)))
    prompts, params = [], []
    for i in range(data.draw(st.integers(1, 5))):
        tail = prompt(data.draw(st.integers(0, 20)), 1000 + i)
        prompts.append(stem + tail if data.draw(st.booleans()) else prompts[-1] if prompts else stem)
        params.append(SamplingParams(n=data.draw(st.integers(1, 3)), temperature=data.draw(st.sampled_from([0, 0.7])),
                                     seed=i, max_tokens=data.draw(st.integers(1, 9)), ignore_eos=True, logprobs=0))
    on, off = (LLM(model, device="cpu", block_size=block_size, num_blocks=512, disable_cascade_attn=disable)
               for disable in (False, True))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cascade, "MIN_PREFIX_TOKENS", 0)  # every shared block cascades
        ours = on.generate(prompts, params, use_tqdm=False)
    theirs = off.generate(prompts, params, use_tqdm=False)
    assert tokens(ours) == tokens(theirs)
    assert_same_logprobs(ours, theirs)
