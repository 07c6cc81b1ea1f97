"""Benchmark of the data pipeline on the shared enwiki corpus; writes results/data-pipeline.{md,json}.

1. `prepare` of all enwiki train shards (validation parquet as --val-source) with the Llama-2
   tokenizer: documents, tokens per split, wall time, MB/s of UTF-8 text.
2. `TrainLoader.next_batch()` and `EvalWindows` throughput on one thread, at several shapes.

Run from the repository root (the output folder is kept: experiments train on it):

    python benchmarks/prepare_enwiki.py [--enwiki ../shared/data/enwiki] [--out data/enwiki-llama2]

The machine may be shared: the load average before and after is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from hyperloop.data.loader import EvalWindows, TokenData, TrainLoader
from hyperloop.data.prepare import available_cores, prepare

REPO = Path(__file__).resolve().parents[1]
LOADER_SHAPES = [(2048, 8), (2048, 32), (1024, 16), (256, 64)]  # (seq_len, micro_batch)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_sha() -> str | None:
    """HEAD, with "+dirty" when the working tree has changes (the figures then come from those)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the tokenizer workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(batches, seconds: float) -> tuple[float, int]:
    """Tokens per second (inputs x) drawn from the iterator ``batches`` for about ``seconds``."""
    next(batches)  # first touch of the memory map and the window order, not the steady state
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(batches)
        tokens += x.numel()
    return tokens / (time.perf_counter() - start), tokens


def _repeat(windows: EvalWindows):
    """Pass after pass over the validation split (one pass takes well under the measuring time)."""
    while True:
        yield from windows


def loader_figures(data: TokenData, seconds: float) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for seq_len, micro_batch in LOADER_SHAPES:
        loader = TrainLoader(data, seq_len, micro_batch, seed=0)
        rate, n = throughput(iter(loader.next_batch, None), seconds)
        rows.append({"what": "TrainLoader.next_batch", "seq_len": seq_len, "micro_batch": micro_batch,
                     "tokens_per_s": round(rate), "tokens_measured": n})
    windows = EvalWindows(data, 2048, 16, split="validation")
    rate, n = throughput(_repeat(windows), seconds)
    rows.append({"what": "EvalWindows", "seq_len": 2048, "micro_batch": 16, "tokens_per_s": round(rate),
                 "tokens_measured": n})
    return rows


def write_markdown(path: Path, r: dict) -> None:
    p, s = r["prepare"], r["prepare"]["splits"]
    lines = [
        "# Data pipeline: prepare enwiki with the Llama-2 tokenizer, and loader throughput",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}; git {r['git_sha'] or 'uncommitted'}  ",
        (
            f"Machine: {r['cpu']}, {r['cores']} cores, load average (1, 5, 15 min) {r['load_before']} before, "
            f"{r['load_after']} after  "
        ),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
        "## prepare",
        "",
        f"`{p['cli']}`",
        "",
        "| split | documents | tokens (incl. one BOS a document) | text bytes (UTF-8) | shards |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, split in s.items():
        lines.append(f"| {name} | {split['documents']:,} | {split['tokens']:,} | {split['text_bytes']:,} | "
                     f"{len(split['shards'])} |")
    lines += [
        "",
        (
            f"Wall time **{p['wall_s']:.1f} s** with {p['workers']} worker processes: "
            f"**{p['mb_per_s']:.2f} MB/s** of text, {p['tokens_per_s'] / 1e6:.2f}M tokens/s, "
            f"{p['bytes_per_token']:.3f} bytes (UTF-8) per token. Target: at most 300 s on 2 cores. "
            f"CPU time (this process and its workers): {p['cpu_s']:.0f} s, i.e. {p['cpu_s'] / r['cores']:.0f} s "
            f"of {r['cores']} cores: the wall time a machine with nothing else running would approach."
        ),
        "",
        "## loader (one thread, memory-mapped shards in the page cache)",
        "",
        "| reader | seq_len | micro_batch | tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for row in r["loader"]:
        lines.append(f"| {row['what']} | {row['seq_len']} | {row['micro_batch']} | {row['tokens_per_s'] / 1e6:.1f}M |")
    lines += ["", "Target: at least 10M tokens/s on one core.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enwiki", default=str(REPO.parent / "shared" / "data" / "enwiki"))
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"))
    parser.add_argument("--out", default=str(REPO / "data" / "enwiki-llama2"))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--loader-seconds", type=float, default=3.0)
    parser.add_argument("--results", default=str(REPO / "results" / "data-pipeline"), help="path stem of .md/.json")
    args = parser.parse_args()

    enwiki = Path(args.enwiki)
    train = sorted(str(p) for p in enwiki.glob("train-*.parquet"))
    val = sorted(str(p) for p in enwiki.glob("validation-*.parquet"))
    if not train or not val:
        sys.exit(f"no train-*.parquet / validation-*.parquet in {enwiki}; pass --enwiki DIR")
    workers = args.workers or available_cores()
    cli = shlex.join(["hyperloop", "prepare", "--source", *train, "--val-source", *val,
                      "--tokenizer", args.tokenizer, "--out", args.out, "--workers", str(workers), "--overwrite"])
    load_before = [round(x, 2) for x in os.getloadavg()]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    meta = prepare(train, args.tokenizer, args.out, val_source=val, workers=workers, overwrite=True)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    text_bytes = sum(split["text_bytes"] for split in meta["splits"].values())
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    loader = loader_figures(TokenData(args.out), args.loader_seconds)
    result = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "cpu": cpu_model(),
        "cores": available_cores(),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "versions": {"python": platform.python_version(), **{
            name: version(name) for name in ("hyperloop", "numpy", "pyarrow", "sentencepiece", "tokenizers", "torch")
        }},
        "prepare": {
            "cli": cli, "workers": workers, "wall_s": round(wall, 2), "cpu_s": round(cpu, 1),
            "mb_per_s": round(text_bytes / wall / 1e6, 3), "tokens_per_s": round(tokens / wall),
            "bytes_per_token": round(text_bytes / tokens, 4),
            "tokenizer": meta["tokenizer"], "splits": meta["splits"],
        },
        "loader": loader,
    }
    stem = Path(args.results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_markdown(stem.with_suffix(".md"), result)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
