"""`pagedlm scaling ...`: the scaling estimators on the command line, printed as plain tables.

add_parser(subparsers) hangs the `scaling` command on the top-level pagedlm CLI;
main(argv) runs it alone: `python -m pagedlm.scaling.cli optimal --flops 1e22`.
"""
from __future__ import annotations

import argparse
import functools
import sys

from . import budget, laws
from .activations import RECOMPUTE
from .config import ModelConfig
from .design import FAMILIES, design_model
from .dtypes import BYTES_PER_ELEMENT
from .flops import forward_flops, training_flops
from .memory import OPTIMIZERS, inference_memory, kv_cache_bytes, training_memory
from .params import count_params, non_embedding_params
from .presets import PRESETS

LAW_SOURCES = {
    "chinchilla": "Hoffmann et al. 2022, Approach 3",
    "epoch2024": "Besiroglu et al. 2024, replication of Approach 3",
    "kaplan": "Kaplan et al. 2020, Tables 5-6 (N excludes embeddings)",
}


def _table(rows, headers=None, align: str = "") -> str:
    """Columns padded to their widest cell; `align` has one 'l' or 'r' per column
    (default: first column left, the rest right, which suits numbers)."""
    rows = [tuple(map(str, r)) for r in ([headers] if headers else []) + list(rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = align or "l" + "r" * (len(widths) - 1)
    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True))

    lines = [line(r).rstrip() for r in rows]
    if headers:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _reports_errors(command):
    """Bad input is the user's to fix: print it as one line and exit 2, without a traceback."""
    @functools.wraps(command)
    def run(args) -> int:
        from pagedlm._extras import MissingExtraError
        try:
            command(args)
        except (ValueError, FileNotFoundError, MissingExtraError) as err:
            print(f"pagedlm scaling {args.scaling_command}: error: {err}", file=sys.stderr)
            return 2
        return 0
    return run


def _model(args) -> ModelConfig:
    return ModelConfig.from_hf(args.hf) if args.hf else ModelConfig.preset(args.preset)


@_reports_errors
def _params(args):
    cfg = _model(args)
    parts = count_params(cfg, breakdown=True)
    total = parts.pop("total")
    print(f"{cfg.name}  ({cfg.source})")
    print(f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} kv x {cfg.head_dim}, "
          f"d_ff {cfg.d_ff} ({cfg.mlp}), vocab {cfg.vocab_size}, {cfg.norm}, {cfg.position}, "
          f"{'tied' if cfg.tied_embeddings else 'untied'} embeddings\n")
    rows = [(k, f"{v:,}", f"{100 * v / total:.1f}%") for k, v in parts.items() if v]
    rows += [("total", f"{total:,}", _count(total)), ("non-embedding", f"{non_embedding_params(cfg):,}", "")]
    print(_table(rows, ("component", "parameters", "share")))
    s = args.seq_len or cfg.max_seq_len
    print()
    print(_table([
        (f"KV cache per token ({args.kv_dtype})", f"{kv_cache_bytes(cfg, 1, args.kv_dtype):,} bytes"),
        (f"forward FLOPs per token (seq {s})", f"{forward_flops(cfg, s) / s:.4g}"),
        ("training FLOPs per token, 6N", f"{training_flops(cfg, 1, method='6ND'):.4g}"),
        (f"training FLOPs per token, Chinchilla App. F (seq {s})",
         f"{training_flops(cfg, 1, method='detailed', seq_len=s):.4g}"),
    ], align="ll"))


@_reports_errors
def _memory(args):
    cfg = _model(args)
    s = args.seq_len or cfg.max_seq_len
    train = training_memory(cfg, args.batch, s, dtype=args.dtype, optimizer=args.optimizer, recompute=args.recompute,
                            flash_attention=args.flash_attention, zero_stage=args.zero_stage, dp=args.dp, tp=args.tp)
    infer = inference_memory(cfg, args.batch, s, dtype=args.dtype, kv_dtype=args.kv_dtype)
    print(f"{cfg.name}: {count_params(cfg):,} parameters; batch {args.batch} x seq {s}\n")
    print(f"Training, per GPU ({args.dtype}, {args.optimizer}, recompute {args.recompute}, "
          f"flash {'on' if args.flash_attention else 'off'}, ZeRO-{args.zero_stage}, dp {args.dp}, tp {args.tp})")
    print(_table([(k.replace("_", " "), _gib(v)) for k, v in train.as_dict().items()], ("part", "memory")))
    print(f"\nInference ({args.dtype} weights, {args.kv_dtype or args.dtype} KV cache)")
    print(_table([(k.replace("_", " "), _gib(v)) for k, v in infer.as_dict().items()], ("part", "memory")))


