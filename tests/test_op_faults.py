"""Regression tests for faults of the public kernel ops found by an adversarial pass: one test
per fault (a crash, a silent wrong answer, a non-atomic failure, an unclear error) and per
other member of its class. Calls that used to crash run in a child process, so that a crash
fails the test instead of ending the run. docs/errors.md states the behaviour they pin down."""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import pagedlm.ops as ops
from attention_reference import decode_reference, paged_inputs, prefill_reference


def run_isolated(code, timeout=60):
    """Runs `code` (after `import torch, pagedlm.ops as ops`) in a child; returns its result."""
    prologue = "import math, torch\nimport pagedlm.ops as ops\n"
    return subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def expect_error_in_child(code, error, *words):
    """The child must end normally, having caught `error` whose message holds each word."""
    body = textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")
    result = run_isolated(f"try:\n{body}\nexcept {error} as e:\n    print('CAUGHT', e)\nelse:\n    print('NO ERROR')\n")
    assert result.returncode == 0, f"child died (code {result.returncode}): {result.stderr[-2000:]}"
    assert "CAUGHT" in result.stdout, result.stdout
    for word in words:
        assert word in result.stdout, result.stdout


# ---- crashes: a length near 2^31 against a bound --------------------------------------------

# A table reaching 2^31 tokens (block_size 2^16, 2^15 blocks wide) and a length of 2^31 - 1: the
# block-id loop's bound (len + block_size - 1) wrapped in int32, the check of the (bad) block ids
# was skipped, and the kernel read outside the cache.
HUGE_TABLE = """
kc = torch.zeros(1, 1 << 16, 1, 1)
tables = torch.full((1, 1 << 15), 1 << 20, dtype=torch.int32)
lens = torch.tensor([2**31 - 1], dtype=torch.int32)
"""


def test_decode_length_near_2_31_is_refused_not_a_crash():
    expect_error_in_child(HUGE_TABLE + "ops.paged_decode_attention(torch.zeros(1, 1, 1), kc, kc, tables, lens)",
                          "ValueError", "block_tables")


def test_prefill_length_near_2_31_is_refused_not_a_crash():
    expect_error_in_child(HUGE_TABLE + """
cu = torch.tensor([0, 1], dtype=torch.int32)
ops.paged_prefill_attention(torch.zeros(1, 1, 1), kc, kc, tables, cu, lens)
""", "ValueError", "block_tables")


def test_lengths_near_2_31_within_a_small_table_name_seq_lens():
    q, kc, vc, tables, lens = paged_inputs([5, 9], num_heads=2, num_kv_heads=1, head_dim=8, block_size=4,
                                           dtype=torch.float32)
    for bad in (2**31 - 1, -2**31):
        lens[1] = bad
        with pytest.raises(ValueError, match=r"seq_lens\[1\]"):
            ops.paged_decode_attention(q, kc, vc, tables, lens)
        with pytest.raises(ValueError, match=r"seq_lens\[1\]"):
            ops.paged_prefill_attention(q, kc, vc, tables, torch.tensor([0, 1, 2], dtype=torch.int32), lens)


def test_cu_seqlens_near_2_31_are_refused():
    q, kc, vc, tables, lens = paged_inputs([5, 9], num_heads=2, num_kv_heads=1, head_dim=8, block_size=4,
                                           dtype=torch.float32)
    for cu in ([0, -2**31, 2], [0, 2**31 - 1, 2]):
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            ops.paged_prefill_attention(q, kc, vc, tables, torch.tensor(cu, dtype=torch.int32), lens)


def test_zero_block_size_is_refused_not_a_division_by_zero():
    expect_error_in_child("""
        kc = torch.zeros(2, 0, 1, 4)
        ops.paged_decode_attention(torch.zeros(1, 1, 4), kc, kc, torch.zeros(1, 1, dtype=torch.int32),
                                   torch.ones(1, dtype=torch.int32))
        """, "ValueError", "key_cache", "block_size")


# ---- silent wrong answers: non-finite values and options ------------------------------------

def decode_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return paged_inputs([7, 12], num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32,
                        generator=generator)


def test_nan_in_the_query_propagates_in_decode():
    q, kc, vc, tables, lens = decode_case()
    q[1, 2, 3] = math.nan
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True)
    assert out[1, 2].isnan().all() and lse[1, 2].isnan()
    # The other rows are untouched by it.
    expected, expected_lse = decode_reference(q, kc, vc, tables, lens)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(out[keep].double(), expected[keep], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse[keep].double(), expected_lse[keep], atol=1e-4, rtol=1e-4)


