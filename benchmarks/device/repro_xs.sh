#!/usr/bin/env bash
# The xs reproduction on one lent GPU (results/repro-xs/), resumable across calls on a warm machine.
# Carried: .carry/xs/enwiki (2 enwiki train shards + validation parquet), .carry/xs/tasks (task files).
# Each call: prepare once, then `hyperloop reproduce --scale xs` under a time budget (SIGTERM makes
# training checkpoint and stop; the next call resumes), then pack what exists into $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
if [ -n "${SMOKE:-}" ] && [ ! -f runs/smoke/report.md ]; then  # every stage on CUDA with tiny models first
  python -m hyperloop reproduce --scale tiny --out runs/smoke --steps 3 --tasks-dir .carry/xs/tasks \
    --set train.compile=off > "$OUT/smoke.log" 2>&1 || { tail -30 "$OUT/smoke.log"; exit 1; }
  echo "smoke ok after $(( $(date +%s) - START ))s"
fi
if [ ! -f runs/enwiki/meta.json ]; then
  python -m hyperloop prepare --source .carry/xs/enwiki/train-0000*.parquet \
    --val-source .carry/xs/enwiki/validation-00000.parquet --tokenizer src/hyperloop/corpus/tokenizer.model \
    --out runs/enwiki --workers 16 2>&1 | tr '\r' '\n' | tail -3 > "$OUT/prepare.log"
  echo "prepared after $(( $(date +%s) - START ))s"
fi
LEFT=$(( ${BUDGET:-570} - ($(date +%s) - START) ))
timeout -s TERM "$LEFT" python -m hyperloop reproduce --scale xs --data runs/enwiki --out runs/repro-xs \
  --tasks-dir .carry/xs/tasks ${REPRO_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v -e '^\s*$' -e 'it/s\]$' -e 'step/s' \
  > "$OUT/reproduce.log"
echo "reproduce exited $? after $(( $(date +%s) - START ))s"; tail -5 "$OUT/reproduce.log"
tar czf "$OUT/repro-xs.tgz" --exclude='checkpoints' --exclude='quant' --exclude='tensorboard' --exclude='data' \
  -C runs repro-xs 2>/dev/null; ls -la "$OUT"
