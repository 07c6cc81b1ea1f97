#!/usr/bin/env bash
# One device call that checks the fold end to end (run from the repo root on the GPU machine):
#   GPU tests of the fold and the site kernel, the per-GEMV micro-benchmark, mhc-s int4 decode
#   uncompiled (graphed) with the fold, then compiled (bounded: torch.compile of the folded step
#   did not finish at 1e89f75). Logs go to $OUT.
set -uo pipefail
export PYTHONPATH=src
start=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - start) )); }
timeout 150 python -m pytest -q -x tests/test_gpu.py -k "folded or site" > "$OUT/pytest.log" 2>&1; echo "pytest rc $?"
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
timeout 60 python dev/fold_micro.py 2>&1 | grep "{" | tee "$OUT/micro.txt"
COMPILE=0 MODES=int4 timeout 120 python dev/mhc_time.py mhc-s hyperloop-s 2>&1 | grep tok_s | tee "$OUT/uncompiled.txt"
# like-for-like baseline: main's src (carried as .carry/main/src), uncompiled, its own extension build dir
TORCH_EXTENSIONS_DIR=/tmp/ext_main PYTHONPATH=.carry/main/src COMPILE=0 MODES=bf16,int4 OUT=/tmp timeout 150 python dev/mhc_time.py mhc-s 2>&1 | grep tok_s | sed 's/^/main /' | tee "$OUT/main_uncompiled.txt"
PYTHONFAULTHANDLER=1 COMPILE=1 MODES=int4 timeout -s ABRT "$(left 560)" python dev/mhc_time.py mhc-s > "$OUT/compiled.log" 2>&1
echo "compiled rc $?"; grep tok_s "$OUT/compiled.log"
