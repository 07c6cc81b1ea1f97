#!/usr/bin/env bash
# Decode and INT4 figures on one lent GPU (results/decode.*, results/int4.*), about 8 minutes:
#  - bench decode of the S models, ours with torch.compile + CUDA graph, against HF generate both
#    eager (dynamic cache) and compiled (static cache), batch 1 and 32;
#  - int4 vs bf16 decode at batch 1, compiled, and the GPTQ wall time of hyperloop-s (quant-time);
#  - with TRAINED=RUN (a trained looped checkpoint on the machine, e.g. from repro_xs.sh) and DATA,
#    the loop / early-exit trade-off and the int4 perplexity columns on it.
# Writes markdown + JSON into $OUT (copy them over results/, then re-append the notes).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
quiet() { tr '\r' '\n' | grep -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' -e 'Warning'; }
timeout 240 python benchmarks/decode.py --compile --out "$OUT" 2>&1 | quiet > "$OUT/decode.log"
timeout 240 python benchmarks/int4.py --sections decode quant-time --compile --out "$OUT" 2>&1 | quiet > "$OUT/int4.log"
if [ -n "${TRAINED:-}" ]; then
  timeout 150 python benchmarks/decode.py --sections tradeoff --ckpt "$TRAINED" --data "$DATA" --out "$OUT" 2>&1 \
    | quiet > "$OUT/tradeoff.log"
  timeout 150 python benchmarks/int4.py --sections ppl --ckpt "$TRAINED" --data "$DATA" --group-size 64 \
    --calib-seqs 64 --out "$OUT" 2>&1 | quiet > "$OUT/int4-ppl.log"
fi
ls -la "$OUT"