@_reports_errors
def _optimal(args):
    law = laws.law_by_name(args.law)
    n, d, loss = (float(x) for x in law.optimal(args.flops))
    rows = [("compute C", f"{args.flops:.4g} FLOPs"), ("N_opt", f"{n:.4g} ({_count(n)})"),
            ("D_opt", f"{d:.4g} tokens ({_count(d)})"), ("tokens per parameter", f"{d / n:.1f}"),
            ("expected loss", f"{loss:.4f} nats/token")]
    if isinstance(law, laws.ChinchillaLaw):
        n_num, _, _ = law.optimal_numeric(args.flops)
        rows.insert(2, ("N_opt, numeric minimiser", f"{n_num:.4g}"))
        print(f"Law {law.name}: L = {law.E} + {law.A}/N^{law.alpha} + {law.B}/D^{law.beta}  ({LAW_SOURCES[args.law]})")
    else:
        print(f"Law kaplan ({LAW_SOURCES['kaplan']}); its frontier does not satisfy C = 6ND")
    print(_table(rows, align="ll"))


@_reports_errors
def _design(args):
    gpu = budget.get_gpu(args.gpu)
    if args.budget_dollars is not None:
        flops = budget.flops_from_budget(args.budget_dollars, gpu, price_per_hour=args.price_per_hour, mfu=args.mfu)
        price = args.price_per_hour or gpu.price_per_hour
        print(f"${args.budget_dollars:,.0f} at ${price:.2f}/GPU-hour on {gpu.name} "
              f"({gpu.peak_flops / 1e12:.0f} TFLOP/s dense bf16, {args.mfu:.0%} MFU) buys {flops:.3g} FLOPs\n")
    else:
        flops = args.flops
    m = design_model(flops, law=args.law, family=args.family, gpu=gpu, mfu=args.mfu, n_gpus=args.n_gpus,
                     vocab_size=args.vocab_size, seq_len=args.seq_len, price_per_hour=args.price_per_hour)
    c = m.config
    print(_table([
        ("n_layers", c.n_layers), ("d_model", c.d_model), ("n_heads / n_kv_heads", f"{c.n_heads} / {c.n_kv_heads}"),
        ("head_dim", c.head_dim), ("d_ff", c.d_ff), ("vocab_size", c.vocab_size), ("max_seq_len", c.max_seq_len),
        ("parameters", f"{m.params:,} ({_count(m.params)})"), ("N_opt", f"{m.n_opt:.4g}"),
        ("tokens", f"{m.tokens:.4g} ({_count(m.tokens)})"), ("expected loss", f"{m.loss:.4f} nats/token"),
        ("GPU-hours", f"{m.gpu_hours:,.0f} {m.gpu}"), ("cost", f"${m.cost_dollars:,.0f}"),
        ("training time", f"{m.train_days:.1f} days on {m.n_gpus} x {m.gpu}"),
    ], ("design", ""), align="ll"))
    print("\nWhy:\n" + "\n".join(f"  - {line}" for line in m.explanation.splitlines()))


@_reports_errors
def _plot(args):
    from .plot import plot_isoflops
    law = plot_isoflops(args.out, law=laws.law_by_name(args.law), runs=args.runs)
    print(f"wrote {args.out} ({law.name}: E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} "
          f"alpha={law.alpha:.4g} beta={law.beta:.4g})")


@_reports_errors
def _fit(args):
    import json

    import numpy as np

    from .fit import fit_chinchilla
    from .plot import read_runs
    runs = read_runs(args.runs)
    law = fit_chinchilla(runs["N"], runs["D"], runs["loss"], n_starts=args.starts, progress=True)
    budgets = np.unique(runs.get("budget", runs["flops"]))
    print(f"Fitted to the {runs['N'].size} runs of {args.runs} "
          f"({'the paper grid' if args.starts is None else f'{args.starts} starts'}): "
          f"L = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.4g} + {law.B:.4g}/D^{law.beta:.4g}\n")
    rows = []
    for candidate in (law, laws.CHINCHILLA, laws.EPOCH_2024):
        n, d, _ = candidate.optimal(budgets)
        rows.append((candidate.name, f"{candidate.E:.3f}", f"{candidate.alpha:.3f}", f"{candidate.beta:.3f}",
                     f"{candidate.beta / (candidate.alpha + candidate.beta):.3f}", *(f"{x:.1f}" for x in d / n)))
    print(_table(rows, ("law", "E", "alpha", "beta", "N_opt ~ C^a", *(f"D/N at {c:.2g}" for c in budgets))))
    if args.json:
        record = {k: getattr(law, k) for k in ("E", "A", "B", "alpha", "beta")}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**record, "runs": str(args.runs), "n_starts": args.starts}, f, indent=1)
            f.write("\n")
        print(f"\nwrote {args.json}")


