"""The fused layers (pagedlm.ops.rms_norm, silu_and_mul, apply_rope) against the unfused torch code of
pagedlm.models.layers, which they replace, and a float64 reference: odd sizes, every dtype,
poisoned outputs, bad arguments, opcheck, and on a GPU the CUDA kernels against the CPU path
and under CUDA-graph capture."""
import pytest
import torch

import pagedlm.ops as ops
from pagedlm import _C

from unaligned import cuda_at_offset

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [1, 7, 96, 4097]
ROWS = [1, 3, 17]


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def assert_ulps(actual, expected, ulps):
    """|actual - expected| within `ulps` units in the last place of actual's dtype (relative
    to |expected|, with a floor at the dtype's smallest normal number)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    info = torch.finfo(actual.dtype)
    a, e = actual.double().cpu(), expected.double().cpu()
    assert not a.isnan().any(), "an output is NaN (not written?)"
    bound = ulps * info.eps * e.abs().clamp_min(info.tiny)
    worst = ((a - e).abs() / bound).max().item() if a.numel() else 0.0
    assert worst <= 1.0, f"off by {worst * ulps:.2f} ulps (allowed {ulps})"


# ---- RMSNorm -----------------------------------------------------------------------------

def rms_norm_unfused(x, weight, eps):
    """pagedlm.models.layers.RMSNorm.forward before the fusion, the rounding order to keep."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm_float64(x, weight, eps):
    x64 = x.double()
    return weight.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + eps).sqrt()


# One rounding to the dtype in the middle, one at the end: 2 ulps of the dtype, plus what
# float32 arithmetic adds (negligible for f16/bf16).
ULPS_VS_FLOAT64 = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_matches_the_unfused_layer(rows, hidden, dtype):
    x, weight = rand(rows, hidden, dtype=dtype, scale=3.0), rand(hidden, dtype=dtype)
    out = ops.rms_norm(x, weight, 1e-5)
    expected = rms_norm_unfused(x, weight, 1e-5)
    # The mean of squares is summed in double here, torch's in float32 in an order that depends
    # on the CPU's vector width: the normalizing factor may differ in its last bits (torch's
    # sum is not correctly rounded), which float32 outputs show.
    # A flip of the middle rounding to f16/bf16 is 1 ulp there, up to 3 after the weight.
    assert_ulps(out, expected, 4 if dtype == torch.float32 else 3)
    if dtype != torch.float32:  # agreement to the bit, but for rare near-ties of the rounding
        assert (out != expected).sum() <= 1 + 0.01 * out.numel()
    assert_ulps(out, rms_norm_float64(x, weight, 1e-5).to(dtype), ULPS_VS_FLOAT64[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 96, 4097])
def test_fused_add_rms_norm_updates_both_in_place(hidden, dtype):
    x, residual = rand(5, hidden, dtype=dtype), rand(5, hidden, dtype=dtype, scale=4.0)
    weight = rand(hidden, dtype=dtype)
    expected_residual = residual + x  # what the decoder layer computes unfused
    expected = rms_norm_unfused(expected_residual, weight, 1e-6)
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()
    normed, new_residual = ops.rms_norm(x, weight, 1e-6, residual=residual)
    assert normed.data_ptr() == x_ptr and new_residual.data_ptr() == residual_ptr
    assert torch.equal(residual, expected_residual)
    assert_ulps(x, expected, 4 if dtype == torch.float32 else 3)


def test_rms_norm_writes_every_element_and_handles_empty_batches():
    x, weight = rand(9, 33), rand(33)
    out = torch.full_like(x, float("nan"))
    _C.rms_norm(x, weight, out, None, 1e-5, 0)
    assert not out.isnan().any()
    assert ops.rms_norm(torch.empty(0, 33), weight, 1e-5).shape == (0, 33)
    # A row of zeros normalizes to zeros (rsqrt(eps) is finite), as the unfused code does.
    assert torch.equal(ops.rms_norm(torch.zeros(2, 33), weight, 1e-5), torch.zeros(2, 33))


