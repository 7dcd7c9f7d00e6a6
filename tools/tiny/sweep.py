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


def run_sweep(plan, train_stream, heldout, csv_path, *, deadline, seed, compile_model, log):
    runs = sweep_runs(plan)
    windows = evaluate.eval_windows(heldout, plan.eval_windows, plan.seq_len)
    device = train_stream.device
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
                f"{tokens:.3g} tokens, batch {batch}, cap {cap:.0f} s")
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
            log(f"  -> loss {row['loss']:.4f} after {result.tokens:,} tokens in {result.wall_s:.1f} s "
                f"(stopped by {result.stopped_by})")
            del model
