"""paged_decode_attention against the float64 reference: CPU in CI, CUDA (marked gpu) on the
GPU machine. Outputs are poisoned with NaN before every run, inputs are fresh random
values, and block tables are scrambled."""
import itertools
import math

import pytest
import torch

import pagedlm.ops as ops
from attention_reference import TOLERANCE, decode_reference, flat_masks, paged_inputs, prefill_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(32, 32), (32, 8), (16, 1)]
HEAD_DIMS = [64, 128, 256]
BLOCK_SIZES = [1, 16, 32]
# Lengths mixed within a batch: 1, 17, 1000 and 4097 tokens, plus zero and odd sizes.
LENGTHS = {1: [4097], 7: [1, 17, 1000, 4097, 0, 97, 513], 33: [1, 17, 1000, 4097] + [17, 1, 97] * 9 + [33, 250]}


def grid():
    """Every (dtype, heads, head_dim) combination; batch, block size, window and soft cap
    rotate through their values so that each appears with every dtype and head layout."""
    cases = []
    for i, (dtype, heads, head_dim) in enumerate(itertools.product(DTYPES, HEADS, HEAD_DIMS)):
        batch = [1, 7, 33][i % 3]
        block_size = BLOCK_SIZES[(i // 3) % 3]
        window = [None, 300][(i // 2) % 2]
        soft_cap = [None, 5.0][(i // 4) % 2]
        cases.append(pytest.param(dtype, heads, head_dim, batch, block_size, window, soft_cap,
                                  id=f"{str(dtype)[6:]}-h{heads[0]}x{heads[1]}-d{head_dim}-b{batch}-bs{block_size}"
                                     f"-w{window}-cap{soft_cap}"))
    return cases


def run_and_check(device, dtype, heads, head_dim, batch, block_size, window, soft_cap, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = LENGTHS[batch]
    q, kc, vc, tables, lens = paged_inputs(lengths, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                           block_size=block_size, dtype=dtype, generator=generator)
    expected, expected_lse = decode_reference(q, kc, vc, tables, lens, sliding_window=window, soft_cap=soft_cap)
    args = [t.to(device) for t in (q, kc, vc, tables, lens)]
    out = torch.full_like(args[0], math.nan)  # poison: every element must be written
    result, lse = ops.paged_decode_attention(*args, sliding_window=window, soft_cap=soft_cap, return_lse=True,
                                             out=out)
    assert result is out
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-4 if dtype == torch.float32 else 1e-3,
                               rtol=1e-4)
    return out, lse


@pytest.mark.parametrize("dtype, heads, head_dim, batch, block_size, window, soft_cap", grid())
def test_cpu_matches_reference(dtype, heads, head_dim, batch, block_size, window, soft_cap):
    run_and_check("cpu", dtype, heads, head_dim, batch, block_size, window, soft_cap, seed=hash((heads, head_dim)))


@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128, 256])
def test_cpu_every_block_size_and_odd_head_dim(block_size):
    # Any head dim runs on CPU; 80 and 7 are not CUDA sizes.
    for head_dim in (80, 7):
        run_and_check("cpu", torch.float32, (4, 2), head_dim, 7, block_size, None, None, seed=block_size)


def test_decode_of_empty_sequence_is_zero_with_minus_inf_lse():
    q, kc, vc, tables, _ = paged_inputs([5, 5], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                                        dtype=torch.float32)
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, torch.tensor([0, 5], dtype=torch.int32),
                                          return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    assert torch.all(torch.isfinite(out[1]))


def test_torch_op_matches_and_opcheck_passes():
    q, kc, vc, tables, lens = paged_inputs([9, 40, 1], num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
                                           dtype=torch.float32)
    out, lse = torch.ops.pagedlm.paged_decode_attention(q, kc, vc, tables, lens, None, 64, None)
    expected, expected_lse = ops.paged_decode_attention(q, kc, vc, tables, lens, sliding_window=64, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    torch.library.opcheck(torch.ops.pagedlm.paged_decode_attention.default, (q, kc, vc, tables, lens),
                          {"soft_cap": 3.0})
    out2, lse2 = torch.empty_like(q), torch.empty(3, 8)
    torch.library.opcheck(torch.ops.pagedlm.paged_decode_attention_out.default,
                          (q, kc, vc, tables, lens, out2, lse2))


@pytest.fixture
def small():
    return paged_inputs([5, 9], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)


@pytest.mark.parametrize("mutate, error, argument", [
    (lambda a: a.update(query=a["query"][0]), ValueError, "query"),
    (lambda a: a.update(query=a["query"].half()), TypeError, "query"),
    (lambda a: a.update(query=a["query"].transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "query"),
    (lambda a: a.update(query=a["query"][:, :3]), ValueError, "query"),
    (lambda a: a.update(key_cache=a["key_cache"][..., :8]), ValueError, "key_cache"),
    (lambda a: a.update(value_cache=a["value_cache"].double()), TypeError, "value_cache"),
    (lambda a: a.update(block_tables=a["block_tables"].long()), TypeError, "block_tables"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "block_tables"),
    (lambda a: a.update(seq_lens=a["seq_lens"].long()), TypeError, "seq_lens"),
    (lambda a: a.update(seq_lens=torch.tensor([5, 13], dtype=torch.int32)), ValueError, "seq_lens"),
    (lambda a: a.update(seq_lens=torch.tensor([-1, 9], dtype=torch.int32)), ValueError, "seq_lens"),
    (lambda a: a["block_tables"].__setitem__((1, 2), 99), ValueError, "block_tables"),
    (lambda a: a["block_tables"].__setitem__((0, 0), -1), ValueError, "block_tables"),
    (lambda a: a.update(out=torch.empty(2, 4, 8)), ValueError, "out"),
    (lambda a: a.update(out=torch.empty(2, 4, 16, dtype=torch.float16)), TypeError, "out"),
    (lambda a: a.update(query=a["query"].numpy()), TypeError, "query"),
    (lambda a: a.update(sliding_window=0), ValueError, "sliding_window"),
    (lambda a: a.update(soft_cap=-1.0), ValueError, "soft_cap"),
])
def test_bad_input_raises_naming_the_argument(small, mutate, error, argument):
    q, kc, vc, tables, lens = small
    args = dict(query=q, key_cache=kc, value_cache=vc, block_tables=tables, seq_lens=lens)
    mutate(args)
    with pytest.raises(error, match=argument):
        ops.paged_decode_attention(**args)


def test_value_checks_need_contiguous_index_tensors():
    # The debug-mode value checks read the tensors' memory in order: a strided view must be refused,
    # not read as if it were dense.
    from pagedlm import _C
    tables, lens = torch.zeros(2, 3, dtype=torch.int32), torch.ones(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        _C.check_paged_decode_values(tables, lens[::2], 16, 4)
    with pytest.raises(ValueError, match="block_tables"):
        _C.check_paged_decode_values(torch.zeros(2, 6, dtype=torch.int32)[:, ::2], lens[:2], 16, 4)
    with pytest.raises(ValueError, match="mask_offsets"):
        _C.check_paged_decode_mask(torch.zeros(4, dtype=torch.int64)[::2], lens[:2], 64)


def test_num_heads_must_be_a_multiple_of_kv_heads():
    q, kc, vc, tables, lens = paged_inputs([5], num_heads=3, num_kv_heads=2, head_dim=16, block_size=4,
                                           dtype=torch.float32)
    with pytest.raises(ValueError, match="num_heads"):
        ops.paged_decode_attention(q, kc, vc, tables, lens)


# ---- CUDA -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, heads, head_dim, batch, block_size, window, soft_cap", grid())
def test_cuda_matches_reference_and_cpu(dtype, heads, head_dim, batch, block_size, window, soft_cap):
    seed = hash((heads, head_dim, "cuda"))
    out_gpu, lse_gpu = run_and_check("cuda", dtype, heads, head_dim, batch, block_size, window, soft_cap, seed)
    out_cpu, lse_cpu = run_and_check("cpu", dtype, heads, head_dim, batch, block_size, window, soft_cap, seed)
    torch.testing.assert_close(out_gpu.cpu().float(), out_cpu.float(), atol=2 * TOLERANCE[dtype], rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("heads", [(32, 8), (8, 8), (16, 1), (12, 4), (6, 3)])
def test_cuda_block_sizes_and_head_groups(block_size, heads):
    run_and_check("cuda", torch.bfloat16, heads, 128, 7, block_size, None, None, seed=block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [32768, 131072])
def test_cuda_long_context_split_k(length):
    run_and_check("cuda", torch.bfloat16, (32, 8), 128, 1, 16, None, None, seed=length) if length <= 32768 else \
        _long_single(length)


def _long_single(length):
    # One 128K sequence: the reference on 8 heads only keeps it affordable.
    generator = torch.Generator().manual_seed(length)
    q, kc, vc, tables, lens = paged_inputs([length], num_heads=8, num_kv_heads=2, head_dim=128, block_size=16,
                                           dtype=torch.bfloat16, generator=generator)
    expected, _ = decode_reference(q, kc, vc, tables, lens)
    out = ops.paged_decode_attention(*[t.cuda() for t in (q, kc, vc, tables, lens)])
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)


@pytest.mark.gpu
def test_cuda_bad_block_id_gives_nan_row_not_a_fault():
    q, kc, vc, tables, lens = [t.cuda() for t in paged_inputs([40, 40], num_heads=8, num_kv_heads=2, head_dim=64,
                                                              block_size=16, dtype=torch.float16)]
    tables[0, 1] = 10_000_000
    lens[1] = 1 << 30  # beyond the table's capacity
    out = ops.paged_decode_attention(q, kc, vc, tables, lens)
    torch.cuda.synchronize()
    assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.gpu
def test_cuda_debug_mode_checks_values(monkeypatch):
    q, kc, vc, tables, lens = [t.cuda() for t in paged_inputs([40], num_heads=8, num_kv_heads=2, head_dim=64,
                                                              block_size=16, dtype=torch.float16)]
    tables[0, 1] = 10_000
    monkeypatch.setenv("PAGEDLM_DEBUG", "1")
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_decode_attention(q, kc, vc, tables, lens)


@pytest.mark.gpu
def test_cuda_rejects_unsupported_head_dim_and_mixed_devices():
    q, kc, vc, tables, lens = paged_inputs([5], num_heads=4, num_kv_heads=2, head_dim=80, block_size=4,
                                           dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), tables.cuda(), lens.cuda())
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_decode_attention(q.cuda(), kc.cuda(), vc.cuda(), tables.cuda(), lens)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    generator = torch.Generator().manual_seed(7)
    q, kc, vc, tables, lens = [t.cuda() for t in paged_inputs([3000, 17, 500], num_heads=32, num_kv_heads=8,
                                                              head_dim=128, block_size=16, dtype=torch.bfloat16,
                                                              generator=generator)]
    out = torch.empty_like(q)
    ops.paged_decode_attention(q, kc, vc, tables, lens, out=out)  # warm-up allocates the workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode_attention(q, kc, vc, tables, lens, out=out)
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([2999, 1, 480], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expected, _ = decode_reference(q.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), lens.cpu())
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)


@pytest.mark.gpu
def test_cuda_opcheck():
    q, kc, vc, tables, lens = [t.cuda() for t in paged_inputs([9, 300], num_heads=8, num_kv_heads=2, head_dim=64,
                                                              block_size=16, dtype=torch.bfloat16)]
    torch.library.opcheck(torch.ops.pagedlm.paged_decode_attention.default, (q, kc, vc, tables, lens))


# ---- A custom mask: the rows of a masked prefill, one decode query each ---------------------------
def masked_rows(seq_lens, q_lens, *, heads, head_dim, block_size, dtype, seed, device):
    """A masked prefill batch (random masks, one row seeing nothing) and the same rows as decode
    queries: row j of sequence s has s's table and length and its mask row at offset
    mask_indptr[s] + j * seq_len_s. Returns (prefill args, decode args, masks)."""
    generator = torch.Generator().manual_seed(seed)
    _, kc, vc, tables, lens = paged_inputs(seq_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                           block_size=block_size, dtype=dtype, generator=generator)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    query = torch.randn(int(cu[-1]), heads[0], head_dim, generator=generator).to(dtype)
    masks = [torch.rand(q, n, generator=generator) < 0.4 for n, q in zip(seq_lens, q_lens)]
    masks[0][-1] = False
    mask, indptr = flat_masks(masks)
    owner = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    within = torch.arange(int(cu[-1])) - cu[owner].long()
    offsets = indptr[owner].long() + within * lens[owner].long()
    prefill = [t.to(device) for t in (query, kc, vc, tables, cu, lens, mask, indptr)]
    decode = [t.to(device) for t in (query, kc, vc, tables[owner].contiguous(), lens[owner].contiguous(), mask,
                                     offsets)]
    return prefill, decode, masks


def check_masked_rows(device, dtype, heads, head_dim, block_size, seq_lens, q_lens, seed):
    prefill, decode, masks = masked_rows(seq_lens, q_lens, heads=heads, head_dim=head_dim, block_size=block_size,
                                         dtype=dtype, seed=seed, device=device)
    query, kc, vc, tables, lens, mask, offsets = decode
    expected, expected_lse = prefill_reference(*[t.cpu() for t in prefill[:6]], masks=masks)
    out = torch.full_like(query, math.nan)
    _, lse = ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask, mask_offsets=offsets,
                                        return_lse=True, out=out)
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=2e-3, rtol=1e-3)
    seen_nothing = q_lens[0] - 1  # the first sequence's last row
    assert torch.all(out[seen_nothing] == 0) and torch.all(lse[seen_nothing] == -math.inf)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, head_dim, block_size", [((8, 2), 64, 16), ((5, 5), 128, 1), ((4, 1), 256, 32)])
def test_cpu_custom_mask_rows_equal_masked_prefill(dtype, heads, head_dim, block_size):
    check_masked_rows("cpu", dtype, heads, head_dim, block_size, [40, 13, 97, 1], [11, 13, 5, 1], seed=71)


def test_custom_mask_needs_offsets_inside_the_mask():
    _, decode, _ = masked_rows([20, 9], [4, 3], heads=(4, 2), head_dim=64, block_size=8, dtype=torch.float32,
                               seed=73, device="cpu")
    query, kc, vc, tables, lens, mask, offsets = decode
    with pytest.raises(ValueError, match="mask_offsets"):
        ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask)
    bad = offsets.clone()
    bad[2] = mask.numel() - 5  # the row's 20 elements run past the end
    with pytest.raises(ValueError, match="mask_offsets"):
        ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask, mask_offsets=bad)
    with pytest.raises(TypeError, match="custom_mask"):
        ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask.to(torch.uint8), mask_offsets=offsets)
    with pytest.raises(ValueError, match="mask_offsets"):
        ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask, mask_offsets=offsets[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, head_dim, block_size", [((8, 2), 64, 16), ((5, 5), 128, 1), ((4, 1), 256, 32)])
def test_cuda_custom_mask_rows_equal_masked_prefill(dtype, heads, head_dim, block_size):
    # 5000 keys make the kernel split the rows (split-K with a merge).
    out = check_masked_rows("cuda", dtype, heads, head_dim, block_size, [40, 13, 5000, 1], [11, 13, 5, 1], seed=79)
    prefill, _, _ = masked_rows([40, 13, 5000, 1], [11, 13, 5, 1], heads=heads, head_dim=head_dim,
                                block_size=block_size, dtype=dtype, seed=79, device="cuda")
    query, kc, vc, tables, cu, lens, mask, indptr = prefill
    expected = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, custom_mask=mask, mask_indptr=indptr)
    torch.testing.assert_close(out.float(), expected.float(), atol=2 * TOLERANCE[dtype], rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, head_dim, block_size", [((5, 5), 64, 16), ((8, 4), 128, 1), ((8, 2), 64, 7),
                                                         ((4, 1), 256, 32)])
