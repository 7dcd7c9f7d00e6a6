"""Shared-prefix (cascade) decode benchmark: pagedlm's cascade_decode_attention beside plain paged
decode of the same batch (every row reading the shared prefix itself) and FlashInfer's
MultiLevelCascadeAttentionWrapper with two levels (if installed), on the shapes of
bench/README.md. bf16, 32 query / 8 kv heads, head_dim 128, page 16, pages scattered at random;
prefixes and suffixes fill whole pages, so plain decode's table is each row's prefix pages then
its suffix pages.

    python bench/bench_cascade.py                  # CUDA: all shapes, writes a markdown table
    python bench/bench_cascade.py --smoke          # tiny shapes, f32, on the CPU when there is no GPU
"""
import argparse
import datetime
import os
import statistics
import time

import torch

import pagedlm.ops as ops
from bench_common import anchor_columns, copy_bandwidth, cpu_name, flashinfer_version, git_commit, write_results

# (groups, rows per group, prefix tokens, suffix tokens per row)
GPU_SHAPES = [(1, 64, 4096, 256), (8, 8, 2048, 256), (16, 4, 1024, 512)]
SMOKE_SHAPES = [(1, 6, 64, 16), (3, 2, 32, 48)]
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
SMOKE_HEADS, SMOKE_KV_HEADS, SMOKE_HEAD_DIM = 4, 2, 64


def make_inputs(groups, rows, prefix, suffix, *, heads, kv_heads, head_dim, dtype, device, seed=0):
    """The cascade's arguments, and the plain decode's block tables and lengths over the same pages."""
    g = torch.Generator().manual_seed(seed)
    batch, prefix_pages, suffix_pages = groups * rows, prefix // PAGE, suffix // PAGE
    num_pages = groups * prefix_pages + batch * suffix_pages
    order = torch.randperm(num_pages, generator=g).int()
    prefix_tables = order[:groups * prefix_pages].view(groups, prefix_pages)
    suffix_tables = order[groups * prefix_pages:].view(batch, suffix_pages)
    group_indptr = torch.arange(groups + 1, dtype=torch.int32) * rows
    plain_tables = torch.cat([prefix_tables.repeat_interleave(rows, dim=0), suffix_tables], dim=1)
    cache_shape = (num_pages, PAGE, kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=g).to(dtype)
    value_cache = torch.randn(cache_shape, generator=g).to(dtype)
    query = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    cascade = [query, key_cache, value_cache, prefix_tables, torch.full((groups,), prefix, dtype=torch.int32),
               group_indptr, suffix_tables, torch.full((batch,), suffix, dtype=torch.int32)]
    plain = (plain_tables, torch.full((batch,), prefix + suffix, dtype=torch.int32))
    return [t.to(device) for t in cascade], [t.to(device) for t in plain]


def flashinfer_cascade(args, heads, kv_heads, head_dim):
    """FlashInfer's two-level cascade over the same pages: level 0 the groups' prefixes, level 1
    each row's suffix (its cache layout "NHD" is pagedlm's)."""
    import flashinfer
    query, key_cache, value_cache, prefix_tables, _, group_indptr, suffix_tables, _ = args
    device = query.device
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")

    def indptr(n, pages):
        return torch.arange(n + 1, dtype=torch.int32, device=device) * pages

    groups, batch = prefix_tables.shape[0], suffix_tables.shape[0]
    wrapper.plan([group_indptr, indptr(batch, 1)],
                 [indptr(groups, prefix_tables.shape[1]), indptr(batch, suffix_tables.shape[1])],
                 [prefix_tables.flatten(), suffix_tables.flatten()],
                 [torch.full((groups,), PAGE, dtype=torch.int32, device=device),
                  torch.full((batch,), PAGE, dtype=torch.int32, device=device)],
                 heads, kv_heads, head_dim, PAGE, q_data_type=query.dtype, kv_data_type=key_cache.dtype)
    return lambda: wrapper.run(query, (key_cache, value_cache))


