#!/usr/bin/env bash
# One device call that checks the fold end to end (run from the repo root on the GPU machine):
#   GPU tests of the fold and the site kernel, the per-GEMV micro-benchmark, mhc-s int4 decode
#   uncompiled (graphed) with the fold, then compiled (bounded: torch.compile of the folded step
#   did not finish at 1e89f75). Logs go to $OUT.
set -uo pipefail
export PYTHONPATH=src
start=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - start) )); }
# build the extension first, untimed: a build killed by a timeout leaves a lock every later load waits on
python -c "from hyperloop.quant import gemv; assert gemv.extension() is not None" > "$OUT/build.log" 2>&1; echo "build rc $? at $(left 0)s"
timeout 200 python -m pytest -q -x -rA tests/test_gpu.py -k "folded or site" > "$OUT/pytest.log" 2>&1; echo "pytest rc $?"
grep -E "passed|failed" "$OUT/pytest.log" | tail -1
timeout 60 python dev/fold_micro.py 2>&1 | grep "{" | tee "$OUT/micro.txt"
COMPILE=0 MODES=int4 timeout 120 python dev/mhc_time.py mhc-s hyperloop-s 2>&1 | grep tok_s | tee "$OUT/uncompiled.txt"
PYTHONFAULTHANDLER=1 COMPILE=1 MODES=int4 timeout -s ABRT "$(left 560)" python dev/mhc_time.py mhc-s > "$OUT/compiled.log" 2>&1
echo "compiled rc $?"; grep tok_s "$OUT/compiled.log"