def test_rms_norm_threads_agree_with_one_thread():
    # Big enough for several chunks of rows: each row's result must not depend on the thread.
    x, weight = rand(300, 1000), rand(1000)
    out = ops.rms_norm(x, weight, 1e-5)
    for r in (0, 137, 299):
        assert torch.equal(out[r:r + 1], ops.rms_norm(x[r:r + 1], weight, 1e-5))


@pytest.mark.parametrize("call, error, argument", [
    (lambda x, w, r: ops.rms_norm(x[0], w, 1e-5), ValueError, "x"),
    (lambda x, w, r: ops.rms_norm(x.t(), w[:4], 1e-5), ValueError, "x"),
    (lambda x, w, r: ops.rms_norm(x[:, :0], w, 1e-5), ValueError, "x"),
    (lambda x, w, r: ops.rms_norm(x.long(), w, 1e-5), TypeError, "x"),
    (lambda x, w, r: ops.rms_norm(x, w[:7], 1e-5), ValueError, "weight"),
    (lambda x, w, r: ops.rms_norm(x, w.half(), 1e-5), TypeError, "weight"),
    (lambda x, w, r: ops.rms_norm(x, w[None], 1e-5), ValueError, "weight"),
    (lambda x, w, r: ops.rms_norm(x, "w", 1e-5), TypeError, "weight"),
    (lambda x, w, r: ops.rms_norm(x, w, -1.0), ValueError, "eps"),
    (lambda x, w, r: ops.rms_norm(x, w, float("nan")), ValueError, "eps"),
    (lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r[:3]), ValueError, "residual"),
    (lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r.half()), TypeError, "residual"),
    (lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r.t().contiguous().t()), ValueError, "residual"),
])
def test_rms_norm_bad_input_raises_naming_the_argument(call, error, argument):
    x, weight, residual = torch.zeros(4, 8), torch.ones(8), torch.zeros(4, 8)
    with pytest.raises(error, match=argument):
        call(x, weight, residual)
    assert torch.all(x == 0) and torch.all(residual == 0)  # nothing was written


def test_rms_norm_torch_ops_and_opcheck():
    x, residual, weight = rand(5, 96), rand(5, 96), rand(96)
    assert torch.equal(torch.ops.pagedlm.rms_norm(x, weight, 1e-5), ops.rms_norm(x, weight, 1e-5))
    torch.library.opcheck(torch.ops.pagedlm.rms_norm.default, (x, weight, 1e-5))
    torch.library.opcheck(torch.ops.pagedlm.fused_add_rms_norm.default, (x, residual, weight, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN + [8192])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
def test_rms_norm_cuda_matches_cpu(hidden, dtype, with_residual, offset):
    rows = 37
    x, residual = rand(rows, hidden, dtype=dtype, scale=3.0), rand(rows, hidden, dtype=dtype)
    weight = rand(hidden, dtype=dtype)
    xc, weightc, residualc = cuda_at_offset(x, offset), weight.cuda(), cuda_at_offset(residual, offset)
    if with_residual:
        ops.rms_norm(x, weight, 1e-5, residual=residual)
        ops.rms_norm(xc, weightc, 1e-5, residual=residualc)
        assert torch.equal(residualc.cpu(), residual)  # one rounded add: exact
        out, outc = x, xc
    else:
        out, outc = ops.rms_norm(x, weight, 1e-5), ops.rms_norm(xc, weightc, 1e-5)
    # float32 sums in another order and CUDA's rsqrtf (2 ulps): a few ulps of float32 in the
    # factor, which may flip the middle rounding to f16/bf16 (up to 3 ulps after the weight).
    assert_ulps(outc.cpu(), out, 16 if dtype == torch.float32 else 3)


@pytest.mark.gpu
def test_rms_norm_cuda_opcheck_and_graph_capture():
    x, residual, weight = rand(8, 512, device="cuda"), rand(8, 512, device="cuda"), rand(512, device="cuda")
    torch.library.opcheck(torch.ops.pagedlm.rms_norm.default, (x, weight, 1e-5))
    torch.library.opcheck(torch.ops.pagedlm.fused_add_rms_norm.default, (x.clone(), residual.clone(), weight, 1e-5))
    expected_out = ops.rms_norm(x, weight, 1e-5)
    expected_x, expected_residual = ops.rms_norm(x.clone(), weight, 1e-5, residual=residual.clone())
    static_x, static_residual = x.clone(), residual.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.rms_norm(static_x, weight, 1e-5)
        ops.rms_norm(static_x, weight, 1e-5, residual=static_residual)
    static_x.copy_(x), static_residual.copy_(residual)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected_out)
    assert torch.equal(static_x, expected_x) and torch.equal(static_residual, expected_residual)