def test_nan_in_the_query_propagates_in_prefill():
    q, kc, vc, tables, lens = decode_case()
    query = torch.randn(5, 4, 8)
    query[4, 0, 0] = math.nan
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    out, lse = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, return_lse=True)
    assert out[4, 0].isnan().all() and lse[4, 0].isnan()
    assert not out[:4].isnan().any() and not out[4, 1:].isnan().any()


def test_infinite_score_gives_nan_out_and_infinite_lse():
    q, kc, vc, tables, lens = decode_case()
    q[0, 0] = 0.0
    q[0, 0, 0] = math.inf
    kc.abs_()  # every score of the row is +inf
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True)
    assert out[0, 0].isnan().all() and lse[0, 0] == math.inf


def test_nan_key_the_row_does_not_see_changes_nothing():
    # The causal mask hides key 6 of sequence 1 from its first query (position 10 of 12 sees 0..10)
    # but not key 11: a NaN at 11 must not reach that row.
    q, kc, vc, tables, lens = decode_case()
    query = torch.randn(2, 4, 8)
    cu = torch.tensor([0, 0, 2], dtype=torch.int32)
    before = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens)
    kc[tables[1, 2], 3] = math.nan  # token 11 of sequence 1
    after = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    assert after[1].isnan().all()


@pytest.mark.parametrize("window", [2**32 + 1, 2**40, 2**63 - 1, 2**63, 2**64 + 3])
def test_a_window_longer_than_any_sequence_is_no_window(window):
    q, kc, vc, tables, lens = decode_case()
    plain = ops.paged_decode_attention(q, kc, vc, tables, lens)
    torch.testing.assert_close(ops.paged_decode_attention(q, kc, vc, tables, lens, sliding_window=window), plain,
                               atol=0, rtol=0)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    torch.testing.assert_close(ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, sliding_window=window),
                               ops.paged_prefill_attention(q, kc, vc, tables, cu, lens), atol=0, rtol=0)


@pytest.mark.parametrize("name, value", [("soft_cap", math.inf), ("soft_cap", math.nan), ("soft_cap", -1.0),
                                         ("soft_cap", 0.0), ("soft_cap", 1e300), ("scale", math.inf),
                                         ("scale", -math.inf), ("scale", math.nan), ("scale", -0.5),
                                         ("scale", 1e39), ("scale", 10**400), ("soft_cap", 10**400)])
def test_non_finite_or_negative_options_are_refused(name, value):
    q, kc, vc, tables, lens = decode_case()
    with pytest.raises(ValueError, match=name):
        ops.paged_decode_attention(q, kc, vc, tables, lens, **{name: value})
    with pytest.raises(ValueError, match=name):
        ops.paged_prefill_attention(q, kc, vc, tables, torch.tensor([0, 1, 2], dtype=torch.int32), lens,
                                    **{name: value})


def test_eps_beyond_float32_is_refused():
    x = torch.randn(3, 8)
    for eps in (1e39, math.inf, math.nan, -1e-6, 10**400):
        with pytest.raises(ValueError, match="eps"):
            ops.rms_norm(x, torch.ones(8), eps)


# ---- atomicity: a refused call changes nothing ----------------------------------------------

def test_copy_blocks_refuses_before_copying_any_layer():
    k0, v0 = torch.randn(8, 2, 1, 4), torch.randn(8, 2, 1, 4)
    k1, v1 = torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4)  # block 6 does not exist here
    before = [t.clone() for t in (k0, v0, k1, v1)]
    with pytest.raises(ValueError, match=r"key_caches\[1\]"):
        ops.copy_blocks([k0, k1], [v0, v1], torch.tensor([[0, 6]]))
    for t, old in zip((k0, v0, k1, v1), before):
        assert torch.equal(t, old)


def test_copy_blocks_bad_second_layer_dtype_changes_nothing():
    k0, v0 = torch.randn(8, 2, 1, 4), torch.randn(8, 2, 1, 4)
    k1, v1 = torch.randn(8, 2, 1, 4), torch.randn(8, 2, 1, 4).half()
    before = k0.clone()
    with pytest.raises(TypeError, match=r"value_caches\[1\]"):
        ops.copy_blocks([k0, k1], [v0, v1], torch.tensor([[0, 6]]))
    assert torch.equal(k0, before)


