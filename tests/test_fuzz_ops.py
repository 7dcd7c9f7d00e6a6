"""Hypothesis fuzzing of every public op: random shapes, dtypes, strided views, extreme
integers and non-finite values, each call run in a child process (fuzz_worker.py). Every
call must either raise a clear exception (ValueError, TypeError, IndexError or RuntimeError)
naming an argument that is really bad, or return the float64 reference's answer: never a
signal, never a hang.

Oracle: for each case the test computes which arguments are bad (out-of-range values, bad
options, wrong layouts). With none, the op must match the reference; with some, it must
raise naming one of them, and leave its in-place arguments as they were. On CUDA without
PAGEDLM_DEBUG=1 the values inside tensors are not checked: a bad length or block id must
then turn exactly its sequence's rows into NaN (docs/errors.md).

Comparisons are IEEE-aware: where the reference is NaN the op must give NaN, where it is
+-inf the op must be non-finite, elsewhere close within the dtype's tolerance scaled by the
values' magnitude. The default run takes about a minute; --runslow runs many more cases,
and the CUDA cases (marked gpu) need a GPU."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from attention_reference import TOLERANCE
from fuzz_worker import OpRunner

INT32_EXTREMES = [0, -1, 2**31 - 1, -2**31, 1, 2**30]
INT64_EXTREMES = [0, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -2**63]
PY_EXTREMES = INT64_EXTREMES + [2**63, -2**63 - 1, 2**64]
# Extremes of float options: refused ones, and valid ones whose float32 results stay finite.
FLOAT_EXTREMES = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e39, -1e-30, 1e-45, 0, -1, 10**400]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ERRORS = ("ValueError", "TypeError", "IndexError", "RuntimeError")

FAST = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEEP = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


def fuzz_tests(body):
    """(fast test, deep test) of body(runner, device, debug, data): the first in every run,
    the second, with many more cases, only under --runslow."""
    devices = pytest.mark.parametrize("device, debug", DEVICES)
    return (devices(FAST(given(data=st.data())(body))),
            pytest.mark.slow(devices(DEEP(given(data=st.data())(body)))))


@pytest.fixture(scope="module")
def runner():
    r = OpRunner(timeout=120)
    yield r
    print(f"\nfuzz cases run: {r.cases}")
    r.close()


DEVICES = [pytest.param("cpu", False, id="cpu"),
           pytest.param("cuda", False, id="cuda", marks=pytest.mark.gpu),
           pytest.param("cuda", True, id="cuda-debug", marks=pytest.mark.gpu)]


# ---- shared checks ---------------------------------------------------------------------------

def expect_named_error(outcome, bad):
    assert outcome[0] != "died", f"{outcome[1]} (bad arguments: {sorted(bad)})"
    assert outcome[0] == "raised", f"returned although {sorted(bad)} are bad"
    assert outcome[1] in ERRORS, outcome
    assert any(name in outcome[2] for name in bad), f"{outcome[2]!r} names none of {sorted(bad)}"


def expect_returned(outcome):
    assert outcome[0] != "died", outcome[1]
    assert outcome[0] == "returned", f"valid call raised {outcome[1]}: {outcome[2]}"
    return outcome[1], outcome[2], outcome[3]


def assert_ieee_close(actual, expected, atol, what):
    """NaN where the reference is NaN, non-finite where it is infinite, else within atol."""
    actual = actual.double()
    nan, inf = expected.isnan(), expected.isinf()
    assert actual[nan].isnan().all(), f"{what}: NaN expected"
    assert not actual[inf].isfinite().any(), f"{what}: non-finite expected"
    finite = ~(nan | inf)
    assert not actual[finite].isnan().any(), f"{what}: NaN where the reference is finite"
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=0, msg=what)


def sprinkle(t, draw, name, chance=0.3):
    """Puts NaN, inf or -inf into a few elements of t (in place) with the given chance."""
    if t.numel() and draw(st.floats(0, 1)) < chance:
        for _ in range(draw(st.integers(1, 3))):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))


def option(draw, kind, default_choices):
    """An option value: None, an ordinary value, or an extreme one. (Not a subnormal scale: the
    kernels scale q before the dot product, and q * 1e-45 underflows where (q . k) * 1e-45 may not.)"""
    pool = {"int": PY_EXTREMES, "float": FLOAT_EXTREMES, "scale": [x for x in FLOAT_EXTREMES if x != 1e-45]}[kind]
    return draw(st.one_of(st.none(), st.sampled_from(default_choices), st.sampled_from(pool)))


def float_option_bad(value, positive):
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    x = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
    return not (math.isfinite(x) and abs(x) <= 3.4028234663852886e38 and (x > 0 if positive else x >= 0))


# ---- attention -------------------------------------------------------------------------------

def attention_reference(query, kc, vc, tables, cu, lens, causal, scale, window, cap):
    """float64 (out, lse) of a packed prefill (decode: one query per sequence at its last
    position). NaN or +inf among a row's visible scores: out NaN, lse NaN or +inf."""
    total_q, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kc.shape[1], kc.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(total_q, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((total_q, num_heads), -math.inf, dtype=torch.float64)
    for b in range(len(lens)):
        start, stop, length = int(cu[b]), int(cu[b + 1]), int(lens[b])
        if stop == start:
            continue
        positions = torch.arange(length)
        blocks = tables[b][positions // block_size].long()
        k = kc[blocks, positions % block_size].double().repeat_interleave(group, dim=1)
        v = vc[blocks, positions % block_size].double().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,thd->hqt", query[start:stop].double(), k) * scale
        if cap:
            logits = cap * torch.tanh(logits / cap)
        pos = torch.arange(length - (stop - start), length).unsqueeze(1)
        keys = positions.unsqueeze(0)
        visible = keys <= pos if causal else torch.ones(stop - start, length, dtype=torch.bool)
        if window:
            visible = visible & (keys > pos - window)
        nan_row = (logits.isnan() & visible).any(-1)
        inf_row = ((logits == math.inf) & visible).any(-1)
        scores = logits.masked_fill(~visible | logits.isnan() | (logits == math.inf), -math.inf)
        row_lse = scores.logsumexp(-1)
        probs = torch.where(row_lse.isfinite().unsqueeze(-1), (scores - row_lse.unsqueeze(-1)).exp(),
                            torch.zeros((), dtype=torch.float64))
        row_out = torch.einsum("hqt,thd->hqd", probs, v)
        row_lse = torch.where(nan_row, math.nan, torch.where(inf_row, math.inf, row_lse))
        row_out[nan_row | inf_row] = math.nan
        out[start:stop] = row_out.transpose(0, 1)
        lse[start:stop] = row_lse.transpose(0, 1)
    return out, lse


@st.composite
def attention_cases(draw, device, prefill):
    dtype = draw(st.sampled_from(DTYPES))
    num_kv_heads = draw(st.integers(1, 2))
    num_heads = num_kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([64, 128])) if device == "cuda" else draw(st.integers(1, 12))
    block_size = draw(st.integers(1, 6))
    num_blocks = draw(st.integers(0, 8))
    batch = draw(st.integers(0, 4))
    width = draw(st.integers(0, 5))
    huge_table = width > 0 and draw(st.floats(0, 1)) < 0.05  # a table reaching 2^31 tokens
    if huge_table:
        block_size, width = 1 << 16, 1 << 15
    capacity = width * block_size
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kc = torch.randn(num_blocks, block_size if not huge_table else 4, num_kv_heads, head_dim, generator=gen)
    if huge_table:  # the full block size without the memory: a cache of one block
        kc = torch.zeros(1, block_size, num_kv_heads, head_dim)
    vc = torch.randn(kc.shape, generator=gen)
    lens = [draw(st.one_of(st.integers(0, min(capacity, 40)), st.sampled_from(INT32_EXTREMES)))
            for _ in range(batch)]
    tables = torch.randint(0, max(num_blocks, 1), (batch, width), generator=gen, dtype=torch.int32)
    if draw(st.floats(0, 1)) < 0.3 and tables.numel():
        tables.view(-1)[draw(st.integers(0, tables.numel() - 1))] = draw(st.sampled_from(INT32_EXTREMES + [num_blocks]))
    if prefill:
        q_lens = [draw(st.integers(0, max(0, min(n, 6)))) if 0 <= n <= 40 else draw(st.integers(0, 3)) for n in lens]
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        if batch and draw(st.floats(0, 1)) < 0.15:
            cu[draw(st.integers(1, batch))] = draw(st.sampled_from(INT32_EXTREMES))
        rows = max(cu[-1], 0) if cu[-1] < 1000 else 0
    else:
        cu, rows = list(range(batch + 1)), batch
    query = torch.randn(rows, num_heads, head_dim, generator=gen)
    sprinkle(query, draw, "query")
    sprinkle(kc, draw, "key_cache", chance=0.15)
    query, kc, vc = query.to(dtype), kc.to(dtype), vc.to(dtype)
    # (CPU only: moving a strided view to CUDA makes it contiguous.)
    strided = device == "cpu" and draw(st.floats(0, 1)) < 0.1 and rows > 1
    if strided:  # a non-contiguous view of the same values
        query = torch.cat([query, query], dim=1)[:, ::2] if num_heads > 1 else query.repeat(2, 1, 1)[::2]
    case = dict(query=query, kc=kc, vc=vc, tables=tables, lens=torch.tensor(lens, dtype=torch.int32),
                cu=torch.tensor(cu, dtype=torch.int32), causal=draw(st.booleans()) if prefill else True,
                scale=option(draw, "scale", [None, 0.25, 1.0]), window=option(draw, "int", [None, 1, 3, 8]),
                cap=option(draw, "float", [None, 2.0, 30.0]), strided=strided and not query.is_contiguous())
    return case


def attention_bad_args(c, device, prefill):
    """The arguments the op must refuse, the sequences whose values are bad, and whether a
    shape is bad (refused on every device, whatever PAGEDLM_DEBUG says)."""
    bad, bad_seqs = set(), set()
    kc = c["kc"]
    capacity = c["tables"].shape[1] * kc.shape[1]
    if c["strided"]:
        bad.add("query")
    if device == "cuda" and kc.shape[3] not in (64, 128, 256):
        bad.add("query")
    shape_bad = capacity > 2**30  # the table's shape, not its values
    if shape_bad:
        bad.add("block_tables")
    if float_option_bad(c["scale"], False):
        bad.add("scale")
    if float_option_bad(c["cap"], True):
        bad.add("soft_cap")
    w = c["window"]
    if w is not None and (isinstance(w, bool) or w <= 0):
        bad.add("sliding_window")
    cu = c["cu"].tolist()
    total_q = c["query"].shape[0]
    if prefill and (cu[0] != 0 or cu[-1] != total_q):
        bad.add("cu_seqlens_q")
    for b, n in enumerate(c["lens"].tolist()):
        q_len = cu[b + 1] - cu[b]
        if prefill and q_len < 0:
            bad.add("cu_seqlens_q")
            bad_seqs.add(b)
        if not 0 <= n <= capacity:
            bad.add("seq_lens")
            bad_seqs.add(b)
            continue
        if prefill and q_len > n:
            bad.add("cu_seqlens_q")
            bad_seqs.add(b)
        used = c["tables"][b, :-(-n // kc.shape[1])]
        if ((used < 0) | (used >= kc.shape[0])).any():
            bad.add("block_tables")
            bad_seqs.add(b)
    return bad, bad_seqs, shape_bad


VALUE_ARGS = {"seq_lens", "block_tables", "cu_seqlens_q"}


def check_attention(runner, c, device, debug, prefill):
    kwargs = dict(scale=c["scale"], sliding_window=c["window"], soft_cap=c["cap"], return_lse=True)
    if prefill:
        outcome = runner("paged_prefill_attention", c["query"], c["kc"], c["vc"], c["tables"], c["cu"], c["lens"],
                         causal=c["causal"], device=device, debug=debug, **kwargs)
    else:
        outcome = runner("paged_decode_attention", c["query"], c["kc"], c["vc"], c["tables"], c["lens"],
                         device=device, debug=debug, **kwargs)
    bad, bad_seqs, shape_bad = attention_bad_args(c, device, prefill)
    unchecked = device == "cuda" and not debug and bad and bad <= VALUE_ARGS and not shape_bad
    if bad and not unchecked:
        expect_named_error(outcome, bad)
        return
    if unchecked and (not prefill or "cu_seqlens_q" not in bad):
        # Values unchecked on CUDA: the bad sequences' rows are NaN, the others exact.
        (out, lse), _, _ = expect_returned(outcome)
        rows = [r for b in bad_seqs for r in range(int(c["cu"][b]), int(c["cu"][b + 1]))]
        assert out[rows].isnan().all() and lse[rows].isnan().all()
        return
    if unchecked:  # a bad cu_seqlens_q: rows may be misplaced, but the call must survive
        assert outcome[0] == "returned", outcome
        return
    (out, lse), _, _ = expect_returned(outcome)
    scale = c["scale"] if c["scale"] is not None else c["query"].shape[-1] ** -0.5
    window = c["window"] if c["window"] is not None and c["window"] < 2**62 else None
    expected, expected_lse = attention_reference(c["query"], c["kc"], c["vc"], c["tables"], c["cu"], c["lens"],
                                                 c["causal"], float(scale), window, c["cap"] and float(c["cap"]))
    magnitude = max(1.0, float(c["vc"].double().abs().max()) if c["vc"].numel() else 1.0)
    assert_ieee_close(out, expected, TOLERANCE[c["query"].dtype] * magnitude, "out")
    assert_ieee_close(lse, expected_lse, 1e-3 * max(1.0, float(expected_lse[expected_lse.isfinite()].abs().max())
                                                    if expected_lse.isfinite().any() else 1.0), "lse")


def _paged_decode(runner, device, debug, data):
    check_attention(runner, data.draw(attention_cases(device, prefill=False)), device, debug, prefill=False)


def _paged_prefill(runner, device, debug, data):
    check_attention(runner, data.draw(attention_cases(device, prefill=True)), device, debug, prefill=True)


test_fuzz_paged_decode, test_fuzz_paged_decode_deep = fuzz_tests(_paged_decode)
test_fuzz_paged_prefill, test_fuzz_paged_prefill_deep = fuzz_tests(_paged_prefill)


# ---- KV cache writes and block copies --------------------------------------------------------

def _write_kv_cache(runner, device, debug, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    num_blocks, block_size, heads, dim = draw(st.integers(0, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 2)), 8
    tokens = draw(st.integers(0, 6))
    slots = num_blocks * block_size
    mapping = [draw(st.one_of(st.integers(-1, max(slots - 1, -1)), st.sampled_from(INT64_EXTREMES)))
               for _ in range(tokens)]
    kc = torch.randn(num_blocks, block_size, heads, dim).to(dtype)
    vc = torch.randn_like(kc)
    fused = torch.randn(tokens, 3 * heads, dim).to(dtype)  # key and value as strided slices
    key, value = fused[:, :heads], fused[:, heads:2 * heads]
    outcome = runner("write_kv_cache", key, value, kc, vc, torch.tensor(mapping, dtype=torch.int64),
                     device=device, debug=debug)
    used = [s for s in mapping if s >= 0]
    bad = any(not -1 <= s < slots for s in mapping) or len(set(used)) != len(used)
    if bad and (device == "cpu" or debug):
        expect_named_error(outcome, {"slot_mapping"})
        return
    _, args, _ = expect_returned(outcome)
    if bad:
        return  # unchecked on CUDA: out-of-range slots are skipped; nothing more is promised
    expected_k, expected_v = kc.clone().view(-1, heads, dim), vc.clone().view(-1, heads, dim)
    for t, s in enumerate(mapping):
        if s >= 0:
            expected_k[s], expected_v[s] = key[t], value[t]
    assert torch.equal(args[2].view(-1, heads, dim), expected_k) and torch.equal(args[3].view(-1, heads, dim), expected_v)


def _copy_blocks(runner, device, debug, data):
    draw = data.draw
    layers = draw(st.integers(0, 3))
    num_blocks = draw(st.integers(1, 6))
    shapes = [(num_blocks if draw(st.floats(0, 1)) < 0.9 else num_blocks + 1, 2, 1, 4) for _ in range(layers)]
    kcs = [torch.randn(s) for s in shapes]
    vcs = [torch.randn(s) for s in shapes]
    pairs = draw(st.lists(st.tuples(*[st.one_of(st.integers(0, num_blocks - 1), st.sampled_from(INT64_EXTREMES))] * 2),
                          max_size=4))
    mapping = torch.tensor(pairs, dtype=torch.int64).view(-1, 2)
    outcome = runner("copy_blocks", kcs, vcs, mapping, device=device, debug=debug)
    moving = [(s, d) for s, d in pairs if s != d]
    dsts = [d for _, d in moving]
    ids_bad = layers > 0 and (any(not 0 <= x < num_blocks for p in pairs for x in p) or len(set(dsts)) != len(dsts)
                              or set(dsts) & {s for s, _ in moving})
    shape_bad = len(set(shapes)) > 1
    if shape_bad:
        # CUDA with PAGEDLM_DEBUG=1 reads the ids before the C++ layer compares the shapes.
        expect_named_error(outcome, {"key_caches"} | ({"block_mapping"} if ids_bad and debug else set()))
        return
    if ids_bad and (device == "cpu" or debug):
        expect_named_error(outcome, {"block_mapping"})
        return
    _, args, _ = expect_returned(outcome)
    if ids_bad:
        return
    for layer in range(layers):
        for caches, got in ((kcs, args[0]), (vcs, args[1])):
            expected = caches[layer].clone()
            for s, d in pairs:
                expected[d] = caches[layer][s]
            assert torch.equal(got[layer], expected)


# ---- fused layers and argmax -----------------------------------------------------------------

def _rms_norm(runner, device, debug, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    rows, hidden = draw(st.integers(0, 4)), draw(st.integers(0, 40))
    x = torch.randn(rows, hidden) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    sprinkle(x, draw, "x")
    x, weight = x.to(dtype), torch.randn(hidden).to(dtype)
    eps = draw(st.one_of(st.sampled_from([1e-6, 1e-5, 0.0]), st.sampled_from(FLOAT_EXTREMES + [2**31 - 1])))
    outcome = runner("rms_norm", x, weight, eps, device=device, debug=debug)
    bad = float_option_bad(eps, False) or hidden == 0
    if bad:
        expect_named_error(outcome, {"eps", "x"})
        return
    out, _, _ = expect_returned(outcome)
    xd = x.double()
    expected = xd / (xd.pow(2).mean(-1, keepdim=True) + float(eps)).sqrt() * weight.double()
    assert_ieee_close(out, expected, TOLERANCE[dtype] * 4 * max(1.0, float(weight.double().abs().max())), "rms_norm")


def _silu_and_mul(runner, device, debug, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(draw(st.integers(0, 4)), draw(st.integers(0, 17)))
    sprinkle(x, draw, "x")
    x = x.to(dtype)
    outcome = runner("silu_and_mul", x, device=device, debug=debug)
    if x.shape[1] % 2:
        expect_named_error(outcome, {"x"})
        return
    out, _, _ = expect_returned(outcome)
    g, u = x.double().chunk(2, dim=-1) if x.shape[1] else (x.double(), x.double())
    expected = g / (1 + (-g).exp()) * u
    finite = expected[expected.isfinite()]
    magnitude = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    assert_ieee_close(out, expected, TOLERANCE[dtype] * 4 * magnitude, "silu_and_mul")


def _apply_rope(runner, device, debug, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    tokens, heads, kv_heads = draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    dim = 2 * draw(st.integers(1, 8))
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim).to(dtype)
    query, key = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
    # (CPU only: moving views to CUDA one by one gives separate tensors.)
    overlap = device == "cpu" and draw(st.floats(0, 1)) < 0.1 and tokens > 0
    if overlap:
        key = qkv[:, :kv_heads]  # shares heads with query
    positions = torch.tensor([draw(st.one_of(st.integers(-100, 5000), st.sampled_from(INT64_EXTREMES)))
                              for _ in range(tokens)], dtype=torch.int64)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    q0, k0 = query.clone(), key.clone()
    # The rotated query into a fresh contiguous tensor, or in place.
    query_out = torch.full((tokens, heads, dim), float("nan")).to(dtype) if draw(st.booleans()) else None
    outcome = runner("apply_rope", query, key, positions, inv_freq, query_out=query_out, device=device, debug=debug)
    if overlap:
        expect_named_error(outcome, {"key", "query"})
        return
    (q, k), _, _ = expect_returned(outcome)
    angle = (positions.float().unsqueeze(-1) * inv_freq).double()  # as the kernels: f32 angle
    cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)
    for got, x in ((q, q0), (k, k0)):
        x1, x2 = x.double().chunk(2, dim=-1)
        expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        assert_ieee_close(got, expected, TOLERANCE[dtype] * 8, "apply_rope")


def _argmax_logprob(runner, device, debug, data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    logits = torch.randn(draw(st.integers(0, 4)), draw(st.integers(0, 50))) * draw(st.sampled_from([1.0, 30.0]))
    sprinkle(logits, draw, "logits")
    logits = logits.to(dtype)
    outcome = runner("argmax_logprob", logits, device=device, debug=debug)
    if logits.shape[1] == 0:
        expect_named_error(outcome, {"logits"})
        return
    out, _, _ = expect_returned(outcome)
    x = logits.double()
    assert torch.equal(out[:, 0].long(), x.argmax(-1))  # torch.argmax: NaN counts as the maximum
    expected = x.log_softmax(-1).gather(1, x.argmax(-1, keepdim=True)).squeeze(1)
    expected[~x.max(-1).values.isfinite() | x.isnan().any(-1)] = math.nan
    finite = expected[expected.isfinite()]
    assert_ieee_close(out[:, 1], expected, 1e-5 * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0),
                      "logprob")


# ---- speculative verification ----------------------------------------------------------------

def _verify_chains(runner, device, debug, data):
    draw = data.draw
    batch, k, vocab = draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(1, 12))
    tokens = torch.tensor([[draw(st.one_of(st.integers(0, vocab - 1), st.sampled_from(INT64_EXTREMES)))
                            for _ in range(k)] for _ in range(batch)], dtype=torch.int64).view(batch, k)
    lens = None
    if draw(st.booleans()):
        lens = torch.tensor([draw(st.one_of(st.integers(0, k), st.sampled_from(INT32_EXTREMES)))
                             for _ in range(batch)], dtype=torch.int32)
    logits = torch.randn(batch, k + 1, vocab)
    sprinkle(logits, draw, "target_logits")
    used = [int(lens[b]) if lens is not None else k for b in range(batch)]
    bad_lens = any(not 0 <= n <= k for n in used)
    bad_tokens = any(not 0 <= int(tokens[b, i]) < vocab for b in range(batch)
                     for i in range(used[b] if 0 <= used[b] <= k else 0))
    checked = device == "cpu" or debug
    greedy = draw(st.booleans())
    if greedy:
        outcome = runner("verify_greedy", tokens, logits, draft_lens=lens, device=device, debug=debug)
    else:
        seed = draw(st.one_of(st.integers(0, 100), st.sampled_from(PY_EXTREMES)))
        outcome = runner("verify_speculative", tokens, None, logits.softmax(-1), seed=seed, draft_lens=lens,
                         device=device, debug=debug)
        if not -2**63 <= seed < 2**64:
            expect_named_error(outcome, {"seed"})
            return
    if (bad_lens or bad_tokens) and checked:
        expect_named_error(outcome, ({"draft_lens"} if bad_lens else set()) | ({"draft_tokens"} if bad_tokens else set()))
        return
    (out, accepted), _, _ = expect_returned(outcome)
    if bad_lens or bad_tokens:
        return  # unchecked on CUDA: never out of bounds, nothing more promised
    assert ((accepted >= 0) & (accepted <= k)).all()
    for b in range(batch):
        n = int(accepted[b])
        assert n <= used[b] and (out[b, n + 1:] == -1).all() and 0 <= int(out[b, n]) < vocab
        assert torch.equal(out[b, :n], tokens[b, :n])
        if greedy:  # the reference chain: drafts accepted while equal to argmax (NaN ranking lowest)
            ranked = logits[b].nan_to_num(nan=-math.inf)
            expected = 0
            while expected < used[b] and int(tokens[b, expected]) == int(ranked[expected].argmax()):
                expected += 1
            assert n == expected and int(out[b, n]) == int(ranked[n].argmax())


def _verify_trees(runner, device, debug, data):
    draw = data.draw
    batch, nodes, vocab = draw(st.integers(0, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    parents = torch.tensor([[-1] + [draw(st.one_of(st.integers(-1, c - 1), st.sampled_from(INT32_EXTREMES)))
                                    for c in range(1, nodes)] for _ in range(batch)], dtype=torch.int32)
    parents = parents.view(batch, nodes)
    tokens = torch.tensor([[draw(st.one_of(st.integers(0, vocab - 1), st.sampled_from(INT64_EXTREMES)))
                            for _ in range(nodes)] for _ in range(batch)], dtype=torch.int64).view(batch, nodes)
    target = torch.rand(batch, nodes, vocab)
    greedy = draw(st.booleans())
    max_depth = draw(st.one_of(st.none(), st.integers(0, 6), st.sampled_from(PY_EXTREMES)))
    kwargs = dict(max_depth=max_depth) if greedy else dict(max_depth=max_depth, seed=draw(st.integers(0, 9)))
    op = "verify_tree_greedy" if greedy else "verify_tree_speculative"
    outcome = runner(op, tokens, parents, target, device=device, debug=debug, **kwargs)
    if max_depth is not None and max_depth < 0:
        expect_named_error(outcome, {"max_depth"})
        return
    bad = False
    for b in range(batch):
        depth = [0] + [None] * (nodes - 1)
        for c in range(1, nodes):
            p = int(parents[b, c])
            if not -1 <= p < c:
                bad = True
                break
            depth[c] = None if p < 0 or depth[p] is None else depth[p] + 1
            if depth[c] is not None and not 0 <= int(tokens[b, c]) < vocab:
                bad = True
    if bad and (device == "cpu" or debug):
        expect_named_error(outcome, {"parents", "tree_tokens"})
        return
    (accepted_nodes, accepted, next_token), _, _ = expect_returned(outcome)
    assert ((accepted >= 0) & (accepted < nodes)).all() and ((next_token >= 0) & (next_token < vocab)).all()
    if not bad:
        for b in range(batch):  # a path from the root down the tree
            path = accepted_nodes[b, :int(accepted[b]) + 1].tolist()
            assert path[0] == 0 and all(int(parents[b, c]) == p for p, c in zip(path, path[1:]))


test_fuzz_write_kv_cache, test_fuzz_write_kv_cache_deep = fuzz_tests(_write_kv_cache)
test_fuzz_copy_blocks, test_fuzz_copy_blocks_deep = fuzz_tests(_copy_blocks)
test_fuzz_rms_norm, test_fuzz_rms_norm_deep = fuzz_tests(_rms_norm)
test_fuzz_silu_and_mul, test_fuzz_silu_and_mul_deep = fuzz_tests(_silu_and_mul)
test_fuzz_apply_rope, test_fuzz_apply_rope_deep = fuzz_tests(_apply_rope)
test_fuzz_argmax_logprob, test_fuzz_argmax_logprob_deep = fuzz_tests(_argmax_logprob)
test_fuzz_verify_chains, test_fuzz_verify_chains_deep = fuzz_tests(_verify_chains)
test_fuzz_verify_trees, test_fuzz_verify_trees_deep = fuzz_tests(_verify_trees)
