"""FP8 KV caches (float8_e4m3fn, float8_e5m2): the write's quantization bit for bit against
torch's own conversion, and decode / prefill in every mode against the float64 reference
computed over the DEQUANTIZED cache (stored * scale in float32, as the kernels widen it), so
that the kernels are held to their own arithmetic, not to the quantization error."""
import math

import pytest
import torch

import pagedlm.ops as ops
from attention_reference import (TOLERANCE, decode_reference, flat_masks, has_wgmma_prefill, pack_masks, paged_inputs,
                                 prefill_reference)

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
QUERY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fp8_id(dtype):
    return "e4m3" if dtype == torch.float8_e4m3fn else "e5m2"


def quantize(x, scale, dtype):
    """The reference quantization: x / scale in float32, saturated, rounded to nearest even by torch."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if scale.dim() == 1:
        scale = scale.view(-1, 1)
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)  # clamp keeps NaN


def dequantize(cache, scale):
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if scale.dim() == 1:
        scale = scale.view(-1, 1)
    return cache.float() * scale


def fp8_inputs(seq_lens, *, num_heads, num_kv_heads, head_dim, block_size, query_dtype, cache_dtype, generator,
               per_head=True):
    """Random query and FP8 caches with scales (per kv head, or one float), and the dequantized
    caches the reference reads."""
    q, kc, vc, tables, lens = paged_inputs(seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                           head_dim=head_dim, block_size=block_size, dtype=torch.float32,
                                           generator=generator)
    if per_head:
        k_scale = torch.rand(num_kv_heads, generator=generator) * 0.02 + 0.005
        v_scale = torch.rand(num_kv_heads, generator=generator) * 0.02 + 0.005
    else:
        k_scale, v_scale = 0.0123, 0.0071
    k8, v8 = quantize(kc, k_scale, cache_dtype), quantize(vc, v_scale, cache_dtype)
    return (q.to(query_dtype), k8, v8, tables, lens, k_scale, v_scale, dequantize(k8, k_scale),
            dequantize(v8, v_scale))


# ---- The write: quantization ------------------------------------------------------------------
def special_values(dtype):
    """Every FP8 value, the midpoints between neighbours (ties), just above and below them, values
    past the largest, subnormals, zeros, infinities and NaN."""
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = codes[codes.isfinite()].unique()
    mids = (finite[1:] + finite[:-1]) / 2
    fmax = torch.finfo(dtype).max
    extra = torch.tensor([0.0, -0.0, fmax * 1.01, fmax * 1.2, -fmax * 3, 1e30, math.inf, -math.inf, math.nan, 1e-30])
    return torch.cat([finite, mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(-math.inf)),
                      extra])


@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
@pytest.mark.parametrize("src_dtype", QUERY_DTYPES, ids=str)
def test_write_rounds_to_nearest_even_and_saturates(cache_dtype, src_dtype):
    values = special_values(cache_dtype)
    if src_dtype != torch.float32:
        values = values.to(src_dtype)
    head_dim = 5
    n = -(-values.numel() // head_dim)
    x = torch.zeros(n * head_dim, dtype=src_dtype)
    x[:values.numel()] = values
    x = x.view(n, 1, head_dim)
    generator = torch.Generator().manual_seed(1)
    for k_scale, v_scale in [(1.0, 1.0), (0.37, 3.0), (torch.tensor(0.5), torch.tensor([2.5]))]:
        kc = torch.full((n + 3, 1, 1, head_dim), 7.0).to(cache_dtype)  # poisoned
        vc = kc.clone()
        slots = torch.randperm(n + 3, generator=generator)[:n].long()
        ops.write_kv_cache(x, x, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
        for cache, scale in ((kc, k_scale), (vc, v_scale)):
            got = cache.view(-1, 1, head_dim)[slots]
            want = quantize(x.float(), torch.as_tensor(scale).reshape(()), cache_dtype)
            nan = want.float().isnan()
            assert torch.equal(got.float().isnan(), nan)
            assert torch.equal(got.view(torch.uint8)[~nan], want.view(torch.uint8)[~nan])


@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
def test_write_per_head_scales_strided_key_and_skipped_slots(cache_dtype):
    generator = torch.Generator().manual_seed(2)
    tokens, kv_heads, head_dim = 37, 3, 13
    qkv = torch.randn(tokens, 2 * kv_heads + 1, head_dim, generator=generator).to(torch.bfloat16) * 30
    key, value = qkv[:, :kv_heads], qkv[:, kv_heads:2 * kv_heads]  # strided views of one fused output
    k_scale, v_scale = torch.tensor([0.1, 1.0, 7.0]), torch.tensor([0.01, 0.5, 2.0])
    kc = torch.zeros(20, 3, kv_heads, head_dim).to(cache_dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(60, generator=generator)[:tokens].long()
    slots[::5] = -1
    ops.write_kv_cache(key, value, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    written = slots >= 0
    for cache, src, scale in ((kc, key, k_scale), (vc, value, v_scale)):
        got = cache.view(-1, kv_heads, head_dim)[slots[written]]
        want = quantize(src[written], scale, cache_dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[slots[written]] = False
    assert (kc.view(-1, kv_heads, head_dim)[untouched].float() == 0).all()


@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
def test_copy_blocks_copies_fp8_bytes(cache_dtype):
    generator = torch.Generator().manual_seed(3)
    layers = [(torch.randn(6, 3, 2, 5, generator=generator).to(cache_dtype),
               torch.randn(6, 3, 2, 5, generator=generator).to(cache_dtype)) for _ in range(2)]
    before = [(k.clone(), v.clone()) for k, v in layers]
    ops.copy_blocks([k for k, _ in layers], [v for _, v in layers], torch.tensor([[0, 4], [2, 5], [1, 1]]))
    for (k, v), (k0, v0) in zip(layers, before):
        for cache, old in ((k, k0), (v, v0)):
            expect = old.clone()
            expect[4], expect[5] = old[0], old[2]
            assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))


# ---- Attention against the float64 reference over the dequantized cache -----------------------
def decode_grid():
    cases = []
    for i, (cache_dtype, query_dtype) in enumerate([(c, q) for c in FP8 for q in QUERY_DTYPES]):
        heads = [(4, 4), (6, 2), (8, 1)][i % 3]
        head_dim = [37, 64, 19][i % 3]
        block_size = [1, 5, 16][(i // 2) % 3]
        window = [None, 23][i % 2]
        soft_cap = [None, 3.5][(i // 3) % 2]
        cases.append(pytest.param(cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap,
                                  id=f"{fp8_id(cache_dtype)}-{str(query_dtype)[6:]}-h{heads[0]}x{heads[1]}-d{head_dim}"
                                     f"-bs{block_size}-w{window}-cap{soft_cap}"))
    return cases


def check_decode(device, cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap, seed,
                 per_head=True, lengths=(1, 0, 97, 33, 250, 7, 64)):
    generator = torch.Generator().manual_seed(seed)
    q, k8, v8, tables, lens, k_scale, v_scale, kd, vd = fp8_inputs(
        lengths, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=block_size,
        query_dtype=query_dtype, cache_dtype=cache_dtype, generator=generator, per_head=per_head)
    expected, expected_lse = decode_reference(q, kd, vd, tables, lens, sliding_window=window, soft_cap=soft_cap)
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    out = torch.full_like(q, math.nan).to(device)  # poison: every element must be written
    result, lse = ops.paged_decode_attention(*map(move, (q, k8, v8, tables, lens)), sliding_window=window,
                                             soft_cap=soft_cap, return_lse=True, out=out, k_scale=move(k_scale),
                                             v_scale=move(v_scale))
    assert result is out and out.dtype == query_dtype
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[query_dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-3, rtol=1e-4)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap", decode_grid())
def test_cpu_decode_matches_reference_over_dequantized_cache(cache_dtype, query_dtype, heads, head_dim, block_size,
                                                             window, soft_cap):
    check_decode("cpu", cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap,
                 seed=hash((str(cache_dtype), str(query_dtype))) % 1000)
    check_decode("cpu", cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap, seed=5,
                 per_head=False)


def prefill_case(seq_lens, q_lens, *, heads, head_dim, block_size, query_dtype, cache_dtype, seed, per_head=True):
    generator = torch.Generator().manual_seed(seed)
    q, k8, v8, tables, lens, k_scale, v_scale, kd, vd = fp8_inputs(
        seq_lens, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, block_size=block_size,
        query_dtype=query_dtype, cache_dtype=cache_dtype, generator=generator, per_head=per_head)
    query = torch.randn(sum(q_lens), heads[0], head_dim, generator=generator).to(query_dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return query, k8, v8, tables, cu, lens, k_scale, v_scale, kd, vd


PREFILL_MODES = ["causal", "full", "flat-mask", "packed-mask", "window", "soft-cap"]


@pytest.mark.parametrize("mode", PREFILL_MODES)
@pytest.mark.parametrize("query_dtype", QUERY_DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
def test_cpu_prefill_matches_reference_over_dequantized_cache(cache_dtype, query_dtype, mode):
    check_prefill("cpu", cache_dtype, query_dtype, mode, head_dim=21, heads=(6, 2), block_size=7)


def check_prefill(device, cache_dtype, query_dtype, mode, *, head_dim, heads, block_size):
    seq_lens, q_lens = [50, 1, 133, 18, 9], [50, 1, 40, 0, 9]
    query, k8, v8, tables, cu, lens, k_scale, v_scale, kd, vd = prefill_case(
        seq_lens, q_lens, heads=heads, head_dim=head_dim, block_size=block_size, query_dtype=query_dtype,
        cache_dtype=cache_dtype, seed=PREFILL_MODES.index(mode) + 11, per_head=mode != "window")
    kwargs, ref_kwargs = {}, {}
    if mode == "full":
        kwargs["causal"] = ref_kwargs["causal"] = False
    elif mode in ("flat-mask", "packed-mask"):
        generator = torch.Generator().manual_seed(4)
        masks = [torch.rand(ql, sl, generator=generator) < 0.6 for ql, sl in zip(q_lens, seq_lens)]
        mask, indptr = (flat_masks if mode == "flat-mask" else pack_masks)(masks)
        kwargs.update(custom_mask=mask.to(device), mask_indptr=indptr.to(device))
        ref_kwargs["masks"] = masks
    elif mode == "window":
        kwargs["sliding_window"] = ref_kwargs["sliding_window"] = 17
    elif mode == "soft-cap":
        kwargs["soft_cap"] = ref_kwargs["soft_cap"] = 2.5
    expected, expected_lse = prefill_reference(query, kd, vd, tables, cu, lens, **ref_kwargs)
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    out = torch.full_like(query, math.nan).to(device)
    result, lse = ops.paged_prefill_attention(*map(move, (query, k8, v8, tables, cu, lens)), return_lse=True,
                                              out=out, k_scale=move(k_scale), v_scale=move(v_scale), **kwargs)
    assert result is out
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[query_dtype], rtol=0)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-3, rtol=1e-4)


def test_decode_custom_mask_rows_with_fp8_cache():
    generator = torch.Generator().manual_seed(9)
    seq_lens = [30, 12, 1]
    q, k8, v8, tables, lens, k_scale, v_scale, kd, vd = fp8_inputs(
        seq_lens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, query_dtype=torch.bfloat16,
        cache_dtype=torch.float8_e4m3fn, generator=generator)
    masks = [torch.rand(1, n, generator=generator) < 0.5 for n in seq_lens]
    mask, indptr = flat_masks(masks)
    out = ops.paged_decode_attention(q, k8, v8, tables, lens, custom_mask=mask, mask_offsets=indptr[:-1].long(),
                                     k_scale=k_scale, v_scale=v_scale)
    cu = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    expected, _ = prefill_reference(q, kd, vd, tables, cu, lens, masks=masks)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)


def test_nan_in_fp8_key_makes_the_row_nan_and_unseen_keys_play_no_part():
    generator = torch.Generator().manual_seed(10)
    q, k8, v8, tables, lens, k_scale, v_scale, kd, vd = fp8_inputs(
        [20, 20], num_heads=2, num_kv_heads=1, head_dim=8, block_size=4, query_dtype=torch.float32,
        cache_dtype=torch.float8_e4m3fn, generator=generator)
    t = 3
    block, offset = int(tables[0, t // 4]), t % 4
    k8.view(torch.uint8)[block, offset, 0, 0] = 0x7f  # NaN
    out, lse = ops.paged_decode_attention(q, k8, v8, tables, lens, k_scale=k_scale, v_scale=v_scale,
                                          return_lse=True)
    assert out[0].isnan().all() and lse[0].isnan().all()
    assert out[1].isfinite().all()
    out, lse = ops.paged_decode_attention(q, k8, v8, tables, lens, k_scale=k_scale, v_scale=v_scale,
                                          return_lse=True, sliding_window=10)
    assert out.isfinite().all()


# ---- Argument checks ------------------------------------------------------------------------
@pytest.fixture
def small():
    generator = torch.Generator().manual_seed(12)
    q, k8, v8, tables, lens, *_ = fp8_inputs([5, 9], num_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                                             query_dtype=torch.float16, cache_dtype=torch.float8_e4m3fn,
                                             generator=generator)
    return q, k8, v8, tables, lens


@pytest.mark.parametrize("scale, error, match", [
    (0.0, ValueError, "k_scale"), (-1.0, ValueError, "k_scale"), (math.nan, ValueError, "k_scale"),
    (math.inf, ValueError, "k_scale"), (1e39, ValueError, "k_scale"), (True, TypeError, "k_scale"),
    ("1", TypeError, "k_scale"),
    (torch.tensor([1.0, 0.0]), ValueError, r"k_scale\[1\]"), (torch.tensor(math.nan), ValueError, r"k_scale\[0\]"),
    (torch.tensor([1.0, -2.0]), ValueError, r"k_scale\[1\]"), (torch.tensor([1.0, 1.0, 1.0]), ValueError, "k_scale"),
    (torch.ones(2, 1), ValueError, "k_scale"), (torch.tensor(1.0, dtype=torch.float64), TypeError, "k_scale"),
    (torch.tensor([1, 2], dtype=torch.int32), TypeError, "k_scale"),
])
def test_bad_scales_are_refused_naming_them(small, scale, error, match):
    q, k8, v8, tables, lens = small
    with pytest.raises(error, match=match):
        ops.paged_decode_attention(q, k8, v8, tables, lens, k_scale=scale)
    cu = torch.arange(3, dtype=torch.int32)
    with pytest.raises(error, match=match):
        ops.paged_prefill_attention(q[:2], k8, v8, tables, cu, lens, k_scale=scale)
    before = k8.clone()
    with pytest.raises(error, match=match):
        ops.write_kv_cache(q[:, :2], q[:, :2], k8, v8, torch.tensor([0, 1]), k_scale=scale)
    assert torch.equal(k8.view(torch.uint8), before.view(torch.uint8))  # a refused call writes nothing


def test_scales_on_a_16_bit_cache_and_mismatched_dtypes_are_refused(small):
    q, k8, v8, tables, lens = small
    kc, vc = k8.half(), v8.half()
    with pytest.raises(ValueError, match="k_scale: only an FP8 cache"):
        ops.paged_decode_attention(q, kc, vc, tables, lens, k_scale=2.0)
    with pytest.raises(ValueError, match="v_scale: only an FP8 cache"):
        ops.write_kv_cache(q[:, :2], q[:, :2], kc, vc, torch.tensor([0, 1]), v_scale=torch.tensor(1.0))
    ops.paged_decode_attention(q, kc, vc, tables, lens, k_scale=1.0)  # 1.0 is no scale
    with pytest.raises(TypeError, match="value_cache: dtype must match key_cache"):
        ops.paged_decode_attention(q, k8, v8.view(torch.float8_e5m2), tables, lens)
    with pytest.raises(TypeError, match="query: dtype"):
        ops.paged_decode_attention(q.to(torch.float8_e4m3fn), k8, v8, tables, lens)
    with pytest.raises(TypeError, match="key_cache: dtype"):
        ops.paged_decode_attention(q, k8.view(torch.uint8), v8.view(torch.uint8), tables, lens)
    with pytest.raises(ValueError, match="k_scale: must not share memory|key_cache: must not share memory"):
        scale = k8.view(torch.uint8).view(-1)[:4].view(torch.float32)[0]
        ops.write_kv_cache(q[:, :2], q[:, :2], k8, v8, torch.tensor([0, 1]), k_scale=scale)


# torch's SchemaCheckMode (opcheck's test_schema) compares tensors with arithmetic that float8 lacks
# ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'), so the FP8 checks run the other
# utilities, and the test checks by hand that attention leaves its FP8 caches as they were.
FP8_OPCHECK = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_torch_ops_and_opcheck_with_fp8_caches(small):
    q, k8, v8, tables, lens = small
    k_scale, v_scale = torch.tensor([0.5, 2.0]), torch.tensor(0.25)
    out, lse = torch.ops.pagedlm.paged_decode_attention(q, k8, v8, tables, lens, k_scale=k_scale, v_scale=v_scale)
    ref = ops.paged_decode_attention(q, k8, v8, tables, lens, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(out, ref)
    torch.library.opcheck(torch.ops.pagedlm.paged_decode_attention.default, (q, k8, v8, tables, lens),
                          {"k_scale": k_scale, "v_scale": v_scale},
                          test_utils=FP8_OPCHECK)
    out_buf, lse_buf = torch.empty_like(q), torch.empty(q.shape[:2])
    torch.library.opcheck(torch.ops.pagedlm.paged_decode_attention_out.default,
                          (q, k8, v8, tables, lens, out_buf, lse_buf), {"k_scale": k_scale, "v_scale": v_scale},
                          test_utils=FP8_OPCHECK)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    query = torch.randn(5, 4, 8).half()
    torch.library.opcheck(torch.ops.pagedlm.paged_prefill_attention.default, (query, k8, v8, tables, cu, lens),
                          {"k_scale": k_scale, "v_scale": v_scale},
                          test_utils=FP8_OPCHECK)
    kc, vc = k8.clone(), v8.clone()
    torch.library.opcheck(torch.ops.pagedlm.write_kv_cache.default,
                          (query[:, :2], query[:, 2:], kc, vc, torch.tensor([3, 4, 0, 9, -1])),
                          {"k_scale": k_scale, "v_scale": v_scale},
                          test_utils=FP8_OPCHECK)
    torch.library.opcheck(torch.ops.pagedlm.copy_blocks.default, ([kc], [vc], torch.tensor([[0, 1]])),
                          test_utils=FP8_OPCHECK)
    before = k8.view(torch.uint8).clone(), v8.view(torch.uint8).clone()
    torch.ops.pagedlm.paged_prefill_attention(query, k8, v8, tables, cu, lens, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(k8.view(torch.uint8), before[0]) and torch.equal(v8.view(torch.uint8), before[1])


# ---- CUDA (run on a GPU machine: pytest -m gpu tests/test_fp8_kv_cache.py) -----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
@pytest.mark.parametrize("src_dtype", QUERY_DTYPES, ids=str)
def test_cuda_write_matches_cpu_bit_for_bit(cache_dtype, src_dtype):
    values = special_values(cache_dtype).to(src_dtype)
    n = values.numel() // 64
    x = values[:n * 64].view(n, 1, 64)
    generator = torch.Generator().manual_seed(13)
    slots = torch.randperm(n + 5, generator=generator)[:n].long()
    k_scale = torch.tensor([0.37])
    caches = {}
    for device in ("cpu", "cuda"):
        kc = torch.zeros(n + 5, 1, 1, 64).to(cache_dtype).to(device)
        vc = kc.clone()
        ops.write_kv_cache(x.to(device), x.to(device), kc, vc, slots.to(device), k_scale=k_scale.to(device),
                           v_scale=3.0)
        caches[device] = (kc.cpu().view(torch.uint8), vc.cpu().view(torch.uint8))
    for a, b in zip(caches["cpu"], caches["cuda"]):
        nan = a.view(cache_dtype).float().isnan()
        assert torch.equal(b.view(cache_dtype).float().isnan(), nan)
        assert torch.equal(a[~nan], b[~nan])


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
@pytest.mark.parametrize("query_dtype", QUERY_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_cuda_decode_matches_reference_and_cpu(cache_dtype, query_dtype, head_dim):
    for heads, block_size, window, soft_cap in [((8, 2), 16, None, None), ((4, 4), 1, 23, 3.5), ((8, 1), 5, None, 2.0)]:
        out, lse = check_decode("cuda", cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap, seed=3)
        ref, ref_lse = check_decode("cpu", cache_dtype, query_dtype, heads, head_dim, block_size, window, soft_cap,
                                    seed=3)
        torch.testing.assert_close(out, ref, atol=TOLERANCE[query_dtype], rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
@pytest.mark.parametrize("query_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_decode_long_sequences_split_across_blocks(cache_dtype, query_dtype):
    # Lengths past the split threshold: the tensor-core kernel's splits and their merge, with the
    # scales applied per split.
    for heads, head_dim, window in [((32, 8), 128, None), ((8, 1), 64, 3000), ((16, 16), 256, None)]:
        check_decode("cuda", cache_dtype, query_dtype, heads, head_dim, 16, window, None, seed=21,
                     lengths=(4100, 1, 9000, 1500))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", PREFILL_MODES)
@pytest.mark.parametrize("query_dtype", QUERY_DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
def test_cuda_prefill_matches_reference(cache_dtype, query_dtype, mode):
    for head_dim in (64, 128, 256):
        check_prefill("cuda", cache_dtype, query_dtype, mode, head_dim=head_dim, heads=(8, 2), block_size=16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["causal", "full", "window", "soft-cap", "negative-k-scale"])
@pytest.mark.parametrize("cache_dtype", FP8, ids=fp8_id)
def test_cuda_prefill_across_key_tiles_on_both_kernels(cache_dtype, mode, monkeypatch):
    # Sequences of several 128-key tiles and 128-query blocks. On Hopper the wgmma kernel's producer
    # copies byte tiles and widens its own copies into the stage ring, through one ring item after
    # item (persistent grid) and one block per tile; the mma.sync kernel widens in shared memory. A
    # negative k_scale cannot fold into the softmax's exponent: each score is scaled first. A bad
    # block id turns only its sequence's rows into NaN.
    hopper = has_wgmma_prefill()
    seq_lens, q_lens = [700, 300, 129, 1, 520], [700, 100, 129, 1, 200]
    query, k8, v8, tables, cu, lens, k_scale, v_scale, kd, vd = prefill_case(
        seq_lens, q_lens, heads=(8, 2), head_dim=128, block_size=16, query_dtype=torch.bfloat16,
        cache_dtype=cache_dtype, seed=hash((mode, str(cache_dtype))) % 1000)
    kwargs = {"full": dict(causal=False), "window": dict(sliding_window=300), "soft-cap": dict(soft_cap=2.5)}.get(mode, {})
    if mode == "negative-k-scale":
        k_scale = -k_scale
        kd = -kd
    expected, expected_lse = prefill_reference(query, kd, vd, tables, cu, lens, **kwargs)
    args = [t.cuda() for t in (query, k8, v8, tables, cu, lens)]
    scales = dict(k_scale=k_scale.cuda(), v_scale=v_scale.cuda())
    for backend, min_work in [("mma", 0)] + ([("sm90", 0), ("sm90", 1 << 62)] if hopper else []):
        monkeypatch.setattr(ops, "PERSISTENT_PREFILL_MIN_WORK", min_work)
        out = torch.full_like(args[0], math.nan)
        _, lse = ops.paged_prefill_attention(*args, out=out, return_lse=True, backend=backend, **scales, **kwargs)
        torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)
        torch.testing.assert_close(lse.cpu().double(), expected_lse, atol=1e-3, rtol=1e-4)
    bad_tables = args[3].clone()
    bad_tables[1, 2] = 1 << 24
    out = ops.paged_prefill_attention(*args[:3], bad_tables, *args[4:], **scales, **kwargs)
    rows = slice(q_lens[0], q_lens[0] + q_lens[1])
    assert out[rows].isnan().all()
    assert out[:rows.start].isfinite().all() and out[rows.stop:].isfinite().all()


@pytest.mark.gpu
def test_cuda_fp8_copy_blocks_bad_block_nan_row_graph_and_debug(monkeypatch):
    generator = torch.Generator().manual_seed(14)
    q, k8, v8, tables, lens, k_scale, v_scale, kd, vd = fp8_inputs(
        [300, 17, 64], num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, query_dtype=torch.bfloat16,
        cache_dtype=torch.float8_e4m3fn, generator=generator)
    q, k8, v8, tables, lens = (t.cuda() for t in (q, k8, v8, tables, lens))
    ks, vs = k_scale.cuda(), v_scale.cuda()
    # copy_blocks: bytes, on CUDA as on the CPU
    kc, vc = k8.clone(), v8.clone()
    ops.copy_blocks([kc], [vc], torch.tensor([[0, 1], [3, 2]], device="cuda"))
    assert torch.equal(kc[1].view(torch.uint8), k8[0].view(torch.uint8))
    # a bad block id gives a NaN row, not a fault; the others are unaffected
    bad = tables.clone()
    bad[1, 0] = 10 ** 6
    out = ops.paged_decode_attention(q, k8, v8, bad, lens, k_scale=ks, v_scale=vs)
    assert out[1].isnan().all() and out[0].isfinite().all()
    # graph capture, then replay with new scales
    out = torch.empty_like(q)
    ops.paged_decode_attention(q, k8, v8, tables, lens, out=out, k_scale=ks, v_scale=vs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode_attention(q, k8, v8, tables, lens, out=out, k_scale=ks, v_scale=vs)
    ks.mul_(2.0)
    vs.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    expected, _ = decode_reference(q.cpu(), dequantize(k8.cpu(), ks.cpu()), dequantize(v8.cpu(), vs.cpu()),
                                   tables.cpu(), lens.cpu())
    torch.testing.assert_close(out.cpu().double(), expected, atol=TOLERANCE[torch.bfloat16], rtol=0)
    # PAGEDLM_DEBUG=1 checks the scale values of CUDA tensors
    monkeypatch.setenv("PAGEDLM_DEBUG", "1")
    with pytest.raises(ValueError, match=r"k_scale\[1\]"):
        ops.paged_decode_attention(q, k8, v8, tables, lens, k_scale=torch.tensor([1.0, 0.0], device="cuda"))
    torch.library.opcheck(torch.ops.pagedlm.paged_decode_attention.default, (q, k8, v8, tables, lens),
                          {"k_scale": ks, "v_scale": vs}, test_utils=FP8_OPCHECK)
