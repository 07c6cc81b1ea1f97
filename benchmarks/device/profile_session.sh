#!/usr/bin/env bash
# Profiles for issues 7 and 11 on one lent GPU: compiled batch-1 decode of the S and M Transformers
# in bf16 and int4 (`hyperloop bench decode --profile`), then the training A/B of ab_train.sh.
# Env: DECODE (presets, default "transformer-s transformer-m"), DECODE_LIMIT (seconds per decode
# command, default 150), and ab_train.sh's BEFORE / AFTER / BUDGET / BASE (no AFTER: decode only).
# Writes $OUT/profile.tgz.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; W=$OUT/profile; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$W/gpu.txt"
quiet() { tr '\r' '\n' | grep -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' -e 'row/s\]$' -e 'Warning'; }
for int4 in "" --int4; do
  timeout "${DECODE_LIMIT:-150}" env PYTHONPATH=src python -m hyperloop bench decode --preset ${DECODE:-transformer-s transformer-m} \
    --batch 1 --compile $int4 --profile "$W/decode" --json "$W/decode${int4}.json" 2>&1 | quiet >> "$W/decode.log"
done
if [ -n "${AFTER:-}" ]; then OUT=$W TAG=train bash benchmarks/device/ab_train.sh; fi
tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$W"