# ---- SiLU and multiply ------------------------------------------------------------------

def silu_and_mul_unfused(x):
    """pagedlm.models.layers.MLP before the fusion: silu in the dtype, then the product."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_and_mul_float64(x):
    gate, up = x.double().chunk(2, dim=-1)
    return gate / (1 + torch.exp(-gate)) * up


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_matches_the_unfused_mlp(rows, d, dtype):
    x = rand(rows, 2 * d, dtype=dtype, scale=4.0)
    out = ops.silu_and_mul(x)
    expected = silu_and_mul_unfused(x)
    # torch's vectorized exp (Sleef, 1 ulp) and the C library's expf may differ in the last bit,
    # which may flip the rounding of silu to f16/bf16 (up to 3 ulps after the product).
    assert_ulps(out, expected, 4 if dtype == torch.float32 else 3)
    if dtype != torch.float32:
        assert (out != expected).sum() <= 1 + 0.01 * out.numel()
    # Against float64: the product's rounding (a few ulps) plus silu's own rounding to the dtype
    # carried through the multiply by up, which is absolute where silu is subnormal (f16 at
    # gate < -10 or so: there it can be many ulps of the product).
    info = torch.finfo(dtype)
    gate, up = x.double().chunk(2, dim=-1)
    exact = silu_and_mul_float64(x)
    silu_spacing = (gate / (1 + torch.exp(-gate))).abs().clamp_min(info.tiny) * info.eps
    bound = 4 * info.eps * exact.abs().clamp_min(info.tiny) + up.abs() * silu_spacing
    assert ((out.double() - exact).abs() <= bound).all()


def test_silu_and_mul_writes_every_element_and_handles_edges():
    x = rand(6, 22)
    out = torch.full((6, 11), float("nan"))
    _C.silu_and_mul(x, out, 0)
    assert not out.isnan().any()
    assert ops.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    big = torch.tensor([[-100.0, 100.0, 0.0, 2.0, 3.0, 5.0]])  # exp(-gate) overflows to inf: silu is -0
    assert torch.equal(ops.silu_and_mul(big), silu_and_mul_unfused(big))


@pytest.mark.parametrize("call, error, argument", [
    (lambda: ops.silu_and_mul(torch.zeros(4, 7)), ValueError, "x"),
    (lambda: ops.silu_and_mul(torch.zeros(8)), ValueError, "x"),
    (lambda: ops.silu_and_mul(torch.zeros(8, 4).t()), ValueError, "x"),
    (lambda: ops.silu_and_mul(torch.zeros(4, 8, dtype=torch.int32)), TypeError, "x"),
    (lambda: ops.silu_and_mul([[1.0, 2.0]]), TypeError, "x"),
    (lambda: _C.silu_and_mul(torch.zeros(4, 8), torch.zeros(4, 3), 0), ValueError, "out"),
    (lambda: _C.silu_and_mul(torch.zeros(4, 8), torch.zeros(4, 4).half(), 0), TypeError, "out"),
])
def test_silu_and_mul_bad_input_raises_naming_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


def test_silu_and_mul_torch_op_and_opcheck():
    x = rand(5, 64)
    assert torch.equal(torch.ops.pagedlm.silu_and_mul(x), ops.silu_and_mul(x))
    torch.library.opcheck(torch.ops.pagedlm.silu_and_mul.default, (x,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HIDDEN + [14336])
@pytest.mark.parametrize("offset", [0, 1])
def test_silu_and_mul_cuda_matches_cpu(d, dtype, offset):
    x = rand(37, 2 * d, dtype=dtype, scale=4.0)
    out = ops.silu_and_mul(cuda_at_offset(x, offset))
    assert_ulps(out.cpu(), ops.silu_and_mul(x), 4 if dtype == torch.float32 else 3)
    # On the GPU, torch's own silu uses the same expf: the same bits.
    assert torch.equal(out, silu_and_mul_unfused(x.cuda()))


# ---- Rotary embedding -------------------------------------------------------------------

def apply_rope_unfused(x, positions, inv_freq):
    """pagedlm.models.layers.apply_rope before the fusion (returns a new tensor)."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(x.device)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_float64(x, positions, inv_freq):
    angles = (positions.float().unsqueeze(-1) * inv_freq).double()  # the float32 angles, exactly
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def inv_freq_of(head_dim, theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device="cpu"):
    """q, k, v as the model makes them: views of one [tokens, (heads + 2 kv_heads) * head_dim]."""
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return qkv, q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v


