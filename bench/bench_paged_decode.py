"""Paged-decode benchmark: pagedlm, FlashInfer's BatchDecodeWithPagedKVCacheWrapper (if
installed; CUDA-core and tensor-core variants, pagedlm compared with the faster) and torch
gather + SDPA side by side on the decode shapes of bench/README.md, with the card's copy
bandwidth measured in the same run. bf16 queries, 32 query / 8 kv heads, head_dim 128, page 16,
pages scattered at random through the cache; the cache bf16 or FP8 (e4m3, scale 1).

    python bench/bench_paged_decode.py                 # CUDA: all shapes, writes a markdown table
    python bench/bench_paged_decode.py --kv-cache-dtype fp8_e4m3   # an FP8 cache (no torch column)
    python bench/bench_paged_decode.py --device cpu    # CPU path vs torch on CPU, f32, B=8 L=2048
"""
import argparse
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

import pagedlm.ops as ops
from bench_common import anchor_columns, copy_bandwidth, cpu_name, flashinfer_version, git_commit, write_results

GPU_SHAPES = [(1, 32768), (8, 8192), (64, 4096), (256, 2048), (1, 131072), (512, 512), (8, 32768), (8, 131072)]
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16


KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def make_inputs(batch, length, dtype, device, seed=0, kv_dtype=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    pages_per_seq = length // PAGE
    num_pages = batch * pages_per_seq
    tables = torch.randperm(num_pages, generator=g).view(batch, pages_per_seq).int().to(device)
    cache_shape = (num_pages, PAGE, KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(cache_shape, dtype=dtype, device=device).to(kv_dtype or dtype)
    value_cache = torch.randn(cache_shape, dtype=dtype, device=device).to(kv_dtype or dtype)
    query = torch.randn(batch, HEADS, HEAD_DIM, dtype=dtype, device=device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    return query, key_cache, value_cache, tables, lens


def torch_gather_sdpa(query, key_cache, value_cache, tables):
    batch = query.shape[0]
    k = key_cache[tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = value_cache[tables.long()].reshape(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    return F.scaled_dot_product_attention(query.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


FLASHINFER_VARIANTS = {"cuda-cores": False, "tensor-cores": True}  # name -> use_tensor_cores


def flashinfer_decode(query, key_cache, value_cache, tables, batch, length, use_tensor_cores):
    import flashinfer
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=query.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=use_tensor_cores)
    pages = length // PAGE
    indptr = torch.arange(batch + 1, dtype=torch.int32, device=query.device) * pages
    last_page_len = torch.full((batch,), PAGE, dtype=torch.int32, device=query.device)
    wrapper.plan(indptr, tables.flatten(), last_page_len, HEADS, KV_HEADS, HEAD_DIM, PAGE,
                 q_data_type=query.dtype, kv_data_type=key_cache.dtype)
    return lambda: wrapper.run(query, (key_cache, value_cache))


def bench_cuda(args):
    from triton.testing import do_bench
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    version = flashinfer_version()
    anchors = [f"FlashInfer {version} {v}" for v in args.flashinfer_variants] if version else []
    kv_dtype = KV_DTYPES[args.kv_cache_dtype]
    rows = []
    for batch, length in GPU_SHAPES:
        q, kc, vc, tables, lens = make_inputs(batch, length, torch.bfloat16, "cuda", kv_dtype=kv_dtype)
        kv_bytes = 2 * batch * length * KV_HEADS * HEAD_DIM * kc.element_size()
        candidates = {"pagedlm": lambda: ops.paged_decode_attention(q, kc, vc, tables, lens)}
        for variant, label in zip(args.flashinfer_variants, anchors):
            try:  # an anchor variant that fails to build is reported and left out
                candidates[label] = flashinfer_decode(q, kc, vc, tables, batch, length, FLASHINFER_VARIANTS[variant])
            except Exception as err:  # noqa: BLE001
                print(f"B={batch} L={length}: {label} failed: {err}")
        if batch * length <= 1 << 20 and kv_dtype == torch.bfloat16:
            candidates["torch gather+SDPA"] = lambda: torch_gather_sdpa(q, kc, vc, tables)
        reference = candidates["pagedlm"]()
        times = {}
        for label, fn in candidates.items():
            out = fn()
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            assert err < 2e-2, (label, err)
            times[label] = do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
        rows.append((batch, length, kv_bytes, times))
        del q, kc, vc, tables, lens
        torch.cuda.empty_cache()

    labels = ["pagedlm", *anchors] + (["torch gather+SDPA"] if kv_dtype == torch.bfloat16 else [])
    lines = [f"### Paged decode, {args.kv_cache_dtype} cache — {datetime.date.today()}, {name}, commit {git_commit()}",
             "", f"`python bench/bench_paged_decode.py --kv-cache-dtype {args.kv_cache_dtype}` — bf16 queries, "
             f"{HEADS}/{KV_HEADS} heads, D={HEAD_DIM}, page {PAGE}, "
             f"scattered pages, `triton.testing.do_bench` median (L2 flushed). Copy bandwidth measured in the same "
             f"run: **{copy_bw / 1e9:.0f} GB/s** (bytes read + written).", "",
             "| B | L | " + " | ".join(f"{label} us (GB/s, % copy)" for label in labels)
             + " | best anchor | pagedlm speed vs it |",
             "|---|---|" + "---|" * len(labels) + "---|---|"]
    for batch, length, kv_bytes, times in rows:
        cells = []
        for label in labels:
            t = times.get(label)
            cells.append("—" if t is None else f"{t:.1f} ({kv_bytes / t / 1e3:.0f}, {kv_bytes / t * 1e6 / copy_bw:.0%})")
        best, speedup = anchor_columns(times, anchors)
        lines.append(f"| {batch} | {length} | " + " | ".join(cells) + f" | {best} | {speedup} |")
    return "\n".join(lines) + "\n"


def bench_cpu(args):
    torch.set_num_threads(os.cpu_count())
    batch, length = 8, 2048
    q, kc, vc, tables, lens = make_inputs(batch, length, torch.float32, "cpu")
    fns = {"pagedlm CPU path": lambda: ops.paged_decode_attention(q, kc, vc, tables, lens),
           "torch gather+SDPA (CPU)": lambda: torch_gather_sdpa(q, kc, vc, tables)}
    reference = fns["pagedlm CPU path"]()
    times = {}
    for label, fn in fns.items():
        assert torch.allclose(fn(), reference, atol=1e-4)
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        times[label] = statistics.median(runs) * 1e3
    lines = [f"### Paged decode, CPU — {datetime.date.today()}, {cpu_name()} ({os.cpu_count()} cores), "
             f"commit {git_commit()}", "",
             f"`python bench/bench_paged_decode.py --device cpu` — f32, B={batch}, L={length}, {HEADS}/{KV_HEADS} "
             f"heads, D={HEAD_DIM}, page {PAGE}, median of {args.repeats}.", "",
             "| implementation | ms |", "|---|---|"]
    lines += [f"| {label} | {ms:.2f} |" for label, ms in times.items()]
    lines += ["", f"pagedlm CPU path vs torch: **{times['torch gather+SDPA (CPU)'] / times['pagedlm CPU path']:.2f}x**."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--kv-cache-dtype", default="bf16", choices=list(KV_DTYPES), help="CUDA: the caches' type")
    parser.add_argument("--repeats", type=int, default=20, help="CPU: timed calls per implementation")
    parser.add_argument("--flashinfer-variants", type=lambda s: s.split(","), default=list(FLASHINFER_VARIANTS),
                        help=f"comma-separated, of {','.join(FLASHINFER_VARIANTS)}")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    text = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    write_results(text, args.out, args.append_results)


if __name__ == "__main__":
    main()
