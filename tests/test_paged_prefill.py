"""paged_prefill_attention against the float64 reference, on the CPU path and (marker gpu) the
CUDA kernels: tensor cores for f16/bf16, CUDA cores for f32. Outputs are poisoned, inputs
fresh, block tables scrambled."""
import itertools
import math

import pytest
import torch

import pagedlm.ops as ops
from attention_reference import (TOLERANCE, flat_masks, has_wgmma_prefill, pack_masks, paged_inputs,
                                 prefill_reference)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_batch(seq_lens, q_lens, *, heads, head_dim, block_size, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    _, kc, vc, tables, lens = paged_inputs(seq_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                                           block_size=block_size, dtype=dtype, generator=generator)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    query = torch.randn(int(cu[-1]), heads[0], head_dim, generator=generator).to(dtype)
    return query, kc, vc, tables, cu, lens


def check(batch, dtype, **kwargs):
    query, kc, vc, tables, cu, lens = batch
    masks = kwargs.pop("masks", None)
    backend = kwargs.pop("backend", "auto")
    mask_args = {}
    if masks is not None:
        fmt = kwargs.pop("mask_format", "flat")
        mask, indptr = (pack_masks if fmt == "packed" else flat_masks)(masks)
        mask_args = dict(custom_mask=mask, mask_indptr=indptr)
    expected, expected_lse = prefill_reference(query, kc, vc, tables, cu, lens, masks=masks, **kwargs)
    out = torch.full_like(query, math.nan)
    result, lse = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, return_lse=True, out=out,
                                              backend=backend, **mask_args, **kwargs)
    assert result is out
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-3, rtol=1e-4)
    return out, lse