def assert_rope_close(actual, expected_float64, x):
    """The rotation's error is relative to the inputs' size (a rotated element may cancel)."""
    eps = torch.finfo(actual.dtype).eps
    scale = x.double().abs().amax(-1, keepdim=True).cpu()
    err = (actual.double().cpu() - expected_float64.cpu()).abs()
    assert not actual.isnan().any()
    assert (err <= 4 * eps * scale).all(), f"error {(err / scale).max().item() / eps:.2f} eps of the row's size"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [2, 6, 64, 128])
@pytest.mark.parametrize("heads, kv_heads", [(1, 1), (4, 2), (7, 1)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_apply_rope_matches_the_unfused_layer(tokens, heads, kv_heads, head_dim, dtype):
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype)
    positions = torch.randint(0, 100_000, (tokens,))
    inv_freq = inv_freq_of(head_dim)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out_q, out_k = ops.apply_rope(q, k, positions, inv_freq)
    assert out_q is q and out_k is k
    assert torch.equal(v, v0)  # the rest of the fused output is untouched
    for actual, x in ((q, q0), (k, k0)):
        expected = apply_rope_unfused(x, positions, inv_freq)
        # Sleef's cos/sin (torch, vectorized) and the C library's may differ in the last bit:
        # an error relative to the inputs (x1 cos - x2 sin may cancel).
        assert_rope_close(actual, expected.double(), x)
        if dtype != torch.float32:
            assert (actual != expected).sum() <= 1 + 0.01 * actual.numel()
        assert_rope_close(actual, apply_rope_float64(x, positions, inv_freq), x)


def test_apply_rope_with_free_head_strides_and_llama3_frequencies():
    from pagedlm.models.layers import rope_frequencies
    inv_freq = rope_frequencies(64, 500000.0, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=8192))
    base_q, base_k = rand(3, 4, 2 * 64), rand(3, 2, 3 * 64)
    q, k = base_q[:, :, 64:], base_k[:, :, :64]  # head strides 128 and 192
    positions = torch.tensor([0, 8191, 131071])
    q0, k0, base_q0, base_k0 = q.clone(), k.clone(), base_q.clone(), base_k.clone()
    ops.apply_rope(q, k, positions, inv_freq)
    assert torch.equal(base_q[:, :, :64], base_q0[:, :, :64]) and torch.equal(base_k[:, :, 64:], base_k0[:, :, 64:])
    assert_rope_close(q, apply_rope_unfused(q0, positions, inv_freq).double(), q0)
    assert_rope_close(k, apply_rope_unfused(k0, positions, inv_freq).double(), k0)
    assert torch.equal(q[0], q0[0])  # position 0: no rotation
    ops.apply_rope(torch.empty(0, 4, 64), torch.empty(0, 2, 64), torch.empty(0, dtype=torch.int64), inv_freq)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(1, 1, 2), (7, 1, 6), (4, 2, 64)])
