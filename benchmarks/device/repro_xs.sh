#!/usr/bin/env bash
# The xs reproduction on the lent GPU machine (results/repro-xs/), resumable across calls on a warm
# machine (runs/ persists between calls).
# The enwiki parquet travels in parts (a call carries at most 64 MiB): name .carry/p1 (train shards
# 0-2 + validation) in one call's carry and .carry/p2 (shards 3-6) in the next; each call copies what
# it carried into runs/raw/ and the data is prepared once all TRAIN_SHARDS train shards are there.
# Then `hyperloop reproduce --scale xs` runs under a time budget (SIGTERM makes training checkpoint and
# stop; the next call resumes) with GPUS models at a time, and what exists is packed into $OUT.
# Env: BUDGET (seconds, default 570), GPUS (default: all visible), TRAIN_SHARDS (default 7),
#      TASKS (task folder, default .carry/tasks), NAME (output folder runs/NAME, default repro-xs),
#      REPRO_ARGS (more reproduce flags, e.g. "--ablation init" with NAME=ablation-init-xs), SMOKE=1.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs/raw
START=$(date +%s)
GPUS=${GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
TASKS=${TASKS:-.carry/tasks}
NAME=${NAME:-repro-xs}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
if [ -n "${SMOKE:-}" ] && [ ! -f runs/smoke/report.md ]; then  # every stage on CUDA with tiny models first
  python -m hyperloop reproduce --scale tiny --out runs/smoke --steps 3 --set train.compile=off \
    > "$OUT/smoke.log" 2>&1 || { tail -30 "$OUT/smoke.log"; exit 1; }
  echo "smoke ok after $(( $(date +%s) - START ))s"
fi
for part in .carry/p*/enwiki; do [ -d "$part" ] && cp -n "$part"/*.parquet runs/raw/; done
if [ ! -f runs/enwiki/meta.json ]; then
  have=$(ls runs/raw/train-*.parquet 2>/dev/null | wc -l)
  if [ "$have" -lt "${TRAIN_SHARDS:-7}" ] || [ ! -f runs/raw/validation-00000.parquet ]; then
    echo "have $have of ${TRAIN_SHARDS:-7} train shards (and validation: $(ls runs/raw/validation-* 2>/dev/null | wc -l)); carry the rest"
    exit 0
  fi
  python -m hyperloop prepare --source runs/raw/train-*.parquet --val-source runs/raw/validation-00000.parquet \
    --tokenizer src/hyperloop/corpus/tokenizer.model --out runs/enwiki --workers "$(nproc)" 2>&1 \
    | tr '\r' '\n' | tail -3 > "$OUT/prepare.log"
  echo "prepared after $(( $(date +%s) - START ))s"
fi
TASK_ARGS=(); [ -d "$TASKS" ] && TASK_ARGS=(--tasks-dir "$TASKS")
LEFT=$(( ${BUDGET:-570} - ($(date +%s) - START) ))
timeout -s TERM "$LEFT" python -m hyperloop reproduce --scale xs --data runs/enwiki --out "runs/$NAME" \
  --gpus "$GPUS" "${TASK_ARGS[@]}" ${REPRO_ARGS:-} 2>&1 | tr '\r' '\n' \
  | grep -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' -e 'step/s' > "$OUT/reproduce.log"
echo "reproduce exited after $(( $(date +%s) - START ))s"; tail -5 "$OUT/reproduce.log"
for r in "runs/$NAME"/runs/*; do echo "$r $(cat "$r/latest" 2>/dev/null)"; done
tar czf "$OUT/$NAME.tgz" --exclude='checkpoints' --exclude='quant' --exclude='tensorboard' --exclude='data' \
  -C runs "$NAME" 2>/dev/null; ls -la "$OUT"
