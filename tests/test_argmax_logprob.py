"""pagedlm.ops.argmax_logprob (the greedy choice of each logits row: argmax and its
log-probability) against a float64 reference and torch: odd sizes, every dtype, ties, NaN
and infinite rows, poisoned outputs, bad arguments, opcheck, and on a GPU the CUDA kernel
against the CPU path and under CUDA-graph capture."""
import math

import pytest
import torch

import pagedlm.ops as ops

from unaligned import cuda_at_offset

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VOCABS = [1, 2, 7, 255, 4096, 50257]
ROWS = [1, 3, 33]


def reference(logits):
    """float64 [rows, 2]: torch.argmax (first maximum, NaN as the maximum) and the float64
    log-softmax of that entry."""
    x = logits.double().cpu()
    tokens = x.argmax(-1)
    logprobs = x.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    return torch.stack([tokens.double(), logprobs], -1)


def poisoned(rows, device="cpu"):
    return torch.full((rows, 2), -12345.0, dtype=torch.float64, device=device)


def assert_choices(actual, expected):
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    actual = actual.cpu()
    assert torch.equal(actual[:, 0], expected[:, 0]), "argmax differs"
    # The kernels sum exponentials in float32 (CUDA) or float64 (CPU) of values widened from
    # the dtype: within float32 rounding of the sum, relative to the (clamped) log-probability.
    torch.testing.assert_close(actual[:, 1], expected[:, 1], rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_the_float64_reference(rows, vocab, dtype):
    logits = (torch.randn(rows, vocab, dtype=torch.float64) * 4).to(dtype)
    out = poisoned(rows)
    assert ops.argmax_logprob(logits, out=out) is out
    assert_choices(out, reference(logits))


def test_is_what_torch_computes_for_float32_logits():
    logits = torch.randn(17, 4097) * 3
    out = ops.argmax_logprob(logits)
    assert torch.equal(out[:, 0].long(), logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1).double()
    # torch forms max + log(sum) in float32 and subtracts it: off by ulps of the row's maximum.
    bound = 4 * torch.finfo(torch.float32).eps * logits.abs().amax(-1).double()
    assert ((out[:, 1] - expected).abs() <= bound).all()


def special_rows(device="cpu"):
    """Ties (the first maximum wins), NaNs (the first NaN wins), infinities, a single huge logit."""
    rows = torch.randn(9, 300, device=device)
    rows[0, [5, 17, 299]] = 50.0                        # tie: index 5
    rows[1, [250, 3]] = float("nan")                    # NaN: index 3, log-probability NaN
    rows[2, 40] = float("inf")                          # +inf: index 40, NaN (as torch)
    rows[3] = float("-inf")                             # all -inf: index 0, NaN
    rows[4, :299] = float("-inf")                       # one finite entry: log-probability 0
    rows[5, 123] = 1e4                                  # certain: log-probability 0
    rows[6] = 0.0                                       # uniform: index 0, -log(300)
    rows[7, 0] = float("nan")                           # NaN first
    rows[8, 299] = 1e30                                 # the last entry, far above the rest
    return rows


def test_ties_nans_and_infinities_follow_torch():
    out = ops.argmax_logprob(special_rows())
    assert_choices(out, reference(special_rows()))
    assert out[0, 0] == 5 and out[1, 0] == 3 and out[2, 0] == 40 and out[3, 0] == 0
    assert out[4, 1] == 0.0 and out[5, 1] == 0.0 and math.isclose(out[6, 1], -math.log(300), rel_tol=1e-12)
    assert out[1, 1].isnan() and out[2, 1].isnan() and out[3, 1].isnan()
    assert not out[4, 1].signbit() and not out[5, 1].signbit(), "a certain token's log-probability is -0.0"


def test_empty_batch():
    assert ops.argmax_logprob(torch.empty(0, 10)).shape == (0, 2)


@pytest.mark.parametrize("call, error, match", [
    (lambda: ops.argmax_logprob(torch.randn(4)), ValueError, "logits: expected 2 dimensions"),
    (lambda: ops.argmax_logprob(torch.randn(3, 0)), ValueError, "logits: the vocabulary"),
    (lambda: ops.argmax_logprob(torch.randn(5, 8)[:, ::2]), ValueError, "logits: must be contiguous"),
    (lambda: ops.argmax_logprob(torch.randint(0, 9, (3, 8))), TypeError, "logits: dtype"),
    (lambda: ops.argmax_logprob(torch.randn(3, 8), out=torch.empty(3, 2)), TypeError, "out: dtype must be float64"),
    (lambda: ops.argmax_logprob(torch.randn(3, 8), out=torch.empty(4, 2, dtype=torch.float64)), ValueError,
     "out: dimension 0"),
    (lambda: ops.argmax_logprob(torch.randn(3, 8), out=torch.empty(3, 1, dtype=torch.float64)), ValueError,
     "out: dimension 1"),
    (lambda: ops.argmax_logprob([[1.0]]), TypeError, "logits: expected a torch.Tensor"),
])
def test_bad_arguments_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_torch_op_and_opcheck():
    logits = torch.randn(5, 33)
    assert torch.equal(torch.ops.pagedlm.argmax_logprob(logits), ops.argmax_logprob(logits))
    torch.library.opcheck(torch.ops.pagedlm.argmax_logprob.default, (logits,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS + [131072])
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_matches_cpu_and_the_reference(vocab, dtype, offset):
    rows = 37
    logits = (torch.randn(rows, vocab, dtype=torch.float64) * 4).to(dtype)
    cpu = ops.argmax_logprob(logits)
    out = poisoned(rows, "cuda")
    ops.argmax_logprob(cuda_at_offset(logits, offset), out=out)
    assert_choices(out, reference(logits))
    assert torch.equal(out[:, 0].cpu(), cpu[:, 0])
    torch.testing.assert_close(out[:, 1].cpu(), cpu[:, 1], rtol=1e-5, atol=1e-5)


def far_apart_rows(vocab, device="cpu"):
    """Rows of a large vocabulary whose deciding entries lie in different 16-byte packs, loads
    and threads of a row's pass: increasing and decreasing rows (the running maximum changes at
    every element, or never), ties and NaNs far apart (the first wins), a lone finite entry at
    the end, and a near-uniform row."""
    rows = torch.randn(8, vocab, device=device)
    steps = torch.arange(vocab, device=device, dtype=torch.float32)
    rows[0] = steps * 1e-4                                  # increasing: the last entry
    rows[1] = -steps * 1e-4                                 # decreasing: the first entry
    far = [i for i in (2048, 4100, 9000, 100_000, vocab - 1) if i < vocab]
    rows[2, far] = 30.0                                     # ties: the first of them
    rows[3, far[1:]] = float("nan")                         # NaNs: the first of them, log-probability NaN
    rows[4] = float("-inf")
    rows[4, vocab - 1] = 3.0                                # one finite entry, the last: log-probability 0
    rows[5] = 1.0 + steps * 1e-9                            # nearly uniform: about -log(vocab)
    rows[6, far[-1]] = float("inf")                         # +inf late: its index, NaN
    rows[7] = -rows[7].abs()
    rows[7, far[0]] = 0.0                                   # the maximum among negative entries
    return rows


@pytest.mark.parametrize("vocab", [131071, 513])
def test_far_apart_entries_match_the_reference(vocab):
    rows = far_apart_rows(vocab)
    assert_choices(ops.argmax_logprob(rows), reference(rows))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [131072, 131071, 4100 + 3, 513])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_far_apart_entries_match_cpu_and_the_reference(vocab, dtype):
    rows = far_apart_rows(vocab, "cuda").to(dtype)
    out = ops.argmax_logprob(rows)
    assert_choices(out, reference(rows))
    assert_choices(out, ops.argmax_logprob(rows.cpu()))


@pytest.mark.gpu
def test_cuda_ties_nans_and_infinities_match_cpu():
    rows = special_rows("cuda")
    out = ops.argmax_logprob(rows)
    assert_choices(out, reference(rows))
    assert_choices(out, ops.argmax_logprob(rows.cpu()))


@pytest.mark.gpu
def test_cuda_opcheck_and_graph_capture():
    logits = torch.randn(8, 4096, device="cuda")
    torch.library.opcheck(torch.ops.pagedlm.argmax_logprob.default, (logits,))
    out = poisoned(8, "cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.argmax_logprob(logits, out=out)
    logits.copy_(torch.randn(8, 4096))
    graph.replay()
    assert_choices(out, reference(logits))
