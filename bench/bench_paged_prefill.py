"""Paged-prefill benchmark: pagedlm, FlashInfer's BatchPrefillWithPagedKVCacheWrapper (if
installed; its fa2 and fa3 backends, pagedlm compared with the faster) and torch SDPA over
dense K/V side by side on the prefill shapes of bench/README.md: bf16 causal, 32 query /
8 kv heads (SDPA: 32/32, dense), head_dim 128, page 16, pages scattered; the cache bf16 or FP8
(e4m3, scale 1; SDPA stays bf16). Three more rows take a 4K sliding window, a soft cap of 50 and
head dim 256 (Mistral's and Gemma's options), and one a custom mask: a random token tree after
each sequence's cached prefix, as speculative tree verification has (FlashInfer given the same,
SDPA not run).

    python bench/bench_paged_prefill.py [--flashinfer-backends fa2,fa3] [--kv-cache-dtype fp8_e4m3]
                                        [--out FILE] [--append-results] [--warm-anchors]

FlashInfer compiles each kernel variant the first time it is planned (about 15-60 s each on the
GPU machine); --warm-anchors only does that, on tiny inputs, and exits, so that gpu_check.sh can
have it done while the GPU tests run.

TFLOP/s counts what causal attention must compute: 4 * H * D per (query, visible key) pair,
i.e. 2 * B * H * L^2 * D for a full causal prefill (a window or a mask sees fewer pairs).
"""
import argparse
import datetime

import torch
import torch.nn.functional as F

import pagedlm.ops as ops
from bench_common import anchor_columns, flashinfer_version, git_commit, write_results

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}
# (label, batch, new tokens per sequence, cached tokens before them, options: sliding window, soft cap, head dim)
SHAPES = [("B=8, L=4096", 8, 4096, 0, {}), ("B=1, L=16384", 1, 16384, 0, {}),
          ("chunked: B=16, 512 new over 8192 cached", 16, 512, 8192, {}),
          ("4K window: B=1, L=16384", 1, 16384, 0, {"window": 4096}),
          ("soft cap 50: B=8, L=4096", 8, 4096, 0, {"soft_cap": 50.0}),
          ("D=256: B=8, L=4096", 8, 4096, 0, {"head_dim": 256}),
          ("tree mask: B=16, 128 tree tokens over 4096 cached", 16, 128, 4096, {"tree": True})]


