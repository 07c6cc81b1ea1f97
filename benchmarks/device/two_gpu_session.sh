#!/usr/bin/env bash
# A session on a lent 2-GPU machine (nvidia-h100-x2), in calls of under 10 minutes made back to back
# on the warm machine (runs/ persists between calls; a machine given back loses it):
#   PHASE=1  carry .carry/p1 (enwiki train shards 0-2 + validation parquet; with the working tree
#            that is about all 64 MiB allow): park it in runs/raw. GPU 0: throughput.sh (CUDA tests,
#            the S training table with the HF anchor, a profile); GPU 1: decode_int4.sh (decode vs
#            HF, int4 decode, GPTQ wall time)
#   PHASE=2  carry .carry/p2 (shards 3-6) and .carry/tasks: repro_xs.sh prepares all 7 shards and
#            trains the four xs models two at a time
#   PHASE=3  no carry: repro_xs.sh again (trainings resume; then eval, INT4, analyses, report)
# The device tool returns at most 8 files from $OUT, so each part is tarred.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
pack() { tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"; }
case "${PHASE:?set PHASE=1, 2 or 3}" in
1)
  mkdir -p runs/raw && cp -n .carry/p1/enwiki/*.parquet runs/raw/
  (CUDA_VISIBLE_DEVICES=0 OUT=$OUT/throughput XS_PRESETS="" timeout 540 bash benchmarks/device/throughput.sh \
    > "$OUT/throughput.log" 2>&1; pack throughput) &
  (CUDA_VISIBLE_DEVICES=1 OUT=$OUT/decode timeout 540 bash benchmarks/device/decode_int4.sh \
    > "$OUT/decode.log" 2>&1; pack decode) &
  wait
  tail -3 "$OUT/throughput.log" "$OUT/decode.log"
  ;;
2|3)
  [ -d .carry/tasks ] && rm -rf runs/tasks && cp -r .carry/tasks runs/tasks
  TASKS=runs/tasks GPUS=2 BUDGET=${BUDGET:-570} bash benchmarks/device/repro_xs.sh
  ;;
esac
ls -la "$OUT"
