"""FLOP counts against published formulas and Chinchilla's Table 3."""
from dataclasses import replace

import pytest

from pagedlm.scaling import ModelConfig, chinchilla_forward_flops, count_params, forward_flops, training_flops


def gpt_like(L=24, h=2048, a=16, V=51200, s=2048):
    return ModelConfig(n_layers=L, d_model=h, n_heads=a, vocab_size=V, max_seq_len=s, mlp="gelu", norm="layernorm")


@pytest.mark.parametrize("L, h, a, V, s, B", [(24, 2048, 16, 51200, 2048, 1), (96, 12288, 96, 51200, 2048, 8),
                                              (5, 320, 5, 97, 17, 3)])
def test_forward_flops_equal_narayanan_et_al_2021(L, h, a, V, s, B):
    # Narayanan et al. 2021 (Megatron-LM, SC'21), appendix: F = 96 B s L h^2 (1 + s/(6h) + V/(16 L h))
    # per iteration with recomputation = 4 forward passes of the layers + 3 of the logits layer. Their forward:
    megatron_forward = 24 * B * s * L * h * h + 4 * B * s * s * L * h + 2 * B * s * h * V
    assert forward_flops(gpt_like(L, h, a, V, s), s, B) == megatron_forward


def test_per_layer_terms_add_up():
    cfg = ModelConfig.preset("llama3-8b")
    parts = forward_flops(cfg, 4096, 2, per_layer=True)
    one_layer = sum(parts[k] for k in ("qkv_proj", "attention_scores", "attention_values", "out_proj", "mlp"))
    assert parts["layers"] == cfg.n_layers * one_layer
    assert parts["total"] == parts["layers"] + parts["lm_head"] == forward_flops(cfg, 4096, 2)


def test_gqa_cuts_only_the_kv_projection_flops():
    mha = ModelConfig.preset("llama-7b")
    gqa = replace(mha, n_kv_heads=8)
    a, b = forward_flops(mha, 1024, per_layer=True), forward_flops(gqa, 1024, per_layer=True)
    assert a["qkv_proj"] - b["qkv_proj"] == 2 * 1024 * 4096 * 2 * (32 - 8) * 128
    assert all(a[k] == b[k] for k in ("attention_scores", "attention_values", "out_proj", "mlp"))


# Hoffmann et al. 2022, Table 3 (Approach 1 projections): parameters, FLOPs, tokens.
CHINCHILLA_TABLE_3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9)]


@pytest.mark.parametrize("N, flops, tokens", CHINCHILLA_TABLE_3)
def test_chinchilla_table_3_rows_agree_with_6ND(N, flops, tokens):
    # The table's FLOPs are 6ND to the three significant figures it prints.
    assert 6 * N * tokens == pytest.approx(flops, rel=5e-3)


def test_6ND_method_uses_all_parameters():
    cfg = ModelConfig.preset("llama-7b")
    assert training_flops(cfg, 1e12) == 6 * count_params(cfg) * 1e12


def test_detailed_method_is_appendix_f_for_an_mha_gelu_model():
    # Hoffmann et al. 2022, Appendix F, written out from the paper for the 1.6B model of Table A4
    # (28 layers, d_model 2048, ffw 8192, 16 heads of 128) at seq_len 2048, vocab 32000.
    s, V, d, f, H, k, L = 2048, 32000, 2048, 8192, 16, 128, 28
    attention = (2 * 3 * s * d * (k * H) + 2 * s * s * (k * H) + 3 * H * s * s + 2 * s * s * (k * H)
                 + 2 * s * (k * H) * d)
    dense = 2 * s * (d * f + d * f)
    forward = 2 * s * V * d + L * (attention + dense) + 2 * s * d * V
    cfg = ModelConfig(n_layers=L, d_model=d, n_heads=H, d_ff=f, vocab_size=V, max_seq_len=s, mlp="gelu")
    assert chinchilla_forward_flops(cfg, s)["total"] == forward
    assert training_flops(cfg, 10 * s, method="detailed") == pytest.approx(3 * forward * 10)


def test_detailed_and_6ND_converge_as_width_outgrows_context():
    # Appendix F's extra terms are the s^2 attention and the embedding matmul; their share falls
    # as d_model grows at fixed seq_len, so the ratio to 6ND approaches 1 (paper: "very small").
    ratios = []
    for d in (1024, 4096, 16384):
        cfg = ModelConfig(n_layers=32, d_model=d, n_heads=d // 128, vocab_size=32000, max_seq_len=2048, mlp="gelu",
                          tied_embeddings=True)
        ratios.append(training_flops(cfg, 1e9, method="detailed") / training_flops(cfg, 1e9))
    assert ratios[0] > ratios[1] > ratios[2] > 1.0
    assert ratios[2] < 1.03


def test_bad_arguments_are_named():
    cfg = ModelConfig.preset("gpt2")
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops(cfg, 0)
    with pytest.raises(ValueError, match="batch"):
        forward_flops(cfg, 16, batch=-2)
    with pytest.raises(ValueError, match="tokens"):
        training_flops(cfg, -1.0)
    with pytest.raises(ValueError, match="method"):
        training_flops(cfg, 1e9, method="8ND")
