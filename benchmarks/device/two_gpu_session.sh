#!/usr/bin/env bash
# A session on a lent 2-GPU machine (nvidia-h100-x2), in calls of under 10 minutes made back to back
# on the warm machine (runs/ persists between calls; a machine given back loses it):
#   PHASE=1  carry .carry/p1 (enwiki train shards 0-2 + validation parquet; with the working tree
#            that is about all 64 MiB allow): park it in runs/raw. GPU 0: decode speed against HF;
#            GPU 1: int4 decode speed and the GPTQ wall time (decode_int4.sh, parts speed / int4)
#   PHASE=2  carry .carry/p2 (shards 3-6): repro_xs.sh prepares all 7 shards and trains the init
#            ablation's Hyperloop variants two at a time. Its `looped` and `hyperloop` rows are the
#            finished runs of the main xs comparison (results/repro-xs: same data order, seed, schedule
#            and maths), seeded into the output folder so that they are not trained again
#   PHASE=3  no carry: repro_xs.sh again (trainings resume; then perplexities and the tables), then on
#            the trained models: GPU 0 the loop / early-exit trade-off and the INT4 perplexity
#            columns; GPU 1 the training-throughput anchor (our transformer-s against HF Llama)
# The device tool returns at most 8 files from $OUT, so each part is tarred.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NAME=ablation-init-xs
pack() { tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"; }
case "${PHASE:?set PHASE=1, 2 or 3}" in
1)
  mkdir -p runs/raw && cp -n .carry/p1/enwiki/*.parquet runs/raw/
  (CUDA_VISIBLE_DEVICES=0 OUT=$OUT/decode PARTS=speed bash benchmarks/device/decode_int4.sh > "$OUT/decode.log" 2>&1
   pack decode) &
  (CUDA_VISIBLE_DEVICES=1 OUT=$OUT/int4 PARTS=int4 bash benchmarks/device/decode_int4.sh > "$OUT/int4.log" 2>&1
   pack int4) &
  wait
  ;;
2)
  for arch in looped hyperloop; do
    run=runs/$NAME/runs/$arch; mkdir -p "$run" "runs/$NAME/eval"
    cp -n results/repro-xs/runs/$arch/{config.json,metrics.jsonl} "$run/"
    echo step-1600 > "$run/latest"  # the checkpoint itself stayed on that session's machine
    cp -n results/repro-xs/eval/$arch.json "runs/$NAME/eval/"
  done
  NAME=$NAME GPUS=2 BUDGET=${BUDGET:-570} REPRO_ARGS="--ablation init" bash benchmarks/device/repro_xs.sh
  ;;
3)
  NAME=$NAME GPUS=2 BUDGET=${BUDGET:-330} REPRO_ARGS="--ablation init" bash benchmarks/device/repro_xs.sh
  trained="runs/$NAME/runs/hyperloop-seed1 runs/$NAME/runs/init-0.1"
  (CUDA_VISIBLE_DEVICES=0 OUT=$OUT/trained PARTS=trained TRAINED=$trained DATA=runs/enwiki \
     bash benchmarks/device/decode_int4.sh > "$OUT/trained.log" 2>&1; pack trained) &
  (CUDA_VISIBLE_DEVICES=1 OUT=$OUT/throughput PRESETS="transformer-s hf-llama-s" XS_PRESETS="" timeout 200 \
     bash benchmarks/device/throughput.sh > "$OUT/throughput.log" 2>&1; pack throughput) &
  wait
  ;;
esac
ls -la "$OUT"
