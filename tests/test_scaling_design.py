"""Budgets in dollars and GPU time, and design_model's concrete architectures."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedlm.scaling import (
    CHINCHILLA,
    EPOCH_2024,
    GPUS,
    count_params,
    design_model,
    flops_from_budget,
    get_gpu,
    training_days,
)
from pagedlm.scaling.design import ASPECT_RANGE


def test_one_dollar_of_h100_time():
    # $2.50 buys one H100-hour: 3600 s x 989 TFLOP/s (dense BF16, half the datasheet's sparse 1,979) x MFU.
    assert flops_from_budget(2.50, "H100") == pytest.approx(3600 * 989e12 * 0.4)
    assert flops_from_budget(2.50, "h100", mfu=0.5) == pytest.approx(3600 * 989e12 * 0.5)


def test_user_overrides_of_price_and_peak():
    assert flops_from_budget(100, "A100", price_per_hour=1.0, peak_flops=1e15, mfu=1.0) == pytest.approx(
        100 * 3600 * 1e15)


def test_every_gpu_has_dense_bf16_peak_memory_price_and_source():
    assert set(GPUS) == {"A100", "H100", "H200", "B200"}
    assert [GPUS[g].peak_flops for g in ("A100", "H100", "H200", "B200")] == [312e12, 989e12, 989e12, 2.25e15]
    assert all(g.memory_bytes > 0 and g.price_per_hour > 0 and g.source for g in GPUS.values())


@pytest.mark.parametrize("call, field", [
    (lambda: flops_from_budget(-5, "H100"), "dollars"),
    (lambda: flops_from_budget(5, "TPUv5"), "gpu"),
    (lambda: flops_from_budget(5, "H100", mfu=1.5), "mfu"),
    (lambda: flops_from_budget(5, "H100", price_per_hour=0), "price_per_hour"),
    (lambda: training_days(1e24, "H100", 0), "n_gpus"),
    (lambda: design_model(-1e20), "compute_flops"),
    (lambda: design_model(1e22, family="mamba"), "family"),
    (lambda: design_model(1e22, gpu="V100"), "gpu"),
    (lambda: design_model(1e22, law="kaplan"), "law"),
    (lambda: design_model(1e10), "compute_flops"),  # far too small for head_dim 128
])
def test_bad_budget_and_design_input_is_named(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# The published fits, written out here rather than read from the law objects under test:
# Hoffmann et al. 2022 (eq. 10) and Besiroglu et al. 2024 (the Epoch AI replication).
PUBLISHED = {"chinchilla": (1.69, 406.4, 410.7, 0.34, 0.28), "epoch2024": (1.8172, 482.01, 2085.43, 0.3478, 0.3658)}


def params_by_hand(cfg, family):
    """Every weight of a LLaMA (untied, RMSNorm, SwiGLU, no biases) or GPT-2 (tied, LayerNorm,
    GELU, learned positions, biases everywhere) model, counted from the architecture."""
    d, f, v, h = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.n_heads * h, cfg.n_kv_heads * h
    if family == "llama":
        layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        return v * d + cfg.n_layers * layer + d + v * d
    layer = (d * q + q) + 2 * (d * kv + kv) + (q * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    return v * d + cfg.max_seq_len * d + cfg.n_layers * layer + 2 * d


def optimal_n_by_hand(C, law):
    """N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann eq. 4)."""
    _, A, B, alpha, beta = PUBLISHED[law.name]
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    return G * (C / 6) ** (beta / (alpha + beta))


def check_design(C, law=CHINCHILLA, family="llama"):
    m = design_model(C, law=law, family=family)
    cfg = m.config
    n_opt = optimal_n_by_hand(C, law)
    assert m.params == params_by_hand(cfg, family)
    assert abs(m.params / n_opt - 1) <= 0.02
    assert cfg.d_model % 128 == 0 and cfg.head_dim == 128 and cfg.d_ff % 256 == 0
    assert ASPECT_RANGE[0] <= cfg.aspect_ratio <= ASPECT_RANGE[1]
    if family == "llama":
        assert cfg.n_kv_heads < cfg.n_heads and cfg.n_heads % cfg.n_kv_heads == 0
    assert 6 * m.params * m.tokens == pytest.approx(C)
    E, A, B, alpha, beta = PUBLISHED[law.name]
    assert m.loss == pytest.approx(E + A / m.params ** alpha + B / m.tokens ** beta)
    peak = {"H100": 989e12}[m.gpu]  # dense BF16 FLOP/s, the datasheet's 1,979 with sparsity halved
    assert m.train_days == pytest.approx(C / (peak * 0.4) / m.n_gpus / 86400)
    return m


@pytest.mark.parametrize("exponent", range(18, 27))
def test_design_lands_within_2_percent_of_n_opt_each_decade(exponent):
    check_design(10.0**exponent)


@settings(deadline=None, max_examples=60)
@given(st.floats(18, 26), st.sampled_from([CHINCHILLA, EPOCH_2024]), st.sampled_from(["llama", "gpt2"]))
def test_design_lands_within_2_percent_of_n_opt_anywhere_in_range(log10_c, law, family):
    check_design(10.0**log10_c, law, family)


def test_design_uses_8_kv_heads_at_scale_and_explains_itself():
    m = design_model(5.76e23, gpu="H100")
    assert m.config.n_kv_heads == 8
    assert str(m.config.n_layers) in m.explanation and "N_opt" in m.explanation
    assert m.n_gpus & (m.n_gpus - 1) == 0  # a power of two
    assert m.train_days <= 90
    assert 16 * m.params / m.n_gpus <= 0.7 * get_gpu("H100").memory_bytes


def test_design_with_given_gpus_reports_their_time():
    m = design_model(1e23, gpu="B200", n_gpus=100)
    assert m.n_gpus == 100
    assert m.train_days == pytest.approx(1e23 / (2.25e15 * 0.4) / 100 / 86400)
    assert m.cost_dollars == pytest.approx(m.gpu_hours * 5.00)
    assert math.isclose(m.gpu_hours, 1e23 / (2.25e15 * 0.4) / 3600)


def test_when_time_is_no_constraint_the_gpus_are_the_fewest_that_hold_the_model_states():
    m = design_model(1e24, gpu="H100", max_days=1e9)
    # Model states: 16 bytes a parameter (bf16 weights and gradients, fp32 Adam), ZeRO-3 sharded,
    # at most 70% of an H100's 80 GB; the fewest GPUs as a power of two.
    needed = 16 * m.params / (0.7 * 80e9)
    assert m.n_gpus >= needed and m.n_gpus / 2 < needed and m.n_gpus & (m.n_gpus - 1) == 0
