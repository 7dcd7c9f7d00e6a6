"""cascade_decode_attention (shared-prefix decode) and merge_attention_states against the float64
reference: CPU in CI, CUDA (marked gpu) on the GPU machine. Outputs are poisoned with NaN before
every run, inputs are fresh random values, and every prefix and suffix lives in blocks scattered
through the cache in a random order."""
import itertools
import math

import pytest
import torch

import pagedlm
import pagedlm.ops as ops
from attention_reference import TOLERANCE, cascade_reference, decode_reference, paged_inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(8, 8), (8, 2), (4, 1)]
HEAD_DIMS = [64, 128, 256]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]

# Groups of 1, 5, 3, 8, 0 and 2 rows. Prefixes: 37 tokens (ending mid-block for block sizes 7, 16
# and 32), none for a group of 5, 200, a single token for a group of 8 (fewer prefix tokens than
# rows), 9 for the empty group, 64. Ragged suffixes, some empty; row 1 sees no token at all.
GROUP_SIZES = [1, 5, 3, 8, 0, 2]
PREFIX_LENS = [37, 0, 200, 1, 9, 64]
SUFFIX_LENS = [3, 0, 17, 1, 40, 0, 97, 2, 5, 33, 0, 8, 1, 16, 64, 7, 11, 0, 29]


def lse_tolerance(dtype):
    return dict(atol=1e-4 if dtype == torch.float32 else 1e-3, rtol=1e-4)


