"""The shipped pair: a ~9M-parameter target, then a draft 4x smaller distilled from it, both
stored in bf16 and evaluated as stored, with the draft's greedy agreement with the target."""
import numpy as np
import torch
from transformers import LlamaForCausalLM

from . import evaluate
from .export import card_name, save_folder
from .models import llama_config, training_flops
from .plan import peak_lr
from .train import train


def _record(role, plan, shape, result, windows, model, extra):
    losses = evaluate.window_losses(model, windows)
    n = shape.params(plan.vocab)
    device = next(model.parameters()).device
    return {
        "role": role, "params": n, "non_embedding_params": shape.non_embedding_params(plan.vocab),
        "d_model": shape.d_model, "layers": shape.layers, "heads": shape.heads, "d_ff": shape.d_ff,
        "tokens": result.tokens, "flops_6nd": training_flops(n, result.tokens), "steps": result.steps,
        "stopped_by": result.stopped_by, "wall_s": round(result.wall_s, 2),
        "train_objective": result.train_loss,  # the draft's mixes cross-entropy and KL to the target
        "heldout_loss": float(losses.mean()), "heldout_loss_std_err": float(losses.std(ddof=1) / np.sqrt(len(losses))),
        "heldout_windows": len(losses), "seq_len": plan.seq_len, "batch": plan.final_batch, "peak_lr": peak_lr(plan, shape),
        "precision": ("fp32 master weights under bf16 autocast" if device.type == "cuda" else "fp32")
                     + "; shipped and evaluated in bf16",
        "card": card_name(device), "torch": torch.__version__, **extra,
    }


@torch.no_grad()
def _greedy_sample(model, tokenizer, prompt="def fibonacci(n):", max_new_tokens=48):
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:]
    return {"prompt": prompt, "greedy_completion": tokenizer.decode(out.tolist())}


def train_pair(plan, tokenizer, train_stream, heldout, out_dir, *, seed, compile_model, log):
    """Train, evaluate and save target and draft under out_dir; returns their records."""
    windows = evaluate.eval_windows(heldout, plan.final_eval_windows, plan.seq_len)
    shipped = evaluate.eval_windows(heldout, plan.shipped_windows, plan.seq_len)
    np.save(out_dir / "heldout.npy", shipped.astype(np.uint16))
    common = dict(windows=windows, shipped=shipped, seed=seed, compile_model=compile_model, log=log)
    target, target_record = _train_role("target", plan, tokenizer, train_stream, out_dir, teacher=None, **common)
    _, draft_record = _train_role("draft", plan, tokenizer, train_stream, out_dir, teacher=target, **common)
    return {"target": target_record, "draft": draft_record}


def train_draft(plan, tokenizer, train_stream, heldout, out_dir, teacher_dir, *, seed, compile_model, log):
    """A new draft distilled from an existing target (the shipped one): out_dir/draft."""
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16).to(train_stream.device).eval()
    log(f"teacher: {teacher_dir}")
    windows = evaluate.eval_windows(heldout, plan.final_eval_windows, plan.seq_len)
    shipped = evaluate.eval_windows(heldout, plan.shipped_windows, plan.seq_len)
    _, record = _train_role("draft", plan, tokenizer, train_stream, out_dir, teacher=teacher, windows=windows,
                            shipped=shipped, seed=seed, compile_model=compile_model, log=log)
    return record


def _train_role(role, plan, tokenizer, train_stream, out_dir, *, teacher, windows, shipped, seed, compile_model, log):
    shape, cap = (plan.target, plan.target_cap_s) if role == "target" else (plan.draft, plan.draft_cap_s)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, plan.vocab, plan.seq_len)).to(train_stream.device)
    log(f"{role}: {shape.name()}, {shape.params(plan.vocab):,} parameters, up to {plan.final_tokens:.3g} tokens "
        f"or {cap:.0f} s" + (f", distilled from the target (weight {plan.distill_weight})" if teacher else ""))
    result = train(model, train_stream, batch=plan.final_batch, seq_len=plan.seq_len, tokens=plan.final_tokens,
                   cap_s=cap, peak_lr=peak_lr(plan, shape), seed=seed, teacher=teacher,
                   distill_weight=plan.distill_weight if teacher else 0.0, log=log, compile_model=compile_model)
    model = model.to(torch.bfloat16)
    extra = {"distill_weight": plan.distill_weight} if teacher else {}
    if teacher is not None:
        extra["greedy_agreement_with_target"] = evaluate.greedy_agreement(model, teacher, windows)
        extra["shipped_sample_agreement"] = evaluate.greedy_agreement(model, teacher, shipped)
    extra["shipped_sample_loss"] = float(evaluate.window_losses(model, shipped).mean())
    extra["sample"] = _greedy_sample(model, tokenizer)
    record = _record(role, plan, shape, result, windows, model, extra)
    save_folder(model, tokenizer if role == "target" else None, out_dir / role, record)  # the draft shares it
    log(f"{role}: {result.tokens:,} tokens in {result.wall_s:.0f} s (stopped by {result.stopped_by}), "
        f"held-out loss {record['heldout_loss']:.4f}"
        + (f", greedy agreement with the target {extra['greedy_agreement_with_target']:.3f}" if teacher else ""))
    return model, record
