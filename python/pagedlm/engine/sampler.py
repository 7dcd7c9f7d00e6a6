"""Next-token sampling for a whole step at once, on the logits' device, with one host sync:
greedy rows take the argmax (greedy_choices, which the CUDA graphs compute with the logits),
sampled rows draw from their processed distribution with a Philox uniform keyed by
(Sequence.seed, sample index, position), so a seeded request draws the same tokens alone or in
any batch, on CPU or GPU. sample_step adds the per-request transforms (penalties, min_tokens)
and logprobs.
"""
import numpy as np
import torch

import pagedlm.ops as ops
from pagedlm import _C
from pagedlm.engine.sequence import Logprob

_DRAW_SAMPLE = 1  # the Philox word the kernels use for sampling a token (philox.h: kDrawSample)


def staged(host, device):
    """host, a CPU tensor, as the source of a copy to device that does not wait for the device:
    pinned when device is a GPU. torch.tensor(values, device=...) waits for the stream (its copy
    synchronizes), and from pageable memory the driver may too (it stages a large copy itself),
    either of which would stall a step launched while the one before runs (async scheduling).
    torch's caching host allocator keeps the pinned block until the copy has run."""
    return host.pin_memory() if torch.device(device).type == "cuda" else host


def on_device(values, device, dtype=None):
    """values (a list, a number, a numpy array or a CPU tensor) as a tensor on device, copied
    without waiting for the device (staged)."""
    return staged(torch.as_tensor(values, dtype=dtype), device).to(device, non_blocking=True)


def greedy_choices(logits, out=None):
    """float64 [rows, 2]: each row's argmax and its log-probability (float64 holds both
    exactly), in one kernel (pagedlm.ops.argmax_logprob); written into out if given. logits:
    contiguous [rows, vocab], float32, float16 or bfloat16."""
    return ops.argmax_logprob(logits, out=out)


def sample_step(logits, seqs, choices=None, eos_token_ids=frozenset(), decode=None):
    """(tokens, logprobs, tops): sample() after the per-request transforms of SamplingParams
    (apply_penalties; eos_token_ids are the ids min_tokens holds back), greedy rows taking the
    argmax of the transformed logits. tops is None when no row asks for logprobs, else one
    entry per row: None, or top_logprobs' dict of the model's raw logits (decode gives their
    decoded_token). logits may be in the model's dtype (a decode graph's): each path upcasts
    what it reads."""
    if not any(s.params._special for s in seqs):  # no transforms, no logprobs: the plain path
        return (*sample(logits, seqs, choices), None)
    raw = logits
    if any(s.params._transforms_logits for s in seqs):
        logits = apply_penalties(logits, seqs, eos_token_ids)
        choices = None  # a graph's greedy choices are the raw logits' argmax
    tokens, logprobs = sample(logits, seqs, choices)
    tops = None
    if any(s.params.logprobs is not None for s in seqs):
        tops = top_logprobs(raw, seqs, tokens, decode)
    return tokens, logprobs, tops


def apply_penalties(logits, seqs, eos_token_ids=frozenset()):
    """float32 [rows, vocab]: a copy of logits with each row's transforms applied (rows of
    requests without any are copied unchanged), in vLLM's order. logit_bias added first; then
    repetition (prompt and output tokens: positive logits divided by it, others multiplied),
    frequency (times each token's count in the output) and presence (once per token in the
    output) subtracted, a logit past float32's range held at its largest magnitude; then, while a sequence has fewer than min_tokens output tokens, its stop
    ids and EOS (unless ignore_eos) are masked to -inf."""
    rows = [i for i, s in enumerate(seqs) if s.params._transforms_logits]
    out = logits.float().clone()
    device, vocab = out.device, out.shape[-1]
    biased = [(i, token, bias) for i in rows if seqs[i].params.logit_bias
              for token, bias in seqs[i].params.logit_bias.items()]
    if biased:
        row, token, bias = zip(*biased)
        out.index_put_((on_device(row, device, torch.int64), on_device(token, device, torch.int64)),
                       on_device(bias, device, out.dtype), accumulate=True)
    penalized = [i for i in rows if seqs[i].params.repetition_penalty != 1 or seqs[i].params.frequency_penalty != 0
                 or seqs[i].params.presence_penalty != 0]
    if penalized:
        sub = given = out[penalized]
        counts = _token_counts([seqs[i].output for i in penalized], vocab, device)
        seen = _token_counts([seqs[i].prompt for i in penalized], vocab, device) > 0
        seen |= counts > 0
        params = [seqs[i].params for i in penalized]
        repetition = on_device([p.repetition_penalty for p in params], device)[:, None]
        frequency = on_device([p.frequency_penalty for p in params], device)[:, None]
        presence = on_device([p.presence_penalty for p in params], device)[:, None]
        repeated = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen & (sub != 0), repeated, sub)  # (a zero logit stays 0: 0 * inf is nan)
        sub = sub - frequency * counts - presence * (counts > 0).float()
        # A penalty near 0 or past float32's range (where it is 0 or inf) sends logits to +-inf,
        # where a row's softmax can be nan and its draw fall past the vocabulary: they stop at
        # float32's largest magnitude instead (ties for the most, or the least, likely). A -inf
        # the logits had stays: that token is never drawn.
        finite = torch.finfo(torch.float32).max
        out[penalized] = sub.clamp(-finite, finite).masked_fill(given == float("-inf"), float("-inf"))
    for i in rows:
        seq = seqs[i]
        if len(seq.output) < seq.params.min_tokens:
            held = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(eos_token_ids))
            held = [t for t in held if t < vocab]
            if held:
                out[i, held] = float("-inf")
    return out


