#!/usr/bin/env bash
# results/multi-gpu.*: benchmarks/multi_gpu.py on a lent 2-GPU machine (carry .carry/p0: enwiki train
# shard 0 + the validation parquet), prepared there first. Writes JSON, markdown, logs into $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=src NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python -m hyperloop prepare --source .carry/p0/enwiki/train-00000.parquet --val-source .carry/p0/enwiki/validation-00000.parquet --tokenizer src/hyperloop/corpus/tokenizer.model --out runs/enwiki1 --workers 28 > $OUT/prepare.log 2>&1
timeout -s TERM 330 python benchmarks/multi_gpu.py --data runs/enwiki1 --out runs/multi-gpu --models hyperloop-s transformer-s --json $OUT/multi-gpu.json --md $OUT/multi-gpu.md > $OUT/multi_gpu.log 2>&1
tail -3 $OUT/multi_gpu.log; tar czf $OUT/mg-logs.tgz runs/multi-gpu/*/*.log runs/multi-gpu/*/*/metrics.jsonl 2>/dev/null
