"""Data-parallel training on several GPUs against one GPU (results/multi-gpu.md + .json).

For each model, with the same global batch, data order and schedule:
  1gpu, 1gpu-repeat  one GPU, gradient accumulation over --nproc micro-batches (the repeat, run at
                     the same time on another GPU, measures the run-to-run noise of bf16 training)
  ddp, fsdp          `torchrun --nproc-per-node N -m hyperloop.train` with train.parallel=ddp|fsdp
  fsdp-resume        the FSDP run's half-way checkpoint resumed on one GPU to the end
and reports tokens/s per GPU (median over the steps after --skip warm-up steps) against one GPU, the
largest loss difference over the first --steps steps, and whether the resumed run continues the
FSDP run's loss curve.

    python benchmarks/multi_gpu.py --data data/enwiki --out runs/multi-gpu --models transformer-s hyperloop-s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
    return [r for r in rows if "loss" in r]


def launch(run: Path, args, sets: list[str], gpus: list[int], nproc: int = 1) -> subprocess.Popen:
    """One training, on the GPUs `gpus`, with `nproc` ranks (torchrun when more than one)."""
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(29500 + gpus[0]), "-m", "hyperloop.train"]  # fmt: skip
    else:
        head = [sys.executable, "-m", "hyperloop", "train"]
    cmd = [*head, "--preset", args.model, "--data", args.data, "--out", str(run), "--set", *sets]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    run.parent.mkdir(parents=True, exist_ok=True)
    log = open(run.parent / f"{run.name}.log", "w")  # noqa: SIM115 (closed with the process)
    print(f"  {run.name}: {' '.join(cmd[cmd.index('--preset') - 1 :][:4])} ... on GPU {gpus}", flush=True)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a training exited {proc.returncode}: see {proc.args[proc.args.index('--out') + 1]}.log")


def speed(run: Path, skip: int, world: int) -> float:
    """Median tokens/s per GPU over the logged steps after the warm-up (compilation)."""
    return statistics.median(r["tok_s"] for r in metrics(run)[skip:]) / world


def max_loss_diff(a: Path, b: Path, first: int = 0) -> float:
    la, lb = ({r["step"]: r["loss"] for r in metrics(run)} for run in (a, b))
    return max(abs(la[s] - lb[s]) for s in la if s in lb and s > first)


def bench_model(args, root: Path) -> dict:
    n, gb = args.nproc, args.nproc * args.micro_batch
    half = args.steps // 2
    sets = [f"train.micro_batch={args.micro_batch}", f"train.global_batch={gb}", "train.log_every=1",
            f"train.train_tokens={args.steps * gb * args.seq_len}", f"train.seq_len={args.seq_len}",
            f"train.warmup_steps={max(1, args.steps // 10)}", f"train.ckpt_every={half}", "train.eval_every=1000000",
            f"train.eval_tokens={args.seq_len * args.micro_batch}", "train.parallel=fsdp"]  # fmt: skip
    # train.parallel only matters under torchrun; keeping one value lets the 1-GPU resume reuse the FSDP run's config
    ddp_sets = [*sets[:-1], "train.parallel=ddp"]
    runs = {name: root / args.model / name for name in ("1gpu", "1gpu-repeat", "ddp", "fsdp", "fsdp-resume")}
    for run in runs.values():
        shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    wait(launch(runs["1gpu"], args, ddp_sets, [0]), launch(runs["1gpu-repeat"], args, ddp_sets, [1 % n]))
    wait(launch(runs["ddp"], args, ddp_sets, list(range(n)), n))
    wait(launch(runs["fsdp"], args, sets, list(range(n)), n))
    # Resume the FSDP run's half-way checkpoint on one GPU: copy the run, drop the later checkpoints.
    shutil.copytree(runs["fsdp"], runs["fsdp-resume"])
    ckpts = runs["fsdp-resume"] / "checkpoints"
    for path in ckpts.iterdir():
        if path.name != f"step-{half}":
            shutil.rmtree(path)
    (runs["fsdp-resume"] / "latest").write_text(f"step-{half}\n")
    wait(launch(runs["fsdp-resume"], args, sets, [0]))
    one = speed(runs["1gpu"], args.skip, 1)
    row = {
        "model": args.model, "micro_batch": args.micro_batch, "global_batch": gb, "seq_len": args.seq_len,
        "steps": args.steps, "tok_s_per_gpu": {"1gpu": one}, "scaling": {},
        "noise_1gpu_repeat": max_loss_diff(runs["1gpu"], runs["1gpu-repeat"]),
        "max_loss_diff_vs_1gpu": {}, "final_loss": {}, "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    for name in ("ddp", "fsdp"):
        row["tok_s_per_gpu"][name] = speed(runs[name], args.skip, n)
        row["scaling"][name] = row["tok_s_per_gpu"][name] / one
        row["max_loss_diff_vs_1gpu"][name] = max_loss_diff(runs["1gpu"], runs[name])
    for name, run in runs.items():
        row["final_loss"][name] = metrics(run)[-1]["loss"]
    row["resume"] = {"from_step": half, "steps_compared": args.steps - half,
                     "max_loss_diff_vs_fsdp": max_loss_diff(runs["fsdp"], runs["fsdp-resume"], first=half)}  # fmt: skip
    row["losses"] = {name: [r["loss"] for r in metrics(run)] for name, run in runs.items()}
    return row


def write_markdown(result: dict, path: Path) -> None:
    n = result["nproc"]
    lines = [
        f"# Data-parallel training on {n} GPUs",
        "",
        f"- device: {n} x {result['device']}; torch {result['torch']}; date: {result['date']}; commit: {result['commit']}",
        f"- command: `{result['command']}`",
        "- Each model: the same global batch, data order and schedule (warmup then cosine over the run) on one GPU "
        f"(gradient accumulation over {n} micro-batches) and on {n} GPUs (`torchrun -m hyperloop.train`, DDP and "
        "FSDP2), bf16 autocast, per-layer torch.compile. tokens/s per GPU: median over the steps after the "
        f"first {result['skip']} (compilation). `1gpu-repeat` is a second identical 1-GPU run: its loss difference "
        "is the noise floor of bf16 training on this machine (non-deterministic kernels).",
        "",
        "| model | 1 GPU tok/s | DDP tok/s/GPU | DDP scaling | FSDP2 tok/s/GPU | FSDP2 scaling | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, t = r["scaling"], r["tok_s_per_gpu"]
        lines.append(f"| {r['model']} | {t['1gpu']:,.0f} | {t['ddp']:,.0f} | {s['ddp']:.3f}x | {t['fsdp']:,.0f} | "
                     f"{s['fsdp']:.3f}x | >= 0.90x |")  # fmt: skip
    lines += ["", f"Loss agreement over the first {result['rows'][0]['steps']} steps (max |loss difference| against the "
              "1-GPU run) and the FSDP2 -> 1-GPU resume:", "",
              "| model | 1gpu-repeat (noise) | DDP | FSDP2 | FSDP2 resumed on 1 GPU vs FSDP2 (steps after the checkpoint) | final losses (1gpu / ddp / fsdp / resumed) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        d, f = r["max_loss_diff_vs_1gpu"], r["final_loss"]
        lines.append(f"| {r['model']} | {r['noise_1gpu_repeat']:.4f} | {d['ddp']:.4f} | {d['fsdp']:.4f} | "
                     f"{r['resume']['max_loss_diff_vs_fsdp']:.1e} (from step {r['resume']['from_step']}) | "
                     f"{f['1gpu']:.4f} / {f['ddp']:.4f} / {f['fsdp']:.4f} / {f['fsdp-resume']:.4f} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared token shards")
    parser.add_argument("--out", default="runs/multi-gpu", help="run folders (wiped per model)")
    parser.add_argument("--models", nargs="+", default=["transformer-s", "hyperloop-s"])
    parser.add_argument("--nproc", type=int, default=2, help="GPUs for the data-parallel runs")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the speed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    if torch.cuda.is_available() and torch.cuda.device_count() < args.nproc:  # (CPU: gloo ranks, to try it out)
        raise SystemExit(f"needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    from hyperloop.train.loop import environment

    env = environment()
    result = {"device": env.get("device"), "torch": env["torch"], "nproc": args.nproc, "skip": args.skip,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": env.get("git"),
              "command": "python " + " ".join(sys.argv), "rows": []}  # fmt: skip
    for model in args.models:
        print(f"{model}:", flush=True)
        result["rows"].append(bench_model(argparse.Namespace(**{**vars(args), "model": model}), Path(args.out)))
        r = result["rows"][-1]
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        if args.json:  # after every model, so a cut-off run still leaves what it finished
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.md:
            write_markdown(result, args.md)


if __name__ == "__main__":
    main()
