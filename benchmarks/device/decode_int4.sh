#!/usr/bin/env bash
# Decode and INT4 figures on one lent GPU (results/decode.*, results/int4.*), in parts that can run
# on two GPUs side by side (PARTS, default "speed int4"):
#  speed    bench decode of the S models, ours with torch.compile + CUDA graph, against HF generate
#           both eager (dynamic cache) and compiled (static cache), batch 1 and 32 (about 5 minutes)
#  int4     int4 vs bf16 decode at batch 1, compiled, of the S and M models (the GPTQ wall time of
#           hyperloop-s, `--sections quant-time`, takes two more minutes and is in results/int4.md)
#  trained  with TRAINED="RUN..." (trained looped runs on the machine, e.g. from repro_xs.sh) and
#           DATA: the loop / early-exit trade-off on the first, the INT4 perplexity columns (bf16,
#           RTN, GPTQ loop-aware, GPTQ first loop) on all of them
# LIMIT (seconds, default 330) bounds each benchmark command; SPEED_ARGS / INT4_ARGS add flags
# (e.g. SPEED_ARGS="--presets transformer-s hf-llama-s:static --no-fewer-loops").
# Writes markdown + JSON into $OUT (copy them over results/, then re-append the notes).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
quiet() { tr '\r' '\n' | grep -v -e '^\s*$' -e 'it/s\]$' -e 's/it\]$' -e 'tok/s\]$' -e 'Warning'; }
for part in ${PARTS:-speed int4}; do
  case $part in
  speed) timeout "${LIMIT:-330}" python benchmarks/decode.py --compile --out "$OUT" ${SPEED_ARGS:-} 2>&1 \
           | quiet > "$OUT/decode.log" ;;
  int4) timeout "${LIMIT:-330}" python benchmarks/int4.py --sections decode --compile --out "$OUT" ${INT4_ARGS:-} 2>&1 \
          | quiet > "$OUT/int4.log" ;;
  trained)
    read -r -a runs <<< "${TRAINED:?set TRAINED to trained run folders}"
    timeout 200 python benchmarks/decode.py --sections tradeoff --ckpt "${runs[0]}" --data "${DATA:?set DATA}" \
      --out "$OUT" 2>&1 | quiet > "$OUT/tradeoff.log"
    timeout 240 python benchmarks/int4.py --sections ppl --ckpt "${runs[@]}" --data "$DATA" --group-size 64 \
      --calib-seqs 256 --out "$OUT" 2>&1 | quiet > "$OUT/int4-ppl.log" ;;
  esac
done
ls -la "$OUT"
