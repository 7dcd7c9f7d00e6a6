"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks each token's top-k experts, and
the experts run as a grouped computation. The (token, expert) pairs are sorted by expert, so
each expert's rows are one contiguous segment; one grouped GEMM (torch._grouped_mm) then runs
every expert's gate/up projection over its segment, and another its down projection. Where
torch has no grouped GEMM for the device and dtype, a loop over the experts runs the same
segments (reading their bounds costs a host synchronization, so inside a CUDA graph capture,
which allows none, every expert runs over every token instead, weighted by the routing; so
too where torch's grouped GEMM itself cannot be captured).

Every shape in the forward depends on the token count alone, never on the routing, so the
grouped path is captured into CUDA graphs as it is."""
import torch
from torch import nn

from pagedlm.models.layers import act_and_mul


def route(router_logits, top_k, renormalize, out_dtype=None):
    """(weights [tokens, top_k], expert ids int64 [tokens, top_k]): softmax over all experts in
    float32, the top_k largest, renormalised to sum to 1 when renormalize (Mixtral always, which
    is the softmax over the top-k logits; Qwen3-MoE when norm_topk_prob). Weights in float32, or
    out_dtype (Qwen3-MoE rounds them to the activations' dtype, as transformers does)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if out_dtype is None else weights.to(out_dtype)), ids


def _probe_grouped_mm(device, dtype):
    """(runs, capturable): whether torch._grouped_mm runs on this device and dtype, and whether a
    CUDA graph can capture it (torch's fallback for some dtypes and GPUs copies the offsets to
    the host, which no capture allows; its own check refuses before anything is recorded).
    Tried once, on small tensors, outside any capture."""
    if not hasattr(torch, "_grouped_mm"):
        return False, False
    a = torch.ones(4, 16, dtype=dtype, device=device)
    b = torch.ones(2, 16, 16, dtype=dtype, device=device).transpose(1, 2)
    offs = torch.tensor([1, 4], dtype=torch.int32, device=device)
    try:
        runs = bool((torch._grouped_mm(a, b, offs=offs) == 16).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False, False
    if not (runs and device.type == "cuda"):
        return runs, False
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            torch._grouped_mm(a, b, offs=offs)
    except RuntimeError:
        return True, False
    return True, True


_grouped_mm_support = {}  # (device, dtype): (runs, capturable), from _probe_grouped_mm


def grouped_mm_available(x, *sizes):
    """torch._grouped_mm serves x's device and dtype (inside a CUDA graph capture too, when one
    is under way), and rows of each of sizes elements keep the 16-byte alignment it requires.
    Probed once per device and dtype; during a capture an unprobed one counts as unavailable."""
    if any(s * x.element_size() % 16 for s in sizes):
        return False
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (x.device, x.dtype)
    if key not in _grouped_mm_support:
        if capturing:
            return False
        _grouped_mm_support[key] = _probe_grouped_mm(x.device, x.dtype)
    runs, capturable = _grouped_mm_support[key]
    return capturable if capturing else runs


def expert_mlp(x, weights, ids, w13, w2, hidden_act, method="auto"):
    """sum over k of weights[t, k] * expert ids[t, k]'s MLP of x[t]: x [tokens, hidden]; w13
    [experts, 2 * inter, hidden] (gate rows, then up rows); w2 [experts, hidden, inter].
    method: "grouped" (torch._grouped_mm), "loop" (a loop over the sorted segments), or "auto"
    (grouped where torch supports it)."""
    tokens, hidden = x.shape
    top_k, experts, inter = ids.shape[1], w13.shape[0], w2.shape[2]
    if tokens == 0:
        return torch.zeros_like(x)
    if method not in ("auto", "grouped", "loop"):
        raise ValueError(f"method: expected 'auto', 'grouped' or 'loop', got {method!r}")
    if method == "auto":
        method = "grouped" if grouped_mm_available(x, hidden, inter, 2 * inter) else "loop"
    if method == "loop" and x.is_cuda and torch.cuda.is_current_stream_capturing():
        return _dense_experts(x, weights, ids, w13, w2, hidden_act)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, k) pairs sorted by expert
    rows = x[order // top_k]                  # [tokens * top_k, hidden]: each expert's rows contiguous
    if method == "grouped":
        counts = torch.zeros(experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = counts.cumsum(0, dtype=torch.int32)  # each expert's segment end
        h = act_and_mul(torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets), hidden_act)
        out = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)
    else:
        ends = torch.bincount(flat, minlength=experts).cumsum(0).tolist()  # one host synchronization
        out = torch.empty_like(rows)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                h = act_and_mul(rows[start:end] @ w13[e].t(), hidden_act)
                out[start:end] = h @ w2[e].t()
            start = end
    out = out * weights.reshape(-1)[order, None]  # rounded to x's dtype, as transformers rounds
    unsorted = torch.empty_like(out, dtype=x.dtype)
    unsorted[order] = out.to(x.dtype)
    return unsorted.view(tokens, top_k, hidden).sum(dim=1)


def _dense_experts(x, weights, ids, w13, w2, hidden_act):
    """Every expert over every token, weighted by the routing (zero for unchosen experts): the
    same result with shapes that never depend on the routing nor need a host read."""
    dense = torch.zeros(x.shape[0], w13.shape[0], dtype=weights.dtype, device=x.device).scatter_(1, ids, weights)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        y = act_and_mul(x @ w13[e].t(), hidden_act) @ w2[e].t()
        out += (y * dense[:, e:e + 1]).to(x.dtype)
    return out


def naive_expert_mlp(x, weights, ids, w13, w2, hidden_act):
    """The reference: for each expert, gather the tokens that chose it (a boolean mask per
    expert), run its MLP, scatter-add the weighted result (transformers' loop)."""
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        token, slot = torch.where(ids == e)
        if token.numel() == 0:
            continue
        y = act_and_mul(x[token] @ w13[e].t(), hidden_act) @ w2[e].t()
        out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
    return out


class Experts(nn.Module):
    """The experts' weights stacked: w13 [experts, 2 * inter, hidden] holds each expert's gate
    and up projections (the checkpoint's w1/w3 or gate_proj/up_proj), w2 [experts, hidden,
    inter] its down projection (w2 or down_proj)."""

    def __init__(self, args):
        super().__init__()
        e, h, i = args.num_experts, args.hidden_size, args.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))


class SparseMoE(nn.Module):
    method = "auto"  # expert_mlp's method; benchmarks and tests set it on the class or an instance

    def __init__(self, args):
        super().__init__()
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)  # the router
        self.experts = Experts(args)
        self.top_k, self.renormalize, self.hidden_act = args.num_experts_per_tok, args.norm_topk_prob, args.hidden_act
        # Qwen3-MoE rounds the routing weights to the activations' dtype; Mixtral keeps float32.
        self.round_weights = args.model_type == "qwen3_moe"

    def forward(self, x):
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, x.dtype if self.round_weights else None)
        return expert_mlp(x, weights, ids, self.experts.w13, self.experts.w2, self.hidden_act, self.method)
