"""LLM(kv_cache_dtype=..., calculate_kv_scales=...): argument checks, a pool of twice the tokens
of a bf16 one, scales from the checkpoint or measured from the first prefill, and speculative
decoding, beam search and prefix caching on an FP8 cache, on the shipped tiny model."""
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pagedlm import LLM, BeamSearchParams, SamplingParams
from pagedlm.data import tiny_model
from pagedlm.kv_cache import describe_scales

from graph_stand_in import replay_eagerly

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def target():
    return tiny_model("target")


@pytest.fixture(scope="module")
def prompts(target):
    held = np.load(target.parent / "heldout.npy")
    return [[int(t) for t in row[:n]] for row, n in zip(held[:4], (40, 7, 23, 61))]


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kv_cache_dtype="fp16"), "kv_cache_dtype"), (dict(kv_cache_dtype=8), "kv_cache_dtype"),
    (dict(kv_cache_dtype="FP8"), "kv_cache_dtype"), (dict(kv_cache_dtype=torch.float16), "kv_cache_dtype"),
    (dict(kv_cache_dtype="fp8", calculate_kv_scales="yes"), "calculate_kv_scales"),
    (dict(kv_cache_dtype="fp8", calculate_kv_scales=1), "calculate_kv_scales"),
    (dict(calculate_kv_scales=True), "calculate_kv_scales"),
])
def test_bad_arguments_are_value_errors_naming_them(target, kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}"):
        LLM(str(target), device="cpu", num_blocks=8, **kwargs)


@pytest.mark.parametrize("name, dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                                         ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_pool_holds_twice_the_tokens_of_a_bf16_one(target, name, dtype):
    bf16 = LLM(str(target), device="cpu", dtype="bfloat16")
    fp8 = LLM(str(target), device="cpu", dtype="bfloat16", kv_cache_dtype=name)
    assert fp8.kv_caches[0][0].dtype == dtype and bf16.kv_caches[0][0].dtype == torch.bfloat16
    assert abs(fp8.block_manager.num_blocks - 2 * bf16.block_manager.num_blocks) <= 1
    bytes_of = lambda llm: sum(k.nbytes + v.nbytes for k, v in llm.kv_caches)  # noqa: E731
    assert abs(bytes_of(fp8) - bytes_of(bf16)) <= bytes_of(bf16) / bf16.block_manager.num_blocks


def test_auto_keeps_the_model_dtype_and_unit_scales(target, prompts):
    llm = LLM(str(target), device="cpu", num_blocks=64)
    assert llm.kv_caches[0][0].dtype == torch.float32
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert all(s == (1.0, 1.0) for s in describe_scales(llm.kv_caches))


def checkpoint_with_scales(target, folder, extra):
    shutil.copytree(target, folder)
    save_file(extra, str(folder / "kv_scales.safetensors"))
    return folder


def test_scales_are_read_from_the_checkpoint(target, tmp_path, prompts):
    heads = 5
    folder = checkpoint_with_scales(target, tmp_path / "scaled", {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.05),
        "model.layers.0.self_attn.v_scale": torch.tensor([0.02]),
        "model.layers.2.self_attn.kv_scale": torch.arange(1, heads + 1, dtype=torch.float32) / 100,
        "model.layers.3.self_attn.kv_scale": torch.tensor(0.5),
        "model.layers.3.self_attn.v_scale": torch.tensor(0.25),  # k_scale / v_scale win over kv_scale
    })
    llm = LLM(str(folder), device="cpu", num_blocks=64, kv_cache_dtype="fp8")
    scales = describe_scales(llm.kv_caches)
    assert scales[0] == pytest.approx((0.05, 0.02))
    assert scales[1] == (1.0, 1.0)
    assert scales[2][0] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05]) == scales[2][1]
    assert scales[3] == (0.5, 0.25)
    out = tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    assert all(len(t) == 16 for t in out)


@pytest.mark.parametrize("bad, match", [
    ({"model.layers.1.self_attn.k_scale": torch.tensor(-1.0)}, "k_scale must be finite and > 0"),
    ({"model.layers.1.self_attn.v_scale": torch.tensor(float("nan"))}, "v_scale must be finite and > 0"),
    ({"model.layers.1.self_attn.kv_scale": torch.ones(3)}, "kv_scale must be one float or one per kv head"),
])
def test_bad_checkpoint_scales_are_refused_naming_file_and_tensor(target, tmp_path, bad, match):
    folder = checkpoint_with_scales(target, tmp_path / "bad", bad)
    with pytest.raises(ValueError, match=f"kv_scales.safetensors: model.layers.1.self_attn.{match}"):
        LLM(str(folder), device="cpu", num_blocks=64, kv_cache_dtype="fp8")


