"""The fused layer kernels at the sizes an engine step gives them: pagedlm.ops.rms_norm (with the
residual add, as every decoder layer runs it), silu_and_mul, and argmax_logprob (a decode step's
greedy choices over Llama 3's 128,256-token vocabulary), beside the torch code they replace, in
achieved bandwidth (bytes the kernel must move over its median time) against the card's copy
bandwidth. Rows: a decode step of 256 sequences, a prompt chunk of 8,192 tokens; argmax_logprob
also at 32 rows, fewer than the card has SMs (a thread block per row).
Llama-3.2-1B's widths (hidden 2,048, intermediate 8,192) and Llama-3.1-8B's (4,096 / 14,336), bf16.

    python bench/bench_fused_layers.py [--out FILE] [--append-results]
"""
import argparse
import datetime
import itertools

import torch
from triton.testing import do_bench

import pagedlm.ops as ops
from bench_common import copy_bandwidth, git_commit, write_results

ROWS = [256, 8192]
WIDTHS = [(2048, 8192), (4096, 14336)]  # (hidden, intermediate)
VOCAB = 128256
ARGMAX_ROWS = [256, 32]


def rms_norm_unfused(x, residual, weight, eps=1e-5):
    residual.add_(x)
    h = residual.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def silu_and_mul_unfused(x):
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def argmax_logprob_unfused(logits):
    logprobs = torch.log_softmax(logits.float(), -1)
    best = logprobs.max(-1)
    return best.indices, best.values


def median_us(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()
    card, bandwidth = torch.cuda.get_device_name(), copy_bandwidth()
    lines = [f"### Fused layers — {card}, {datetime.date.today()}, commit {git_commit()}", "",
             f"`python bench/bench_fused_layers.py` — bf16; bandwidth: the bytes each kernel must read and write "
             f"over its median time; the card's copy bandwidth {bandwidth / 1e9:,.0f} GB/s.", "",
             "| kernel | rows x width | pagedlm (us) | GB/s | of copy | torch unfused (us) | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for rows in ROWS:
        for hidden, intermediate in WIDTHS:
            x = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
            residual, weight = torch.randn_like(x), torch.randn(hidden, dtype=torch.bfloat16, device="cuda")
            # reads x and residual, writes residual and out (the second pass's re-read hits L2)
            ours = median_us(lambda: ops.rms_norm(x, weight, 1e-5, residual=residual))
            theirs = median_us(lambda: rms_norm_unfused(x, residual, weight))
            moved = 4 * x.numel() * x.element_size()
            lines.append(f"| fused_add_rms_norm | {rows} x {hidden} | {ours:.1f} | {moved / ours / 1e3:,.0f} | "
                         f"{moved / ours / 1e3 / (bandwidth / 1e9):.0%} | {theirs:.1f} | {theirs / ours:.2f}x |")
            gate_up = torch.randn(rows, 2 * intermediate, dtype=torch.bfloat16, device="cuda")
            ours = median_us(lambda: ops.silu_and_mul(gate_up))
            theirs = median_us(lambda: silu_and_mul_unfused(gate_up))
            moved = 3 * rows * intermediate * gate_up.element_size()
            lines.append(f"| silu_and_mul | {rows} x {intermediate} | {ours:.1f} | {moved / ours / 1e3:,.0f} | "
                         f"{moved / ours / 1e3 / (bandwidth / 1e9):.0%} | {theirs:.1f} | {theirs / ours:.2f}x |")
    for dtype, rows in itertools.product((torch.bfloat16, torch.float32), ARGMAX_ROWS):
        logits = torch.randn(rows, VOCAB, device="cuda").to(dtype)
        ours = median_us(lambda: ops.argmax_logprob(logits))
        theirs = median_us(lambda: argmax_logprob_unfused(logits))
        moved = logits.numel() * logits.element_size()  # read once, nothing written but [rows, 2]
        lines.append(f"| argmax_logprob, {str(dtype)[6:]} | {rows} x {VOCAB} | {ours:.1f} | "
                     f"{moved / ours / 1e3:,.0f} | {moved / ours / 1e3 / (bandwidth / 1e9):.0%} | {theirs:.1f} | "
                     f"{theirs / ours:.2f}x |")
    write_results("\n".join(lines), args.out, args.append_results)


if __name__ == "__main__":
    main()
