"""Memory estimators against the KV-cache, ZeRO and activation-recomputation papers."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedlm.scaling import (
    ModelConfig,
    activation_bytes_per_layer,
    inference_memory,
    kv_cache_bytes,
    model_state_bytes,
    training_memory,
)


def test_llama_13b_kv_cache_is_800_kb_per_token():
    # Kwon et al. 2023 (vLLM, SOSP), section 3: "for the 13B parameter OPT model, the KV cache of a
    # single token demands 800 KB of space, calculated as 2 (key and value vectors) x 5120 (hidden
    # state size) x 40 (number of layers) x 2 (bytes per FP16)". LLaMA-13B has the same 40 x 5120 shape.
    assert kv_cache_bytes(ModelConfig.preset("llama-13b"), tokens=1, dtype="fp16") == 819_200
    opt_13b = ModelConfig(n_layers=40, d_model=5120, n_heads=40, vocab_size=50272, mlp="gelu", norm="layernorm",
                          position="learned")
    assert kv_cache_bytes(opt_13b) == 819_200
    # "Since OPT can generate sequences up to 2048 tokens, [...] as much as 1.6 GB" (800 KiB x 2048 = 1600 MiB).
    assert kv_cache_bytes(opt_13b, tokens=2048) == 1600 * 2**20


def test_kv_cache_honours_gqa_and_scales_with_tokens_and_dtype():
    # Llama 2 70B stores 8 kv heads of 128 instead of 64: 2 x 80 x 8 x 128 x 2 bytes per token.
    llama2_70b = ModelConfig.preset("llama2-70b")
    assert kv_cache_bytes(llama2_70b) == 327_680
    assert kv_cache_bytes(llama2_70b, tokens=4096, dtype="fp8") == 4096 * 327_680 // 2
    assert kv_cache_bytes(llama2_70b, tokens=3, dtype="int4") == 3 * 327_680 // 4


@pytest.mark.parametrize("stage, gigabytes", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(stage, gigabytes):
    # Rajbhandari et al. 2020 (ZeRO), Figure 1: model states per device for a 7.5B-parameter model,
    # mixed-precision Adam (K = 12), data parallelism 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    total = sum(model_state_bytes(7.5e9, dtype="bf16", optimizer="adam", zero_stage=stage, dp=64))
    assert total / 1e9 == pytest.approx(gigabytes, abs=0.05)


@given(st.floats(1e6, 1e12), st.integers(1, 1024))
def test_zero_3_spreads_exactly_the_baseline_over_dp_ranks(n_params, dp):
    baseline = sum(model_state_bytes(n_params, zero_stage=0, dp=dp))
    per_stage = [sum(model_state_bytes(n_params, zero_stage=z, dp=dp)) for z in range(4)]
    assert per_stage == sorted(per_stage, reverse=True)
    assert per_stage[3] * dp == pytest.approx(baseline)


def gpt3_layer(s=2048, h=12288, a=96):
    # The GPT-3-style layer Korthikanti et al. analyse: MHA, GELU MLP of 4h, LayerNorm, dropout.
    return ModelConfig(n_layers=1, d_model=h, n_heads=a, vocab_size=51200, max_seq_len=s, mlp="gelu",
                       norm="layernorm")


# Korthikanti et al. 2022, Table 2: activation bytes per layer (16-bit, with dropout).
@pytest.mark.parametrize("s, b, h, a, t", [(2048, 1, 12288, 96, 1), (2048, 4, 12288, 96, 8), (97, 3, 640, 5, 5)])
def test_korthikanti_table_2(s, b, h, a, t):
    cfg = gpt3_layer(s, h, a)
    kw = dict(dtype="bf16", dropout=True, tp=t)
    sbh = s * b * h
    # No parallelism / tensor parallel + sequence parallel: s b h (34 + 5 a s / h) / t
    assert activation_bytes_per_layer(cfg, b, s, **kw) == pytest.approx(sbh * (34 + 5 * a * s / h) / t)
    # Tensor parallel without sequence parallel: s b h (10 + 24/t + 5 a s / (h t))
    assert activation_bytes_per_layer(cfg, b, s, sequence_parallel=False, **kw) == pytest.approx(
        sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    # Selective recomputation with sequence parallel: 34 s b h / t
    assert activation_bytes_per_layer(cfg, b, s, recompute="selective", **kw) == pytest.approx(34 * sbh / t)
    # Full recomputation keeps the layer input: 2 s b h (split by t under sequence parallelism)
    assert activation_bytes_per_layer(cfg, b, s, recompute="full", **kw) == pytest.approx(2 * sbh / t)


def test_flash_attention_removes_the_quadratic_term():
    cfg = ModelConfig.preset("llama-7b")
    short, long = (activation_bytes_per_layer(cfg, 1, s, flash_attention=True) for s in (2048, 4096))
    assert long == pytest.approx(2 * short)  # linear in s
    plain = activation_bytes_per_layer(cfg, 1, 4096)
    assert plain - long > 32 * 4096 * 4096  # the s^2 softmax tensor (2 bytes x 32 heads) is gone


def test_swiglu_and_gqa_adaptation_of_the_per_layer_list():
    # Without dropout and scores (flash), a Llama-style layer keeps, in elements: norm inputs and
    # block inputs 4 s b h; Q and attention output 2 s b q_dim; K, V 2 s b kv_dim; gate, up and their
    # product 3 s b d_ff. Plus the fp32 log-sum-exp, 4 bytes per head and row.
    cfg = ModelConfig.preset("llama3-8b")
    s, b = 8192, 2
    elements = s * b * (4 * 4096 + 2 * 4096 + 2 * 1024 + 3 * 14336)
    assert activation_bytes_per_layer(cfg, b, s, flash_attention=True) == 2 * elements + 4 * 32 * s * b


def test_training_memory_breakdown():
    cfg = ModelConfig.preset("llama-7b")
    mem = training_memory(cfg, 1, 2048, zero_stage=3, dp=8, recompute="full", flash_attention=True)
    n = 6_738_415_616
    assert (mem.weights, mem.gradients, mem.optimizer_states) == pytest.approx((2 * n / 8, 2 * n / 8, 12 * n / 8))
    assert mem.total == pytest.approx(sum(mem.as_dict()[k] for k in ("weights", "gradients", "optimizer_states",
                                                                      "activations")))
    tp2 = training_memory(cfg, 1, 2048, tp=2)
    assert tp2.weights == pytest.approx(2 * n / 2)
    assert tp2.activations == pytest.approx(training_memory(cfg, 1, 2048).activations / 2)


def test_inference_memory():
    cfg = ModelConfig.preset("llama2-70b")
    mem = inference_memory(cfg, 8, 4096, dtype="bf16", kv_dtype="fp8")
    assert mem.weights == 2 * 68_976_648_192
    assert mem.kv_cache == 8 * 4096 * 327_680 // 2
    assert mem.total == mem.weights + mem.kv_cache + mem.activations
    # The prefill transient (residual + gate and up: 8192 + 2 x 28672 wide, bf16, 32768 tokens) and the
    # last positions' fp32 logits; independent of the KV-cache format.
    assert mem.activations == 2 * 8 * 4096 * (8192 + 2 * 28672) + 4 * 8 * 32000
    assert inference_memory(cfg, 8, 4096, kv_dtype="bf16").activations == mem.activations


@pytest.mark.parametrize("call, field", [
    (lambda c: kv_cache_bytes(c, tokens=-1), "tokens"),
    (lambda c: kv_cache_bytes(c, dtype="fp12"), "dtype"),
    (lambda c: training_memory(c, 1, 128, zero_stage=4), "zero_stage"),
    (lambda c: training_memory(c, 1, 128, dp=0), "dp"),
    (lambda c: training_memory(c, 1, 128, tp=3), "tp"),
    (lambda c: training_memory(c, 0, 128), "batch"),
    (lambda c: training_memory(c, 1, 128, optimizer="lion"), "optimizer"),
    (lambda c: training_memory(c, 1, 128, recompute="some"), "recompute"),
    (lambda c: training_memory(c, 1, 128, dtype="int8"), "dtype"),
    (lambda c: inference_memory(c, 1, -5), "seq_len"),
])
def test_bad_memory_arguments_are_named(call, field):
    with pytest.raises(ValueError, match=field):
        call(ModelConfig.preset("llama-7b"))