def test_checkpoint_scales_are_ignored_without_an_fp8_cache(target, tmp_path):
    folder = checkpoint_with_scales(target, tmp_path / "auto", {"model.layers.0.self_attn.k_scale": torch.tensor(-1.)})
    LLM(str(folder), device="cpu", num_blocks=8)


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_calculate_kv_scales_measures_the_first_prefill(target, prompts, name):
    llm = LLM(str(target), device="cpu", num_blocks=64, kv_cache_dtype=name, calculate_kv_scales=True)
    assert all(c.measure for c in llm.kv_caches)
    first = tokens(llm.generate(prompts[:1], GREEDY, use_tqdm=False))
    fmax = torch.finfo(llm.kv_caches[0][0].dtype).max
    scales = describe_scales(llm.kv_caches)
    assert not any(c.measure for c in llm.kv_caches)
    assert all(0 < k < 1 and 0 < v < 1 for k, v in scales)  # the tiny model's K/V are far below fmax
    # The scales stay: a second request (and the first again) reads with them.
    assert tokens(llm.generate(prompts[:1], GREEDY, use_tqdm=False)) == first
    assert describe_scales(llm.kv_caches) == scales
    assert scales[0][0] * fmax > 0.1  # amax of the first layer's keys: not a degenerate measurement


@pytest.mark.parametrize("lengths", [(3, 7, 5), (1, 1)])  # a few-tokens graph's step; prompts that decode at once
def test_graphs_never_measure_the_scales(target, prompts, lengths, monkeypatch):
    """With CUDA graphs (emulated on the CPU: a capture runs the forward, a replay reruns it), the
    scales are measured from the first forward's real tokens, never from a capture's padding: the
    steps run eagerly until the caches have measured, and measure what the eager engine does."""
    import pagedlm.engine.cuda_graphs as cuda_graphs
    from pagedlm.engine.varlen_graphs import VarlenGraphs
    monkeypatch.setattr(cuda_graphs, "capture", replay_eagerly)
    batch = [p[:n] for p, n in zip(prompts, lengths)]
    eager = LLM(str(target), device="cpu", num_blocks=64, kv_cache_dtype="fp8", calculate_kv_scales=True)
    expected = tokens(eager.generate(batch, GREEDY, use_tqdm=False))
    llm = LLM(str(target), device="cpu", num_blocks=64, kv_cache_dtype="fp8", calculate_kv_scales=True)
    llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, 8, llm.device, None)
    llm.runner.graphs = cuda_graphs.DecodeGraphs(llm.model, llm.kv_caches, 8, llm.device)
    for cache in llm.kv_caches:  # armed after the graphs' start-up captures, as LLM() arms them
        cache.measure = True
    got = tokens(llm.generate(batch, GREEDY, use_tqdm=False))
    assert describe_scales(llm.kv_caches) == describe_scales(eager.kv_caches)
    assert llm.runner.varlen.replays + llm.runner.graphs.replays > 0  # graphs ran, after the measurement
    assert got == expected


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_prefix_caching_and_chunked_prefill_change_nothing_on_fp8(target, prompts, name):
    shared = [prompts[0][:32] + p for p in prompts]
    runs = [tokens(LLM(str(target), device="cpu", num_blocks=128, kv_cache_dtype=name, enable_prefix_caching=pc,
                       max_num_batched_tokens=budget).generate(shared, GREEDY, use_tqdm=False))
            for pc, budget in [(False, 8192), (True, 8192), (True, 16)]]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("method", [dict(method="draft", num_tokens=3, adaptive=False),
                                    dict(method="ngram", num_tokens=3, max_ngram=3, adaptive=False)])
def test_speculative_greedy_equals_plain_greedy_on_fp8(target, prompts, method):
    config = dict(method)
    if config["method"] == "draft":
        config["model"] = str(tiny_model("draft"))
    plain = tokens(LLM(str(target), device="cpu", num_blocks=128, kv_cache_dtype="fp8")
                   .generate(prompts, GREEDY, use_tqdm=False))
    spec = LLM(str(target), device="cpu", num_blocks=128, kv_cache_dtype="fp8", speculative=config)
    assert spec.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert tokens(spec.generate(prompts, GREEDY, use_tqdm=False)) == plain


def test_beam_search_on_fp8(target, prompts):
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    fp8 = LLM(str(target), device="cpu", num_blocks=128, kv_cache_dtype="fp8").beam_search(prompts[:2], params)
    auto = LLM(str(target), device="cpu", num_blocks=128).beam_search(prompts[:2], params)
    for a, b in zip(fp8, auto):
        assert len(a.outputs) == 3
        assert a.outputs[0].token_ids[:2] == b.outputs[0].token_ids[:2]  # the best beam starts alike


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_cuda_engine_with_fp8_cache_graphs_and_measured_scales(target, prompts, name):
    eager = LLM(str(target), device="cuda", num_blocks=128, kv_cache_dtype=name, enforce_eager=True,
                calculate_kv_scales=True)
    graphs = LLM(str(target), device="cuda", num_blocks=128, kv_cache_dtype=name, calculate_kv_scales=True)
    a, b = (tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) for llm in (eager, graphs))
    assert describe_scales(eager.kv_caches) == pytest.approx(describe_scales(graphs.kv_caches))
    agree = np.mean([np.mean(np.array(x) == np.array(y)) for x, y in zip(a, b)])
    assert agree > 0.9
    cpu = tokens(LLM(str(target), device="cpu", dtype="bfloat16", num_blocks=128, kv_cache_dtype=name,
                     calculate_kv_scales=True).generate(prompts, GREEDY, use_tqdm=False))
    assert np.mean([x[:4] == y[:4] for x, y in zip(a, cpu)]) >= 0.5