@_reports_errors
def _presets(args):
    rows = [(name, f"{count_params(ModelConfig.preset(name)):,}", source) for name, (_, source) in PRESETS.items()]
    print(_table(rows, ("preset", "parameters", "source"), align="lrl"))


def _add_model_args(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="CONFIG_JSON", help="Hugging Face config.json (or its folder)")
    source.add_argument("--preset", metavar="NAME", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the model's max_seq_len)")


def _populate(parser: argparse.ArgumentParser) -> None:
    from pagedlm.cli import HelpFormatter

    parser.set_defaults(func=lambda args: parser.print_help() or 0)
    sub = parser.add_subparsers(dest="scaling_command", metavar="COMMAND")

    p = sub.add_parser("params", help="parameter count, KV cache and FLOPs per token of a model")
    _add_model_args(p)
    p.add_argument("--kv-dtype", default="fp16", choices=list(BYTES_PER_ELEMENT), help="KV-cache element type")
    p.set_defaults(func=_params)

    p = sub.add_parser("memory", help="training and inference memory of a model")
    _add_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="micro-batch (sequences) per GPU")
    p.add_argument("--dtype", default="bf16", choices=list(BYTES_PER_ELEMENT), help="weights and activations")
    p.add_argument("--kv-dtype", choices=list(BYTES_PER_ELEMENT), help="inference KV cache (default: --dtype)")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS, help="optimizer whose states are counted")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE, help="activation recomputation")
    p.add_argument("--flash-attention", action="store_true", help="attention without the score matrix in memory")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks (ZeRO partitions over them)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.set_defaults(func=_memory)

    p = sub.add_parser("optimal", help="compute-optimal N, D and loss for a FLOP budget")
    p.add_argument("--flops", type=float, required=True, help="training compute budget in FLOPs")
    p.add_argument("--law", default="chinchilla", choices=list(laws.LAWS), help="scaling law")
    p.set_defaults(func=_optimal)

    p = sub.add_parser("design", help="a concrete model for a dollar or FLOP budget")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--budget-dollars", type=float, help="training budget in dollars")
    amount.add_argument("--flops", type=float, help="training budget in FLOPs")
    p.add_argument("--gpu", default="H100", help=f"one of: {', '.join(budget.GPUS)}")
    p.add_argument("--price-per-hour", type=float, help="dollars per GPU-hour (default: the GPU table's)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    p.add_argument("--n-gpus", type=int, help="GPUs to train on (default: chosen)")
    p.add_argument("--law", default="chinchilla", choices=["chinchilla", "epoch2024"], help="scaling law")
    p.add_argument("--family", default="llama", choices=list(FAMILIES), help="architecture family")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length")
    p.set_defaults(func=_design)

    p = sub.add_parser("plot", help="isoFLOP curves and the compute-optimal frontier (PNG, PDF, SVG)")
    p.add_argument("--out", required=True, help="image file to write (format from its extension)")
    p.add_argument("--law", default="chinchilla", choices=["chinchilla", "epoch2024"],
                   help="law drawn when no --runs are given")
    p.add_argument("--runs", metavar="CSV", help="measured runs (columns N,D,flops,loss): plot them and their fit")
    p.set_defaults(func=_plot)

    p = sub.add_parser("fit", help="fit a Chinchilla law to measured runs; compare it with the published ones")
    p.add_argument("--runs", metavar="CSV", required=True, help="columns N,D,flops,loss (and budget)")
    p.add_argument("--starts", type=int, help="keep this many L-BFGS starts (default: all 4,500 of the paper)")
    p.add_argument("--json", metavar="FILE", help="also write the fitted constants here")
    p.set_defaults(func=_fit)

    p = sub.add_parser("presets", help="list the preset models and their sources")
    p.set_defaults(func=_presets)

    parser.formatter_class = HelpFormatter  # every command shows its options' defaults
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `scaling` command to a top-level argparse subparsers object; each leaf sets func(args) -> int."""
    parser = subparsers.add_parser("scaling", help="scaling laws, parameter/FLOP/memory estimates, model design",
                                   description="Scaling laws, parameter/FLOP/memory estimates, model design.")
    _populate(parser)
    return parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pagedlm scaling",
                                     description="Scaling laws, parameter/FLOP/memory estimates, model design.")
    _populate(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
