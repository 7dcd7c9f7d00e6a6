"""pagedlm.LLM on the GPU: f32 greedy output equal to transformers', bf16 greedy choices that
transformers' own logits agree with (within bf16 tolerance), CUDA-graph decode and prompt-chunk
steps equal to eager, and preemption, prefix caching and seeded sampling unchanged from the CPU."""
import pytest
import torch

from pagedlm import LLM, SamplingParams

from llama_checkpoint import save_llama
from model_families import assert_choices_near_best

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu

TINY = dict(vocab_size=211, hidden_size=256, intermediate_size=224, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.05)
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-gpu")
    return folder, save_llama(folder, TINY)


def prompts(count, seed=1, low=3, high=90):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(TINY["vocab_size"], (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def engine(folder, device="cuda", **kwargs):
    """An LLM with a small fixed cache (the default would take 90% of the GPU's free memory)."""
    kwargs.setdefault("num_blocks", 2048)
    kwargs.setdefault("dtype", torch.float32)
    return LLM(folder, device=device, **kwargs)


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


def reference_greedy(reference, prompt, count):
    """Greedy tokens from transformers' logits, one full forward per token (EOS is a token like
    any other here, as with ignore_eos; generate's min_new_tokens would suppress it instead)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(reference(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_f32_greedy_equals_transformers(checkpoint):
    folder, reference = checkpoint
    reference = reference.to("cuda")
    batch = prompts(7)
    outputs = engine(folder, block_size=16).generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, GREEDY.max_tokens)


def test_bf16_greedy_choices_agree_with_transformers_logits(checkpoint):
    """bf16 rounding may flip a near-tie, so compare choices, not sequences: at every step the
    token pagedlm picked must be within bf16 tolerance of the best under transformers' bf16
    logits for the same prefix, and the log-probabilities must agree."""
    folder, reference = checkpoint
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    batch = prompts(9, seed=2)
    outputs = engine(folder, dtype=torch.bfloat16, block_size=16).generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        chosen = out.outputs[0].token_ids
        steps = assert_choices_near_best(reference, prompt, chosen)
        logprob = steps.log_softmax(-1).gather(-1, torch.tensor(chosen, device="cuda")[:, None]).sum()
        assert out.outputs[0].cumulative_logprob == pytest.approx(float(logprob), abs=0.05 * len(chosen))


@pytest.mark.parametrize("count, block_size", [(1, 16), (5, 16), (19, 4)])
def test_cuda_graph_decode_equals_eager(checkpoint, count, block_size):
    folder, _ = checkpoint
    batch = prompts(count, seed=3 + count, high=300)  # at block_size 4 some tables pass 64 blocks (a wider graph)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = engine(folder, block_size=block_size, enforce_eager=True)
    graphed = engine(folder, block_size=block_size, max_num_seqs=32)
    expected = eager.generate(batch, params, use_tqdm=False)
    got = graphed.generate(batch, params, use_tqdm=False)
    assert graphed.runner.graphs.replays > 0 and eager.runner.graphs is None
    assert tokens(got) == tokens(expected)
    for a, b in zip(got, expected):
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("budget", [48, 300])
def test_cuda_graph_prompt_chunks_equal_eager(checkpoint, budget):
    """A small token budget makes prompt chunks join the running sequences' decodes step after
    step: chunks graphs (decode rows through the decode kernel, the rest through the prefill
    kernel) emit what eager steps do."""
    folder, _ = checkpoint
    batch = prompts(12, seed=21, high=400)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = engine(folder, block_size=16, enforce_eager=True, max_num_batched_tokens=budget).generate(
        batch, params, use_tqdm=False)
    graphed = engine(folder, block_size=16, max_num_seqs=32, max_num_batched_tokens=budget)
    got = graphed.generate(batch, params, use_tqdm=False)
    assert graphed.runner.varlen.chunk_replays > 0, "no step replayed a chunks graph"
    assert tokens(got) == tokens(expected)
    for a, b in zip(got, expected):
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_async_scheduling_emits_what_waiting_steps_emit(checkpoint, dtype):
    """Decode steps launched while the one before runs (their input tokens taken on the device
    from it, seeded draws among them) emit the tokens and log-probabilities of the same engine
    without async scheduling, with EOS ending some sequences at a token in flight and a stop id
    others."""
    folder, _ = checkpoint
    waiting = engine(folder, block_size=16, dtype=dtype, max_num_seqs=16, async_scheduling=False)
    batch = prompts(9, seed=31, high=200)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 30, 17, 1, 30, 8, 25)]
    params += [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=30, ignore_eos=True) for s in (1, 2)]
    overlapped = engine(folder, block_size=16, dtype=dtype, max_num_seqs=16, async_scheduling=True)
    launches = []
    launch = overlapped.runner.launch
    overlapped.runner.launch = lambda *args: launches.append(args[2] is not None) or launch(*args)
    expected = waiting.generate(batch, params, use_tqdm=False)
    assert tokens(overlapped.generate(batch, params, use_tqdm=False)) == tokens(expected)
    assert sum(launches) >= 20, "few steps launched while another was in flight"
    stops = [r.outputs[0].token_ids[min(5, len(r.outputs[0].token_ids) - 1)] for r in expected]
    eos_params = [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[s]) for s in stops]
    waiting.eos_token_ids = overlapped.eos_token_ids = {expected[1].outputs[0].token_ids[9]}
    expected = waiting.generate(batch, eos_params, use_tqdm=False)
    got = overlapped.generate(batch, eos_params, use_tqdm=False)
    assert [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in got] == \
        [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in expected]
    # A sequence ending at a token in flight is in one step more than without async scheduling,
    # so some steps' batches differ (another graph bucket, other matmul kernels): the
    # log-probabilities agree to the rounding of the model's dtype (each token's within 1e-4 in
    # float32; bfloat16 logits differ in their last bit, 1e-3 a token), not bit for bit.
    per_token = 1e-4 if dtype == torch.float32 else 1e-3
    for a, b in zip(got, expected):
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob,
                                                                abs=per_token * len(b.outputs[0].token_ids))
    assert overlapped.block_manager.stats()["used_blocks"] == 0 and not overlapped._flights


def test_async_scheduling_overlaps_prompt_chunks_and_admissions(checkpoint):
    """Prompt chunks (a small token budget) and requests admitted as others end (more requests
    than sequences) launch while a step is in flight, chunks graphs and eager steps fed on the
    device: the same tokens as waiting steps. float32: a step's batch differs between the two
    engines (admissions come a step later), which in bfloat16 may flip a near tie."""
    folder, _ = checkpoint
    batch = prompts(24, seed=33, low=20, high=300)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (4, 19, 9, 27) * 5]
    params += [SamplingParams(temperature=0.7, seed=s, max_tokens=12, ignore_eos=True) for s in range(4)]
    for budget in (64, 4096):  # chunks graphs; eager steps of whole prompts
        options = dict(block_size=16, dtype=torch.float32, max_num_seqs=8, max_num_batched_tokens=budget)
        expected = engine(folder, async_scheduling=False, **options).generate(batch, params, use_tqdm=False)
        overlapped = engine(folder, async_scheduling=True, **options)
        fed_chunks = []
        launch = overlapped.runner.launch

        def counted(scheduled, copies, in_flight):
            fed_chunks.append(in_flight is not None and any(s.seq.num_cached < len(s.seq.prompt) for s in scheduled))
            return launch(scheduled, copies, in_flight)
        overlapped.runner.launch = counted
        assert tokens(overlapped.generate(batch, params, use_tqdm=False)) == tokens(expected)
        assert sum(fed_chunks) >= 5, "few prompt chunks launched while a step was in flight"
        assert overlapped.block_manager.stats()["used_blocks"] == 0 and not overlapped._flights


def test_async_scheduling_is_on_by_default_where_supported(checkpoint):
    folder, _ = checkpoint
    assert engine(folder).async_scheduling
    assert not engine(folder, async_scheduling=False).async_scheduling
    assert not engine(folder, speculative={"method": "ngram", "num_tokens": 2, "max_ngram": 2}).async_scheduling
    assert not engine(folder, device="cpu").async_scheduling


def test_preemption_and_prefix_caching_change_nothing_on_gpu(checkpoint):
    folder, _ = checkpoint
    shared = prompts(1, seed=8, low=40, high=41)[0]
    batch = [shared + p for p in prompts(10, seed=9, low=1, high=30)]
    expected = tokens(engine(folder, block_size=4, enable_prefix_caching=False).generate(batch, GREEDY, use_tqdm=False))
    tight = engine(folder, block_size=4, num_blocks=60, max_num_batched_tokens=32)
    outputs = tight.generate(batch, GREEDY, use_tqdm=False)
    assert tokens(outputs) == expected
    assert tight.scheduler.preemptions > 0 and tight.block_manager.stats()["used_blocks"] == 0
    assert any(o.metrics["cached_prompt_tokens"] > 0 for o in outputs)


def test_seeded_sampling_matches_the_cpu(checkpoint):
    folder, _ = checkpoint
    batch = prompts(4, seed=11)
    params = SamplingParams(n=2, temperature=0.9, top_k=50, top_p=0.95, max_tokens=12, seed=5, ignore_eos=True)
    on_gpu = engine(folder).generate(batch, params, use_tqdm=False)
    on_cpu = engine(folder, device="cpu").generate(batch, params, use_tqdm=False)
    assert tokens(on_gpu) == tokens(on_cpu)
    assert len({tuple(t) for r in tokens(on_gpu) for t in r}) > 1


def test_a_head_dim_without_cuda_kernels_is_refused_up_front(tmp_path):
    config = dict(TINY, hidden_size=160, num_attention_heads=2, num_key_value_heads=2)  # head_dim 80
    save_llama(tmp_path, config)
    with pytest.raises(ValueError, match="model: head_dim 80"):
        engine(tmp_path)
