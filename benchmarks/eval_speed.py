"""Evaluation speed (issue 6): full HellaSwag validation and held-out perplexity, one model, one GPU.

Targets (an S-size model on one H100): HellaSwag validation (10,042 docs x 4 endings) in at most
60 s, perplexity over 2.8M tokens in at most 30 s. Random weights cost exactly what trained ones
do, so `--preset hyperloop-s` needs no checkpoint; `--checkpoint` measures a real one instead.
Each timing runs `hyperloop eval`'s own code (eval.runner.run_task, eval.perplexity.perplexity)
after a short warm-up on the same device, and is wall time including tokenization.

    python benchmarks/eval_speed.py --preset hyperloop-s --tasks-dir ../shared/data/tasks \\
        --data ../shared/data/enwiki/validation-00000.parquet \\
        --json results/eval_speed.json --markdown results/eval_speed.md
    python benchmarks/eval_speed.py --smoke --tasks-dir ../shared/data/tasks      # CPU, tiny, ~1 min

--data is a folder from `hyperloop prepare` (its validation split is read), or text (parquet, jsonl,
txt) that is prepared first with the Llama-2 tokenizer into a temporary folder, all of it as the
validation split (enwiki's validation parquet: 2.80M tokens). Without --data the bundled demo
corpus is prepared, a quarter held out (about 440K tokens, so fewer than 2.8M).
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

from hyperloop.checkpoint import load_model
from hyperloop.config import count_params, get_preset
from hyperloop.data.demo import demo_corpus_path, demo_tokenizer_path
from hyperloop.data.loader import TokenData
from hyperloop.data.prepare import prepare
from hyperloop.eval.perplexity import perplexity
from hyperloop.eval.runner import resolve_device, run_task
from hyperloop.eval.tasks import TASKS, load_docs
from hyperloop.model import HyperloopLM

TARGET_HELLASWAG_S, TARGET_PPL_S, PPL_TOKENS = 60.0, 30.0, 2_800_000
WARMUP_DOCS, WARMUP_TOKENS = 64, 65536


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """(result, seconds) of fn() with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def build_model(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer or None, description): a checkpoint, or a preset with random weights."""
    if args.checkpoint:
        loaded = load_model(args.checkpoint, device=device)
        tokenizer = loaded.tokenizer() if loaded.tokenizer_path else None
        return loaded.model, tokenizer, f"checkpoint {loaded.path} ({loaded.config.name})"
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    return HyperloopLM(cfg).to(device).eval(), None, f"{args.preset} (random weights)"


def token_data(source: str | None, tmp: str) -> TokenData:
    """A prepared folder as it is. Anything else (a parquet/jsonl/txt file or folder) is prepared here
    with the Llama-2 tokenizer, all of it as the validation split; no source: the demo corpus, a
    quarter held out."""
    if source and (Path(source) / "meta.json").is_file():
        return TokenData(source)
    out, tokenizer = f"{tmp}/data", str(demo_tokenizer_path())
    if source:
        prepare([source], tokenizer, out, val_source=[source], progress=False)
    else:
        prepare([str(demo_corpus_path())], tokenizer, out, val_fraction=0.25, progress=False)
    return TokenData(out)


def bench_hellaswag(model, tokenizer, tasks_dir: str, limit: int | None, batch_tokens, device) -> dict:
    task = TASKS["hellaswag"]
    docs, split = load_docs(task, tasks_dir, use_hub=False)
    docs = docs[:limit] if limit else docs
    run_task(model, tokenizer, task, docs[:WARMUP_DOCS], split, batch_tokens=batch_tokens, progress=False)
    result, seconds = timed(device, lambda: run_task(model, tokenizer, task, docs, split,
                                                       batch_tokens=batch_tokens, progress=True))  # fmt: skip
    requests = sum(len(lp) for lp in result.logprobs)
    return {
        "docs": len(docs), "requests": requests, "seconds": round(seconds, 2), "docs_per_s": round(len(docs) / seconds, 1),
        "acc": result.accuracy("none"), "acc_norm_tokens": result.accuracy("tokens"),
        "target_s": TARGET_HELLASWAG_S, "within_target": seconds <= TARGET_HELLASWAG_S,
    }  # fmt: skip


def bench_ppl(model, data: TokenData, split: str, tokens: int, batch_tokens, device) -> dict:
    perplexity(model, data, split, max_tokens=WARMUP_TOKENS, batch_tokens=batch_tokens, progress=False)
    result, seconds = timed(device, lambda: perplexity(model, data, split, max_tokens=tokens,
                                                         batch_tokens=batch_tokens))  # fmt: skip
    return {
        "tokens": result["tokens"], "seconds": round(seconds, 2), "tok_per_s": round(result["tokens"] / seconds),
        "ppl": result["ppl"], "target_s": TARGET_PPL_S, "within_target": seconds <= TARGET_PPL_S,
        "target_tokens": tokens,
    }  # fmt: skip


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }


def markdown(report: dict) -> str:
    env, lines = report["environment"], ["# Evaluation speed", ""]
    lines += [f"`{env['command']}` on {env['device']}, torch {env['torch']}, {env['date']}", "",
              f"Model: {report['model']}, {report['params'] / 1e6:.1f}M parameters (paper convention).", "",
              "| measurement | size | seconds | target | met |", "|---|---|---|---|---|"]  # fmt: skip
    if "hellaswag" in report:
        h = report["hellaswag"]
        lines.append(f"| HellaSwag validation | {h['docs']:,} docs, {h['requests']:,} requests | {h['seconds']} "
                     f"| <= {h['target_s']:.0f} s | {'yes' if h['within_target'] else 'no'} |")  # fmt: skip
    if "ppl" in report:
        p = report["ppl"]
        lines.append(f"| perplexity | {p['tokens']:,} tokens | {p['seconds']} | <= {p['target_s']:.0f} s "
                     f"| {'yes' if p['within_target'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="hyperloop-s", help="preset with random weights (default hyperloop-s)")
    parser.add_argument("--checkpoint", help="time a real checkpoint instead of a random preset")
    parser.add_argument("--tasks-dir", help="folder with hellaswag/validation.jsonl (no HellaSwag timing without)")
    parser.add_argument("--data", help="prepared folder, or text to prepare, for perplexity (default: demo corpus)")
    parser.add_argument("--split", default="validation", help="data split for perplexity (default validation)")
    parser.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS, help="perplexity tokens (default 2.8M)")
    parser.add_argument("--limit", type=int, default=None, help="HellaSwag documents (default: all 10,042)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward (default: eval's)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: hyperloop-tiny, 200 docs, 32K tokens")
    parser.add_argument("--json", help="write the report as JSON here")
    parser.add_argument("--markdown", help="write a markdown table here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.limit, args.ppl_tokens = "hyperloop-tiny", args.limit or 200, min(args.ppl_tokens, 32768)
    device = resolve_device(args.device)
    model, tokenizer, description = build_model(args, device)
    report: dict = {"model": description, "params": count_params(model.cfg)["total"], "environment": environment(device)}
    with tempfile.TemporaryDirectory() as tmp:
        data = token_data(args.data, tmp)
        tokenizer = tokenizer or data.tokenizer()
        data.check_vocab(model.cfg.vocab_size, sha256=tokenizer.sha256)
        if args.tasks_dir:
            report["hellaswag"] = bench_hellaswag(model, tokenizer, args.tasks_dir, args.limit, args.batch_tokens, device)
        report["ppl"] = bench_ppl(model, data, args.split, args.ppl_tokens, args.batch_tokens, device)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
