#!/usr/bin/env bash
# Loss A/B of model.hc_bf16_streams on the shared enwiki (results/train-throughput.md): hyperloop-xs
# trained for TOKENS tokens with fp32 streams (seeds 0 and 1: the seed-to-seed spread) and with bf16
# streams (seed 0), same data order. Carry .carry/p1 (enwiki train shards 0-2 + validation, parquet);
# the first call prepares them into runs/enwiki3 (kept on a warm machine).
# Env: TOKENS (default 41943040: 320 steps of the xs batch), RUNS (default "fp32-s0:false:0 bf16-s0:true:0 fp32-s1:false:1").
# Writes $OUT/<run>.jsonl (the metrics) and $OUT/<run>.log (the last lines).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" runs/raw
cp -n .carry/p1/enwiki/*.parquet runs/raw/
if [ ! -f runs/enwiki3/meta.json ]; then
  python -m hyperloop prepare --source runs/raw/train-0000[012].parquet --val-source runs/raw/validation-00000.parquet \
    --tokenizer src/hyperloop/corpus/tokenizer.model --out runs/enwiki3 --workers "$(nproc)" 2>&1 | tr '\r' '\n' | tail -2
fi
for spec in ${RUNS:-fp32-s0:false:0 bf16-s0:true:0 fp32-s1:false:1}; do
  IFS=: read -r name bf16 seed <<< "$spec"
  rm -rf "runs/ab-$name"
  python -m hyperloop train --preset hyperloop-xs --data runs/enwiki3 --out "runs/ab-$name" \
    --set model.hc_bf16_streams="$bf16" train.seed="$seed" train.train_tokens="${TOKENS:-41943040}" \
    train.eval_every=100 train.ckpt_every=100000 2>&1 | tr '\r' '\n' | grep -v -e '^\s*$' | tail -4 > "$OUT/$name.log"
  cp "runs/ab-$name/metrics.jsonl" "$OUT/$name.jsonl"
  grep val_loss "$OUT/$name.jsonl" | tail -1
done