def tree_mask(batch, q_len, cached, seed=0):
    """(mask, mask_indptr): for each sequence, a random tree of q_len tokens (each token's parent
    an earlier one or the cached prefix) whose rows see the whole prefix, their ancestors and
    themselves; [q_len, cached + q_len] per sequence, flattened one after another."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(batch):
        tree = torch.zeros(q_len, q_len, dtype=torch.bool)
        for i in range(q_len):
            parent = int(torch.randint(-1, i, (1,), generator=g)) if i else -1
            if parent >= 0:
                tree[i] = tree[parent]
            tree[i, i] = True
        masks.append(torch.cat([torch.ones(q_len, cached, dtype=torch.bool), tree], dim=1).flatten())
    indptr = torch.arange(batch + 1, dtype=torch.int32) * q_len * (cached + q_len)
    return torch.cat(masks).cuda(), indptr.cuda()


def make_inputs(batch, q_len, cached, kv_dtype, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = cached + q_len
    pages = -(-length // PAGE)
    tables = torch.randperm(batch * pages, generator=g).view(batch, pages).int().cuda()
    shape = (batch * pages, PAGE, KV_HEADS, head_dim)
    key_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda").to(kv_dtype)
    value_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda").to(kv_dtype)
    query = torch.randn(batch * q_len, HEADS, head_dim, dtype=torch.bfloat16, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return query, key_cache, value_cache, tables, cu, lens


def flashinfer_prefill(query, key_cache, value_cache, tables, cu, lens, batch, length, backend, window, soft_cap,
                       mask=None):
    import flashinfer
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
    pages = tables.shape[1]
    kv_indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages
    last = torch.full((batch,), length - (pages - 1) * PAGE, dtype=torch.int32, device="cuda")
    wrapper.plan(cu, kv_indptr, tables.flatten(), last, HEADS, KV_HEADS, query.shape[-1], PAGE,
                 causal=mask is None, custom_mask=mask, q_data_type=torch.bfloat16, kv_data_type=key_cache.dtype,
                 window_left=-1 if window is None else window - 1, logits_soft_cap=soft_cap)
    return lambda: wrapper.run(query, (key_cache, value_cache))


def sdpa_dense(batch, q_len, length):
    q = torch.randn(batch, HEADS, q_len, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, HEADS, length, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    if q_len == length:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Bottom-right causal for a chunk after cached tokens: an explicit mask.
    mask = torch.arange(length, device="cuda")[None, :] <= torch.arange(length - q_len, length, device="cuda")[:, None]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_flops(batch, q_len, cached, window=None, head_dim=HEAD_DIM):
    """4 * H * D per visible (query, key) pair: the query at position p sees min(p + 1, window) keys."""
    window = window or cached + q_len
    visible_pairs = sum(min(p + 1, window) for p in range(cached, cached + q_len))
    return 4 * batch * HEADS * head_dim * visible_pairs


def warm_anchors(backends, kv_dtype):
    """Plans and runs FlashInfer once per backend and kernel variant the shapes need (window or
    not, soft cap or not, head dim), on one sequence of 128 tokens: its JIT cache then holds them."""
    if not flashinfer_version():
        return
    variants = {(options.get("window") is not None, options.get("soft_cap") is not None,
                 options.get("head_dim", HEAD_DIM), options.get("tree", False)): options for *_, options in SHAPES}
    for backend in backends:
        for options in variants.values():
            inputs = make_inputs(1, 128, 0, kv_dtype, options.get("head_dim", HEAD_DIM))
            mask = tree_mask(1, 128, 0)[0] if options.get("tree") else None
            try:
                flashinfer_prefill(*inputs, 1, 128, backend, options.get("window"), options.get("soft_cap"), mask)()
                torch.cuda.synchronize()
                print(f"FlashInfer {backend} {options or 'plain'}: built")
            except Exception as err:  # noqa: BLE001  (the timed run reports and skips it too)
                print(f"FlashInfer {backend} {options or 'plain'}: failed: {str(err)[:200]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flashinfer-backends", type=lambda s: s.split(","), default=None,
                        help="comma-separated FlashInfer backends to run (fa2, fa3, auto; default fa2,fa3, and "
                             "fa2 alone over an FP8 cache, whose fa3 kernels FlashInfer 0.7.2 fails to compile)")
    parser.add_argument("--kv-cache-dtype", default="bf16", choices=list(KV_DTYPES), help="the caches' type")
    parser.add_argument("--backend", default="auto", choices=list(ops.PREFILL_BACKENDS),
                        help="pagedlm's prefill kernel (paged_prefill_attention's backend)")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--warm-anchors", action="store_true",
                        help="only JIT-compile FlashInfer's kernels for these shapes' options, then exit")
    args = parser.parse_args()
    if args.flashinfer_backends is None:
        args.flashinfer_backends = ["fa2", "fa3"] if args.kv_cache_dtype == "bf16" else ["fa2"]
    if args.warm_anchors:
        warm_anchors(args.flashinfer_backends, KV_DTYPES[args.kv_cache_dtype])
        return
    from triton.testing import do_bench
    version = flashinfer_version()
    anchors = [f"FlashInfer {version} {b}" for b in args.flashinfer_backends] if version else []
    rows = []
    for label, batch, q_len, cached, options in SHAPES:
        window, soft_cap, head_dim = options.get("window"), options.get("soft_cap"), options.get("head_dim", HEAD_DIM)
        query, kc, vc, tables, cu, lens = make_inputs(batch, q_len, cached, KV_DTYPES[args.kv_cache_dtype], head_dim)
        mask, indptr = tree_mask(batch, q_len, cached) if options.get("tree") else (None, None)
        fns = {"pagedlm": lambda: ops.paged_prefill_attention(query, kc, vc, tables, cu, lens, custom_mask=mask,
                                                              mask_indptr=indptr, sliding_window=window,
                                                              soft_cap=soft_cap, backend=args.backend)}
        for backend, anchor in zip(args.flashinfer_backends, anchors):
            fns[anchor] = lambda b=backend: flashinfer_prefill(query, kc, vc, tables, cu, lens, batch, cached + q_len, b,
                                                               window, soft_cap, mask)
        reference = fns["pagedlm"]()
        times = {}
        for name, make in fns.items():
            try:  # an anchor variant that fails to build or run is reported and left out
                fn = make() if name != "pagedlm" else make
                out = fn()
            except Exception as err:  # noqa: BLE001
                print(f"{label}: {name} failed: {err}")
                continue
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            assert err < 2e-2, (name, err)
            times[name] = do_bench(fn, warmup=25, rep=100, return_mode="median")
        if not options:
            times["torch SDPA dense (MHA)"] = do_bench(sdpa_dense(batch, q_len, cached + q_len), warmup=25, rep=100,
                                                       return_mode="median")
        flops = (4 * HEADS * head_dim * int(mask.sum()) if mask is not None
                 else causal_flops(batch, q_len, cached, window, head_dim))
        rows.append((label, flops, times))
        del query, kc, vc, tables, cu, lens, mask
        torch.cuda.empty_cache()

    names = ["pagedlm", *anchors, "torch SDPA dense (MHA)"]
    lines = [f"### Paged prefill, {args.kv_cache_dtype} cache — {datetime.date.today()}, "
             f"{torch.cuda.get_device_name()}, commit {git_commit()}", "",
             f"`python bench/bench_paged_prefill.py --kv-cache-dtype {args.kv_cache_dtype} --backend {args.backend}` — "
             f"bf16 queries, causal, {HEADS}/{KV_HEADS} heads, D={HEAD_DIM}, page "
             f"{PAGE}, scattered pages, `triton.testing.do_bench` median. TFLOP/s of causal attention "
             "(4·H·D per visible query-key pair).", "",
             "| shape | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names) + " | best anchor | pagedlm speed vs it |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for label, flops, times in rows:
        cells = [f"{times[n]:.3f} ({flops / times[n] / 1e9:.0f})" if n in times else "—" for n in names]
        best, speed = anchor_columns(times, anchors)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {best} | {speed} |")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
