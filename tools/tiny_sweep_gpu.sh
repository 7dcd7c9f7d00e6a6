#!/usr/bin/env bash
# The isoFLOP sweep of issue 9 on its own (tools/train_tiny.py --mode sweep): the corpus of the
# shipped models, their tokenizer, 3 budgets x 6 sizes, ended by the trainer's own clock at 330 s
# on one H100/H200 (the whole job in under 6 minutes). Needs no pagedlm install.
#   bash tools/tiny_sweep_gpu.sh [--with-draft]
# --with-draft first distils a new draft from the shipped target (about 70 s more; the clock
# moves to 400 s). $OUT gets flat files: runs.csv (for docs/tiny-code/, then `pagedlm scaling
# fit`), sweep.log, and with --with-draft draft-{config.json,model.safetensors,training.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
WORK=$(mktemp -d)
modes=(sweep) limit=330
if [ "${1:-}" = "--with-draft" ]; then
  modes=(draft sweep) limit=400
  shift
fi

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# The trainer ends the sweep by itself at $limit s; the timeout only guards against a hang.
status=0
timeout $((limit + 15)) python3 tools/train_tiny.py --mode "${modes[@]}" --time-limit "$limit" \
  --tokenizer python/pagedlm/data/tiny-code/target/tokenizer.json --out "$WORK" --device cuda "$@" || status=$?
# runs.csv is written row by row, so a cut-short job still returns the runs it finished.
cp "$WORK/runs.csv" "$OUT/" 2>/dev/null || true
cp "$WORK/train.log" "$OUT/sweep.log" 2>/dev/null || true
for f in config.json model.safetensors training.json; do
  cp "$WORK/tiny-code/draft/$f" "$OUT/draft-$f" 2>/dev/null || true
done
ls -l "$OUT"
exit "$status"
