#!/usr/bin/env bash
# The isoFLOP sweep of issue 9 on its own (tools/train_tiny.py --mode sweep): the corpus of the
# shipped models, their tokenizer, 3 budgets x 6 sizes, ended by the trainer's own clock at 330 s
# on one H100/H200 (the whole job in under 6 minutes). Needs no pagedlm install.
# $OUT gets two flat files: runs.csv (for docs/tiny-code/, then `pagedlm scaling fit`) and sweep.log.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
WORK=$(mktemp -d)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# The trainer ends the sweep by itself at 330 s; the timeout only guards against a hang.
status=0
timeout 345 python3 tools/train_tiny.py --mode sweep --tokenizer python/pagedlm/data/tiny-code/target/tokenizer.json \
  --out "$WORK" --device cuda "$@" || status=$?
# runs.csv is written row by row, so a cut-short job still returns the runs it finished.
cp "$WORK/runs.csv" "$OUT/" 2>/dev/null || true
cp "$WORK/train.log" "$OUT/sweep.log" 2>/dev/null || true
ls -l "$OUT"
exit "$status"
