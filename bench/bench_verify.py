"""Speculative-verification benchmark: pagedlm.verify_speculative against FlashInfer's
chain_speculative_sampling (if importable) on (B, k, V) = (64, 4, 32000) and (16, 8, 128256),
f32 probabilities, drafts sampled from the draft distribution; and pagedlm.verify_greedy from
bf16 logits against torch (argmax + compare) on the same shapes. The card's copy bandwidth is
measured in the same run; every figure is a triton.testing.do_bench median (L2 flushed).

    python bench/bench_verify.py [--out FILE] [--append-results]
    python bench/bench_verify.py --smoke      # each op once on small inputs (for compute-sanitizer)

"GB/s" is the tensors' bytes over the time (draft + target probabilities, or the logits), as
FlashInfer's figures are quoted. verify_speculative reads only the rows it samples from, so
its figure can exceed the copy bandwidth: it is a speed, not a measured traffic.
"""
import argparse
import datetime

import torch

from bench_common import copy_bandwidth, git_commit, write_results
from pagedlm.verify import verify_greedy, verify_speculative

SHAPES = [(64, 4, 32000), (16, 8, 128256)]
SEED = 1234


def make_inputs(batch, k, vocab, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(batch * k)
    # Peaked softmaxes (like real models); the draft is a noisy copy of the target, so acceptance
    # runs are long and rejections happen at every position.
    target_logits = torch.randn(batch, k + 1, vocab, device=device, generator=gen) * 3
    draft_logits = target_logits[:, :k] + torch.randn(batch, k, vocab, device=device, generator=gen)
    target_probs, draft_probs = target_logits.softmax(-1), draft_logits.softmax(-1)
    drafts = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=gen).reshape(batch, k)
    return drafts, draft_probs, target_probs, target_logits.to(torch.bfloat16)