def cascade_inputs(group_sizes, prefix_lens, suffix_lens, *, heads, head_dim, block_size, dtype, seed,
                   spare_blocks=3):
    """Random query and caches, each group's prefix and each row's suffix in blocks of their own,
    taken in a random order from the cache (some blocks belong to nobody). Table entries past a
    part's blocks are -1, and the prefix tables have a spare column. Returns the op's arguments."""
    generator = torch.Generator().manual_seed(seed)
    prefix_blocks = [-(-n // block_size) for n in prefix_lens]
    suffix_blocks = [-(-n // block_size) for n in suffix_lens]
    num_blocks = sum(prefix_blocks) + sum(suffix_blocks) + spare_blocks
    order = torch.randperm(num_blocks, generator=generator).int()

    def tables(counts, spare_columns, start):
        t = torch.full((len(counts), max(counts, default=0) + spare_columns), -1, dtype=torch.int32)
        for i, n in enumerate(counts):
            t[i, :n] = order[start:start + n]
            start += n
        return t, start

    prefix_tables, used = tables(prefix_blocks, 1, 0)
    suffix_tables, _ = tables(suffix_blocks, 0, used)
    batch = sum(group_sizes)
    query = torch.randn(batch, heads[0], head_dim, generator=generator).to(dtype)
    key_cache = torch.randn(num_blocks, block_size, heads[1], head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, heads[1], head_dim, generator=generator).to(dtype)
    group_indptr = torch.tensor([0, *itertools.accumulate(group_sizes)], dtype=torch.int32)
    return (query, key_cache, value_cache, prefix_tables, torch.tensor(prefix_lens, dtype=torch.int32), group_indptr,
            suffix_tables, torch.tensor(suffix_lens, dtype=torch.int32))


def run_and_check(device, args, *, dtype, soft_cap=None, reference_caches=None, **kwargs):
    """The op on `device` (output poisoned) against the float64 reference; returns (out, lse) on the CPU.
    reference_caches: the caches the reference reads (the dequantized ones for FP8)."""
    ref_args = list(args)
    if reference_caches is not None:
        ref_args[1:3] = reference_caches
    expected, expected_lse = cascade_reference(*ref_args, soft_cap=soft_cap)
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    out = torch.full(args[0].shape, math.nan, dtype=args[0].dtype, device=device)
    result, lse = ops.cascade_decode_attention(*map(move, args), soft_cap=soft_cap, return_lse=True, out=out,
                                               **{k: move(v) for k, v in kwargs.items()})
    assert result is out and out.dtype == args[0].dtype
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, **lse_tolerance(dtype))
    return out.cpu(), lse.cpu()


def grid():
    """Every (dtype, heads, head_dim) combination; block size and soft cap rotate through their
    values so that each appears with every dtype and head layout."""
    cases = []
    for i, (dtype, heads, head_dim) in enumerate(itertools.product(DTYPES, HEADS, HEAD_DIMS)):
        block_size = [16, 7, 32, 1][i % 4]
        soft_cap = [None, 5.0][(i // 2) % 2]
        name = f"{str(dtype)[6:]}-h{heads[0]}x{heads[1]}-d{head_dim}-bs{block_size}-cap{soft_cap}"
        cases.append(pytest.param(dtype, heads, head_dim, block_size, soft_cap, id=name))
    return cases


@pytest.mark.parametrize("dtype, heads, head_dim, block_size, soft_cap", grid())
def test_cpu_matches_reference(dtype, heads, head_dim, block_size, soft_cap):
    args = cascade_inputs(GROUP_SIZES, PREFIX_LENS, SUFFIX_LENS, heads=heads, head_dim=head_dim,
                          block_size=block_size, dtype=dtype, seed=hash((heads, head_dim)) % 1000)
    out, lse = run_and_check("cpu", args, dtype=dtype, soft_cap=soft_cap)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)  # no prefix and no suffix


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_groups_of_one_row_and_odd_head_dim(block_size):
    # Every row its own group (prefixes of 0, 1, ... tokens); any head dim runs on CPU.
    suffix_lens = [5, 0, 13, 1, 0, 40, 2]
    prefix_lens = [0, 3, 16, 17, 1, 0, 33]
    args = cascade_inputs([1] * 7, prefix_lens, suffix_lens, heads=(6, 3), head_dim=7, block_size=block_size,
                          dtype=torch.float32, seed=block_size)
    run_and_check("cpu", args, dtype=torch.float32)


def test_one_group_over_the_whole_batch_and_empty_groups_around_it():
    args = cascade_inputs([0, 33, 0], [5, 300, 0], [1, 17, 100] * 11, heads=(8, 2), head_dim=64, block_size=16,
                          dtype=torch.bfloat16, seed=3)
    run_and_check("cpu", args, dtype=torch.bfloat16, soft_cap=4.0)


def test_groups_larger_than_the_prefix_tables_reach():
    # The prefill reads a short group's rows' worth of tokens from block 0 (its result dropped):
    # here 9 rows against prefix tables of 8 slots, then of none at all.
    args = list(cascade_inputs([9, 4], [2, 0], [1, 5, 0, 8, 3, 2, 7, 1, 4, 6, 0, 2, 9], heads=(4, 2), head_dim=32,
                               block_size=4, dtype=torch.float32, seed=21))
    assert args[3].shape[1] * 4 < 9
    run_and_check("cpu", args, dtype=torch.float32)
    args[3], args[4] = torch.zeros(2, 0, dtype=torch.int32), int32(0, 0)
    run_and_check("cpu", args, dtype=torch.float32)


def test_empty_batch():
    args = cascade_inputs([0, 0], [4, 0], [], heads=(4, 2), head_dim=16, block_size=4, dtype=torch.float32, seed=4)
    out, lse = ops.cascade_decode_attention(*args, return_lse=True)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


def test_scale_is_applied_to_both_parts():
    args = cascade_inputs([2, 3], [20, 9], [4, 0, 11, 6, 1], heads=(4, 2), head_dim=32, block_size=8,
                          dtype=torch.float32, seed=5)
    expected, expected_lse = cascade_reference(*args, scale=0.3, soft_cap=2.0)
    out, lse = ops.cascade_decode_attention(*args, scale=0.3, soft_cap=2.0, return_lse=True)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, **lse_tolerance(torch.float32))


def concatenated(args):
    """The block tables and lengths of paged_decode_attention over each row's prefix blocks then
    suffix blocks (a block-aligned prefix)."""
    _, key_cache, _, prefix_tables, prefix_lens, group_indptr, suffix_tables, suffix_lens = args
    block_size = key_cache.shape[1]
    rows = []
    for g in range(len(prefix_lens)):
        assert prefix_lens[g] % block_size == 0
        prefix = prefix_tables[g, :int(prefix_lens[g]) // block_size]
        for b in range(int(group_indptr[g]), int(group_indptr[g + 1])):
            rows.append(torch.cat([prefix, suffix_tables[b]]))
    width = max((len(r) for r in rows), default=0)
    tables = torch.stack([torch.cat([r, torch.full((width - len(r),), -1, dtype=torch.int32)]) for r in rows])
    owner = torch.repeat_interleave(torch.arange(len(prefix_lens)), group_indptr.diff().long())
    return tables, prefix_lens[owner] + suffix_lens


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_decode_over_the_concatenated_table(dtype):
    args = cascade_inputs([3, 1, 6], [64, 16, 0], [0, 9, 33, 16, 1, 2, 100, 0, 15, 40], heads=(8, 2), head_dim=64,
                          block_size=16, dtype=dtype, seed=6)
    out, lse = ops.cascade_decode_attention(*args, soft_cap=3.0, return_lse=True)
    tables, lens = concatenated(args)
    decode, decode_lse = ops.paged_decode_attention(args[0], args[1], args[2], tables, lens, soft_cap=3.0,
                                                    return_lse=True)
    torch.testing.assert_close(out.float(), decode.float(), atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse, decode_lse, atol=1e-4, rtol=1e-5)


def test_forked_block_manager_sequences():
    """What the engine's tables give: a prompt forked into 4 samples, each having appended its own
    tokens (copy-on-write of the partial last block). Prefix: the full blocks all samples share;
    suffix: each sample's blocks after them. Equal to decode over each sample's whole table."""
    block_size, prompt_len = 4, 11
    manager = pagedlm.BlockManager(num_blocks=64, block_size=block_size)
    manager.allocate(0, list(range(prompt_len)))
    for i in range(1, 4):
        manager.fork(0, i)
    for i, steps in enumerate([1, 6, 3, 9]):
        for step in range(steps):
            manager.append(i, [100 * i + step])
    tables = torch.from_numpy(manager.block_tables([0, 1, 2, 3])).int()
    lens = torch.tensor([manager.num_tokens(i) for i in range(4)], dtype=torch.int32)
    shared = prompt_len // block_size
    assert torch.all(tables[:, :shared] == tables[0, :shared]) and len(set(tables[:, shared].tolist())) == 4
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(4, 8, 64, generator=generator)
    key_cache, value_cache = torch.randn(2, 64, block_size, 2, 64, generator=generator)
    out = ops.cascade_decode_attention(query, key_cache, value_cache, tables[:1, :shared].contiguous(),
                                       torch.tensor([shared * block_size], dtype=torch.int32),
                                       torch.tensor([0, 4], dtype=torch.int32), tables[:, shared:].contiguous(),
                                       lens - shared * block_size)
    expected, _ = decode_reference(query, key_cache, value_cache, tables, lens)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)


# ---- FP8 caches: the reference reads the dequantized cache --------------------------------------
def quantize(x, scale, dtype):
    scale = torch.as_tensor(scale, dtype=torch.float32)
    scale = scale.view(-1, 1) if scale.dim() == 1 else scale
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


def dequantize(cache, scale):
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return cache.float() * (scale.view(-1, 1) if scale.dim() == 1 else scale)


def fp8_case(cache_dtype, query_dtype, *, heads, head_dim, block_size, per_head, seed):
    """cascade_inputs with FP8 caches: (args, k_scale, v_scale, dequantized caches)."""
    args = list(cascade_inputs(GROUP_SIZES, PREFIX_LENS, SUFFIX_LENS, heads=heads, head_dim=head_dim,
                               block_size=block_size, dtype=torch.float32, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    if per_head:
        k_scale = torch.rand(heads[1], generator=generator) * 0.02 + 0.005
        v_scale = torch.rand(heads[1], generator=generator) * 0.02 + 0.005
    else:
        k_scale, v_scale = 0.0123, 0.0071
    args[0] = args[0].to(query_dtype)
    args[1], args[2] = quantize(args[1], k_scale, cache_dtype), quantize(args[2], v_scale, cache_dtype)
    return args, k_scale, v_scale, (dequantize(args[1], k_scale), dequantize(args[2], v_scale))


@pytest.mark.parametrize("query_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
def test_cpu_fp8_caches(cache_dtype, query_dtype):
    for per_head, soft_cap in [(True, None), (False, 3.5)]:
        args, k_scale, v_scale, dequantized = fp8_case(cache_dtype, query_dtype, heads=(6, 2), head_dim=24,
                                                       block_size=5, per_head=per_head, seed=8)
        run_and_check("cpu", args, dtype=query_dtype, soft_cap=soft_cap, reference_caches=dequantized,
                      k_scale=k_scale, v_scale=v_scale)


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


# ---- The torch op, and arguments ----------------------------------------------------------------
def small_args():
    return cascade_inputs([2, 3], [10, 7], [5, 0, 9, 3, 12], heads=(4, 2), head_dim=16, block_size=4,
                          dtype=torch.float32, seed=13)


def test_torch_op_matches_and_opcheck_passes():
    args = small_args()
    out, lse = torch.ops.pagedlm.cascade_decode_attention(*args, None, 3.0)
    expected, expected_lse = ops.cascade_decode_attention(*args, soft_cap=3.0, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    torch.library.opcheck(torch.ops.pagedlm.cascade_decode_attention.default, args, {"scale": 0.2})


# torch's SchemaCheckMode compares tensors with arithmetic that float8 lacks (as in test_fp8_kv_cache.py).
FP8_OPCHECK = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_torch_op_with_fp8_caches_and_opcheck():
    args, k_scale, v_scale, _ = fp8_case(torch.float8_e4m3fn, torch.bfloat16, heads=(4, 2), head_dim=16,
                                         block_size=4, per_head=True, seed=14)
    out, _ = torch.ops.pagedlm.cascade_decode_attention(*args, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(out, ops.cascade_decode_attention(*args, k_scale=k_scale, v_scale=v_scale))
    torch.library.opcheck(torch.ops.pagedlm.cascade_decode_attention.default, tuple(args),
                          {"k_scale": k_scale, "v_scale": v_scale}, test_utils=FP8_OPCHECK)


ARG_NAMES = ["query", "key_cache", "value_cache", "prefix_block_tables", "prefix_lens", "group_indptr",
             "suffix_block_tables", "suffix_lens"]


def int32(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("mutate, error, argument", [
    (lambda a: a.update(query=a["query"][0]), ValueError, "query"),
    (lambda a: a.update(query=a["query"].half()), TypeError, "query"),
    (lambda a: a.update(query=a["query"][:, :3]), ValueError, "query"),
    (lambda a: a.update(key_cache=a["key_cache"][0]), ValueError, "key_cache"),
    (lambda a: a.update(value_cache=a["value_cache"].double()), TypeError, "value_cache"),
    (lambda a: a.update(prefix_block_tables=a["prefix_block_tables"].long()), TypeError, "prefix_block_tables"),
    (lambda a: a.update(prefix_block_tables=a["prefix_block_tables"][0]), ValueError, "prefix_block_tables"),
    (lambda a: a.update(prefix_block_tables=a["prefix_block_tables"][:1]), ValueError, "prefix_block_tables"),
    (lambda a: a.update(prefix_block_tables=a["prefix_block_tables"].t().contiguous().t()), ValueError,
     "prefix_block_tables"),
    (lambda a: a.update(prefix_lens=a["prefix_lens"].long()), TypeError, "prefix_lens"),
    (lambda a: a.update(prefix_lens=a["prefix_lens"][None]), ValueError, "prefix_lens"),
    (lambda a: a.update(group_indptr=int32(0, 5)), ValueError, "group_indptr"),
    (lambda a: a.update(group_indptr=a["group_indptr"].long()), TypeError, "group_indptr"),
    (lambda a: a.update(group_indptr=int32(0, 1, 2, 3, 4, 5, 6)[::3]), ValueError, "group_indptr"),
    (lambda a: a.update(suffix_block_tables=a["suffix_block_tables"][:4]), ValueError, "suffix_block_tables"),
    (lambda a: a.update(suffix_block_tables=a["suffix_block_tables"].short()), TypeError, "suffix_block_tables"),
    (lambda a: a.update(suffix_lens=a["suffix_lens"][:4]), ValueError, "suffix_lens"),
    (lambda a: a.update(suffix_lens=a["suffix_lens"].float()), TypeError, "suffix_lens"),
    (lambda a: a.update(suffix_lens=[5, 0, 9, 3, 12]), TypeError, "suffix_lens"),
    # values
    (lambda a: a.update(group_indptr=int32(1, 2, 5)), ValueError, "group_indptr"),
    (lambda a: a.update(group_indptr=int32(0, 4, 3)), ValueError, "group_indptr"),
    (lambda a: a.update(group_indptr=int32(0, 2, 4)), ValueError, "group_indptr"),
    (lambda a: a.update(group_indptr=int32(0, 2, 6)), ValueError, "group_indptr"),
    (lambda a: a.update(prefix_lens=int32(10, 17)), ValueError, "prefix_lens"),
    (lambda a: a.update(prefix_lens=int32(-1, 7)), ValueError, "prefix_lens"),
    (lambda a: a.update(suffix_lens=int32(5, 0, 9, 3, 13)), ValueError, "suffix_lens"),
    (lambda a: a.update(suffix_lens=int32(5, -2, 9, 3, 12)), ValueError, "suffix_lens"),
    (lambda a: a["prefix_block_tables"].__setitem__((1, 1), 99), ValueError, "prefix_block_tables"),
    (lambda a: a["prefix_block_tables"].__setitem__((0, 0), -1), ValueError, "prefix_block_tables"),
    (lambda a: a["suffix_block_tables"].__setitem__((4, 2), 99), ValueError, "suffix_block_tables"),
    # options and out
    (lambda a: a.update(out=torch.empty(5, 4, 8)), ValueError, "out"),
    (lambda a: a.update(out=torch.empty(5, 4, 16, dtype=torch.float16)), TypeError, "out"),
    (lambda a: a.update(out=torch.empty(4, 5, 16).transpose(0, 1)), ValueError, "out"),
    (lambda a: a.update(out=a["query"]), ValueError, "out: must not share memory with query"),
    (lambda a: a.update(out=a["key_cache"].view(-1)[:320].view(5, 4, 16)), ValueError,
     "out: must not share memory with key_cache"),
    (lambda a: a.update(out=[0.0]), TypeError, "out"),
    (lambda a: a.update(soft_cap=-1.0), ValueError, "soft_cap"),
    (lambda a: a.update(scale=math.nan), ValueError, "scale"),
    (lambda a: a.update(k_scale=2.0), ValueError, "k_scale"),
    (lambda a: a.update(sliding_window=64), TypeError, "sliding_window"),
])
def test_bad_input_raises_naming_the_argument(mutate, error, argument):
    args = dict(zip(ARG_NAMES, small_args()))
    mutate(args)
    with pytest.raises(error, match=argument):
        ops.cascade_decode_attention(**args)


def test_block_ids_past_a_length_are_not_read():
    # Entries beyond the blocks a length uses may hold anything (the tables' -1 padding is not read).
    args = dict(zip(ARG_NAMES, small_args()))
    expected = ops.cascade_decode_attention(**args)
    args["prefix_block_tables"][1, 2:] = 1 << 30   # group 1 uses 2 blocks (7 tokens)
    args["suffix_block_tables"][1] = -7             # row 1 has no suffix
    assert torch.equal(ops.cascade_decode_attention(**args), expected)


def test_a_refused_call_leaves_out_unwritten():
    args = dict(zip(ARG_NAMES, small_args()))
    args["suffix_lens"] = int32(5, 0, 9, 3, 100)
    out = torch.full((5, 4, 16), 7.0)
    with pytest.raises(ValueError, match="suffix_lens"):
        ops.cascade_decode_attention(**args, out=out)
    assert torch.all(out == 7.0)


# ---- CUDA -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, heads, head_dim, block_size, soft_cap", grid())
def test_cuda_matches_reference_and_cpu(dtype, heads, head_dim, block_size, soft_cap):
    args = cascade_inputs(GROUP_SIZES, PREFIX_LENS, SUFFIX_LENS, heads=heads, head_dim=head_dim,
                          block_size=block_size, dtype=dtype, seed=hash((heads, head_dim, "cuda")) % 1000)
    out_gpu, lse_gpu = run_and_check("cuda", args, dtype=dtype, soft_cap=soft_cap)
    out_cpu, lse_cpu = run_and_check("cpu", args, dtype=dtype, soft_cap=soft_cap)
    torch.testing.assert_close(out_gpu.float(), out_cpu.float(), atol=2 * TOLERANCE[dtype], rtol=0)
    assert torch.all(out_gpu[1] == 0) and torch.all(lse_gpu[1] == -math.inf)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (16, 1)])
def test_cuda_long_shared_prefix(heads):
    # The benchmark's shape, shortened: 64 rows sharing a 4,096-token prefix, and 8 groups of 8.
    for group_sizes, prefix_len in [([64], 4096), ([8] * 8, 2048)]:
        batch = sum(group_sizes)
        suffix_lens = [(37 * b) % 300 for b in range(batch)]
        args = cascade_inputs(group_sizes, [prefix_len] * len(group_sizes), suffix_lens, heads=heads, head_dim=128,
                              block_size=16, dtype=torch.bfloat16, seed=prefix_len)
        run_and_check("cuda", args, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_cuda_large_batch_takes_the_persistent_prefill():
    # 16 groups of 128 rows: each group's prefix (longer than its 128 x 4 packed queries, so none is
    # short) is one prefill sequence of 512 queries per kv head, through the persistent grid.
    group_sizes = [128] * 16
    assert ops.persistent_prefill(sum(group_sizes) * 4, len(group_sizes), 8)
    suffix_lens = [(11 * b) % 40 for b in range(sum(group_sizes))]
    args = cascade_inputs(group_sizes, [520 + 16 * g for g in range(16)], suffix_lens, heads=(32, 8), head_dim=64,
                          block_size=16, dtype=torch.float16, seed=15)
    run_and_check("cuda", args, dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("query_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", FP8, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_fp8_caches(cache_dtype, query_dtype, head_dim):
    for per_head, soft_cap in [(True, None), (False, 3.5)]:
        args, k_scale, v_scale, dequantized = fp8_case(cache_dtype, query_dtype, heads=(8, 2), head_dim=head_dim,
                                                       block_size=16, per_head=per_head, seed=16)
        run_and_check("cuda", args, dtype=query_dtype, soft_cap=soft_cap, reference_caches=dequantized,
                      k_scale=k_scale, v_scale=v_scale)


@pytest.mark.gpu
def test_cuda_never_synchronizes():
    args = [t.cuda() for t in cascade_inputs(GROUP_SIZES, PREFIX_LENS, SUFFIX_LENS, heads=(8, 2), head_dim=128,
                                             block_size=16, dtype=torch.bfloat16, seed=17)]
    ops.cascade_decode_attention(*args)  # warm-up: the decode workspace is allocated on first use
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.cascade_decode_attention(*args, soft_cap=2.0, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """Captured once, replayed with new queries, lengths and groups: everything is read on the device."""
    args = [t.cuda() for t in cascade_inputs([3, 1, 4], [300, 17, 64], [5, 0, 40, 9, 1, 16, 70, 2], heads=(32, 8),
                                             head_dim=128, block_size=16, dtype=torch.bfloat16, seed=18)]
    query, _, _, _, prefix_lens, group_indptr, _, suffix_lens = args
    out = torch.empty_like(query)
    ops.cascade_decode_attention(*args, out=out)  # warm-up allocates the decode workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = ops.cascade_decode_attention(*args, out=out, return_lse=True)
    # Lengths within each table's blocks; the last groups put all rows behind a 1-token prefix.
    for new_prefix, new_indptr, new_suffix in [([299, 3, 0], [0, 3, 4, 8], [5, 0, 33, 9, 1, 16, 70, 2]),
                                               ([16, 2, 63], [0, 1, 5, 8], [0, 0, 0, 0, 0, 0, 0, 0]),
                                               ([0, 0, 1], [0, 0, 0, 8], [3, 0, 1, 0, 16, 16, 2, 9])]:
        query.copy_(torch.randn_like(query))
        prefix_lens.copy_(int32(*new_prefix))
        group_indptr.copy_(int32(*new_indptr))
        suffix_lens.copy_(int32(*new_suffix))
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_lse = cascade_reference(*[t.cpu() for t in args])
        torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)
        torch.testing.assert_close(lse.cpu().double(), expected_lse, **lse_tolerance(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_debug_mode_checks_values(monkeypatch):
    args = dict(zip(ARG_NAMES, [t.cuda() for t in small_args()]))
    monkeypatch.setenv("PAGEDLM_DEBUG", "1")
    for name, bad, argument in [("group_indptr", int32(0, 4, 3), "group_indptr"),
                                ("prefix_lens", int32(10, 17), "prefix_lens"),
                                ("suffix_lens", int32(5, 0, 9, 3, 13), "suffix_lens")]:
        with pytest.raises(ValueError, match=argument):
            ops.cascade_decode_attention(**{**args, name: bad.cuda()})
    tables = args["prefix_block_tables"].clone()
    tables[1, 1] = 10_000
    with pytest.raises(ValueError, match="prefix_block_tables"):
        ops.cascade_decode_attention(**{**args, "prefix_block_tables": tables})


@pytest.mark.gpu
def test_cuda_rejects_mixed_devices():
    args = dict(zip(ARG_NAMES, [t.cuda() for t in small_args()]))
    for name in ARG_NAMES[3:]:
        with pytest.raises(ValueError, match=name):
            ops.cascade_decode_attention(**{**args, name: args[name].cpu()})
    with pytest.raises(ValueError, match="out"):
        ops.cascade_decode_attention(**args, out=torch.empty(5, 4, 16))
    out_a, lse_a = torch.randn(4, 3, 8, device="cuda"), torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="lse_b"):
        ops.merge_attention_states(out_a, lse_a, out_a, lse_a.cpu())


@pytest.mark.gpu
def test_cuda_opcheck():
    args = [t.cuda() for t in cascade_inputs([2, 3], [40, 7], [5, 0, 19, 3, 12], heads=(8, 2), head_dim=64,
                                             block_size=16, dtype=torch.bfloat16, seed=19)]
    torch.library.opcheck(torch.ops.pagedlm.cascade_decode_attention.default, tuple(args))
    out_a, lse_a = torch.randn(5, 8, 64, device="cuda").bfloat16(), torch.randn(5, 8, device="cuda")
    torch.library.opcheck(torch.ops.pagedlm.merge_attention_states.default, (out_a, lse_a, out_a.neg(), lse_a + 1))


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
