"""pagedlm.LLM on a tiny random Llama saved by transformers: greedy output equal to
transformers' generate, and the engine's promises — preemption, prefix caching, abort,
n > 1 forks and batch-independent seeded sampling."""
import pytest
import torch

import pagedlm
from pagedlm import LLM, SamplingParams

from llama_checkpoint import save_llama

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_llama(folder, TINY)


def prompts(count, seed=1, low=3, high=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


def test_greedy_equals_transformers_generate(checkpoint):
    folder, reference = checkpoint
    batch = prompts(6)
    outputs = LLM(folder, device="cpu", block_size=4).generate(batch, GREEDY, use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                          min_new_tokens=12)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"


def test_preemption_changes_nothing(checkpoint):
    folder, _ = checkpoint
    batch = prompts(8, seed=2)
    roomy = LLM(folder, device="cpu", block_size=4, num_blocks=512)
    tight = LLM(folder, device="cpu", block_size=4, num_blocks=30)
    expected = tokens(roomy.generate(batch, GREEDY, use_tqdm=False))
    assert tokens(tight.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert tight.scheduler.preemptions > 0
    assert tight.block_manager.stats()["used_blocks"] == 0


def test_prefix_caching_reuses_blocks_and_changes_nothing(checkpoint):
    folder, _ = checkpoint
    shared = prompts(1, seed=3, low=30, high=31)[0]
    batch = [shared + [5, 6, 7], shared + [9]]
    plain = LLM(folder, device="cpu", block_size=4, enable_prefix_caching=False)
    cached = LLM(folder, device="cpu", block_size=4, enable_prefix_caching=True)
    expected = tokens(plain.generate(batch, GREEDY, use_tqdm=False))
    cached.generate([shared], GREEDY, use_tqdm=False)  # fills the cache
    outputs = cached.generate(batch, GREEDY, use_tqdm=False)
    assert tokens(outputs) == expected
    assert all(o.metrics["cached_prompt_tokens"] >= 28 for o in outputs)


def test_n_samples_share_prompt_blocks_and_abort_frees_them(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=64, enable_prefix_caching=False)
    request = llm.add_request(list(range(1, 19)), SamplingParams(n=4, temperature=1.0, max_tokens=20, seed=7,
                                                                               ignore_eos=True))
    llm.step()
    first_seq = llm._requests[request]["seqs"][0]
    first_block = llm.block_manager.block_table(first_seq.seq_id)[0]
    assert llm.block_manager.ref_count(first_block) == 4
    llm.step()
    llm.abort(request)
    assert llm.block_manager.num_free_blocks == 64
    assert not llm.scheduler.has_work()


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(checkpoint):
    folder, _ = checkpoint
    target = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = LLM(folder, device="cpu", block_size=4).generate([target], params, use_tqdm=False)
    crowd = LLM(folder, device="cpu", block_size=4, seed=99).generate(prompts(5, seed=4) + [target], params,
                                                                      use_tqdm=False)
    assert alone[0].outputs[0].token_ids == crowd[-1].outputs[0].token_ids
    other = LLM(folder, device="cpu", block_size=4).generate(
        [target], SamplingParams(temperature=0.8, max_tokens=10, seed=4321, ignore_eos=True), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone[0].outputs[0].token_ids


def test_a_request_that_can_never_fit_is_refused_and_others_carry_on(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=8)
    with pytest.warns(UserWarning, match="refused"):
        outputs = llm.generate([list(range(1, 60)), [1, 2, 3]], SamplingParams(temperature=0, max_tokens=4),
                               use_tqdm=False)
    assert outputs[0].outputs[0].finish_reason == "refused" and outputs[0].outputs[0].token_ids == []
    assert len(outputs[1].outputs[0].token_ids) == 4


def test_one_sampling_params_per_prompt(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=64)
    outputs = llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                                 for m in (2, 5)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [2, 5]
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        llm.generate([[1, 2, 3], [4, 5]], [SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate([[1, 2, 3]], {"temperature": 0}, use_tqdm=False)


def test_bad_sampling_params_name_the_field():
    for kwargs, field in [(dict(n=0), "n"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                          (dict(top_k=0), "top_k"), (dict(max_tokens=0), "max_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    assert pagedlm.SamplingParams is SamplingParams


def test_cli_generate_from_a_folder_with_a_tokenizer(checkpoint, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pagedlm.cli import main
    folder, _ = checkpoint
    words = [f"w{i}" for i in range(97)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "with-tokenizer"
    model_dir.mkdir()
    for f in folder.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    tokenizer.save(str(model_dir / "tokenizer.json"))
    assert main(["generate", "--model", str(model_dir), "--device", "cpu", "--max-tokens", "5", "w3 w1 w4"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("w3 w1 w4") and len(printed.out.split()) == 3 + 5
    assert "5 tokens, length" in printed.err


def test_chunked_prefill_changes_nothing(checkpoint):
    folder, _ = checkpoint
    batch = prompts(6, seed=5, low=20, high=60)
    whole = LLM(folder, device="cpu", block_size=4)
    chunked = LLM(folder, device="cpu", block_size=4, max_num_batched_tokens=16)
    assert tokens(chunked.generate(batch, GREEDY, use_tqdm=False)) == tokens(whole.generate(batch, GREEDY,
                                                                                          use_tqdm=False))


@pytest.mark.parametrize("num_blocks, budget, prefix_caching", [(40, 16, True), (25, 7, True), (40, 16, False)])
def test_chunking_preemption_and_caching_together_change_nothing(checkpoint, num_blocks, budget, prefix_caching):
    folder, _ = checkpoint
    batch = prompts(10, seed=9, low=5, high=70)
    expected = tokens(LLM(folder, device="cpu", block_size=4).generate(batch, GREEDY, use_tqdm=False))
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=num_blocks, max_num_batched_tokens=budget,
              enable_prefix_caching=prefix_caching)
    assert tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert llm.scheduler.preemptions > 0 and llm.block_manager.stats()["used_blocks"] == 0
    sampled = SamplingParams(n=3, temperature=0.9, max_tokens=15, seed=3, ignore_eos=True)
    alone = LLM(folder, device="cpu", block_size=4).generate(batch[:3], sampled, use_tqdm=False)
    assert tokens(llm.generate(batch[:3], sampled, use_tqdm=False)) == tokens(alone)


def test_engine_demo_serves_synthetic_requests(capsys):
    from pagedlm.cli import main
    main(["demo", "--random-weights", "--requests", "6", "--num-blocks", "120", "--block-size", "8"])
    out = capsys.readouterr().out
    assert "tokens/s" in out and "KV utilization" in out and "preemptions" in out


def test_more_samples_than_max_num_seqs_is_an_error_naming_n_and_others_carry_on(checkpoint):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=64, max_num_seqs=2)
    with pytest.raises(ValueError, match=r"params\.n: 3 samples run at once, max_num_seqs is 2"):
        llm.add_request([1, 2, 3], SamplingParams(n=3, max_tokens=2))
    assert not llm._requests and not llm.scheduler.has_work()  # nothing was queued
    served = llm.add_request([4, 5], SamplingParams(n=2, max_tokens=2, ignore_eos=True))
    while llm.scheduler.has_work():
        llm.step()
    assert [len(o.token_ids) for o in llm.take_output(served).outputs] == [2, 2]
