"""Asynchronous scheduling (LLM(async_scheduling=True), engine/overlap.py) on the CPU, decode
graphs emulated (graph_stand_in): every engine emits exactly what the same engine without it
emits — under max_tokens, EOS and stop ids, seeded and unseeded sampling, aborts, requests
joining mid-run, logprobs and penalties (which do not overlap), a full KV cache, and a failing
launch — and it really overlaps:
steps launch while the one before is in flight, fed its tokens on the device. Slots reserved
with a placeholder are named once known, so the prefix cache serves generated tokens as before."""
import pytest
import torch

import pagedlm.engine.cuda_graphs as cuda_graphs
import pagedlm.engine.overlap as overlap
from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.engine.cuda_graphs import DecodeGraphs
from pagedlm.engine.varlen_graphs import VarlenGraphs

from engine_checks import write_garbage_kv
from graph_stand_in import replay_eagerly
from llama_checkpoint import save_random_checkpoint

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
MAX_SEQS = 8


@pytest.fixture(autouse=True)
def eager_capture(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture", replay_eagerly)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("async") / "model"
    save_random_checkpoint(folder, TINY, seed=5)
    return folder


def engine(model, async_scheduling, **options):
    """An LLM on the CPU with the decode and varlen graphs a GPU engine has (emulated); with
    async_scheduling, its launches are counted in .launches (batch size, whether a step was in
    flight), and in .fed_chunks those with prompt tokens launched while a step was in flight."""
    options = dict(dict(block_size=4, num_blocks=512), **options)
    llm = LLM(model, device="cpu", max_num_seqs=MAX_SEQS, async_scheduling=async_scheduling, **options)
    llm.runner.graphs = DecodeGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device)
    llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    llm.launches, llm.fed_chunks = [], 0
    launch = llm.runner.launch

    def counted(scheduled, copies, in_flight):
        llm.launches.append((len(scheduled), in_flight is not None))
        llm.fed_chunks += in_flight is not None and any(s.seq.num_cached < len(s.seq.prompt) for s in scheduled)
        return launch(scheduled, copies, in_flight)
    llm.runner.launch = counted
    return llm


def prompts(count, seed=1, low=3, high=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def drain(llm, ids):
    while llm.scheduler.has_work() or llm._flights:
        llm.step()
    return [llm.take_output(r) for r in ids]


def results(outputs):
    """Tokens, finish reasons and cumulative logprobs to 5 significant digits: a float32 logprob
    depends in its last bits on the rest of its step's batch (the CPU's matmuls block by batch
    size), and async scheduling admits requests into other steps' batches."""
    return [[(o.token_ids, o.finish_reason, float(f"{o.cumulative_logprob:.5g}")) for o in r.outputs]
            for r in outputs]


def both(model, batch, params, **options):
    """(outputs of the engine without, outputs with async scheduling, the latter's launches)."""
    plain = results(engine(model, False, **options).generate(batch, params, use_tqdm=False))
    llm = engine(model, True, **options)
    overlapped = results(llm.generate(batch, params, use_tqdm=False))
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks, "blocks leaked"
    assert not llm._flights and all(s.in_flight == 0 for r in llm._requests.values() for s in r["seqs"])
    return plain, overlapped, llm.launches


def test_greedy_decoding_overlaps_and_emits_the_same_tokens(model):
    batch = prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 5, 17, 9, 12, 2)]
    plain, overlapped, launches = both(model, batch, params)
    assert overlapped == plain
    fed = [size for size, in_flight in launches if in_flight]
    assert len(fed) >= 10 and max(fed) >= 3, "steps did not launch while another was in flight"
    assert all(size <= 6 for size, _ in launches)


def test_eos_and_stop_ids_end_sequences_at_the_same_token(model):
    """A sequence ending at a token in flight has had one more step computed for nothing; it is
    dropped, and the blocks go back."""
    batch = prompts(6, seed=2)
    reference = engine(model, False).generate(batch, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                              use_tqdm=False)
    # Stop at tokens the sequences do produce, at different steps.
    stops = [r.outputs[0].token_ids[3 + i % 5] for i, r in enumerate(reference)]
    params = [SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[s]) for s in stops]
    plain, overlapped, _ = both(model, batch, params)
    assert overlapped == plain and any(o[0][1] == "stop" for o in plain)
    eos = reference[0].outputs[0].token_ids[6]
    plain_llm, async_llm = engine(model, False), engine(model, True)
    plain_llm.eos_token_ids = async_llm.eos_token_ids = {eos}
    params = SamplingParams(temperature=0, max_tokens=16)
    assert (results(async_llm.generate(batch, params, use_tqdm=False))
            == results(plain_llm.generate(batch, params, use_tqdm=False)))


