#!/usr/bin/env bash
# A session on a lent 2-GPU machine (nvidia-h100-x2), in calls of under 10 minutes made back to back
# on the warm machine (runs/ persists between calls; a machine given back loses it):
#   PHASE=1  carry .carry/p1 (enwiki train shards 0-2 + validation parquet; with the working tree
#            that is about all 64 MiB allow): park it in runs/raw. GPU 0: the compiled decode step
#            against HF's compiled static cache, then the CUDA tests; GPU 1: compiled int4 decode
#   PHASE=2  carry .carry/p2 (shards 3-6) and .carry/tasks: repro_xs.sh prepares all 7 shards and
#            trains the four xs models of seed $SEED two at a time (mHC, the slowest, first)
#   PHASE=3  no carry, repeat until done: repro_xs.sh resumes the trainings, then evaluates,
#            quantizes and analyses on GPU 0. Once the trainings are done, GPU 1 measures the loop /
#            early-exit trade-off of the new Hyperloop, then times the training step of transformer-s,
#            HF Llama and hyperloop-s
# The device tool returns at most 8 files from $OUT, so each part is tarred.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEED=${SEED:-1}
NAME=repro-xs-seed$SEED
pack() { tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"; }
case "${PHASE:?set PHASE=1, 2 or 3}" in
1)
  mkdir -p runs/raw && cp -n .carry/p1/enwiki/*.parquet runs/raw/
  (export CUDA_VISIBLE_DEVICES=0
   OUT=$OUT/decode PARTS=speed LIMIT=200 SPEED_ARGS="--presets transformer-s hyperloop-s hf-llama-s:static --no-fewer-loops" \
     bash benchmarks/device/decode_int4.sh > "$OUT/decode.log" 2>&1
   PYTHONPATH=src timeout 150 python -m pytest -q tests/test_gpu.py tests/test_infer.py -k "cuda or compiled or graphed" \
     2>&1 | tail -15 > "$OUT/decode/test_gpu.txt"
   pack decode) &
  (CUDA_VISIBLE_DEVICES=1 OUT=$OUT/int4 PARTS=int4 LIMIT=280 INT4_ARGS="--presets transformer-s transformer-m" \
     bash benchmarks/device/decode_int4.sh > "$OUT/int4.log" 2>&1; pack int4) &
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
      # the loop / early-exit trade-off of the trained seed's Hyperloop (early exit as CUDA graphs)
      mkdir -p "$OUT/tradeoff"
      CUDA_VISIBLE_DEVICES=1 PYTHONPATH=src timeout $(( END - $(date +%s) - 20 )) python benchmarks/decode.py \
        --sections tradeoff --ckpt "runs/$NAME/runs/hyperloop$([ "$SEED" = 0 ] || echo "-seed$SEED")" --data runs/enwiki --out "$OUT/tradeoff" \
        > "$OUT/tradeoff/tradeoff.log" 2>&1
      pack tradeoff
      left=$(( END - $(date +%s) - 20 ))
      [ "$left" -gt 100 ] || exit 0
      mkdir -p "$OUT/train"
      CUDA_VISIBLE_DEVICES=1 PYTHONPATH=src timeout "$left" python -m hyperloop bench train --preset transformer-s \
        hf-llama-s hyperloop-s --micro-batch 16 --seq-len 2048 --steps 10 --json "$OUT/train/train-throughput.json" \
        > "$OUT/train/bench.log" 2>&1
      pack train
    ) &
  fi
  NAME=$NAME TASKS=runs/tasks GPUS=2 BUDGET=$BUDGET REPRO_ARGS="--seeds $SEED" \
    bash benchmarks/device/repro_xs.sh
  wait
  ;;
esac
ls -la "$OUT"