def _token_counts(lists, vocab, device):
    """float32 [len(lists), vocab]: how many times each token occurs in each list."""
    counts = torch.zeros(len(lists), vocab, dtype=torch.float32, device=device)
    flat = [t for tokens in lists for t in tokens]
    if flat:
        row = torch.repeat_interleave(torch.arange(len(lists)), torch.tensor([len(t) for t in lists]))
        index = on_device(torch.stack([row, torch.tensor(flat)]), device)
        counts.index_put_((index[0], index[1]), torch.ones(len(flat), device=device), accumulate=True)
    return counts


def top_logprobs(logits, seqs, tokens, decode=None):
    """For each row whose params ask for logprobs: logprob_dicts' entry of its sampled token and
    its params.logprobs most likely tokens; None for the other rows."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    out = [None] * len(seqs)
    if rows:
        entries = logprob_dicts(logits[_index(rows, logits.device, len(seqs))], [tokens[i] for i in rows],
                                [seqs[i].params.logprobs for i in rows], decode)
        for i, entry in zip(rows, entries):
            out[i] = entry
    return out


ROWS_AT_ONCE = 1024  # logprob_dicts' rows per log_softmax: a long prompt's never doubles its logits' memory


def logprob_dicts(logits, tokens, widths, decode=None):
    """One {token_id: Logprob} per row of logits [rows, vocab], the model's raw logits: the raw
    log_softmax's value of the row's token (tokens[i]) first, ranked 1 + the number of tokens
    with a larger value, then the widths[i] most likely tokens in rank order (ties: the lower id
    first), ranked 1..widths[i] by place, a token already there not repeated. decode: token id
    -> its text (each Logprob's decoded_token), or None. One host copy."""
    device, vocab = logits.device, logits.shape[-1]
    width = min(max(widths), vocab)
    chosen = on_device(tokens, device, torch.int64)[:, None]
    parts = []
    for start in range(0, len(tokens), ROWS_AT_ONCE):
        logprobs = torch.log_softmax(logits[start:start + ROWS_AT_ONCE].float(), -1)
        token = chosen[start:start + ROWS_AT_ONCE]
        value = logprobs.gather(-1, token)
        columns = [token.double(), (logprobs > value).sum(-1, keepdim=True).double() + 1, value.double()]
        if width:
            top = logprobs.topk(width, -1, sorted=True)
            columns += [top.indices.double(), top.values.double()]
        parts.append(torch.cat(columns, 1))
    host = torch.cat(parts).cpu().numpy()
    ids, ranks, values = host[:, 0].astype(np.int64).tolist(), host[:, 1].astype(np.int64).tolist(), host[:, 2].tolist()
    top_ids, top_values = host[:, 3:3 + width].astype(np.int64).tolist(), host[:, 3 + width:].tolist()
    decode = decode or (lambda token: None)
    out = []
    for r, n in enumerate(widths):
        entry = {ids[r]: Logprob(values[r], ranks[r], decode(ids[r]))}
        for k in range(min(n, width)):
            token = top_ids[r][k]
            if token not in entry:
                entry[token] = Logprob(top_values[r][k], k + 1, decode(token))
        out.append(entry)
    return out


def sample(logits, seqs, choices=None):
    """(tokens, logprobs) lists of logits [rows, vocab] (float32, or the model's dtype), one row
    per sequence in seqs: greedy rows (temperature 0) take the argmax, sampled ones draw from
    probabilities() by inverse CDF with a Philox-4x32-10 uniform (the verification kernels'
    generator). choices: the logits' greedy_choices when a graph computed them. One host copy."""
    return choice_lists(sampled_choices(logits, seqs, choices).cpu().numpy())


def choice_lists(host):
    """(token ids, log-probabilities) as lists from choices on the host (float64 [rows, 2], as
    greedy_choices gives them)."""
    return host[:, 0].astype(np.int64).tolist(), host[:, 1].tolist()


def sampled_choices(logits, seqs, choices=None):
    """sample()'s tokens and log-probabilities as float64 [rows, 2] on the logits' device, as
    greedy_choices gives them (float64 holds both exactly), without waiting for the device: an
    asynchronous step's input for the next. A step with sampled rows gives every row's
    log-probability rounded to float32."""
    if not seqs:  # a step of prompt chunks that all go on
        return torch.empty(0, 2, dtype=torch.float64, device=logits.device)
    greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
    if len(greedy) == len(seqs):  # the common step: the choices themselves
        return greedy_choices(logits) if choices is None else choices
    logits = logits.float()  # (a no-op on float32; a decode graph's logits are in the model's dtype)
    out = torch.empty(len(seqs), 2, dtype=torch.float64, device=logits.device)
    if greedy:
        rows = _index(greedy, logits.device, len(seqs))
        picked = greedy_choices(logits[rows])
        out[rows, 0], out[rows, 1] = picked[:, 0], picked[:, 1].float().double()
    sampled = [i for i, s in enumerate(seqs) if s.params.temperature != 0]
    if sampled:
        rows = _index(sampled, logits.device, len(seqs))
        chosen, logprob = _sample_rows(logits[rows], [seqs[i] for i in sampled])
        out[rows, 0], out[rows, 1] = chosen.double(), logprob.double()
    return out


def _index(rows, device, total):
    if len(rows) == total:
        return slice(None)
    return on_device(rows, device, torch.int64)


def probabilities(logits, params):
    """float32 [rows, vocab]: the distribution each row samples from (temperature, then min_p,
    top-k and top-p), params holding one SamplingParams per row, none greedy. Speculative
    verification uses it too, so min_p is verified as it is sampled."""
    device = logits.device
    # Each row's largest logit is subtracted before dividing (softmax does not change), so the
    # quotient stays finite for any temperature > 0: a tiny one would take a logit to inf and
    # the softmax to nan, where this way the largest logit stays 0 and the others go to -inf at
    # worst (the greedy limit). Temperatures below float32's smallest normal count as it, and
    # those past its range as its largest (an infinite one would take -inf, a masked logit, to nan).
    finfo = torch.finfo(torch.float32)
    temperature = on_device([p.temperature for p in params], device).clamp(finfo.tiny, finfo.max)
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature[:, None]
    top_k = [p.top_k if p.top_k > 0 else scaled.shape[-1] for p in params]
    if min(top_k) < scaled.shape[-1]:
        # Keep the logits at least as large as the k-th largest (ties kept).
        kth_index = on_device([min(k, scaled.shape[-1]) - 1 for k in top_k], device, torch.int64)
        kth = scaled.sort(-1, descending=True).values.gather(-1, kth_index[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if any(p.min_p > 0 for p in params):
        # vLLM's min_p, on the temperature's distribution: keep the tokens at least min_p times
        # as likely as the most likely one (that one always stays).
        min_p = on_device([p.min_p for p in params], device)
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    probs = scaled.softmax(-1)
    if any(p.top_p < 1 for p in params):  # (decided on the host: a device check would wait for the device)
        top_p = on_device([p.top_p for p in params], device)
        sorted_probs, order = probs.sort(-1, descending=True)
        # The smallest nucleus: drop a token once the mass before it already exceeds top_p.
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _sample_rows(logits, seqs):
    device = logits.device
    probs = probabilities(logits, [s.params for s in seqs])
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    uniform = on_device([_uniform(s) for s in seqs], device, torch.float32)
    # Kept below the total so rounding can never run past the last token.
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # The first token whose CDF exceeds the draw: never a zero-probability token, whose CDF
    # equals its predecessor's.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def _uniform(seq):
    """A uniform in [0, 1) keyed by (the sequence's seed, its sample index, its position: where
    the token drawn goes, after any tokens in flight)."""
    seed = seq.seed & ((1 << 64) - 1)
    position = len(seq) + seq.in_flight
    words = _C.philox4x32_10(seq.index & 0xFFFFFFFF, 0, position & 0xFFFFFFFF, 0,
                             seed & 0xFFFFFFFF, seed >> 32)
    return words[_DRAW_SAMPLE] / 2.0 ** 32