def flashinfer_chain(draft_probs, drafts, target_probs):
    """FlashInfer's chain_speculative_sampling as a callable, or None if it cannot run here."""
    try:
        from flashinfer.sampling import chain_speculative_sampling
        drafts32 = drafts.int()
        accepted = torch.zeros(drafts.shape[0], dtype=torch.int32, device=drafts.device)
        emitted = torch.zeros_like(accepted)

        def fn():
            return chain_speculative_sampling(draft_probs, drafts32, target_probs, accepted, emitted)

        out = fn()  # first use JIT-compiles
        torch.cuda.synchronize()
        out = out[0] if isinstance(out, tuple) else out  # some versions also return the counters
        assert out.shape == (drafts.shape[0], drafts.shape[1] + 1)
        return fn
    except Exception as error:  # not installed, or its JIT build failed: report, don't stop
        print(f"FlashInfer skipped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return None


def torch_greedy(drafts, logits):
    best = logits.argmax(-1)
    k = drafts.shape[1]
    accepted = (best[:, :k] == drafts).int().cumprod(-1).sum(-1)
    position = torch.arange(k + 1, device=drafts.device)
    padded = torch.cat([drafts, drafts[:, :1]], dim=1)
    out = torch.where(position < accepted[:, None], padded, torch.where(position == accepted[:, None], best, -1))
    return out, accepted.int()


def check_speculative(out, accepted, drafts, vocab):
    k = drafts.shape[1]
    assert ((out >= -1) & (out < vocab)).all()
    position = torch.arange(k + 1, device=out.device)
    padded = torch.cat([drafts, drafts[:, :1]], dim=1)
    assert torch.equal(torch.where(position < accepted[:, None], out, 0),
                       torch.where(position < accepted[:, None], padded, 0))
    assert ((position > accepted[:, None]) == (out == -1)).all()


def bench_shape(batch, k, vocab):
    """(mean accepted drafts, {label: us}) for one shape; every candidate checked first."""
    from triton.testing import do_bench

    def timed(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3

    drafts, draft_probs, target_probs, logits = make_inputs(batch, k, vocab)

    def speculative():
        return verify_speculative(drafts, draft_probs, target_probs, seed=SEED)

    def greedy():
        return verify_greedy(drafts, logits)

    out, accepted = speculative()
    check_speculative(out, accepted, drafts, vocab)
    assert all(torch.equal(a, b) for a, b in zip(greedy(), torch_greedy(drafts, logits))), "greedy != torch"
    times = {"pagedlm speculative": timed(speculative)}
    flashinfer = flashinfer_chain(draft_probs, drafts, target_probs)
    if flashinfer is not None:
        times["FlashInfer speculative"] = timed(flashinfer)
    times["pagedlm greedy"] = timed(greedy)
    times["torch greedy"] = timed(lambda: torch_greedy(drafts, logits))
    return accepted.float().mean().item(), times


def bench(args):
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    rows = []
    for batch, k, vocab in SHAPES:
        mean_accepted, times = bench_shape(batch, k, vocab)
        probs_bytes = (2 * k + 1) * batch * vocab * 4
        logits_bytes = (k + 1) * batch * vocab * 2
        rows.append((batch, k, vocab, probs_bytes, logits_bytes, mean_accepted, times))
        torch.cuda.empty_cache()

    def cell(t, nbytes):
        return "—" if t is None else f"{t:.1f} ({nbytes / t / 1e3:.0f}, {nbytes / t * 1e6 / copy_bw:.0%})"

    lines = [f"### Speculative verification — {datetime.date.today()}, {name}, commit {git_commit()}", "",
             "`python bench/bench_verify.py` — f32 probabilities (speculative), bf16 logits (greedy), drafts sampled "
             "from the draft model, `triton.testing.do_bench` median (L2 flushed). Cells: us (tensor GB/s, % of copy "
             f"bandwidth). Copy bandwidth measured in the same run: **{copy_bw / 1e9:.0f} GB/s** (bytes read + "
             "written, 1 GiB device-to-device).", "",
             "| B | k | V | mean accepted | pagedlm speculative | FlashInfer speculative | vs FlashInfer "
             "| pagedlm greedy | torch greedy | vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for batch, k, vocab, probs_bytes, logits_bytes, mean_accepted, t in rows:
        fi, ours = t.get("FlashInfer speculative"), t["pagedlm speculative"]
        versus = f"{fi / ours:.2f}x" if fi else "—"
        lines.append(
            f"| {batch} | {k} | {vocab} | {mean_accepted:.2f} | {cell(ours, probs_bytes)} | {cell(fi, probs_bytes)} "
            f"| {versus} | {cell(t['pagedlm greedy'], logits_bytes)} | {cell(t['torch greedy'], logits_bytes)} "
            f"| {t['torch greedy'] / t['pagedlm greedy']:.2f}x |")
    return "\n".join(lines) + "\n"


def smoke():
    """Each op once on small CUDA inputs, several cluster sizes and both load widths."""
    from pagedlm.verify import verify_tree_greedy, verify_tree_speculative
    for batch, k, vocab in [(3, 4, 4099), (40, 2, 32000), (2, 3, 1000)]:
        drafts, draft_probs, target_probs, logits = make_inputs(batch, k, vocab)
        verify_speculative(drafts, draft_probs, target_probs, seed=1)
        verify_speculative(drafts, None, target_probs, seed=1, offset=torch.ones(1, dtype=torch.int64, device="cuda"))
        verify_greedy(drafts, logits)
        parents = torch.tensor([[-1, 0, 0, 1, 1][:k + 1]] * batch, dtype=torch.int32, device="cuda")
        tokens = target_probs[:, :, :8].argmax(-1)
        verify_tree_greedy(tokens, parents, logits)
        verify_tree_speculative(tokens, parents, target_probs, seed=2)
    torch.cuda.synchronize()
    print("smoke: ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="run each op once on small inputs and exit")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return
    write_results(bench(args), args.out, args.append_results)


if __name__ == "__main__":
    main()