def test_copy_blocks_refuses_chained_or_repeated_destinations():
    k, v = torch.randn(8, 2, 1, 4), torch.randn(8, 2, 1, 4)
    before = k.clone()
    for mapping in ([[0, 1], [1, 2]], [[0, 3], [1, 3]]):
        with pytest.raises(ValueError, match="block_mapping"):
            ops.copy_blocks([k], [v], torch.tensor(mapping))
        assert torch.equal(k, before)
    ops.copy_blocks([k], [v], torch.tensor([[0, 1], [0, 2], [5, 5]]))  # one source, two copies: fine
    assert torch.equal(k[1], before[0]) and torch.equal(k[2], before[0])


def test_write_kv_cache_refuses_two_tokens_for_one_slot():
    kc, vc = torch.zeros(4, 2, 1, 4), torch.zeros(4, 2, 1, 4)
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 5 repeats slot_mapping\[0\]"):
        ops.write_kv_cache(torch.randn(3, 1, 4), torch.randn(3, 1, 4), kc, vc, torch.tensor([5, -1, 5]))
    assert not kc.any() and not vc.any()


# ---- unclear errors: Python numbers beyond int64 or of the wrong type ------------------------

@pytest.mark.parametrize("value, error", [(2**64, None), (-2**63 - 1, ValueError), (1.5, TypeError),
                                          ("3", TypeError), (True, TypeError), (0, ValueError), (-1, ValueError)])
def test_sliding_window_values_get_a_named_error_or_mean_no_window(value, error):
    q, kc, vc, tables, lens = decode_case()
    if error is None:
        ops.paged_decode_attention(q, kc, vc, tables, lens, sliding_window=value)
        return
    with pytest.raises(error, match="sliding_window"):
        ops.paged_decode_attention(q, kc, vc, tables, lens, sliding_window=value)


@pytest.mark.parametrize("value", ["x", None, [1.0], torch.ones(2)])
def test_float_options_of_the_wrong_type_are_named(value):
    with pytest.raises(TypeError, match="eps"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4), value)
    q, kc, vc, tables, lens = decode_case()
    if value is not None:
        with pytest.raises(TypeError, match="scale"):
            ops.paged_decode_attention(q, kc, vc, tables, lens, scale=value)


def test_causal_must_be_a_bool():
    q, kc, vc, tables, lens = decode_case()
    with pytest.raises(TypeError, match="causal"):
        ops.paged_prefill_attention(q, kc, vc, tables, torch.tensor([0, 1, 2], dtype=torch.int32), lens,
                                    causal=torch.ones(2))


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_verify_seed_beyond_64_bits_is_named(seed):
    with pytest.raises(ValueError, match="seed"):
        ops.verify_speculative(torch.zeros(1, 1, dtype=torch.int64), None, torch.full((1, 2, 4), 0.25), seed=seed)


# ---- aliasing: an op writing memory it also reads ------------------------------------------

def test_rope_refuses_overlapping_query_and_key():
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="key"):
        ops.apply_rope(x, x, torch.arange(3), torch.ones(4))
    with pytest.raises(ValueError, match="query"):
        ops.apply_rope(torch.randn(1, 1, 8).expand(3, 2, 8), torch.randn(3, 1, 8), torch.arange(3), torch.ones(4))
    # Head slices of one fused qkv output do not overlap: accepted.
    qkv = torch.randn(3, 4, 8)
    ops.apply_rope(qkv[:, :2], qkv[:, 2:3], torch.arange(3), torch.ones(4))


def test_rms_norm_refuses_residual_aliasing_x():
    x = torch.randn(3, 8)
    before = x.clone()
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, torch.ones(8), 1e-6, residual=x)
    assert torch.equal(x, before)


def test_outputs_must_not_alias_inputs():
    q, kc, vc, tables, lens = decode_case()
    with pytest.raises(ValueError, match="out"):
        ops.paged_decode_attention(q, kc, vc, tables, lens, out=q)
    logits = torch.randn(4, 16)
    with pytest.raises(ValueError, match="out"):  # out over the first row of logits
        ops.argmax_logprob(logits, out=logits.view(-1)[:16].view(torch.float64).view(4, 2))
