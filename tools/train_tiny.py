#!/usr/bin/env python3
"""Train pagedlm's shipped code models and its scaling-law runs on Python source found on this
machine (see tools/tiny/plan.py for what is trained and how long each run may take).

    python tools/train_tiny.py --out DIR              # corpus, tokenizer, target + draft, isoFLOP sweep
    python tools/train_tiny.py --out DIR --smoke      # the same pipeline in seconds on a CPU
    python tools/train_tiny.py --out DIR --mode sweep --tokenizer python/pagedlm/data/tiny-code/target/tokenizer.json
                                                      # the sweep alone, on the shipped models' tokenizer

On a GPU, tools/tiny_gpu.sh runs --mode final (about 4 minutes) and tools/tiny_sweep_gpu.sh
--mode sweep (330 s); --mode all there needs --time-limit 580 (the sweep's end, from start).

DIR gets tiny-code/{target,draft}/ (Hugging Face folders), tiny-code/heldout.npy (held-out
windows for the tests), tiny-code/manifest.json (sources and licences), runs.csv (the sweep),
files.tsv (every file used), tokenizer.json and train.log.
"""
import argparse
import dataclasses
import hashlib
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tiny.corpus import collect, write_manifest
from tiny.final import train_draft, train_pair
from tiny.plan import SMOKE, Plan
from tiny.sweep import run_sweep
from tiny.tokenizer import EOT, encode_stream, train_tokenizer

class Log:
    def __init__(self, path, start):
        self.file, self.start = open(path, "a", encoding="utf-8"), start

    def __call__(self, message):
        line = f"[{time.monotonic() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def load_tokenizer(path, log):
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.token_to_id(EOT) != 0:
        raise RuntimeError(f"{path}: {EOT} has id {tokenizer.token_to_id(EOT)}, expected 0")
    log(f"tokenizer: {path} ({tokenizer.get_vocab_size()} tokens, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})")
    return tokenizer


def prepare_data(plan, smoke, out, log, tokenizer_path=None):
    """Corpus -> manifest, tokenizer (trained, or loaded from tokenizer_path), and the train and
    held-out token streams (uint16 numpy)."""
    # The smoke corpus is three standard-library packages every CPython has: seconds to read.
    roots = [(Path(sysconfig.get_paths()["stdlib"]) / p, "stdlib") for p in ("asyncio", "email", "json")] if smoke else None
    files, licences = collect(plan.corpus_bytes, plan.held_out_per_mille, roots=roots)
    manifest = write_manifest(files, licences, out)
    log(f"corpus: {manifest['files']:,} files, {manifest['bytes'] / 1e6:.1f} MB, "
        f"{manifest['held_out_files']} held out, from {len(manifest['origins'])} origins")
    train_texts = [f.text for f in files if not f.held_out]
    heldout_texts = [f.text for f in files if f.held_out]
    if not heldout_texts:
        raise RuntimeError("corpus: no file fell in the held-out split; raise held_out_per_mille or the corpus size")
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path, log)
    else:
        sample, size = [], 0
        for text in train_texts:
            if size >= plan.tokenizer_sample_bytes:
                break
            sample.append(text)
            size += len(text)
        tokenizer = train_tokenizer(sample, plan.vocab)
        log(f"tokenizer: byte-level BPE, {tokenizer.get_vocab_size()} tokens, trained on {size / 1e6:.1f} MB")
    tokenizer.save(str(out / "tokenizer.json"))
    train_ids, heldout_ids = encode_stream(tokenizer, train_texts), encode_stream(tokenizer, heldout_texts)
    log(f"tokens: {len(train_ids):,} train, {len(heldout_ids):,} held out "
        f"({manifest['bytes'] / (len(train_ids) + len(heldout_ids)):.2f} bytes per token)")
    return tokenizer, train_ids, heldout_ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--mode", choices=("all", "final", "draft", "sweep"), nargs="+", default=["all"],
                        help="draft: a new draft distilled from --teacher (with --tokenizer, the teacher's)")
    parser.add_argument("--teacher", type=Path, default=Path(__file__).resolve().parents[1] / "python" / "pagedlm"
                        / "data" / "tiny-code" / "target", help="the target a --mode draft run distils from")
    parser.add_argument("--smoke", action="store_true", help="tiny corpus and models: checks the pipeline in seconds")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.json to use instead of training one (the shipped models' keeps a sweep "
                             "comparable to them); its vocabulary sets the models'")
    parser.add_argument("--time-limit", type=float,
                        help="seconds from start by which the sweep must end (default: the plan's, 330)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model (off by default: every new shape compiles anew, "
                             "which costs more than most runs last)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.monotonic()

    plan = SMOKE if args.smoke else Plan()
    deadline = start + (args.time_limit or plan.time_limit_s)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # these models are too small to gain from threads; on a busy CPU they lose 10x
    models_dir = args.out / "tiny-code"
    models_dir.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log", start)
    log(f"train_tiny {'smoke ' if args.smoke else ''}on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, mode {' '.join(args.mode)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer, train_ids, heldout_ids = prepare_data(plan, args.smoke, args.out, log, args.tokenizer)
    plan = dataclasses.replace(plan, vocab=tokenizer.get_vocab_size())
    (args.out / "manifest.json").replace(models_dir / "manifest.json")
    train_stream = torch.from_numpy(train_ids.astype(np.int32)).to(device)
    common = dict(seed=args.seed, compile_model=args.compile, log=log)
    modes = set(args.mode)
    if modes & {"all", "final"}:
        train_pair(plan, tokenizer, train_stream, heldout_ids, models_dir, **common)
    if "draft" in modes:
        train_draft(plan, tokenizer, train_stream, heldout_ids, models_dir, args.teacher, **common)
    if modes & {"all", "sweep"}:
        run_sweep(plan, train_stream, heldout_ids, args.out / "runs.csv", deadline=deadline - plan.reserve_s, **common)
    log(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
