"""count_params: the breakdown, tied embeddings, GQA, and the Kaplan non-embedding count."""
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from pagedlm.scaling import ModelConfig, count_params, non_embedding_params


@st.composite
def configs(draw):
    n_kv = draw(st.integers(1, 8))
    group = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([16, 64, 128]))
    return ModelConfig(
        n_layers=draw(st.integers(1, 96)), d_model=draw(st.integers(1, 64)) * 64, n_heads=n_kv * group,
        n_kv_heads=n_kv, head_dim=head_dim, d_ff=draw(st.integers(1, 20000)), vocab_size=draw(st.integers(1, 200000)),
        max_seq_len=draw(st.integers(1, 8192)), tied_embeddings=draw(st.booleans()),
        mlp=draw(st.sampled_from(["swiglu", "gelu"])), norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
        position=draw(st.sampled_from(["rope", "learned"])), qkv_bias=draw(st.booleans()),
        attn_out_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))


@given(configs())
def test_breakdown_sums_to_total(cfg):
    parts = count_params(cfg, breakdown=True)
    total = parts.pop("total")
    assert total == sum(parts.values()) == count_params(cfg)


@given(configs())
def test_untying_adds_exactly_one_vocab_by_width_matrix(cfg):
    tied, untied = replace(cfg, tied_embeddings=True), replace(cfg, tied_embeddings=False)
    assert count_params(untied) - count_params(tied) == cfg.vocab_size * cfg.d_model


@given(configs())
def test_gqa_saves_exactly_the_dropped_kv_projections(cfg):
    mha = replace(cfg, n_kv_heads=cfg.n_heads)
    saved_width = (cfg.n_heads - cfg.n_kv_heads) * cfg.head_dim  # per K and per V
    per_layer = 2 * saved_width * cfg.d_model + (2 * saved_width if cfg.qkv_bias else 0)
    assert count_params(mha) - count_params(cfg) == cfg.n_layers * per_layer


def test_gpt2_breakdown_by_hand():
    # GPT-2 small: wte 50257x768, wpe 1024x768, per layer c_attn 768x2304+2304, c_proj 768x768+768,
    # c_fc 768x3072+3072, mlp c_proj 3072x768+768, two LayerNorms of 2x768; final LayerNorm.
    parts = count_params(ModelConfig.preset("gpt2"), breakdown=True)
    assert parts["embedding"] == 38_597_376
    assert parts["position"] == 786_432
    assert parts["attention"] == 12 * (768 * 2304 + 2304 + 768 * 768 + 768)
    assert parts["mlp"] == 12 * (768 * 3072 + 3072 + 3072 * 768 + 768)
    assert parts["norms"] == 25 * 2 * 768
    assert parts["output_head"] == 0


def test_non_embedding_params_is_kaplans_12_L_d_squared_for_gpt_shapes():
    # Kaplan et al. 2020, section 2.1: N ~ 2 d_model n_layer (2 d_attn + d_ff) = 12 n_layer d_model^2
    # for d_attn = d_model and d_ff = 4 d_model, ignoring biases and norms.
    cfg = ModelConfig(n_layers=24, d_model=1024, n_heads=16, vocab_size=50257, mlp="gelu", norm="rmsnorm")
    assert non_embedding_params(cfg) == 12 * 24 * 1024**2 + (2 * 24 + 1) * 1024
