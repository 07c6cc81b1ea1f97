#!/usr/bin/env bash
# One device call: the folds' Sinkhorn three ways (rows + rcp.approx, warp + rcp.approx, warp + IEEE
# divisions = 5aea552), each built into its own extension dir at once, then for each: the fold's GPU
# tests, the per-GEMV micro-benchmark and mhc-s int4 decode uncompiled; bf16 compiled last if time is left.
set -uo pipefail
export PYTHONPATH=src
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
names=(${AB_NAMES:-rows_fast warp_fast warp_ieee})
flags=("" "-DHL_FOLD_WARP" "-DHL_FOLD_WARP -DHL_FOLD_IEEE")
[ -n "${AB_FLAGS:-}" ] && IFS=, read -ra flags <<< "$AB_FLAGS"
for i in "${!names[@]}"; do
  TORCH_EXTENSIONS_DIR=/tmp/ext_${names[$i]} HL_CUDA_FLAGS="${flags[$i]}" \
    python -c "from hyperloop.quant import gemv; assert gemv.extension() is not None" > "$OUT/build_${names[$i]}.log" 2>&1 &
done
wait; echo "built at $(el)s"
for i in "${!names[@]}"; do
  v=${names[$i]}; export TORCH_EXTENSIONS_DIR=/tmp/ext_$v HL_CUDA_FLAGS="${flags[$i]}"
  timeout ${AB_TEST_S:-100} python -m pytest -q -x tests/test_gpu.py -k "${AB_TESTS:-folded or (decoding_with_the_site_kernel and mhc)}" > "$OUT/pytest_$v.log" 2>&1
  echo "$v pytest rc $? $(grep -E 'passed|failed' "$OUT/pytest_$v.log" | tail -1) at $(el)s"
  timeout 60 python dev/fold_micro.py 2>&1 | grep "{" | sed "s/^/$v /" | tee "$OUT/micro_$v.txt"
  COMPILE=0 MODES=int4 OUT=/tmp timeout 90 python dev/mhc_time.py mhc-s 2>&1 | grep tok_s | sed "s/^/$v /" | tee "$OUT/time_$v.txt"
done
echo "at $(el)s"
[ -n "${AB_SKIP_BF16:-}" ] || COMPILE=1 MODES=bf16 OUT=/tmp timeout $(( 400 - $(el) )) python dev/mhc_time.py mhc-s 2>&1 | grep tok_s | sed "s/^/bf16 compiled /"
