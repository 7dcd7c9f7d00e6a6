#!/usr/bin/env bash
# The GPU job that makes the shipped pair of issue 9: corpus, tokenizer, target + draft
# (tools/train_tiny.py --mode final), in about 4 minutes on one H100/H200. Needs no pagedlm
# install. The isoFLOP sweep is a job of its own: tools/tiny_sweep_gpu.sh.
# Results go to $OUT as at most 8 flat files (the device tool brings back no more):
#   tiny.tar.part-aa, -ab, ...  a tar of repo paths: python/pagedlm/data/tiny-code/..., docs/tiny-code/...
#                               unpack in the repo root: cat tiny.tar.part-* | tar -x
#   train.log, target.json, draft.json   the same results, readable at once
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
WORK=$(mktemp -d)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# Each model stops at its own wall-clock cap (150 + 55 s); the timeout only guards against a hang.
status=0
timeout 500 python3 tools/train_tiny.py --mode final --out "$WORK" --device cuda "$@" || status=$?

STAGE="$WORK/stage"
DATA="$STAGE/python/pagedlm/data/tiny-code"
DOCS="$STAGE/docs/tiny-code"
mkdir -p "$DATA" "$DOCS"
for part in target draft; do
  if [ -d "$WORK/tiny-code/$part" ]; then
    rm -f "$WORK/tiny-code/$part/generation_config.json"  # defaults only; pagedlm reads config.json
    cp -r "$WORK/tiny-code/$part" "$DATA/"
    cp "$WORK/tiny-code/$part/training.json" "$OUT/$part.json"
  fi
done
cp "$WORK/tiny-code/heldout.npy" "$WORK/tiny-code/manifest.json" "$DATA/" 2>/dev/null || true
[ -f "$WORK/files.tsv" ] && gzip -9 -c "$WORK/files.tsv" > "$DOCS/files.tsv.gz"
cp "$WORK/train.log" "$DOCS/" && cp "$WORK/train.log" "$OUT/"
chmod -R a+rX "$STAGE"
tar -C "$STAGE" -cf - . | split -b 15m - "$OUT/tiny.tar.part-"
ls -l "$OUT"
du -sh "$DATA"
exit "$status"
