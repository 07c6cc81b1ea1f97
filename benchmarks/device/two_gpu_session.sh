#!/usr/bin/env bash
# One session on a lent 2-GPU machine (nvidia-h100-x2), in resumable phases of under 10 minutes
# each, called back to back on the warm machine (runs/ persists between calls):
#   PHASE=1  carry .carry/p1 (enwiki train shards 0-2 + validation parquet): prepare them; the CUDA
#            fast-path tests (GPU 0) beside `hyperloop bench train` of the S models (GPU 1); then
#            benchmarks/multi_gpu.py (1 GPU vs DDP vs FSDP2, and FSDP2 -> 1 GPU resume)
#   PHASE=2  carry .carry/hellaswag (the full task file): eval speed (GPU 0) beside the M Transformer's
#            throughput (GPU 1), then the xs ablations, two trainings at a time (--gpus 2)
#   PHASE=3  the ablations continue; then the report of every table whose runs are all complete
# Everything lands in $OUT (logs, JSON, markdown, a tarball of the ablation tables).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-570}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
quiet() { tr '\r' '\n' | grep -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' -e 'step/s' -e 'Warning'; }
ABL_ARGS=(--scale xs --data runs/enwiki3 --out runs/ablations-xs --steps "${ABL_STEPS:-240}")
TABLES=(h_res placement lora streams structure)  # the training order when time runs short

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" >> "$OUT/gpu.txt"

case "${PHASE:?set PHASE=1, 2 or 3}" in
1)
  python -m hyperloop prepare --source .carry/p1/enwiki/train-*.parquet \
    --val-source .carry/p1/enwiki/validation-00000.parquet --tokenizer src/hyperloop/corpus/tokenizer.model \
    --out runs/enwiki3 --workers 20 2>&1 | quiet | tail -3 > "$OUT/prepare.log" &
  CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pytest -q tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 250 python -m hyperloop bench train \
    --preset transformer-s hf-llama-s hyperloop-s looped-s mhc-s --micro-batch 16 --seq-len 2048 --steps 8 \
    --json "$OUT/train-throughput.json" 2>&1 | quiet > "$OUT/bench.log" &
  wait
  echo "tests, bench, prepare done after $(( $(date +%s) - START ))s"; tail -2 "$OUT/test_gpu.log"
  timeout -s TERM "$(left)" python benchmarks/multi_gpu.py --data runs/enwiki3 --out runs/multi-gpu \
    --json "$OUT/multi-gpu.json" --md "$OUT/multi-gpu.md" > "$OUT/multi_gpu.log" 2>&1
  echo "multi-gpu exited $? after $(( $(date +%s) - START ))s"
  tar czf "$OUT/multi-gpu-logs.tgz" runs/multi-gpu/*/*.log 2>/dev/null
  ;;
2)
  CUDA_VISIBLE_DEVICES=0 timeout 150 python benchmarks/eval_speed.py --preset hyperloop-s --tasks-dir .carry \
    --data runs/enwiki3 --json "$OUT/eval_speed.json" --markdown "$OUT/eval_speed.md" > "$OUT/eval_speed.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 150 python -m hyperloop bench train --preset transformer-m --micro-batch 8 \
    --seq-len 2048 --steps 8 --json "$OUT/train-throughput-m.json" 2>&1 | quiet > "$OUT/bench-m.log" &
  wait
  echo "eval speed, M bench done after $(( $(date +%s) - START ))s"
  ;;&
2|3)
  RESERVE=${RESERVE:-60}  # seconds for the trainings to checkpoint after SIGTERM, and for the report
  timeout -s TERM "$(( $(left) - RESERVE ))" python -m hyperloop reproduce "${ABL_ARGS[@]}" \
    --ablation "${TABLES[@]}" --gpus 2 2>&1 | quiet > "$OUT/ablations-$PHASE.log"
  echo "ablations exited after $(( $(date +%s) - START ))s"; tail -3 "$OUT/ablations-$PHASE.log"
  DONE=$(python - "${TABLES[@]}" <<'EOF'
import sys
from pathlib import Path
from hyperloop.reproduce import _run_complete, ablation_variants
print(" ".join(t for t in sys.argv[1:]
               if all(_run_complete(Path("runs/ablations-xs/runs") / v.name) for v in ablation_variants(t, "xs"))))
EOF
)
  echo "complete tables: $DONE"
  if [ -n "$DONE" ] && [ "$(left)" -gt 20 ]; then  # evaluate and tabulate what is complete (cached evals are reused)
    timeout "$(left)" python -m hyperloop reproduce "${ABL_ARGS[@]}" --ablation $DONE 2>&1 \
      | quiet > "$OUT/ablations-report-$PHASE.log"
  fi
  tar czf "$OUT/ablations-xs.tgz" --exclude=checkpoints --exclude=tensorboard -C runs ablations-xs 2>/dev/null
  ;;
esac
ls -la "$OUT"; echo "phase $PHASE done after $(( $(date +%s) - START ))s"
