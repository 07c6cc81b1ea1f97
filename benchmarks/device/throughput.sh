#!/usr/bin/env bash
# On the lent GPU: check the CUDA fast paths, then training throughput of the four S models and
# HF LlamaForCausalLM of the same shape, side by side (results/train-throughput.*), plus xs speed.
# Usage (device tool): bash benchmarks/device/throughput.sh   (writes into $OUT)
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -x tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/test_gpu.txt"
python -m hyperloop bench train --preset ${PRESETS:-transformer-s hf-llama-s hyperloop-s looped-s mhc-s} \
  --micro-batch ${MICRO:-16} --seq-len 2048 --steps ${STEPS:-10} --json "$OUT/train-throughput.json" \
  --profile "$OUT/profile" 2>&1 \
  | grep -v Warning | tee "$OUT/bench.log"
if [ -n "${XS_PRESETS-transformer-xs mhc-xs hyperloop-xs}" ]; then  # XS_PRESETS="" skips them
  python -m hyperloop bench train --preset ${XS_PRESETS-transformer-xs mhc-xs hyperloop-xs} --micro-batch ${XS_MICRO:-32} \
    --seq-len 2048 --steps 10 --json "$OUT/train-throughput-xs.json" 2>&1 | grep -v Warning | tee "$OUT/bench-xs.log"
fi