@pytest.mark.parametrize("tokens", [0, 1, 5])
def test_apply_rope_into_query_out_equals_in_place(tokens, heads, kv_heads, head_dim, dtype, device="cpu"):
    """The rotated query written into a contiguous query_out: the same bits as the rotation in
    place, the query left as it was, and every element of query_out written."""
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, 100_000, (tokens,), device=device)
    inv_freq = inv_freq_of(head_dim).to(device)
    expected_q, expected_k = ops.apply_rope(q.clone(), k.clone(), positions, inv_freq)
    q0, v0 = q.clone(), v.clone()
    query_out = torch.full((tokens, heads, head_dim), float("nan"), dtype=dtype, device=device)
    out_q, out_k = ops.apply_rope(q, k, positions, inv_freq, query_out=query_out)
    assert out_q is query_out and out_k is k
    assert torch.equal(query_out, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(q, q0) and torch.equal(v, v0)


@pytest.mark.parametrize("make_out, error", [
    (lambda q, k: torch.empty(3, 4, 8, dtype=torch.float64), TypeError),      # another dtype
    (lambda q, k: torch.empty(3, 3, 8), ValueError),                          # another head count
    (lambda q, k: torch.empty(2, 4, 8), ValueError),                          # another token count
    (lambda q, k: torch.empty(3, 8, 4).transpose(1, 2), ValueError),           # not contiguous
    (lambda q, k: torch.empty(4, 3, 8).transpose(0, 1), ValueError),           # not contiguous
    (lambda q, k: q, ValueError),                                             # the query itself
    (lambda q, k: k.as_strided((3, 4, 8), (32, 8, 1)), ValueError),           # the key's memory
    ([3, 4, 8], TypeError),                                                   # not a tensor
])
def test_apply_rope_bad_query_out_raises_naming_it(make_out, error):
    q, k = torch.zeros(3, 4, 8), torch.zeros(12, 2, 8)[:3]
    out = make_out if isinstance(make_out, list) else make_out(q, k)
    with pytest.raises(error, match="query_out"):
        ops.apply_rope(q, k, torch.arange(3), inv_freq_of(8), query_out=out)
    assert torch.all(q == 0) and torch.all(k == 0)


@pytest.mark.parametrize("call, error, argument", [
    (lambda q, k, p, f: ops.apply_rope(q[0], k, p, f), ValueError, "query"),
    (lambda q, k, p, f: ops.apply_rope(q[..., :7], k[..., :7], p, f[:3]), ValueError, "query"),
    (lambda q, k, p, f: ops.apply_rope(q.transpose(1, 2), k, p, f), ValueError, "query"),
    (lambda q, k, p, f: ops.apply_rope(q.long(), k, p, f), TypeError, "query"),
    (lambda q, k, p, f: ops.apply_rope(q, k[:2], p, f), ValueError, "key"),
    (lambda q, k, p, f: ops.apply_rope(q, k[..., :4], p, f), ValueError, "key"),
    (lambda q, k, p, f: ops.apply_rope(q, k.half(), p, f), TypeError, "key"),
    (lambda q, k, p, f: ops.apply_rope(q, k.transpose(1, 2).contiguous().transpose(1, 2), p, f), ValueError, "key"),
    (lambda q, k, p, f: ops.apply_rope(q, k, p.int(), f), TypeError, "positions"),
    (lambda q, k, p, f: ops.apply_rope(q, k, p[:2], f), ValueError, "positions"),
    (lambda q, k, p, f: ops.apply_rope(q, k, p[None], f), ValueError, "positions"),
    (lambda q, k, p, f: ops.apply_rope(q, k, p, f.double()), TypeError, "inv_freq"),
    (lambda q, k, p, f: ops.apply_rope(q, k, p, f[:3]), ValueError, "inv_freq"),
    (lambda q, k, p, f: ops.apply_rope(q, k, [0, 1, 2], f), TypeError, "positions"),
])
def test_apply_rope_bad_input_raises_naming_the_argument(call, error, argument):
    q, k = torch.zeros(3, 4, 8), torch.zeros(3, 2, 8)
    with pytest.raises(error, match=argument):
        call(q, k, torch.arange(3), inv_freq_of(8))
    assert torch.all(q == 0) and torch.all(k == 0)


def test_apply_rope_torch_op_and_opcheck():
    q, k, positions, inv_freq = rand(5, 4, 16), rand(5, 2, 16), torch.arange(5) * 7, inv_freq_of(16)
    expected_q, expected_k = ops.apply_rope(q.clone(), k.clone(), positions, inv_freq)
    torch.ops.pagedlm.apply_rope(q, k, positions, inv_freq)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    torch.library.opcheck(torch.ops.pagedlm.apply_rope.default, (q, k, positions, inv_freq))
    query_out = torch.empty_like(q)
    torch.ops.pagedlm.apply_rope(q, k, positions, inv_freq, query_out=query_out)
    torch.library.opcheck(torch.ops.pagedlm.apply_rope.default, (q, k, positions, inv_freq),
                          {"query_out": query_out})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(1, 1, 2), (32, 8, 64), (8, 2, 128)])