def test_sampled_requests_overlap_and_draw_the_same_tokens(model):
    """A draw depends on the sequence's seed and the position it fills, which for a step
    launched ahead lies past the tokens in flight: the same draws as steps that wait."""
    batch = prompts(5, seed=8)
    params = [SamplingParams(temperature=0.9, seed=7, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=1.3, top_k=12, top_p=0.8, seed=3, max_tokens=11, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=0.6, min_p=0.1, max_tokens=9, ignore_eos=True),  # the engine's seed
              SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=13, ignore_eos=True)]
    plain, overlapped, launches = both(model, batch, params)
    assert overlapped == plain
    assert max(size for size, fed in launches if fed) == 6


def test_logprobs_and_penalized_requests_run_without_overlap_and_as_before(model):
    batch = prompts(5, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, logprobs=2, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.2, max_tokens=3, ignore_eos=True)]
    plain, overlapped, launches = both(model, batch, params)
    assert overlapped == plain
    assert launches and all(size == 3 for size, _ in launches), "only once the other two have ended"


def test_requests_joining_and_aborted_mid_run(model):
    """A request added between steps is admitted by a step launched while the one before is in
    flight; an aborted one keeps what it had emitted and drops its tokens in flight."""
    batch = prompts(7, seed=4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    runs = []
    for async_scheduling in (False, True):
        llm = engine(model, async_scheduling)
        ids = [llm.add_request(p, params) for p in batch[:4]]
        steps = 0
        while llm.scheduler.has_work() or llm._flights:
            llm.step()
            steps += 1
            if steps == 6:
                ids += [llm.add_request(p, params) for p in batch[4:]]
            if steps == 9:
                llm.abort(ids[1])
        outputs = [llm.take_output(r) for r in ids]
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        runs.append(results(outputs))
    (plain, overlapped) = runs
    assert overlapped[:1] + overlapped[2:] == plain[:1] + plain[2:]
    aborted, reference = overlapped[1][0][0], plain[1][0][0]
    assert overlapped[1][0][1] == "abort" and aborted == reference[:len(aborted)] and len(aborted) >= 3


def test_prompt_chunks_and_admissions_overlap_the_steps_in_flight(model):
    """Prompts longer than the token budget, prefilled in chunks beside the decodes, and requests
    admitted (a group of n = 2 forks among them) while others decode: those steps launch with
    a step in flight too, and emit what the engine without async scheduling does."""
    batch = prompts(12, seed=9, low=20, high=60)  # more sequences than MAX_SEQS
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 9, 14, 6, 11, 8) * 2]
    params[7] = SamplingParams(n=2, temperature=0.7, seed=5, max_tokens=7, ignore_eos=True)
    for budget in (24, 61):
        llm = engine(model, True, max_num_batched_tokens=budget)
        overlapped = results(llm.generate(batch, params, use_tqdm=False))
        plain = results(engine(model, False, max_num_batched_tokens=budget).generate(batch, params, use_tqdm=False))
        assert overlapped == plain
        assert llm.fed_chunks >= 3, "no prompt chunk launched while a step was in flight"
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_graph_captured_while_a_step_is_in_flight_leaves_its_tokens_alone(model):
    """Varlen graphs share their output buffers, and capturing one runs its forward once: a step
    launched while another is in flight, whose shape is new, must not read the capture's output
    as the input tokens of the step in flight (a launched step keeps its own copy of its tokens)."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    runs = []
    for async_scheduling in (False, True):
        llm = engine(model, async_scheduling, max_num_batched_tokens=64)
        ids = [llm.add_request([5, 6, 7], params)]
        llm.step(), llm.step()
        ids.append(llm.add_request([9, 10, 11, 12, 13], params))  # a prompt beside a decode: a new chunks shape
        llm.step()
        ids.append(llm.add_request(list(range(3, 23)), params))
        runs.append(results(drain(llm, ids)))
        captures = llm.runner.varlen.captures
    assert runs[1] == runs[0] and captures >= 2


def test_prompt_logprobs_waiting_for_admission_land_the_step_in_flight(model):
    """A waiting request that asks for prompt logprobs, or a running one owed them, keeps every
    step from overlapping until it is done; the outputs (its prompt logprobs too) are as without."""
    batch = prompts(4, seed=10, low=12, high=30)
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)] * 3
    params.append(SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, ignore_eos=True))
    runs = []
    for async_scheduling in (False, True):
        llm = engine(model, async_scheduling, max_num_batched_tokens=16)
        ids = [llm.add_request(p, sp) for p, sp in zip(batch, params)]
        outputs = drain(llm, ids)
        runs.append((results(outputs), [[sorted(e.items()) if e else e for e in o.prompt_logprobs]
                                        for o in outputs[3:]]))
    assert runs[1] == runs[0]


def test_a_full_cache_falls_back_to_steps_that_wait(model):
    """With few free blocks the next step cannot reserve ahead: such steps run as without
    async scheduling (preempting as it does), and the tokens are the same."""
    batch = prompts(8, seed=5, low=10, high=20)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, overlapped, launches = both(model, batch, params, num_blocks=48)
    assert overlapped == plain and launches


def test_generated_tokens_enter_the_prefix_cache_as_without_it(model):
    """A prompt that repeats a finished request's prompt and output hits the blocks its decode
    steps wrote, placeholders named: as many cached tokens as without async scheduling."""
    prompt = prompts(1, seed=6, low=9, high=10)[0]
    params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
    hits = []
    for async_scheduling in (False, True):
        llm = engine(model, async_scheduling)
        output = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        follow_up = llm.generate([prompt + output + [1, 2]], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        hits.append((output, follow_up.metrics["cached_prompt_tokens"]))
    assert hits[0] == hits[1] and hits[1][1] >= 28


def test_a_failing_launch_fails_its_requests_and_the_engine_goes_on(model):
    """A launch that raises: the step in flight before it lands, the failed step is rolled back
    and blamed as any failed step, and the engine serves new requests."""
    llm = engine(model, True)
    launch, calls = llm.runner.launch, []

    def failing(scheduled, copies, in_flight):
        calls.append(in_flight is not None)
        if len(calls) == 4:
            raise RuntimeError("injected launch failure")
        return launch(scheduled, copies, in_flight)
    llm.runner.launch = failing
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompts(3, seed=7), params, use_tqdm=False)
    assert not llm._flights and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    llm.runner.launch = launch
    again = results(llm.generate(prompts(3, seed=7), params, use_tqdm=False))
    assert again == results(engine(model, False).generate(prompts(3, seed=7), params, use_tqdm=False))


@pytest.mark.parametrize("options", [dict(speculative={"method": "ngram", "num_tokens": 2, "max_ngram": 2}),
                                     dict(async_scheduling="yes")])
def test_refused_options_name_async_scheduling(model, options):
    with pytest.raises((ValueError, TypeError), match="async_scheduling"):
        LLM(model, device="cpu", num_blocks=64, **dict(dict(async_scheduling=True), **options))


def test_by_default_off_on_the_cpu_and_with_speculation(model):
    assert not LLM(model, device="cpu", num_blocks=64).async_scheduling
    assert not LLM(model, device="cpu", num_blocks=64, speculative={"method": "ngram", "num_tokens": 2,
                                                                     "max_ngram": 2}).async_scheduling


@pytest.mark.parametrize("fail", ["garbage", "plain_raise", "none"])
def test_a_failed_launch_leaves_no_unwritten_block_in_the_prefix_cache(model, fail):
    """A launch fails after reserving a placeholder that fills a block, and the step before it
    lands a stop id there, ending the sequence: the failed step is rolled back before that
    landing, so the block (its last slot's KV never computed) is not cached under the real
    tokens, and a later prompt through it decodes as on the engine without async scheduling."""
    prompt = prompts(1, seed=6, low=9, high=10)[0]  # 9 tokens
    P = len(prompt)
    ref = engine(model, False).generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                        use_tqdm=False)[0].outputs[0].token_ids
    # output[j] sits at position P + j; want it at a block's last slot and first of its kind.
    j = next(j for j in range(2, 16) if (P + j) % 4 == 3 and ref[j] not in ref[:j])
    params = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ref[j]])
    follow_up = prompt + ref[:j + 1] + [1, 2, 3]
    follow_params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    plain = engine(model, False)
    plain.generate([prompt], params, use_tqdm=False)
    expected = plain.generate([follow_up], follow_params, use_tqdm=False)[0].outputs[0].token_ids

    llm = engine(model, True)
    launch, calls = llm.runner.launch, []

    def failing(scheduled, copies, in_flight):
        calls.append(1)
        # The launch whose placeholder is output[j]'s slot: the first launch prefills the prompt
        # and draws output[0], the k-th takes output[k - 2] in flight as its input.
        if fail != "none" and len(calls) == j + 2:
            # a step that fails midway, after writing its KV slots (as the engine fuzz's bad requests)
            if fail == "garbage":
                write_garbage_kv(llm, [s.seq.seq_id for s in scheduled], [s.num_new for s in scheduled])
            raise RuntimeError("injected launch failure")
        return launch(scheduled, copies, in_flight)
    llm.runner.launch = failing
    rid = llm.add_request(prompt, params)
    try:
        while llm.scheduler.has_work() or llm._flights:
            llm.step()
    except RuntimeError as e:
        assert "injected" in str(e)
    assert len(calls) >= j + 2
    out = llm.take_output(rid).outputs[0]
    assert (out.token_ids, out.finish_reason) == (ref[:j + 1], "stop")  # it ended normally
    llm.runner.launch = launch
    got = llm.generate([follow_up], follow_params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == expected, f"cached={got.metrics['cached_prompt_tokens']}"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_interrupt_while_a_step_lands_loses_no_token(model, async_scheduling):
    """An interrupt while a step's tokens are being emitted: the engine without async scheduling
    rolls the step back and recomputes; with it, the sequences not yet emitted drop their tokens
    in flight and recompute them. Either way every request ends with the tokens it would have."""
    batch = prompts(3, seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in engine(model, False).generate(batch, params, use_tqdm=False)]

    llm = engine(model, async_scheduling)
    emit, calls = llm._emit, []

    def interrupted(seq, tokens):
        calls.append(1)
        if len(calls) == 3 * 5 + 2:  # the second sequence of the fifth step's landing
            raise KeyboardInterrupt
        return emit(seq, tokens)
    llm._emit = interrupted
    errors = []
    ids = [llm.add_request(p, params) for p in batch]
    while llm.scheduler.has_work() or llm._flights:
        try:
            llm.step()
        except KeyboardInterrupt:
            pass
        except Exception as e:  # a later step that fails
            errors.append(repr(e))
    assert len(calls) > 17
    got = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in map(llm.take_output, ids)]
    assert (got, errors) == ([(e, "length") for e in expected], [])
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_an_interrupt_at_the_end_of_a_launch_leaves_no_token_counted_in_flight(model, monkeypatch):
    """An interrupt as a launch ends (before its step is in flight): the step is rolled back, no
    token stays counted in flight, and seeded draws keep their positions."""
    batch = prompts(2, seed=8)
    params = [SamplingParams(temperature=0.9, seed=7, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)]
    expected = [o.outputs[0].token_ids for o in engine(model, False).generate(batch, params, use_tqdm=False)]
    llm = engine(model, True)
    launched, calls = overlap.StepInFlight.launched.__func__, []

    def interrupted(cls, seqs, choices):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return launched(cls, seqs, choices)
    monkeypatch.setattr(overlap.StepInFlight, "launched", classmethod(interrupted))
    ids = [llm.add_request(p, sp) for p, sp in zip(batch, params)]
    stale = []
    while llm.scheduler.has_work() or llm._flights:
        try:
            llm.step()
        except KeyboardInterrupt:
            stale = [s.in_flight for r in ids for s in llm.sequences(r)]
    got = [llm.take_output(r).outputs[0].token_ids for r in ids]
    assert got == expected, stale
    assert stale == [0, 0] and len(calls) > 6


def test_a_failing_beam_search_with_a_step_in_flight(model, monkeypatch):
    """A step is in flight between step() calls; beam search lands it first, and when the search
    fails (resetting the block manager) the requests still end with their tokens."""
    import pagedlm.llm as llm_module
    batch = prompts(2, seed=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in engine(model, False).generate(batch, params, use_tqdm=False)]
    llm = engine(model, True)
    ids = [llm.add_request(p, params) for p in batch]
    for _ in range(4):
        llm.step()
    assert llm._flights

    def broken(self, token_ids):
        raise RuntimeError("injected beam search failure")
        yield
    monkeypatch.setattr(llm_module.BeamSearch, "run_in_waves", broken)
    with pytest.raises(RuntimeError, match="injected"):
        llm.beam_search([[1, 2, 3]], BeamSearchParams(beam_width=2, max_tokens=3))
    got = drain(llm, ids)
    assert [o.outputs[0].token_ids for o in got] == expected