@pytest.mark.parametrize("seq_lens, q_lens", [([40, 13, 97, 1], [11, 13, 5, 1]), ([150, 300, 9], [81, 40, 9])])
def test_cuda_custom_mask_rows_of_short_sequences(dtype, heads, head_dim, block_size, seq_lens, q_lens):
    """Short sequences (no split-K), as the masked varlen graphs of lookahead run them (81 rows of
    one sequence): equal to the float64 reference and to the CPU path."""
    out = check_masked_rows("cuda", dtype, heads, head_dim, block_size, seq_lens, q_lens, seed=89)
    cpu = check_masked_rows("cpu", dtype, heads, head_dim, block_size, seq_lens, q_lens, seed=89)
    torch.testing.assert_close(out.cpu().float(), cpu.float(), atol=2 * TOLERANCE[dtype], rtol=0)


@pytest.mark.gpu
def test_cuda_custom_mask_rows_with_a_bad_block_id_give_nan_rows_only_there():
    """A bad block id in one sequence's table turns that sequence's rows into NaN; the other
    sequences' rows stay finite."""
    _, decode, _ = masked_rows([40, 30, 12], [11, 5, 4], heads=(5, 5), head_dim=64, block_size=8,
                               dtype=torch.bfloat16, seed=97, device="cuda")
    query, kc, vc, tables, lens, mask, offsets = decode
    tables[:11, 3] = kc.shape[0] + 7  # the first sequence's fourth block: tokens 24-31 of its 40
    out = ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask, mask_offsets=offsets)
    torch.cuda.synchronize()
    assert torch.isnan(out[:11]).all() and torch.isfinite(out[11:]).all()


@pytest.mark.gpu
def test_cuda_custom_mask_offset_out_of_range_gives_nan_row():
    _, decode, _ = masked_rows([20, 9], [4, 3], heads=(4, 2), head_dim=64, block_size=8, dtype=torch.float16,
                               seed=83, device="cuda")
    query, kc, vc, tables, lens, mask, offsets = decode
    offsets[2] = mask.numel() - 5
    out = ops.paged_decode_attention(query, kc, vc, tables, lens, custom_mask=mask, mask_offsets=offsets)
    torch.cuda.synchronize()
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4, 5, 6]]).all()
