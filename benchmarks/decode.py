"""Decode figures (issue 8): prints JSON and, with --out DIR, updates DIR/decode.json + DIR/decode.md.

speed     prefill / decode tokens/s and peak memory of random-weight models at batch 1 and 32 next
          to HF transformers' LlamaForCausalLM.generate of the Transformer's shape (`hf-llama-s`: eager,
          dynamic cache; `hf-llama-s:static`: static cache, compiled by HF; the target is ours >= 1.5x
          the faster of the two), and the looped presets at every test-time loop count K' <= K.
tradeoff  (with --ckpt and --data) on a trained looped model: perplexity, mean loops per token and
          batch-1 decode tokens/s at K' = 1..K loops and at several early-exit thresholds, teacher-
          forced token by token through the KV cache (hyperloop.infer.tradeoff).

Each run replaces only the sections it computed, so they can be run one at a time:

    python benchmarks/decode.py --out results                                 # speed, ~3 min on an H100
    python benchmarks/decode.py --sections tradeoff --ckpt RUN --data DATA --out results   # ~5 min
    python benchmarks/decode.py --smoke                                       # tiny models, CPU, a minute
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from hyperloop.checkpoint import load_model
from hyperloop.config import get_preset
from hyperloop.data.loader import EvalWindows, TokenData
from hyperloop.infer.bench import (
    add_speedups,
    bench_device,
    build_model,
    decode_rows,
    environment,
    preset_config,
)
from hyperloop.infer.tradeoff import decode_perplexity

SPEED_PRESETS = ["transformer-s", "looped-s", "hyperloop-s", "hf-llama-s", "hf-llama-s:static"]
SMOKE_PRESETS = ["transformer-tiny", "hyperloop-tiny", "hf-llama-tiny"]


def speed(args) -> dict:
    rows = decode_rows(args.presets, args.batch, args.prompt_len, args.new_tokens, compile=args.compile)
    for name in args.presets if args.fewer_loops else []:  # the looped presets again at K' < K
        trained = preset_config(name).num_loops
        for loops in range(1, trained):
            rows += decode_rows([name], args.batch, args.prompt_len, args.new_tokens, num_loops=loops,
                                compile=args.compile)  # fmt: skip
    add_speedups(rows)  # the reduced-loop rows against the HF row of their batch too
    return {**environment(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}


def tradeoff_inputs(args):
    """The model and (x, y) windows: a checkpoint + validation data, or for --smoke without them a
    random hyperloop-tiny on random tokens (which checks the plumbing, not the figures)."""
    device, dtype = bench_device()
    if args.ckpt:
        loaded = load_model(args.ckpt, device=device, dtype=dtype)
        data = TokenData(args.data)
        data.check_vocab(loaded.config.vocab_size)
        windows = EvalWindows(
            data, args.window_len, 1, split="validation", max_tokens=args.windows * args.window_len
        )
        return loaded.model, list(windows), str(loaded.path)
    model = build_model(get_preset("hyperloop-tiny"), device, dtype, int4=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.windows, args.window_len + 1))
    return (
        model,
        [(tokens[i : i + 1, :-1], tokens[i : i + 1, 1:]) for i in range(args.windows)],
        "random hyperloop-tiny",
    )


def tradeoff(args) -> dict:
    model, windows, source = tradeoff_inputs(args)
    trained = model.cfg.num_loops
    settings = [(loops, None) for loops in range(1, trained + 1)] + [(trained, x) for x in args.thresholds]
    total = sum(x.numel() for x, _ in windows)
    rows = [decode_perplexity(model, windows, num_loops=loops, exit_threshold=x, total_tokens=total)
            for loops, x in settings]  # fmt: skip
    return {**environment(), "checkpoint": source, "tokens": total, "batch": 1, "rows": rows}


def table(title: str, section: dict, note: str, header: list[str], rows: list[list]) -> list[str]:
    """One markdown section: title, the command, where/when it ran and a note, then the table."""
    env = f"{section['device']}, {section['dtype']}, torch {section['torch']}, {section['date']}."
    lines = [f"## {title}", "", f"`{section['command']}`", "", f"{env} {note}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def markdown(results: dict) -> str:
    lines = ["# Decode: speed, and what fewer loops cost", ""]
    if "speed" in results:
        s = results["speed"]
        rows = [[r["preset"], r.get("loops") or "-", r["batch"], f"{r['prefill_tok_s']:,.0f}",
                 f"{r['decode_tok_s']:,.0f}", f"{r['decode_ms_per_step']:.2f}",
                 f"{r['decode_speedup_vs_hf']:.2f}x" if "decode_speedup_vs_hf" in r else "-",
                 "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"] for r in s["rows"]]  # fmt: skip
        lines += table(
            f"Speed (random weights; prompt {s['prompt_len']}, {s['new_tokens']} new tokens, greedy)", s,
            "Ours: static KV cache, on CUDA the decode step replayed as a CUDA graph. "
            "HF: `LlamaForCausalLM.generate` with SDPA, `hf-llama-s` eager with its dynamic cache, "
            "`hf-llama-s:static` with a static cache that HF compiles; 'vs HF' divides by the faster of the two.",
            ["model", "loops", "batch", "prefill tok/s", "decode tok/s", "ms / step", "decode vs HF", "peak GiB"],
            rows,
        )  # fmt: skip
    if "tradeoff" in results:
        t = results["tradeoff"]
        graph = {True: "yes", False: "no", None: "-"}
        rows = [[r["loops"], "-" if r["exit_threshold"] is None else f"{r['exit_threshold']:g}", f"{r['ppl']:.3f}",
                 f"{r['mean_loops']:.2f}", f"{r['decode_tok_s']:,.0f}", graph[r.get("cuda_graph")]]
                for r in t["rows"]]  # fmt: skip
        lines += table(
            f"Loops and early exit ({t['checkpoint']}, {t['tokens']:,} validation tokens, batch 1)", t,
            "Teacher-forced token by token through the KV cache; an exited token gives the cache slots of "
            "the loops it skipped its exit-loop K/V. CUDA graph: the step replayed as one graph (plain) or "
            "one graph per loop (early exit).",
            ["loops K'", "exit threshold", "perplexity", "mean loops / token", "decode tok/s", "CUDA graph"],
            rows,
        )  # fmt: skip
    if results.get("notes"):  # kept in decode.json (written by hand), so a rerun does not drop them
        lines += ["Notes:", *(f"- {note}" for note in results["notes"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["speed", "tradeoff"],
        default=None,
        help="default: speed, plus tradeoff when --ckpt is given (always both with --smoke)",
    )
    parser.add_argument(
        "--presets", nargs="+", default=None, help=f"speed rows (default {' '.join(SPEED_PRESETS)})"
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="torch.compile our decode step before capture")
    parser.add_argument("--fewer-loops", action=argparse.BooleanOptionalAction, default=True,
                        help="speed: also time the looped presets at every K' < K (default on)")
    parser.add_argument("--ckpt", help="trained looped checkpoint (or run folder) for the trade-off")
    parser.add_argument("--data", help="prepared data folder (its validation split) for the trade-off")
    parser.add_argument("--windows", type=int, default=16, help="trade-off: validation windows (default 16)")
    parser.add_argument(
        "--window-len", type=int, default=256, help="trade-off: tokens per window (default 256)"
    )
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.6, 0.4])
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes (CPU, about a minute)")
    parser.add_argument("--out", type=Path, help="folder to update decode.json and decode.md in")
    args = parser.parse_args()
    if args.ckpt and not args.data:
        parser.error("--ckpt needs --data (a prepared folder with a validation split)")
    if args.smoke:
        args.presets = args.presets or SMOKE_PRESETS
        args.batch, args.prompt_len, args.new_tokens, args.windows, args.window_len = [1, 2], 8, 8, 2, 16
    args.presets = args.presets or SPEED_PRESETS
    sections = args.sections or (["speed", "tradeoff"] if args.ckpt or args.smoke else ["speed"])
    if "tradeoff" in sections and not (args.ckpt or args.smoke):
        parser.error("the tradeoff section needs --ckpt and --data")

    command = {"command": shlex.join(["python", *sys.argv])}
    results = {}
    if "speed" in sections:
        results["speed"] = {**command, **speed(args)}
    if "tradeoff" in sections:
        results["tradeoff"] = {**command, **tradeoff(args)}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        file = args.out / "decode.json"
        merged = {**(json.loads(file.read_text()) if file.exists() else {}), **results}
        file.write_text(json.dumps(merged, indent=2) + "\n")
        (args.out / "decode.md").write_text(markdown(merged))


if __name__ == "__main__":
    main()