def grid():
    cases = []
    for i, (dtype, heads, head_dim) in enumerate(itertools.product(DTYPES, [(8, 8), (8, 2), (4, 1)], [64, 128, 256])):
        block_size = [1, 16, 32][i % 3]
        window = [None, 40][(i // 3) % 2]
        soft_cap = [None, 5.0][(i // 2) % 2]
        cases.append(pytest.param(dtype, heads, head_dim, block_size, window, soft_cap,
                                  id=f"{str(dtype)[6:]}-h{heads[0]}x{heads[1]}-d{head_dim}-bs{block_size}-w{window}"
                                     f"-cap{soft_cap}"))
    return cases


@pytest.mark.parametrize("dtype, heads, head_dim, block_size, window, soft_cap", grid())
def test_mixed_batch_matches_reference(dtype, heads, head_dim, block_size, window, soft_cap):
    # Plain prefill (q_len = seq_len), chunks after cached tokens, a single new token, 97.
    seq_lens, q_lens = [97, 130, 1, 60, 33], [97, 45, 1, 1, 17]
    batch = make_batch(seq_lens, q_lens, heads=heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                       seed=hash((heads, head_dim)))
    check(batch, dtype, sliding_window=window, soft_cap=soft_cap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_query_equals_decode(dtype):
    seq_lens = [1, 17, 300, 64]
    batch = make_batch(seq_lens, [1] * 4, heads=(8, 2), head_dim=64, block_size=16, dtype=dtype, seed=5)
    query, kc, vc, tables, cu, lens = batch
    prefill, prefill_lse = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, sliding_window=100,
                                                       soft_cap=4.0, return_lse=True)
    decode, decode_lse = ops.paged_decode_attention(query, kc, vc, tables, lens, sliding_window=100, soft_cap=4.0,
                                                    return_lse=True)
    torch.testing.assert_close(prefill.float(), decode.float(), atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(prefill_lse, decode_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mask_format", ["flat", "packed"])
def test_custom_mask_equal_to_causal_gives_causal_result(mask_format):
    seq_lens, q_lens = [50, 23, 9], [50, 7, 3]
    batch = make_batch(seq_lens, q_lens, heads=(8, 2), head_dim=64, block_size=16, dtype=torch.float32, seed=7)
    masks = [torch.arange(n).unsqueeze(0) <= torch.arange(n - q, n).unsqueeze(1) for n, q in zip(seq_lens, q_lens)]
    causal, causal_lse = check(batch, torch.float32)
    masked, masked_lse = check(batch, torch.float32, masks=masks, mask_format=mask_format)
    torch.testing.assert_close(masked, causal, atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_lse, causal_lse, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mask_format", ["flat", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_masks_with_empty_rows(mask_format, dtype):
    seq_lens, q_lens = [40, 13, 70], [11, 13, 5]
    batch = make_batch(seq_lens, q_lens, heads=(4, 2), head_dim=64, block_size=8, dtype=dtype, seed=11)
    generator = torch.Generator().manual_seed(3)
    masks = [torch.rand(q, n, generator=generator) < 0.3 for n, q in zip(seq_lens, q_lens)]
    masks[0][2] = False  # a row that sees nothing: zeros, lse -inf
    out, lse = check(batch, dtype, masks=masks, mask_format=mask_format)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == -math.inf)


def test_tree_shaped_mask_for_speculative_verification():
    # A prefix of 20 cached tokens, then a token tree of 7 nodes: node i sees the prefix and
    # its ancestors (node 0 is the root, parents[i] < i).
    parents = [-1, 0, 0, 1, 1, 2, 5]
    prefix, nodes = 20, len(parents)
    tree = torch.zeros(nodes, prefix + nodes, dtype=torch.bool)
    tree[:, :prefix] = True
    for i in range(nodes):
        j = i
        while j >= 0:
            tree[i, prefix + j] = True
            j = parents[j]
    batch = make_batch([prefix + nodes], [nodes], heads=(8, 2), head_dim=128, block_size=16, dtype=torch.bfloat16,
                       seed=13)
    check(batch, torch.bfloat16, masks=[tree])
    check(batch, torch.bfloat16, masks=[tree], mask_format="packed")


def test_non_causal():
    batch = make_batch([30, 8], [10, 8], heads=(4, 4), head_dim=32, block_size=4, dtype=torch.float32, seed=17)
    check(batch, torch.float32, causal=False)


def test_torch_op_and_opcheck():
    query, kc, vc, tables, cu, lens = make_batch([12, 30], [12, 5], heads=(4, 2), head_dim=32, block_size=8,
                                                 dtype=torch.float32, seed=19)
    out, lse = torch.ops.pagedlm.paged_prefill_attention(query, kc, vc, tables, cu, lens)
    expected = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens)
    assert torch.equal(out, expected)
    torch.library.opcheck(torch.ops.pagedlm.paged_prefill_attention.default, (query, kc, vc, tables, cu, lens),
                          {"sliding_window": 6})


@pytest.mark.parametrize("mutate, error, argument", [
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 12, 16], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([1, 12, 17], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 17], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q"),
    (lambda a: a.update(seq_lens=torch.tensor([10, 30], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    (lambda a: a.update(seq_lens=torch.tensor([12, 300], dtype=torch.int32)), ValueError, "seq_lens"),
    (lambda a: a["block_tables"].__setitem__((1, 0), 1000), ValueError, "block_tables"),
    (lambda a: a.update(custom_mask=torch.ones(10, dtype=torch.bool),
                        mask_indptr=torch.tensor([0, 5, 10], dtype=torch.int32)), ValueError, "mask_indptr"),
    (lambda a: a.update(custom_mask=torch.ones(300, dtype=torch.float32),
                        mask_indptr=torch.tensor([0, 144, 294], dtype=torch.int32)), TypeError, "custom_mask"),
    (lambda a: a.update(custom_mask=torch.ones(300, dtype=torch.bool)), ValueError, "mask_indptr"),
    (lambda a: a.update(query=a["query"][:, :3]), ValueError, "query"),
    (lambda a: a.update(sliding_window=-2), ValueError, "sliding_window"),
    (lambda a: a.update(backend="fa3"), ValueError, "backend"),
    (lambda a: a.update(backend=None), ValueError, "backend"),
])
def test_bad_input_raises_naming_the_argument(mutate, error, argument):
    query, kc, vc, tables, cu, lens = make_batch([12, 30], [12, 5], heads=(4, 2), head_dim=32, block_size=8,
                                                 dtype=torch.float32, seed=23)
    args = dict(query=query, key_cache=kc, value_cache=vc, block_tables=tables, cu_seqlens_q=cu, seq_lens=lens)
    mutate(args)
    with pytest.raises(error, match=argument):
        ops.paged_prefill_attention(**args)


@pytest.mark.parametrize("backend", ["auto", "mma", "sm90"])
def test_cpu_path_takes_every_backend(backend):
    batch = make_batch([40, 13], [40, 5], heads=(4, 2), head_dim=32, block_size=8, dtype=torch.float32, seed=29)
    check(batch, torch.float32, backend=backend)


# ---- CUDA -----------------------------------------------------------------------------
def cuda_check(batch, dtype, **kwargs):
    """CUDA against the float64 reference and against the CPU path."""
    masks = kwargs.pop("masks", None)
    fmt = kwargs.pop("mask_format", "flat")
    backend = kwargs.pop("backend", "auto")
    mask_args = {}
    if masks is not None:
        mask, indptr = (pack_masks if fmt == "packed" else flat_masks)(masks)
        mask_args = dict(custom_mask=mask, mask_indptr=indptr)
    query, kc, vc, tables, cu, lens = batch
    expected, expected_lse = prefill_reference(query, kc, vc, tables, cu, lens, masks=masks, **kwargs)
    cpu = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, **mask_args, **kwargs)
    gpu_args = [t.cuda() for t in batch]
    gpu_mask = {k: v.cuda() for k, v in mask_args.items()}
    out = torch.full_like(gpu_args[0], math.nan)
    _, lse = ops.paged_prefill_attention(*gpu_args, return_lse=True, out=out, backend=backend, **gpu_mask, **kwargs)
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out.cpu().float(), cpu.float(), atol=2 * TOLERANCE[dtype], rtol=0)
    return out, lse


def test_many_short_sequences_take_the_persistent_grid():
    """The grid choice counts the blocks the one-block-per-tile grid would launch: a step of 257
    short sequences (decodes and a prompt chunk) over 32 heads is mostly spare blocks, and runs
    persistent; one short sequence does not; a long prefill does."""
    assert ops.persistent_prefill(512, 257, 32)
    assert not ops.persistent_prefill(128, 1, 32)
    assert not ops.persistent_prefill(100, 3, 8)
    assert ops.persistent_prefill(16384, 1, 32)
    # At the bound: (rows / 128 + sequences) x heads blocks of 128 rows each.
    tiles = ops.PERSISTENT_PREFILL_MIN_WORK // ops.PREFILL_QUERY_TILE // 8
    assert ops.persistent_prefill((tiles - 4) * ops.PREFILL_QUERY_TILE, 4, 8)
    assert not ops.persistent_prefill((tiles - 5) * ops.PREFILL_QUERY_TILE, 4, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, heads, head_dim, block_size, window, soft_cap", grid())
def test_cuda_mixed_batch(dtype, heads, head_dim, block_size, window, soft_cap):
    seq_lens, q_lens = [97, 130, 1, 60, 33, 300], [97, 45, 1, 1, 17, 150]
    batch = make_batch(seq_lens, q_lens, heads=heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                       seed=hash((heads, head_dim, "cuda")))
    cuda_check(batch, dtype, sliding_window=window, soft_cap=soft_cap)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask_format", ["flat", "packed"])
def test_cuda_custom_masks_and_tree(mask_format, dtype):
    seq_lens, q_lens = [40, 13, 70, 27], [11, 13, 5, 7]
    batch = make_batch(seq_lens, q_lens, heads=(8, 2), head_dim=128, block_size=16, dtype=dtype, seed=31)
    generator = torch.Generator().manual_seed(5)
    masks = [torch.rand(q, n, generator=generator) < 0.3 for n, q in zip(seq_lens, q_lens)]
    masks[0][2] = False
    out, lse = cuda_check(batch, dtype, masks=masks, mask_format=mask_format)
    assert torch.all(out[2] == 0) and torch.all(lse[2] == -math.inf)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_backends_agree_with_the_reference(dtype, causal):
    # Both tensor-core kernels where the device has them: "mma" everywhere, "sm90" on Hopper.
    batch = make_batch([700, 300, 129], [700, 100, 1], heads=(8, 2), head_dim=128, block_size=16, dtype=dtype,
                       seed=41)
    hopper = has_wgmma_prefill()
    for backend in ["auto", "mma"] + (["sm90"] if hopper else []):
        cuda_check(batch, dtype, causal=causal, backend=backend)
    if hopper:  # the wgmma kernel takes no custom mask: asking for it there is an error, not a fallback
        mask, indptr = flat_masks([torch.ones(q, n, dtype=torch.bool) for n, q in zip([700, 300, 129], [700, 100, 1])])
        with pytest.raises(ValueError, match="backend"):
            ops.paged_prefill_attention(*[t.cuda() for t in batch], custom_mask=mask.cuda(), mask_indptr=indptr.cuda(),
                                        backend="sm90")
    else:
        with pytest.raises(ValueError, match="backend"):
            ops.paged_prefill_attention(*[t.cuda() for t in batch], backend="sm90")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("soft_cap", [None, 2.0])
@pytest.mark.parametrize("window", [1, 100, 128, 129, 300])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_cuda_windows_and_soft_caps_across_tiles(head_dim, window, soft_cap, causal, monkeypatch):
    # Windows shorter than, as long as and longer than the Hopper kernel's 128-key tiles, over
    # sequences of several query tiles: each warpgroup computes only the key tiles its rows' windows
    # reach and passes over the rest, which its neighbour may need; through the persistent grid (items
    # one after another through one K/V ring) and one block per tile.
    seq_lens, q_lens = [700, 300, 129, 1, 520], [700, 100, 129, 1, 200]
    batch = make_batch(seq_lens, q_lens, heads=(8, 2), head_dim=head_dim, block_size=16, dtype=torch.bfloat16,
                       seed=hash((head_dim, window, soft_cap, causal, "window")))
    for min_work in (0, 1 << 62):
        monkeypatch.setattr(ops, "PERSISTENT_PREFILL_MIN_WORK", min_work)
        cuda_check(batch, torch.bfloat16, causal=causal, sliding_window=window, soft_cap=soft_cap,
                   backend="sm90" if has_wgmma_prefill() else "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_long_causal_prefill_and_non_causal(dtype):
    batch = make_batch([1500, 700], [1500, 200], heads=(8, 2), head_dim=128, block_size=16, dtype=dtype, seed=37)
    cuda_check(batch, dtype)
    cuda_check(batch, dtype, causal=False)


@pytest.mark.gpu
def test_cuda_single_query_equals_decode():
    query, kc, vc, tables, cu, lens = [t.cuda() for t in make_batch([1, 17, 300, 64], [1] * 4, heads=(8, 2),
                                                                     head_dim=64, block_size=16,
                                                                     dtype=torch.bfloat16, seed=41)]
    prefill = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, sliding_window=100)
    decode = ops.paged_decode_attention(query, kc, vc, tables, lens, sliding_window=100)
    torch.testing.assert_close(prefill.float(), decode.float(), atol=TOLERANCE[torch.bfloat16], rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_bad_block_gives_nan_rows_and_graph_capture_works(dtype):
    query, kc, vc, tables, cu, lens = [t.cuda() for t in make_batch([80, 40], [30, 40], heads=(8, 2), head_dim=64,
                                                                     block_size=16, dtype=dtype, seed=43)]
    out = torch.empty_like(query)
    ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, out=out)
    query.copy_(torch.randn_like(query))
    graph.replay()
    torch.cuda.synchronize()
    expected, _ = prefill_reference(query.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), cu.cpu(), lens.cpu())
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=0)
    tables[0, 2] = 1 << 24
    ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, out=out)
    torch.cuda.synchronize()
    assert torch.isnan(out[:30]).all() and torch.isfinite(out[30:]).all()


@pytest.mark.gpu
def test_cuda_rejects_odd_head_dims():
    batch = make_batch([20], [5], heads=(4, 2), head_dim=80, block_size=16, dtype=torch.float16, seed=47)
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_prefill_attention(*[t.cuda() for t in batch])
    torch.library.opcheck(torch.ops.pagedlm.paged_prefill_attention.default,
                          tuple(t.cuda() for t in make_batch([20, 9], [5, 9], heads=(4, 2), head_dim=64,
                                                             block_size=16, dtype=torch.float16, seed=53)))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, block_size", [((8, 8), 16), ((8, 2), 32), ((8, 1), 5), ((4, 1), 1)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_query_and_key_tile_edges(dtype, head_dim, heads, block_size, causal):
    # Edges of the Hopper kernel's tiles (64-row warpgroups, 128-query blocks, 128-key tiles, 64 at head
    # dim 256): q_len and
    # seq_len on either side of them, plain prefill and chunks after cached tokens, GQA groups 1/4/8,
    # block sizes that are not powers of two.
    seq_lens, q_lens = [63, 129, 300, 256, 520, 1, 700], [63, 65, 127, 128, 200, 1, 129]
    batch = make_batch(seq_lens, q_lens, heads=heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                       seed=hash((heads, head_dim, block_size, causal, "edges")))
    cuda_check(batch, dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_size", [4, 8, 64, 256])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_cuda_page_sizes_with_poisoned_tails(head_dim, block_size, causal):
    # The Hopper kernel's producer takes a thread's rows (8 for D=64, 16 for D=128) from one page when
    # the page holds them, else page by page; pages larger than a 128-key tile hold several tiles. The
    # cache past each sequence's end (its last page's tail, the blocks nobody owns) is NaN, which must
    # never reach an output: rows past the end are zero-filled, not read.
    seq_lens, q_lens = [129, 300, 1, 520, 77], [65, 127, 1, 200, 77]
    batch = make_batch(seq_lens, q_lens, heads=(8, 2), head_dim=head_dim, block_size=block_size,
                       dtype=torch.bfloat16, seed=hash((head_dim, block_size, causal, "poison")))
    _, kc, vc, tables, _, lens = batch
    owned = torch.zeros(kc.shape[0], block_size, dtype=torch.bool)
    for row, length in zip(tables.tolist(), lens.tolist()):
        for t in range(length):
            owned[row[t // block_size], t % block_size] = True
    kc[~owned], vc[~owned] = math.nan, math.nan
    cuda_check(batch, torch.bfloat16, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim, block_size", [(128, 16), (64, 5), (256, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_persistent_grid_equals_one_block_per_tile(dtype, head_dim, block_size, causal, monkeypatch):
    # Enough (query tile, head) items for several per SM, so that the persistent grid's blocks run
    # item after item through one K/V ring: same bits as one block per tile, and the reference. A bad
    # block id in one sequence NaNs that sequence's rows only, in both grids.
    generator = torch.Generator().manual_seed(59)
    q_lens = [int(n) for n in torch.randint(1, 400, (14,), generator=generator)]
    seq_lens = [q + int(c) for q, c in zip(q_lens, torch.randint(0, 200, (14,), generator=generator))]
    q_lens[3], seq_lens[3] = 1, 1
    q_lens[5], seq_lens[5] = 150, 300
    batch = make_batch(seq_lens, q_lens, heads=(32, 8), head_dim=head_dim, block_size=block_size, dtype=dtype,
                       seed=hash((head_dim, block_size, causal, "persistent")))
    monkeypatch.setattr(ops, "PERSISTENT_PREFILL_MIN_WORK", 0)
    out, lse = cuda_check(batch, dtype, causal=causal)
    query, kc, vc, tables, cu, lens = [t.cuda() for t in batch]
    monkeypatch.setattr(ops, "PERSISTENT_PREFILL_MIN_WORK", 1 << 62)
    grid_out, grid_lse = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, causal=causal, return_lse=True)
    assert torch.equal(out, grid_out) and torch.equal(lse, grid_lse)

    tables[5, 1] = kc.shape[0]
    bad_rows = slice(int(cu[5]), int(cu[6]))
    for min_work in (0, 1 << 62):
        monkeypatch.setattr(ops, "PERSISTENT_PREFILL_MIN_WORK", min_work)
        out = ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, causal=causal)
        torch.cuda.synchronize()
        assert torch.isnan(out[bad_rows]).all()
        assert torch.equal(out[:bad_rows.start], grid_out[:bad_rows.start])
        assert torch.equal(out[bad_rows.stop:], grid_out[bad_rows.stop:])


@pytest.mark.gpu
def test_cuda_persistent_grid_in_a_graph(monkeypatch):
    # The work counter is zeroed inside the captured graph, so every replay hands out all the work.
    monkeypatch.setattr(ops, "PERSISTENT_PREFILL_MIN_WORK", 0)
    batch = make_batch([900, 1200, 64], [900, 300, 64], heads=(32, 8), head_dim=128, block_size=16,
                       dtype=torch.bfloat16, seed=61)
    query, kc, vc, tables, cu, lens = [t.cuda() for t in batch]
    out = torch.empty_like(query)
    ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, out=out)
    for _ in range(3):
        query.copy_(torch.randn_like(query))
        out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        expected, _ = prefill_reference(query.cpu(), kc.cpu(), vc.cpu(), tables.cpu(), cu.cpu(), lens.cpu())
        torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)
