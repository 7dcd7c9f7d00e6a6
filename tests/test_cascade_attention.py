"""merge_attention_states against the float64 reference, on the CPU and (marked gpu) CUDA: two
decodes over disjoint parts of each row's keys, merged, equal the decode over all of them."""
import math

import pytest
import torch

import pagedlm.ops as ops
from attention_reference import TOLERANCE, decode_reference, paged_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def lse_tolerance(dtype):
    return dict(atol=1e-4 if dtype == torch.float32 else 1e-3, rtol=1e-4)


# ---- merge_attention_states ----------------------------------------------------------------------
def split_decode(dtype, seed, device="cpu"):
    """A decode batch whose keys are split in two disjoint sets (each row's first blocks, the
    rest): ((out, lse) of each part, (out, lse) of the whole, the float64 reference)."""
    generator = torch.Generator().manual_seed(seed)
    q, kc, vc, tables, lens = [t.to(device) for t in paged_inputs(
        [1, 17, 300, 0, 64, 33, 5], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
        generator=generator)]
    first = 2  # blocks in part a: rows of up to 32 tokens have nothing in part b, an empty row nothing anywhere
    lens_a = lens.clamp(max=first * 16)
    part_a = ops.paged_decode_attention(q, kc, vc, tables[:, :first].contiguous(), lens_a, return_lse=True)
    part_b = ops.paged_decode_attention(q, kc, vc, tables[:, first:].contiguous(), lens - lens_a, return_lse=True)
    whole = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True)
    return part_a, part_b, whole, decode_reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_two_parts_equals_the_whole(dtype):
    (out_a, lse_a), (out_b, lse_b), (whole, whole_lse), (expected, expected_lse) = split_decode(dtype, seed=9)
    out = torch.full_like(out_a, math.nan)
    result, lse = ops.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out)
    assert result is out
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, **lse_tolerance(dtype))
    torch.testing.assert_close(out.float(), whole.float(), atol=TOLERANCE[dtype], rtol=0)
    swapped, swapped_lse = ops.merge_attention_states(out_b, lse_b, out_a, lse_a)
    assert torch.equal(swapped, out) and torch.equal(swapped_lse, lse)
    # Rows 0 and 1 have no key in part b, row 3 none anywhere.
    assert torch.equal(out[:2], out_a[:2]) and torch.equal(lse[:2], lse_a[:2])
    assert torch.all(out[3] == 0) and torch.all(lse[3] == -math.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_with_an_empty_part_is_exact(dtype):
    generator = torch.Generator().manual_seed(10)
    out_a = (torch.randn(5, 3, 8, generator=generator) * 4).to(dtype)
    lse_a = torch.randn(5, 3, generator=generator) * 30
    out_b = torch.zeros_like(out_a)
    lse_b = torch.full_like(lse_a, -math.inf)
    for args in [(out_a, lse_a, out_b, lse_b), (out_b, lse_b, out_a, lse_a)]:
        out, lse = ops.merge_attention_states(*args)
        assert out.dtype == dtype and torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = ops.merge_attention_states(out_b, lse_b, out_b, lse_b)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_merge_propagates_nan_and_inf():
    out_a, lse_a = torch.randn(6, 2, 4), torch.randn(6, 2)
    out_b, lse_b = torch.randn(6, 2, 4), torch.randn(6, 2)
    lse_a[0, 1] = math.nan                       # a NaN lse: that head's out and lse
    out_b[1, 0, 2] = math.nan                    # a NaN element of out: that element
    out_a[2, 1, 0], lse_a[2, 1] = math.nan, -math.inf   # a NaN out in a part of weight 0: still NaN
    out_a[3, 0], lse_a[3, 0] = math.nan, math.inf       # a +inf score (NaN out, lse +inf): NaN out, lse +inf
    lse_a[4], lse_b[4] = -math.inf, -math.inf    # nothing seen
    out_a[4] = out_b[4] = 0.0
    out, lse = ops.merge_attention_states(out_a, lse_a, out_b, lse_b)
    nan = torch.zeros(6, 2, 4, dtype=torch.bool)
    nan[0, 1], nan[1, 0, 2], nan[2, 1, 0], nan[3, 0] = True, True, True, True
    assert torch.equal(out.isnan(), nan)
    assert lse[0, 1].isnan() and lse[3, 0] == math.inf and torch.all(lse[4] == -math.inf) and torch.all(out[4] == 0)
    lse_nan = torch.zeros(6, 2, dtype=torch.bool)
    lse_nan[0, 1] = True
    assert torch.equal(lse.isnan(), lse_nan)
    assert torch.isfinite(lse[[1, 2, 5]]).all()


def test_merge_in_place_into_a_part():
    (out_a, lse_a), (out_b, lse_b), _, (expected, _) = split_decode(torch.bfloat16, seed=11)
    result, _ = ops.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out_a)
    assert result is out_a
    torch.testing.assert_close(out_a.double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("mutate, error, argument", [
    (lambda a: a.update(out_a=a["out_a"][0]), ValueError, "out_a"),
    (lambda a: a.update(out_a=a["out_a"].double(), out_b=a["out_b"].double()), TypeError, "out_a"),
    (lambda a: a.update(out_b=a["out_b"].half()), TypeError, "out_b"),
    (lambda a: a.update(out_b=a["out_b"][:, :2]), ValueError, "out_b"),
    (lambda a: a.update(lse_a=a["lse_a"].double()), TypeError, "lse_a"),
    (lambda a: a.update(lse_b=a["lse_b"][:3]), ValueError, "lse_b"),
    (lambda a: a.update(lse_b=a["lse_b"].unsqueeze(-1)), ValueError, "lse_b"),
    (lambda a: a.update(out=torch.empty(4, 3)), ValueError, "out"),
    (lambda a: a.update(out=torch.empty(4, 3, 8, dtype=torch.bfloat16)), TypeError, "out"),
    (lambda a: a.update(lse_a=a["lse_a"].numpy()), TypeError, "lse_a"),
    (lambda a: a.update(out_b=[1.0]), TypeError, "out_b"),
])
def test_merge_bad_input_raises_naming_the_argument(mutate, error, argument):
    args = dict(out_a=torch.randn(4, 3, 8), lse_a=torch.randn(4, 3), out_b=torch.randn(4, 3, 8),
                lse_b=torch.randn(4, 3))
    mutate(args)
    with pytest.raises(error, match=argument):
        ops.merge_attention_states(**args)


def test_merge_torch_op_and_opcheck():
    (out_a, lse_a), (out_b, lse_b), _, _ = split_decode(torch.float16, seed=12)
    out, lse = torch.ops.pagedlm.merge_attention_states(out_a, lse_a, out_b, lse_b)
    expected, expected_lse = ops.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    torch.library.opcheck(torch.ops.pagedlm.merge_attention_states.default, (out_a, lse_a, out_b, lse_b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_matches_cpu_and_keeps_its_edge_cases(dtype):
    (out_a, lse_a), (out_b, lse_b), _, (expected, expected_lse) = split_decode(dtype, seed=20, device="cuda")
    lse_a[5, 0], lse_b[4, 1] = math.nan, -math.inf  # rows 4 and 5 have keys in both parts
    out, lse = ops.merge_attention_states(out_a, lse_a, out_b, lse_b)
    cpu, cpu_lse = ops.merge_attention_states(*[t.cpu() for t in (out_a, lse_a, out_b, lse_b)])
    torch.testing.assert_close(out.cpu().float(), cpu.float(), atol=TOLERANCE[dtype], rtol=0, equal_nan=True)
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=1e-5, rtol=1e-6, equal_nan=True)
    assert out[5, 0].isnan().all() and lse[5, 0].isnan()
    assert torch.equal(out[4, 1], out_a[4, 1]) and torch.equal(lse[4, 1], lse_a[4, 1])
    keep = torch.ones(7, dtype=torch.bool)
    keep[[4, 5]] = False
    torch.testing.assert_close(out[keep].cpu().double(), expected[keep], atol=TOLERANCE[dtype], rtol=0)
