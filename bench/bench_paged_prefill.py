"""Paged-prefill benchmark: pagedlm, FlashInfer 0.2.8 paged prefill (if installed) and torch
SDPA over dense K/V side by side on the prefill shapes of shared/BENCH.md: bf16 causal,
32 query / 8 kv heads (SDPA: 32/32, dense), head_dim 128, page 16, pages scattered.

    python bench/bench_paged_prefill.py [--out FILE] [--append-results]

TFLOP/s counts what causal attention must compute: 4 * H * D per (query, visible key) pair,
i.e. 2 * B * H * L^2 * D for a full causal prefill.
"""
import argparse
import datetime

import torch
import torch.nn.functional as F

import pagedlm.ops as ops
from bench_common import git_commit, write_results

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
# (label, batch, new tokens per sequence, cached tokens before them)
SHAPES = [("B=8, L=4096", 8, 4096, 0), ("B=1, L=16384", 1, 16384, 0),
          ("chunked: B=16, 512 new over 8192 cached", 16, 512, 8192)]


def make_inputs(batch, q_len, cached, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = cached + q_len
    pages = -(-length // PAGE)
    tables = torch.randperm(batch * pages, generator=g).view(batch, pages).int().cuda()
    shape = (batch * pages, PAGE, KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    query = torch.randn(batch * q_len, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_len
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return query, key_cache, value_cache, tables, cu, lens


def flashinfer_prefill(query, key_cache, value_cache, tables, cu, lens, batch, length):
    import flashinfer
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    pages = tables.shape[1]
    kv_indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * pages
    last = torch.full((batch,), length - (pages - 1) * PAGE, dtype=torch.int32, device="cuda")
    wrapper.plan(cu, kv_indptr, tables.flatten(), last, HEADS, KV_HEADS, HEAD_DIM, PAGE, causal=True,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
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


def causal_flops(batch, q_len, cached):
    visible_pairs = q_len * cached + q_len * (q_len + 1) / 2
    return 4 * batch * HEADS * HEAD_DIM * visible_pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    from triton.testing import do_bench
    try:
        import flashinfer  # noqa: F401
        have_flashinfer = True
    except ImportError:
        have_flashinfer = False
    rows = []
    for label, batch, q_len, cached in SHAPES:
        query, kc, vc, tables, cu, lens = make_inputs(batch, q_len, cached)
        fns = {"pagedlm": lambda: ops.paged_prefill_attention(query, kc, vc, tables, cu, lens)}
        if have_flashinfer:
            fns["FlashInfer 0.2.8"] = flashinfer_prefill(query, kc, vc, tables, cu, lens, batch, cached + q_len)
        reference = fns["pagedlm"]()
        times = {}
        for name, fn in fns.items():
            out = fn()
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            assert err < 2e-2, (name, err)
            times[name] = do_bench(fn, warmup=25, rep=100, return_mode="median")
        times["torch SDPA dense (MHA)"] = do_bench(sdpa_dense(batch, q_len, cached + q_len), warmup=25, rep=100,
                                                   return_mode="median")
        rows.append((label, causal_flops(batch, q_len, cached), times))
        del query, kc, vc, tables, cu, lens
        torch.cuda.empty_cache()

    names = ["pagedlm"] + (["FlashInfer 0.2.8"] if have_flashinfer else []) + ["torch SDPA dense (MHA)"]
    lines = [f"### Paged prefill — {datetime.date.today()}, {torch.cuda.get_device_name()}, commit {git_commit()}", "",
             f"`python bench/bench_paged_prefill.py` — bf16 causal, {HEADS}/{KV_HEADS} heads, D={HEAD_DIM}, page "
             f"{PAGE}, scattered pages, `triton.testing.do_bench` median. TFLOP/s of causal attention "
             "(4·H·D per visible query-key pair).", "",
             "| shape | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names) + " | pagedlm speed vs FlashInfer |",
             "|---|" + "---|" * len(names) + "---|"]
    for label, flops, times in rows:
        cells = [f"{times[n]:.3f} ({flops / times[n] / 1e9:.0f})" for n in names]
        speed = f"{times['FlashInfer 0.2.8'] / times['pagedlm']:.2f}x" if have_flashinfer else "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {speed} |")
    write_results("\n".join(lines) + "\n", args.out, args.append_results)


if __name__ == "__main__":
    main()
