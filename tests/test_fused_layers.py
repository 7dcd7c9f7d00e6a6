"""The fused layers (pagedlm.ops.rms_norm) against the unfused torch code of
pagedlm.models.layers, which they replace, and a float64 reference: odd sizes, every dtype,
poisoned outputs, bad arguments, opcheck, and on a GPU the CUDA kernels against the CPU path
and under CUDA-graph capture."""
import pytest
import torch

import pagedlm.ops as ops
from pagedlm import _C

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
    # A flip of the middle rounding to f16/bf16 is 1 ulp there, up to 2 after the weight.
    assert_ulps(out, expected, 4 if dtype == torch.float32 else 2)
    if dtype != torch.float32:  # agreement to the bit, but for rare near-ties of the rounding
        assert (out != expected).sum() <= 1 + 0.01 * out.numel()
    assert_ulps(out, rms_norm_float64(x, weight, 1e-5).to(dtype), ULPS_VS_FLOAT64[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 96, 4097])
def test_fused_add_rms_norm_updates_both_in_place(hidden, dtype):
    x, residual, weight = rand(5, hidden, dtype=dtype), rand(5, hidden, dtype=dtype, scale=4.0), rand(hidden, dtype=dtype)
    expected_residual = residual + x  # what the decoder layer computes unfused
    expected = rms_norm_unfused(expected_residual, weight, 1e-6)
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()
    normed, new_residual = ops.rms_norm(x, weight, 1e-6, residual=residual)
    assert normed.data_ptr() == x_ptr and new_residual.data_ptr() == residual_ptr
    assert torch.equal(residual, expected_residual)
    assert_ulps(x, expected, 4 if dtype == torch.float32 else 2)


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
def test_rms_norm_cuda_matches_cpu(hidden, dtype, with_residual):
    rows = 37
    x, weight, residual = rand(rows, hidden, dtype=dtype, scale=3.0), rand(hidden, dtype=dtype), rand(rows, hidden, dtype=dtype)
    xc, weightc, residualc = x.cuda(), weight.cuda(), residual.cuda()
    if with_residual:
        ops.rms_norm(x, weight, 1e-5, residual=residual)
        ops.rms_norm(xc, weightc, 1e-5, residual=residualc)
        assert torch.equal(residualc.cpu(), residual)  # one rounded add: exact
        out, outc = x, xc
    else:
        out, outc = ops.rms_norm(x, weight, 1e-5), ops.rms_norm(xc, weightc, 1e-5)
    # float32 sums in another order and CUDA's rsqrtf (2 ulps): a few ulps of float32 in the
    # factor, which may flip a rounding to f16/bf16.
    assert_ulps(outc.cpu(), out, 16 if dtype == torch.float32 else 2)


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
