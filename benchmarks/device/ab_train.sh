#!/usr/bin/env bash
# Training throughput of this working tree against a baseline source tree, one after the other on
# the same GPU (results/train-throughput.*: the before/after columns), with a profile of the "after".
# Make the baseline first: git archive <commit> src | tar -x -C .carry/base   (and carry .carry/base)
# Env: BASE (default .carry/base/src), BEFORE / AFTER (presets), MICRO (default 16), STEPS (10),
#      TAG (output subfolder), BUDGET (seconds for both; default 420). Writes $OUT/$TAG.tgz (the
#      device tool returns at most 8 files per call; the profile alone has more).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}/${TAG:-ab}; mkdir -p "$OUT"
END=$(( $(date +%s) + ${BUDGET:-420} ))
bench() {  # PYTHONPATH, label, presets, extra flags...
  timeout $(( END - $(date +%s) )) env PYTHONPATH="$1" python -m hyperloop bench train --preset $3 \
    --micro-batch "${MICRO:-16}" --seq-len 2048 --steps "${STEPS:-10}" --json "$OUT/$2.json" "${@:4}" 2>&1 \
    | grep -v Warning | sed "s/^/[$2] /" >> "$OUT/bench.log"
}
bench "${BASE:-.carry/base/src}" before "$BEFORE"
bench src after "$AFTER" --profile "$OUT/profile"
cat "$OUT/bench.log"
tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && rm -rf "$OUT"