def graph_of(fn):
    """fn captured in a CUDA graph (after a warm-up call): returns its replay."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timer(device, repeats):
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3

    def median_us(fn):
        fn()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs) * 1e6
    return median_us


def bench(args):
    device = args.device
    smoke = args.smoke
    heads, kv_heads, head_dim = (SMOKE_HEADS, SMOKE_KV_HEADS, SMOKE_HEAD_DIM) if smoke else (HEADS, KV_HEADS, HEAD_DIM)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    version = flashinfer_version() if device == "cuda" else None
    anchors = [f"FlashInfer {version} cascade"] if version else []
    time_us = timer(device, args.repeats)
    copy_bw = copy_bandwidth() if device == "cuda" else None
    rows = []
    for groups, rows_per_group, prefix, suffix in SMOKE_SHAPES if smoke else GPU_SHAPES:
        cascade_args, (plain_tables, plain_lens) = make_inputs(groups, rows_per_group, prefix, suffix, heads=heads,
                                                               kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                                                               device=device)
        query, key_cache, value_cache = cascade_args[:3]
        out = torch.empty_like(query)
        candidates = {
            "plain decode": lambda: ops.paged_decode_attention(query, key_cache, value_cache, plain_tables, plain_lens),
            "pagedlm": lambda: ops.cascade_decode_attention(*cascade_args),
        }
        if device == "cuda":
            candidates["pagedlm, CUDA graph"] = graph_of(lambda: ops.cascade_decode_attention(*cascade_args, out=out))
        for label in anchors:
            try:  # an anchor that fails to build is reported and left out
                candidates[label] = flashinfer_cascade(cascade_args, heads, kv_heads, head_dim)
            except Exception as err:  # noqa: BLE001
                print(f"{groups}x{rows_per_group}, prefix {prefix}: {label} failed: {err}")
        reference = candidates["plain decode"]().float()
        times = {}
        for label, fn in candidates.items():
            result = fn()
            if label == "pagedlm, CUDA graph":
                result = out  # the replay writes into the captured call's out
            err = ((result.float() - reference).norm() / reference.norm()).item()
            assert err < 2e-2, (label, err)
            times[label] = time_us(fn)
        token_bytes = 2 * kv_heads * head_dim * query.element_size()  # K and V of one token
        batch = groups * rows_per_group
        plain_bytes = batch * (prefix + suffix) * token_bytes
        cascade_bytes = (groups * prefix + batch * suffix) * token_bytes
        rows.append((groups, rows_per_group, prefix, suffix, plain_bytes, cascade_bytes, times))
        candidates.clear()  # the CUDA graph and its memory go before the next shape's inputs come
    return table(args, rows, anchors, heads, kv_heads, head_dim, dtype, copy_bw)


def megabytes(n):
    return f"{n / 1e6:.0f}" if n >= 1e7 else f"{n / 1e6:.2f}"


def table(args, rows, anchors, heads, kv_heads, head_dim, dtype, copy_bw):
    cuda = args.device == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"{cpu_name()} ({os.cpu_count()} cores)"
    timing = ("`triton.testing.do_bench` median (L2 flushed)" if cuda else f"median of {args.repeats} calls")
    command = "python bench/bench_cascade.py" + (" --smoke" if args.smoke else "") + ("" if cuda else " --device cpu")
    labels = ["plain decode", "pagedlm"] + (["pagedlm, CUDA graph"] if cuda else []) + anchors
    lines = [f"### Cascade decode{', smoke' if args.smoke else ''} — {datetime.date.today()}, {card}, "
             f"commit {git_commit()}", "",
             f"`{command}` — {str(dtype)[6:]}, {heads}/{kv_heads} heads, D={head_dim}, page {PAGE}, scattered pages; "
             f"groups of rows share a prefix, each row has a suffix of its own. {timing}. KV MB: the K/V bytes "
             f"plain decode reads (every row its prefix) / the cascade reads (each prefix once)."]
    if cuda:
        lines[-1] += (f" Copy bandwidth measured in the same run: **{copy_bw / 1e9:.0f} GB/s** (bytes read + "
                      "written). The cascade's GB/s (its KV MB ÷ time, and their share of copy bandwidth) and its "
                      "speed over plain decode are those of its CUDA-graph replay: eager, its few dozen torch ops "
                      "on the host can take longer than its kernels. FlashInfer's cascade runs eager, and is "
                      "compared with pagedlm's eager call.")
    lines += ["", "| groups × rows | prefix | suffix | KV MB | " + " | ".join(f"{label} us" for label in labels)
              + " | cascade speed vs plain | best anchor | pagedlm speed vs it |",
              "|---|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
    for groups, rows_per_group, prefix, suffix, plain_bytes, cascade_bytes, times in rows:
        cells = [f"{times[label]:.1f}" if label in times else "—" for label in labels]
        cascade = "pagedlm, CUDA graph" if cuda else "pagedlm"
        rate = cascade_bytes / times[cascade] / 1e3  # bytes per us / 1e3 = GB/s
        cells[labels.index(cascade)] += f" ({rate:.0f} GB/s, {rate * 1e9 / copy_bw:.0%})" if cuda else \
            f" ({rate:.0f} GB/s)"
        best, speedup = anchor_columns(times, anchors)
        lines.append(f"| {groups} × {rows_per_group} | {prefix} | {suffix} | {megabytes(plain_bytes)} / "
                     f"{megabytes(cascade_bytes)} | " + " | ".join(cells)
                     + f" | {times['plain decode'] / times[cascade]:.2f}x | {best} | {speedup} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (f32 on the CPU): checks that the script runs")
    parser.add_argument("--repeats", type=int, default=5, help="CPU: timed calls per implementation")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if args.device == "cpu" and not args.smoke:
        parser.error("the CPU runs only --smoke: the full shapes are GPU work")
    write_results(bench(args), args.out, args.append_results)


if __name__ == "__main__":
    main()
