"""Analysis figures (issue 9): what `hyperloop analyze` costs, and a check of its CUDA numerics.

For each preset a random-weight model is saved as a checkpoint and `analyze` runs on it over
--tokens validation tokens. A row records the wall time (load, stream, plots), tokens/s, the peak
GPU memory, and the logit lens after the last layer next to `hyperloop eval`'s loss on the same
windows: the two must agree (a check of the bf16-autocast CUDA path, which the CPU tests cannot run).
Random weights cost the same as trained ones, so the times hold for the real checkpoints.

    python benchmarks/analysis.py --out results                 # xs and s presets, 262144 tokens: ~2 min, H100
    python benchmarks/analysis.py --smoke                       # tiny presets, 4096 tokens: CPU, a few minutes
    python benchmarks/analysis.py --data DIR --presets ...      # a prepared folder instead of the demo corpus

Without --data the bundled demo corpus is prepared with the Llama-2 tokenizer into a temporary
folder, a quarter of it held out (about 440K validation tokens).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hyperloop.analysis import DEFAULT_TOKENS, analyze
from hyperloop.checkpoint import load_model, save_model
from hyperloop.config import get_preset
from hyperloop.data.loader import TokenData
from hyperloop.data.prepare import prepare
from hyperloop.eval.perplexity import perplexity
from hyperloop.eval.runner import resolve_device
from hyperloop.model import HyperloopLM

PRESETS = ["transformer-xs", "mhc-xs", "looped-xs", "hyperloop-xs", "transformer-s", "hyperloop-s"]
SMOKE_PRESETS = ["transformer-tiny", "mhc-tiny", "looped-tiny", "hyperloop-tiny"]


def bench_preset(name: str, data: Path, work: Path, tokens: int, device: torch.device) -> dict:
    cfg = get_preset(name)
    torch.manual_seed(0)
    ckpt = save_model(work / "ckpt" / name, HyperloopLM(cfg), tokenizer_dir=data / "tokenizer")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    report = analyze([str(ckpt)], str(data), str(work / "out" / name), tokens, device=str(device), progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = report["models"][0]
    model = load_model(ckpt, device).model
    reference = perplexity(model, TokenData(data), max_tokens=tokens, progress=False)
    assert reference["tokens"] == report["tokens"], "analyze and eval must read the same windows"
    return {
        "preset": name,
        "structure": cfg.structure(),
        "depth": len(result["layers"]),
        "tokens": report["tokens"],
        "seconds": seconds,
        "tok_s": report["tokens"] / seconds,
        "peak_memory_gb": peak,
        "lens_final_ce": result["final"]["ce"],
        "eval_loss": reference["loss"],
        "abs_diff": abs(result["final"]["ce"] - reference["loss"]),
        "loop_similarity": None if result["loop_similarity"] is None else result["loop_similarity"]["mean"],
    }


def markdown(results: dict) -> str:
    lines = [
        "# Analysis: cost of `hyperloop analyze`, and its last-layer lens against `hyperloop eval`",
        "",
        f"`{results['command']}`",
        "",
        (f"{results['device']}, torch {results['torch']}, {results['date']}. Random-weight models; "
        f"data `{results['data']}`. Time = load + stream + plots for one checkpoint."),
        "",
        "| model | structure | effective layers | tokens | seconds | tok/s | peak GiB | lens CE (last) | eval loss | diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        peak = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        lines.append(
            f"| {r['preset']} | {r['structure']} | {r['depth']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tok_s']:,.0f} | {peak} | {r['lens_final_ce']:.5f} | {r['eval_loss']:.5f} | {r['abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, help=f"default: {' '.join(PRESETS)}")
    parser.add_argument("--tokens", type=int, default=None, help=f"tokens per model (default {DEFAULT_TOKENS})")
    parser.add_argument("--data", type=Path, help="prepared folder (default: the demo corpus, prepared here)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--smoke", action="store_true", help="tiny presets, 4096 tokens (CPU)")
    parser.add_argument("--out", type=Path, help="folder to write analysis_cost.json and analysis_cost.md in")
    args = parser.parse_args()
    presets = args.presets or (SMOKE_PRESETS if args.smoke else PRESETS)
    tokens = args.tokens or (4096 if args.smoke else DEFAULT_TOKENS)
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="hyperloop-analysis-bench-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "demo"
            prepare(["demo"], "llama2", str(data), val_fraction=0.25, progress=False)
        rows = [bench_preset(name, data, work, tokens, device) for name in presets]
    results = {
        "command": shlex.join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(args.data or "demo corpus (llama2, 25% held out)"),
        "rows": rows,
    }
    print(json.dumps(results, indent=2))
    print(markdown(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "analysis_cost.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "analysis_cost.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
