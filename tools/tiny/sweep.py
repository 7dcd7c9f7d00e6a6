"""The isoFLOP sweep: every (budget, size) run of the plan on the same corpus and tokenizer,
each given a share of the time left in proportion to its estimated cost, one CSV row per run
(written as it finishes, so a cut-short job keeps what it did)."""
import csv
import time

import torch
from transformers import LlamaForCausalLM

from . import evaluate
from .export import card_name
from .models import llama_config, training_flops
from .plan import peak_lr, sweep_runs
from .train import train

COLUMNS = ["budget", "N", "N_non_embedding", "D", "flops", "loss", "loss_std_err", "wall_s", "card", "d_model", "layers",
           "batch", "steps", "peak_lr", "stopped_by"]


def log_plan(plan, runs, train_tokens, seconds_left, log):
    log(f"sweep plan: {len(runs)} runs, {len(plan.sweep)} budgets, seq {plan.seq_len}, "
        f"{train_tokens:,} train tokens")
    for budget, shape, tokens, batch, estimate in runs:
        n = shape.params(plan.vocab)
        log(f"  {budget:.0e}  {shape.name():8s} N {n / 1e6:5.2f}M  D {tokens / 1e6:6.1f}M  D/N {tokens / n:4.0f}  "
            f"epochs {tokens / train_tokens:4.1f}  batch {batch:3d}  steps {tokens / (batch * plan.seq_len):5.0f}  "
            f"lr {peak_lr(plan, shape):.1e}  ~{estimate:4.1f} s")
    log(f"sweep plan: ~{sum(r[4] for r in runs):.0f} s of training estimated, {seconds_left:.0f} s left")


def log_differences(budget, results, log):
    """Each size's loss above the budget's best, with the std error of that difference over the
    same windows: held-out windows vary far more than sizes differ, but they vary alike for all."""
    best_name, best = min(results, key=lambda r: r[1].mean())
    parts = []
    for name, losses in results:
        diff = losses - best
        parts.append(f"{name} best" if name == best_name else
                     f"{name} +{diff.mean():.4f} +- {diff.std(ddof=1) / len(diff) ** 0.5:.4f}")
    edge = best_name in (results[0][0], results[-1][0])
    log(f"budget {budget:.0e}: " + ", ".join(parts)
        + (" (minimum at the edge: the sizes do not bracket it)" if edge else " (minimum inside)"))


def run_sweep(plan, train_stream, heldout, csv_path, *, deadline, seed, compile_model, log):
    runs = sweep_runs(plan)
    log_plan(plan, runs, train_stream.numel(), deadline - time.monotonic(), log)
    # Every held-out token once: the sizes' differences are then as precise as this split allows.
    windows = evaluate.eval_windows(heldout, len(heldout) // (plan.seq_len + 1), plan.seq_len)
    device = train_stream.device
    results = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for i, (budget, shape, tokens, batch, estimate) in enumerate(runs):
            left = deadline - time.monotonic()
            remaining_estimate = sum(r[4] for r in runs[i:])
            cap = max(1.0, left * estimate / remaining_estimate)
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama_config(shape, plan.vocab, plan.seq_len)).to(device)
            n = shape.params(plan.vocab)
            log(f"sweep {i + 1}/{len(runs)}: budget {budget:.2g}, {shape.name()} ({n:,} parameters), "
                f"{tokens:.3g} tokens, batch {batch}, estimate {estimate:.0f} s, cap {cap:.0f} s")
            result = train(model, train_stream, batch=batch, seq_len=plan.seq_len, tokens=tokens, cap_s=cap,
                           peak_lr=peak_lr(plan, shape), seed=seed, log=log, compile_model=compile_model)
            losses = evaluate.window_losses(model, windows)
            row = {"budget": budget, "N": n, "N_non_embedding": shape.non_embedding_params(plan.vocab),
                   "D": result.tokens, "flops": training_flops(n, result.tokens), "loss": round(float(losses.mean()), 5),
                   "loss_std_err": round(float(losses.std(ddof=1) / len(losses) ** 0.5), 5),
                   "wall_s": round(result.wall_s, 2), "card": card_name(device), "d_model": shape.d_model,
                   "layers": shape.layers, "batch": batch, "steps": result.steps, "peak_lr": peak_lr(plan, shape),
                   "stopped_by": result.stopped_by}
            writer.writerow(row)
            f.flush()
            log(f"  -> loss {row['loss']:.4f} +- {row['loss_std_err']:.4f} ({len(losses)} windows) after "
                f"{result.tokens:,} tokens, {result.steps} steps in {result.wall_s:.1f} s (stopped by {result.stopped_by})")
            results.append((shape.name(), losses))
            if i + 1 == len(runs) or runs[i + 1][0] != budget:
                log_differences(budget, results, log)
                results = []
            del model
