"""Op fuzzing on CUDA tensors in one process, for compute-sanitizer (memcheck, racecheck,
initcheck, synccheck): every public op over random shapes, dtypes, extreme integers (block
ids, lengths, slots, token ids near 2^31 and 2^63) and non-finite values, first without and
then with PAGEDLM_DEBUG=1. Without it, bad values inside CUDA tensors must never make a
kernel read or write out of bounds (the sanitizer reports that); with it they must be refused
with a ValueError. Other exceptions (a clear refusal of a bad argument) are counted, not fatal;
anything that is not an exception -- a sanitizer error, a crash -- ends the run.

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_fuzz.py --cases 200
"""
import argparse
import math
import os
import random

import torch

import pagedlm.ops as ops

INT32 = [0, -1, 1, 2**31 - 1, -2**31, 2**30, 1 << 20]
INT64 = INT32 + [2**32, 2**63 - 1, -2**63]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pick(rng, ordinary, extremes, chance=0.2):
    return rng.choice(extremes) if rng.random() < chance else ordinary


def nonfinite(rng, t, chance=0.3):
    if t.numel() and rng.random() < chance:
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    return t


def attention(rng, prefill):
    dtype, head_dim = rng.choice(DTYPES), rng.choice([64, 128, 256])
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([1, 2, 4, 8])
    block_size, num_blocks = rng.choice([1, 16, 32]), rng.randint(1, 40)
    batch, width = rng.randint(1, 4), rng.randint(1, 70)
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    nonfinite(rng, kc, 0.1)
    tables = torch.randint(0, num_blocks, (batch, width), dtype=torch.int32, device="cuda")
    if rng.random() < 0.3:
        tables.view(-1)[rng.randrange(tables.numel())] = rng.choice(INT32 + [num_blocks])
    lens = [pick(rng, rng.randint(0, width * block_size), INT32) for _ in range(batch)]
    options = dict(sliding_window=pick(rng, None, [1, 7, 2**32 + 1, 2**63], 0.3),
                   soft_cap=pick(rng, None, [5.0, 30.0], 0.3), return_lse=True)
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    if not prefill:
        q = nonfinite(rng, torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype))
        if rng.random() < 0.2:  # the masked-row form
            mask = torch.rand(sum(max(0, min(n, 5000)) for n in lens) + 8, device="cuda") < 0.5
            offsets = torch.tensor([pick(rng, 0, INT64) for _ in range(batch)], device="cuda")
            options.update(custom_mask=mask, mask_offsets=offsets)
        return ops.paged_decode_attention(q, kc, vc, tables, lens_t, **options)
    q_lens = [rng.randint(0, max(0, min(n, 300))) if 0 <= n <= width * block_size else 1 for n in lens]
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    rows = cu[-1]
    if rng.random() < 0.15:
        cu[rng.randint(1, batch)] = rng.choice(INT32)
    q = nonfinite(rng, torch.randn(rows, heads, head_dim, device="cuda", dtype=dtype))
    if rng.random() < 0.3:
        ops.PERSISTENT_PREFILL_MIN_WORK = 0  # the Hopper kernel's persistent grid
    try:
        return ops.paged_prefill_attention(q, kc, vc, tables, torch.tensor(cu, dtype=torch.int32, device="cuda"),
                                           lens_t, causal=rng.random() < 0.8, **options)
    finally:
        ops.PERSISTENT_PREFILL_MIN_WORK = 1 << 16


def kv_cache(rng):
    dtype, head_dim = rng.choice(DTYPES), rng.choice([8, 64, 128])
    kc = torch.randn(rng.randint(1, 10), rng.choice([1, 16]), 2, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    tokens = rng.randint(0, 8)
    slots = [pick(rng, s, INT64) for s in rng.sample(range(-1, kc.shape[0] * kc.shape[1]), tokens)]
    key = torch.randn(tokens, 2, head_dim, device="cuda", dtype=dtype)
    ops.write_kv_cache(key, torch.randn_like(key), kc, vc, torch.tensor(slots, dtype=torch.int64, device="cuda"))
    pairs = [[pick(rng, rng.randrange(kc.shape[0]), INT64) for _ in range(2)] for _ in range(rng.randint(0, 4))]
    ops.copy_blocks([kc, kc.clone()], [vc, vc.clone()], torch.tensor(pairs, dtype=torch.int64, device="cuda").view(-1, 2))


def fused(rng):
    dtype = rng.choice(DTYPES)
    x = nonfinite(rng, torch.randn(rng.randint(0, 9), 2 * rng.randint(1, 300), device="cuda", dtype=dtype))
    ops.rms_norm(x, torch.randn(x.shape[1], device="cuda", dtype=dtype), 1e-6)
    ops.rms_norm(x, torch.randn(x.shape[1], device="cuda", dtype=dtype), 1e-6, residual=torch.randn_like(x))
    ops.silu_and_mul(x)
    ops.argmax_logprob(x)
    dim = rng.choice([64, 128])
    qkv = torch.randn(rng.randint(0, 9), 12, dim, device="cuda", dtype=dtype)
    positions = torch.tensor([pick(rng, t, INT64) for t in range(qkv.shape[0])], device="cuda")
    ops.apply_rope(qkv[:, :8], qkv[:, 8:10], positions, torch.rand(dim // 2, device="cuda"))


def verify(rng):
    batch, k, vocab = rng.randint(1, 4), rng.randint(0, 6), rng.choice([5, 1000])
    tokens = torch.tensor([[pick(rng, rng.randrange(vocab), INT64) for _ in range(k)] for _ in range(batch)],
                          dtype=torch.int64, device="cuda").view(batch, k)
    lens = torch.tensor([pick(rng, rng.randint(0, k), INT32) for _ in range(batch)], dtype=torch.int32, device="cuda")
    logits = nonfinite(rng, torch.randn(batch, k + 1, vocab, device="cuda"))
    ops.verify_greedy(tokens, logits, draft_lens=lens)
    ops.verify_speculative(tokens, torch.rand(batch, k, vocab, device="cuda"), logits.softmax(-1), seed=rng.randrange(2**64),
                           draft_lens=lens)
    nodes = rng.randint(1, 8)
    parents = torch.tensor([[-1] + [pick(rng, rng.randint(-1, c - 1), INT32) for c in range(1, nodes)]
                            for _ in range(batch)], dtype=torch.int32, device="cuda")
    tree = torch.tensor([[pick(rng, rng.randrange(vocab), INT64) for _ in range(nodes)] for _ in range(batch)],
                        dtype=torch.int64, device="cuda")
    target = torch.rand(batch, nodes, vocab, device="cuda")
    ops.verify_tree_greedy(tree, parents, target)
    ops.verify_tree_speculative(tree, parents, target, seed=rng.randrange(100), max_depth=rng.choice([None, 0, 3]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200, help="cases per op family and debug setting")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    families = [lambda: attention(rng, False), lambda: attention(rng, True), lambda: kv_cache(rng),
                lambda: fused(rng), lambda: verify(rng)]
    for debug in ("0", "1"):
        os.environ["PAGEDLM_DEBUG"] = debug
        refused = 0
        for _ in range(args.cases):
            for family in families:
                try:
                    family()
                except (ValueError, TypeError, IndexError):  # a clear refusal; CUDA errors end the run
                    refused += 1
        torch.cuda.synchronize()
        print(f"PAGEDLM_DEBUG={debug}: {args.cases * len(families)} cases, {refused} refused")
    print("sanitize fuzz done")


if __name__ == "__main__":
    main()
