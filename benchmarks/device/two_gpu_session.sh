#!/usr/bin/env bash
# A session on a lent 2-GPU machine (nvidia-h100-x2), in calls of under 10 minutes made back to back
# on the warm machine (runs/ persists between calls; a machine given back loses it):
#   PHASE=1  carry .carry/p1 (enwiki train shards 0-2 + validation parquet; with the working tree
#            that is about all 64 MiB allow): park it in runs/raw; GPU 0 runs the CUDA tests, GPU 1
#            times the training step of transformer-s, HF Llama and hyperloop-s
#   PHASE=2  carry .carry/p2 (shards 3-6) and .carry/tasks: repro_xs.sh prepares all 7 shards and
#            trains the four xs models of seed $SEED two at a time (mHC, the slowest, first)
#   PHASE=3  no carry, repeat until done: repro_xs.sh resumes the trainings, then evaluates,
#            quantizes and analyses on GPU 0. Once the trainings are done, GPU 1 measures the
#            compiled decode step against HF and int4 against bf16 (decode_int4.sh)
# The device tool returns at most 8 files from $OUT, so each part is tarred.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEED=${SEED:-1}
NAME=repro-xs-seed$SEED
pack() { tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"; }
case "${PHASE:?set PHASE=1, 2 or 3}" in
1)
  mkdir -p runs/raw && cp -n .carry/p1/enwiki/*.parquet runs/raw/
  (CUDA_VISIBLE_DEVICES=0 PYTHONPATH=src timeout 200 python -m pytest -q tests/test_gpu.py tests/test_infer.py \
     -k "cuda or compiled or graphed" 2>&1 | tail -15 > "$OUT/test_gpu.txt") &
  (CUDA_VISIBLE_DEVICES=1 PYTHONPATH=src timeout 200 python -m hyperloop bench train --preset transformer-s \
     hf-llama-s hyperloop-s --micro-batch 16 --seq-len 2048 --steps 10 --json "$OUT/train-throughput.json" \
     > "$OUT/train-bench.log" 2>&1) &
  wait
  ;;
2|3)
  [ -d .carry/tasks ] && rm -rf runs/tasks && cp -r .carry/tasks runs/tasks
  BUDGET=${BUDGET:-560}; END=$(( $(date +%s) + BUDGET ))
  if [ "$PHASE" = 3 ] && [ ! -f runs/bench.started ]; then
    (  # GPU 1 is free once every training is done (the post-training stages run on GPU 0)
      until [ -n "$(ls runs/$NAME/eval/*.json 2>/dev/null)" ]; do
        sleep 5; [ "$(date +%s)" -lt "$END" ] || exit 0
      done
      touch runs/bench.started
      for part in speed int4; do
        left=$(( END - $(date +%s) - 20 ))
        [ "$left" -gt 120 ] || break
        CUDA_VISIBLE_DEVICES=1 OUT=$OUT/bench PARTS=$part LIMIT=$left bash benchmarks/device/decode_int4.sh \
          >> "$OUT/bench.log" 2>&1
      done
      pack bench
    ) &
  fi
  NAME=$NAME TASKS=runs/tasks GPUS=2 BUDGET=$BUDGET REPRO_ARGS="--set train.seed=$SEED" \
    bash benchmarks/device/repro_xs.sh
  wait
  ;;
esac
ls -la "$OUT"
