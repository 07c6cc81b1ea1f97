#!/usr/bin/env bash
# One device call (from the repo root on the GPU machine; logs to $OUT): the folds' Sinkhorn built
# several ways, each into its own extension dir at once (names and nvcc flags from AB_NAMES and AB_FLAGS,
# comma-separated flags), then for each: the fold's GPU tests, the per-GEMV micro-benchmark and mhc-s
# int4 decode uncompiled; then, with the fastest, the step compiled and the mHC decode test (compiles).
#   AB_NAMES="rows_fast thread_fast" AB_FLAGS=",-DHL_FOLD_THREAD" bash dev/fold_ab.sh
set -uo pipefail
export PYTHONPATH=src
start=$(date +%s)
el() { echo $(( $(date +%s) - start )); }
names=(${AB_NAMES:-rows_fast thread_fast})
IFS=, read -ra flags <<< "${AB_FLAGS:-,-DHL_FOLD_THREAD}"
for i in "${!names[@]}"; do
  TORCH_EXTENSIONS_DIR=/tmp/ext_${names[$i]} HL_CUDA_FLAGS="${flags[$i]:-}" \
    python -c "from hyperloop.quant import gemv; assert gemv.extension() is not None" > "$OUT/build_${names[$i]}.log" 2>&1 &
done
wait; echo "built at $(el)s"
best=0; best_tok=0
for i in "${!names[@]}"; do
  v=${names[$i]}; export TORCH_EXTENSIONS_DIR=/tmp/ext_$v HL_CUDA_FLAGS="${flags[$i]:-}"
  timeout 100 python -m pytest -q -x tests/test_gpu.py -k folded > "$OUT/pytest_$v.log" 2>&1
  echo "$v pytest rc $? $(grep -E 'passed|failed' "$OUT/pytest_$v.log" | tail -1) at $(el)s"
  timeout 60 python dev/fold_micro.py 2>&1 | grep "{" | sed "s/^/$v /" | tee "$OUT/micro_$v.txt"
  COMPILE=0 MODES=int4 OUT=/tmp timeout 90 python dev/mhc_time.py mhc-s 2>&1 | grep tok_s | sed "s/^/$v /" | tee "$OUT/time_$v.txt"
  tok=$(grep -o "'tok_s': [0-9]*" "$OUT/time_$v.txt" | grep -o "[0-9]*$"); tok=${tok:-0}
  if [ "$tok" -gt "$best_tok" ]; then best=$i; best_tok=$tok; fi
done
v=${names[$best]}; export TORCH_EXTENSIONS_DIR=/tmp/ext_$v HL_CUDA_FLAGS="${flags[$best]:-}"
echo "fastest: $v ($best_tok tok/s); compiling at $(el)s"
PYTHONFAULTHANDLER=1 COMPILE=1 MODES=int4 OUT=/tmp timeout -s ABRT $(( 420 - $(el) )) python dev/mhc_time.py mhc-s > "$OUT/compiled_$v.log" 2>&1
echo "compiled rc $? at $(el)s"; grep tok_s "$OUT/compiled_$v.log"
timeout $(( 560 - $(el) )) python -m pytest -q -x tests/test_gpu.py -k "decoding_with_the_site_kernel and mhc" > "$OUT/pytest_decode_$v.log" 2>&1
echo "decode test rc $? $(grep -E 'passed|failed' "$OUT/pytest_decode_$v.log" | tail -1) at $(el)s"