def test_apply_rope_cuda_into_query_out_equals_in_place(heads, kv_heads, head_dim, dtype):
    test_apply_rope_into_query_out_equals_in_place(19, heads, kv_heads, head_dim, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [2, 6, 64, 128, 256])
@pytest.mark.parametrize("heads, kv_heads", [(1, 1), (32, 8)])
def test_apply_rope_cuda_matches_unfused_cuda_and_cpu(heads, kv_heads, head_dim, dtype):
    tokens = 19
    qkv, q, k, v = fused_qkv(tokens, heads, kv_heads, head_dim, dtype, device="cuda")
    positions = torch.randint(0, 100_000, (tokens,), device="cuda")
    inv_freq = inv_freq_of(head_dim).cuda()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    ops.apply_rope(q, k, positions, inv_freq)
    assert torch.equal(v, v0)
    for actual, x in ((q, q0), (k, k0)):
        # torch on CUDA: the same cosf/sinf and separately rounded products, so the same bits.
        assert torch.equal(actual, apply_rope_unfused(x, positions, inv_freq))
        cpu = x.cpu().clone()
        ops.apply_rope(cpu, cpu[:, :0], positions.cpu(), inv_freq.cpu())  # key with no heads
        assert_rope_close(actual, cpu.double(), x)
        assert_rope_close(actual, apply_rope_float64(x.cpu(), positions.cpu(), inv_freq.cpu()), x)


# ---- All three on the GPU: opcheck and CUDA-graph capture -------------------------------

@pytest.mark.gpu
def test_silu_and_mul_and_apply_rope_cuda_opcheck_and_graph_capture():
    x = rand(8, 2 * 384, dtype=torch.bfloat16, device="cuda")
    qkv, q, k, v = fused_qkv(8, 4, 2, 64, torch.bfloat16, device="cuda")
    positions, inv_freq = torch.arange(8, device="cuda") * 100, inv_freq_of(64).cuda()
    torch.library.opcheck(torch.ops.pagedlm.silu_and_mul.default, (x,))
    torch.library.opcheck(torch.ops.pagedlm.apply_rope.default,
                          (q.contiguous(), k.contiguous(), positions, inv_freq))
    expected_act = ops.silu_and_mul(x)
    expected_qkv = qkv.clone()
    ops.apply_rope(*fused_qkv_views(expected_qkv, 4, 2, 64), positions, inv_freq)
    qkv0 = qkv.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act = ops.silu_and_mul(x)
        ops.apply_rope(q, k, positions, inv_freq)
    qkv.copy_(qkv0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(act, expected_act) and torch.equal(qkv, expected_qkv)


def fused_qkv_views(qkv, heads, kv_heads, head_dim):
    tokens = qkv.shape[0]
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
