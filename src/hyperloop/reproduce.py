"""`hyperloop reproduce`: the paper's comparison (spec section 5) end to end, in one resumable command.

Stages, each skipped when its output exists (so re-running continues an interrupted run):
  data      prepare the corpus (the bundled demo corpus by default) unless --data is prepared shards
  sweep     optional: a short peak-LR sweep on the Transformer alone (the paper tunes nothing for
            the looped models); the best LR is then used for every model
  train     every variant with the same data order, tokens and hyperparameters (runs/<name>/)
  eval      perplexity on the validation split (and every --eval-data), zero-shot tasks if given
  int4      loop-aware GPTQ of every model, then its perplexity (quant/<name>/, eval/<name>-int4.json)
  analysis  cross-loop similarity and logit lens of all models (analysis/)
  report    report.md, summary.json, loss_curves.png

A variant is (name, preset, --set overrides): the main comparison has four, one per architecture;
an ablation (`--ablation NAME...`) is a list of Hyperloop variants compared with the reference row;
`--gpus N` trains N variants at a time, one process per GPU. `--report-only` writes the report
from the stages that finished (e.g. a run copied off a GPU machine without its checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hyperloop.checkpoint import atomic_write_text
from hyperloop.config import ModelConfig, count_params, read_json
from hyperloop.errors import HyperloopError

ARCHS = ("transformer", "mhc", "looped", "hyperloop")
PAPER_S = {  # spec section 5, S scale: PPL bf16, PPL int4
    "transformer": (14.65, 14.85), "mhc": (14.55, 14.73), "looped": (14.85, 15.18), "hyperloop": (14.40, 14.68),
}  # fmt: skip


@dataclass
class Scale:
    """What differs between the CPU smoke test and the GPU reproduction."""

    val_fraction: float  # for a corpus we prepare ourselves
    group_size: int  # GPTQ group: must divide every linear's input size (tiny ffn 352, xs ffn 704)
    calib_seqs: int
    analysis_tokens: int
    eval_max_tokens: int | None
    task_limit: int | None  # examples per zero-shot task (None: all)
    default_steps: int | None  # None: the preset recipe's token budget
    note: str


SCALES = {
    "tiny": Scale(0.05, 32, 32, 4_096, 32_768, 200, 200,
                  "CPU smoke test: tiny models, a few hundred steps on a few MB of text. The numbers only show "
                  "that the pipeline runs end to end; they say nothing about the paper's claims."),
    "xs": Scale(0.005, 64, 64, 2**19, None, 1000, None,
                "d=256 models at the paper's S depth and loop structure (2L -> 4L x3 -> 2L), one GPU."),
}  # fmt: skip


@dataclass
class Variant:
    name: str
    preset: str
    overrides: list[str] = field(default_factory=list)


def main_variants(scale: str, seeds: list[int] | None = None) -> list[Variant]:
    """The four architectures once per seed. Seed 0 (the recipe's) keeps the plain names; another
    seed s runs as `<arch>-seed<s>` with train.seed = s (other initial weights and data order)."""
    return [Variant(arch, f"{arch}-{scale}") if seed == 0 else
            Variant(f"{arch}-seed{seed}", f"{arch}-{scale}", [f"train.seed={seed}"])
            for seed in seeds or [0] for arch in ARCHS]  # fmt: skip


def _arch_and_seed(name: str) -> tuple[str, int]:
    """`hyperloop-seed1` -> ("hyperloop", 1); `mhc` -> ("mhc", 0) (the names main_variants gives)."""
    arch, _, seed = name.partition("-seed")
    return arch, int(seed or 0)


def ablation_variants(name: str, scale: str) -> list[Variant]:
    """The paper's ablations (spec section 5) as variants of the scale's Hyperloop, whose plain run
    (named "hyperloop", shared with the main comparison) is the reference row of every table."""
    from hyperloop.config import get_preset

    hyper, looped = f"hyperloop-{scale}", f"looped-{scale}"
    ref = Variant("hyperloop", hyper)
    cfg = get_preset(hyper)
    unrolled = cfg.middle_layers * cfg.num_loops
    if name == "streams":
        rows = [ref if n == cfg.n_streams else Variant(f"streams-{n}", hyper, [f"model.n_streams={n}"])
                for n in (2, 4, 6, 8)]  # fmt: skip
        return rows + [Variant("hyperloop-seed1", hyper, ["train.seed=1"])]  # the noise between seeds
    if name == "h_res":
        return [Variant(f"h_res-{kind}", hyper, [f"model.h_res={kind}"]) for kind in ("identity", "sinkhorn")] + [ref]
    if name == "placement":  # one HC every s unrolled middle layers; s = middle_layers is the default
        spans = sorted({1, 2, cfg.middle_layers, unrolled})
        return [ref if s == cfg.middle_layers else Variant(f"span-{s}", hyper, [f"model.hc_span={s}"]) for s in spans]
    if name == "structure":  # the same unrolled middle depth cut into other loop structures
        shapes = [(cfg.middle_layers, cfg.num_loops)]
        shapes += [(m, unrolled // m) for m in (3, 2) if unrolled % m == 0 and m != cfg.middle_layers]
        rows = []
        for m, k in shapes:
            sets = [] if (m, k) == shapes[0] else [f"model.middle_layers={m}", f"model.num_loops={k}"]
            tag = "" if not sets else f"-{m}x{k}"
            rows += [Variant(f"hyperloop{tag}", hyper, sets), Variant(f"looped{tag}", looped, sets)]
        return rows
    if name == "init":  # H_res = r, H_post = 1 - r at init: a loop maps s to s + (1 - r) delta (spec 2d: about s + delta)
        rows = [ref if r == cfg.hc_res_init else Variant(f"init-{r:g}", hyper, [f"model.hc_res_init={r}"])
                for r in (0.1, cfg.hc_res_init, 0.9)]  # fmt: skip
        rows += [Variant("init-own", hyper, ["model.hc_pre_init=own"])]  # each loop reads its own stream
        # what an init change has to beat (no hyper-connections), and how far the seed (initial weights and
        # data order) alone moves the reference
        return [Variant("looped", looped), *rows, Variant("hyperloop-seed1", hyper, ["train.seed=1"])]
    if name == "lora":
        return [Variant("looped", looped)] + [Variant(f"lora-{r}", looped, [f"model.lora_rank={r}"])
                                              for r in (8, 32)] + [ref]  # fmt: skip
    raise HyperloopError(f"unknown ablation '{name}' (known: {', '.join(ABLATIONS)})")


ABLATIONS = ("streams", "h_res", "placement", "structure", "lora", "init")
# The paper's S-scale PPL for the rows it reports (spec section 5).
PAPER_ABLATION_PPL = {
    "streams-2": 14.43, "hyperloop": 14.40, "streams-6": 14.38, "streams-8": 14.39, "span-1": 14.45,
    "span-12": 14.63, "h_res-identity": 14.61, "h_res-sinkhorn": 14.59, "lora-32": 14.77, "looped": 14.85,
}  # fmt: skip


# ------------------------------------------------------------------------------------ stages
def _stage_data(out: Path, data: str | None, scale: Scale) -> Path:
    """A prepared folder as given, or prepare a corpus (default: the bundled demo) into OUT/data."""
    from hyperloop.data import demo_corpus_path, demo_tokenizer_path
    from hyperloop.data.prepare import prepare

    if data is not None and (Path(data) / "meta.json").is_file():
        return Path(data)
    target = out / "data"
    if (target / "meta.json").is_file():
        return target
    source = str(data) if data is not None else str(demo_corpus_path())
    prepare([source], str(demo_tokenizer_path()), str(target), val_fraction=scale.val_fraction)
    return target


def _finished(path: Path) -> dict[str, Any] | None:
    """A stage's saved output, or None while the stage has not finished (each stage is skipped on
    a rerun, and --report-only reports, when its file exists)."""
    return json.loads(path.read_text()) if path.is_file() else None


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]


def _final_val_loss(run: Path) -> float | None:
    rows = _metrics(run)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return vals[-1] if vals else None


def _train_one(variant: Variant, overrides: list[str], data: Path, run: Path) -> dict[str, Any]:
    from hyperloop.train.loop import resolve_config, train

    config = resolve_config(variant.preset, None, [*variant.overrides, *overrides])
    return train(config, str(data), str(run))


def _run_complete(run: Path) -> bool:
    """Whether the run folder holds a checkpoint at the last step of its schedule."""
    from hyperloop.train.recipe import TrainConfig, token_budget, total_steps

    if not (run / "latest").is_file():
        return False
    saved = read_json(run / "config.json")
    tcfg = TrainConfig.from_dict(saved["train"])
    steps = total_steps(tcfg, token_budget(tcfg, ModelConfig.from_dict(saved["model"]), saved.get("preset")))
    return int((run / "latest").read_text().strip().removeprefix("step-")) >= steps


def train_command(variant: Variant, overrides: list[str], data: Path, run: Path) -> list[str]:
    """The `hyperloop train` process that trains one variant (--gpus N runs N of them at a time)."""
    sets = [*variant.overrides, *overrides]
    return [sys.executable, "-m", "hyperloop", "train", "--preset", variant.preset, "--data", str(data),
            "--out", str(run), *(["--set", *sets] if sets else [])]  # fmt: skip


def _train_parallel(variants: list[Variant], overrides: list[str], data: Path, out: Path, gpus: int) -> bool:
    """Train the variants `gpus` at a time, each a `hyperloop train` process on its own GPU (on a
    CPU machine the processes share the cores). Logs go to OUT/logs/<name>.log. SIGTERM/SIGINT are
    passed on to the running trainings (they checkpoint and exit) and no new one starts. Returns
    False when stopped before every run was complete."""
    import os
    import signal
    import subprocess
    import time

    from hyperloop.config import get_preset

    todo = [v for v in variants if not _run_complete(out / "runs" / v.name)]
    # mHC's hyper-connections around every sub-layer make it the slowest to train by far: start it
    # first, so that it does not run alone on one GPU at the end while the others idle.
    todo.sort(key=lambda v: get_preset(v.preset).hc_placement != "sublayer")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[subprocess.Popen, Variant, Any]] = {}  # GPU slot -> (process, variant, log file)
    stop = {"requested": False}

    def on_signal(signum, frame) -> None:
        stop["requested"] = True
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = max(1, (os.cpu_count() or 1) // gpus)
    try:
        while (todo and not stop["requested"]) or running:
            for slot in range(gpus):
                if slot in running or not todo or stop["requested"]:
                    continue
                variant = todo.pop(0)
                cmd = train_command(variant, overrides, data, out / "runs" / variant.name)
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slot), "OMP_NUM_THREADS": str(threads)}
                log = (out / "logs" / f"{variant.name}.log").open("a")
                running[slot] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), variant, log)
                print(f"[gpu {slot}] training {variant.name} (log: {log.name})", flush=True)
            time.sleep(0.5)
            for slot, (proc, variant, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                log.close()
                if proc.returncode != 0 and not stop["requested"]:
                    on_signal(None, None)  # one failure stops the others cleanly (they checkpoint)
                    raise HyperloopError(f"training {variant.name} failed (exit {proc.returncode}); "
                                         f"see {out / 'logs' / (variant.name + '.log')}")  # fmt: skip
                print(f"[gpu {slot}] {variant.name} {'stopped' if stop['requested'] else 'done'}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return all(_run_complete(out / "runs" / v.name) for v in variants)


def _stage_sweep(out: Path, scale_name: str, lrs: list[float], tokens: int, data: Path, overrides: list[str]) -> float:
    """Train the Transformer briefly at each peak LR; the lowest final validation loss wins."""
    results_file = out / "sweep.json"
    if (done := _finished(results_file)) is not None:
        return done["best_lr"]
    rows = []
    for lr in lrs:
        run = out / "sweep" / f"lr-{lr:g}"
        sets = [*overrides, f"train.lr={lr}", f"train.min_lr={lr / 10}", f"train.train_tokens={tokens}"]
        if _train_one(Variant("transformer", f"transformer-{scale_name}"), sets, data, run).get("stopped"):
            raise _Stopped
        rows.append({"lr": lr, "val_loss": _final_val_loss(run)})
    best = min(rows, key=lambda r: r["val_loss"])["lr"]
    atomic_write_text(results_file, json.dumps({"tokens": tokens, "rows": rows, "best_lr": best}, indent=2))
    return best


class _Stopped(Exception):
    """A training stage was stopped by SIGTERM/SIGINT (checkpoint written): stop, rerun to resume."""


def _run_metrics(run: Path) -> dict[str, Any]:
    rows = _metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    speeds = [r["tok_s"] for r in train_rows[1:]] or [r["tok_s"] for r in train_rows]  # skip compile warm-up
    return {
        "curve": [(r["tokens"], r["loss"]) for r in train_rows],
        "val_curve": [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r],
        "train_tok_s": sum(speeds) / len(speeds) if speeds else None,
        "train_tokens": train_rows[-1]["tokens"] if train_rows else 0,
    }


def _stage_eval(out: Path, name: str, ckpt: Path, data: Path, eval_data: list[str], tasks_dir: str | None,
                scale: Scale, device: str | None) -> dict[str, Any]:  # fmt: skip
    from hyperloop.eval.runner import evaluate

    target = out / "eval" / f"{name}.json"
    if (done := _finished(target)) is not None:
        return done
    result = evaluate(ckpt, data, tasks="all" if tasks_dir else "none", tasks_dir=tasks_dir, use_hub=False,
                      limit=scale.task_limit, max_tokens=scale.eval_max_tokens, device=device)  # fmt: skip
    result["eval_data"] = {
        extra: evaluate(ckpt, extra, tasks="none", max_tokens=scale.eval_max_tokens, device=device)["ppl"]
        for extra in eval_data
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(result, indent=2))
    return result


def _stage_int4(out: Path, name: str, ckpt: Path, data: Path, scale: Scale, device: str | None) -> dict[str, Any]:
    from hyperloop.eval.runner import evaluate
    from hyperloop.quant.convert import quantize_checkpoint

    target = out / "eval" / f"{name}-int4.json"
    if (done := _finished(target)) is not None:
        return done
    qdir = out / "quant" / name
    summary = quantize_checkpoint(ckpt, qdir, method="gptq", bits=4, group_size=scale.group_size,
                                  calib_data=data, calib_seqs=scale.calib_seqs, loop_hessian="all",
                                  device=device, overwrite=True)  # fmt: skip
    result = evaluate(qdir, data, tasks="none", max_tokens=scale.eval_max_tokens, device=device)
    result["quantize"] = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    atomic_write_text(target, json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------ driver
def reproduce(
    scale: str,
    out: str,
    *,
    data: str | None = None,
    eval_data: list[str] | None = None,
    tasks_dir: str | None = None,
    steps: int | None = None,
    lr_sweep: list[float] | None = None,
    sweep_tokens: int | None = None,
    overrides: list[str] | None = None,
    ablations: list[str] | None = None,
    gpus: int = 1,
    eval_tokens: int | None = None,
    analysis_tokens: int | None = None,
    calib_seqs: int | None = None,
    device: str | None = None,
    report_only: bool = False,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """The main comparison (four architectures, once per seed in `seeds`), or with `ablations` some
    of the paper's ablation tables (Hyperloop variants; perplexity only, written to ablations.md /
    ablations.json). gpus > 1 trains that many variants at a time, one process per GPU."""
    if scale not in SCALES:
        raise HyperloopError(f"unknown scale '{scale}' (known: {', '.join(SCALES)})")
    spec = dataclasses.replace(SCALES[scale], eval_max_tokens=eval_tokens or SCALES[scale].eval_max_tokens,
                               analysis_tokens=analysis_tokens or SCALES[scale].analysis_tokens,
                               calib_seqs=calib_seqs or SCALES[scale].calib_seqs)
    if seeds is not None and (ablations or not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise HyperloopError("--seeds takes distinct seeds >= 0, for the main comparison (not --ablation)")
    if ablations and "all" in ablations:
        ablations = list(ABLATIONS)
    if ablations:  # the union of the tables' variants: the shared reference rows are trained once
        tables = {name: ablation_variants(name, scale) for name in ablations}
        variants = list({v.name: v for rows in tables.values() for v in rows}.values())
    else:
        variants = main_variants(scale, seeds)
    if gpus < 1:
        raise HyperloopError(f"--gpus must be >= 1, got {gpus}")
    if data is not None and not data.startswith("hf:") and not Path(data).exists():
        raise HyperloopError(f"--data {data} does not exist: pass prepared shards or a corpus to prepare")
    out_dir = Path(out)
    if report_only:
        if ablations:
            raise HyperloopError("--report-only writes the main comparison's report, not the ablation tables")
        return _report_finished(out_dir, scale, spec, variants)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = list(overrides or [])
    data_dir = _stage_data(out_dir, data, spec)
    steps = steps if steps is not None else spec.default_steps
    if steps is not None:  # a shorter run with a complete schedule (warmup + cosine), not a cut one
        from hyperloop.train.recipe import default_train_config

        recipe = default_train_config(variants[0].preset)
        sets.append(f"train.train_tokens={steps * recipe.global_batch * recipe.seq_len}")
        sets.append(f"train.warmup_steps={max(1, min(recipe.warmup_steps, steps // 10))}")
    try:
        best_lr = None
        if lr_sweep:
            best_lr = _stage_sweep(out_dir, scale, lr_sweep, sweep_tokens or 20 * 2**20, data_dir, sets)
            sets += [f"train.lr={best_lr}", f"train.min_lr={best_lr / 10}"]
        if gpus > 1 and not _train_parallel(variants, sets, data_dir, out_dir, gpus):
            raise _Stopped
        results: dict[str, dict[str, Any]] = {}
        for variant in variants:
            run = out_dir / "runs" / variant.name
            if _run_complete(run):
                print(f"{variant.name}: training complete, skipped", file=sys.stderr)
            elif _train_one(variant, sets, data_dir, run).get("stopped"):
                raise _Stopped
            results[variant.name] = {"run": run, "variant": variant}
    except _Stopped:
        print("stopped by signal after writing a checkpoint; rerun the same command to resume", file=sys.stderr)
        return {"stopped": True}
    for name, res in results.items():
        res["eval"] = _stage_eval(out_dir, name, res["run"], data_dir, eval_data or [],
                                  None if ablations else tasks_dir, spec, device)  # fmt: skip
    if ablations:
        for name, rows in tables.items():
            summary = write_ablation_report(out_dir, name, {v.name: results[v.name] for v in rows})
        return summary
    for name, res in results.items():
        res["int4"] = _stage_int4(out_dir, name, res["run"], data_dir, spec, device)
    from hyperloop.analysis.report import analyze

    first = {name: res for name, res in results.items() if _arch_and_seed(name)[1] == (seeds or [0])[0]}
    analysis_result = (_finished(out_dir / "analysis" / "analysis.json") or  # the analyses: the first seed's models
                       analyze([str(r["run"]) for r in first.values()], str(data_dir), str(out_dir / "analysis"),
                               spec.analysis_tokens, labels=list(first), device=device))  # fmt: skip
    return write_report(out_dir, scale, spec, results, best_lr, analysis_result)


def _report_finished(out: Path, scale: str, spec: Scale, variants: list[Variant]) -> dict[str, Any]:
    """The report of whatever finished: trained runs with their metrics, and the eval, int4 and
    analysis JSON that exist; a missing stage shows as '-' and is listed in the report."""
    results = {v.name: {"run": out / "runs" / v.name} for v in variants
               if (out / "runs" / v.name / "metrics.jsonl").is_file()}  # fmt: skip
    if not results:
        raise HyperloopError(f"{out} holds no trained runs (runs/<name>/metrics.jsonl): nothing to report")
    missing = []
    for name, res in results.items():
        for key, suffix in (("eval", ""), ("int4", "-int4")):
            res[key] = _finished(out / "eval" / f"{name}{suffix}.json")
            if res[key] is None:
                missing.append(f"{key} of {name}")
    sweep = _finished(out / "sweep.json")
    best_lr = sweep["best_lr"] if sweep else None
    analysis_result = _finished(out / "analysis" / "analysis.json")
    if analysis_result is None:
        missing.append("analysis")
    return write_report(out, scale, spec, results, best_lr, analysis_result, missing)


# ------------------------------------------------------------------------------------ report
def _environment() -> dict[str, Any]:
    from hyperloop.train.loop import environment

    return environment()


def _plot_losses(path: Path, curves: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    # One colour per architecture, one line style per seed: the seeds of a model read as a band.
    archs = list(dict.fromkeys(_arch_and_seed(name)[0] for name in curves))
    seeds = sorted({_arch_and_seed(name)[1] for name in curves})
    for name, m in curves.items():
        arch, seed = _arch_and_seed(name)
        style = {"color": f"C{archs.index(arch) % 10}", "linestyle": ("-", "--", ":", "-.")[seeds.index(seed) % 4]}
        tokens, loss = zip(*m["curve"]) if m["curve"] else ((), ())
        ax.plot([t / 1e6 for t in tokens], loss, label=f"{name} (train)", linewidth=1.0, alpha=0.7, **style)
        if m["val_curve"]:
            vt, vl = zip(*m["val_curve"])
            ax.plot([t / 1e6 for t in vt], vl, marker="o", markersize=3, label=f"{name} (val)", **style)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("Training curves")
    losses = [v for m in curves.values() for _, v in m["curve"]]
    if losses:  # the first steps (~10 nats) would flatten everything after them
        ax.set_ylim(min(losses) - 0.1, min(max(losses), min(losses) + 3.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, scale: str, spec: Scale, results: dict, best_lr, analysis_result,
                 missing: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """`missing`: stages that did not run (their cells are '-'), listed in the report."""
    # The environment each model was trained in (the report may be written elsewhere, and seeds run
    # on different machines); the first run's is the summary's.
    envs = {name: read_json(res["run"] / "config.json").get("env") or _environment() for name, res in results.items()}
    env = next(iter(envs.values()))
    rows = {}
    curves = {}
    for name, res in results.items():
        cfg = ModelConfig.load(res["run"] / "config.json")
        metrics = _run_metrics(res["run"])
        curves[name] = metrics
        ev, q = res["eval"] or {}, res["int4"] or {}
        rows[name] = {
            "params": count_params(cfg)["total"],
            "structure": cfg.structure(),
            "val_ppl": ev.get("ppl"),
            "int4_ppl": q.get("ppl"),
            "tasks": {t: v["score"] for t, v in ev.get("tasks", {}).items()},
            "tasks_avg": ev.get("avg"),
            "train_tok_s": metrics["train_tok_s"],
            "device": envs[name].get("device", "cpu"),
            "commit": envs[name].get("git"),
            "eval_data_ppl": ev.get("eval_data", {}),
        }
    train_tokens = max(c["train_tokens"] for c in curves.values())
    models = _by_architecture(rows)
    summary = {
        "device": env.get("device", "cpu"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": env.get("git"),
        "scale": scale,
        "train_tokens": train_tokens,
        "lr": best_lr,
        "command": "hyperloop " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None,
        "env": env,
        "models": models,
        "runs": rows,
        "missing_stages": missing or [],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    _plot_losses(out / "loss_curves.png", curves)
    atomic_write_text(out / "report.md", _report_markdown(summary, spec, out, analysis_result))
    return summary


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _by_architecture(rows: dict[str, dict]) -> dict[str, dict]:
    """One row per architecture: the mean over its seeds of every figure, and under "seeds" the run
    of each seed (its own row is in the summary's "runs"). With one seed, that run's figures.
    "int4_delta" pairs each run's INT4 with its own bf16 perplexity (a seed without INT4 would skew a
    difference of means); "train_tok_s" averages only the runs on the first run's device."""
    models: dict[str, dict] = {}
    for name in rows:
        arch, seed = _arch_and_seed(name)
        models.setdefault(arch, {"seeds": {}})["seeds"][str(seed)] = name
    device = next(iter(rows.values()))["device"]
    for model in models.values():
        runs = [rows[name] for name in model["seeds"].values()]
        tasks = sorted({t for r in runs for t in r["tasks"]})
        model.update(
            params=runs[0]["params"], structure=runs[0]["structure"],
            **{key: _mean([r[key] for r in runs]) for key in ("val_ppl", "int4_ppl", "tasks_avg")},
            int4_seeds=[s for s, n in model["seeds"].items() if rows[n]["int4_ppl"] is not None],
            int4_delta=_mean([r["int4_ppl"] - r["val_ppl"] for r in runs if r["int4_ppl"] and r["val_ppl"]]),
            train_tok_s=_mean([r["train_tok_s"] for r in runs if r["device"] == device]),
            tasks={t: _mean([r["tasks"].get(t) for r in runs]) for t in tasks},
            val_ppl_range=[min(v), max(v)] if (v := [r["val_ppl"] for r in runs if r["val_ppl"] is not None]) else None,
        )  # fmt: skip
    return models


def _order(rows: dict, key: str) -> str:
    """Model names by `key`, best (lowest) first; models without the figure are left out."""
    ranked = sorted((n for n in rows if rows[n][key] is not None), key=lambda n: rows[n][key])
    return " < ".join(ranked) or "-"


def _orders(models: dict, runs: dict, key: str) -> str:
    """The order of the means over seeds, then each seed's own order, of the seeds where every
    architecture has the figure (a mean over some seeds only would compare unlike sets)."""
    seeds = sorted({seed for m in models.values() for seed in m["seeds"]}, key=int)
    if len(seeds) == 1:
        return _order(models, key)
    complete = [s for s in seeds if all(s in m["seeds"] and runs[m["seeds"][s]][key] is not None for m in models.values())]
    per_seed = "; ".join(f"seed {s}: " + _order({a: runs[m["seeds"][s]] for a, m in models.items()}, key)
                         for s in complete)  # fmt: skip
    mean = f"mean over seeds: {_order(models, key)}" if complete == seeds else "mean: - (not every seed has it)"
    return mean + (f"; {per_seed}" if per_seed else "")


def _per_seed(models: dict, runs: dict, key: str) -> str:
    """A run attribute (device, commit) once if every run shares it, else with the seeds of each."""
    seeds: dict[str, set[str]] = {}
    for m in models.values():
        for seed, name in m["seeds"].items():
            seeds.setdefault(str(runs[name][key]), set()).add(seed)
    if len(seeds) == 1:
        return next(iter(seeds))
    return ", ".join(f"{value} (seed {', '.join(sorted(s, key=int))})" for value, s in seeds.items())


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _report_markdown(summary: dict, spec: Scale, out: Path, analysis_result) -> str:
    rows, runs = summary["models"], summary["runs"]
    seeds = sorted({seed for r in rows.values() for seed in r["seeds"]}, key=int)
    lines = [
        f"# Reproduction of the paper comparison ({summary['scale']})",
        "",
        f"> {spec.note}",
        "",
        f"- device: {_per_seed(rows, runs, 'device')}; date: {summary['date']}; "
        f"commit: {_per_seed(rows, runs, 'commit')}",
        f"- command: `{summary['command']}`",
        f"- training tokens per model: {summary['train_tokens']:,}" + (f"; peak LR {summary['lr']:g} (from the sweep)"
                                                                         if summary["lr"] else ""),
        f"- INT4: loop-aware GPTQ (Hessian summed over all loops), 4 bits, group {spec.group_size}, "
        f"{spec.calib_seqs} calibration sequences",
        "",
    ]
    if len(seeds) > 1:
        lines += [f"- seeds {', '.join(seeds)} (`train.seed`: initial weights and data order); each figure is the "
                  "mean over the seeds that have it (INT4 names its seeds where some lack it; INT4 - bf16 pairs "
                  f"each run with itself), the range is over seeds; train tok/s: runs on {summary['device']}; "
                  "every run is listed below", ""]  # fmt: skip
    lines += ["| model | structure | params | val PPL | INT4 PPL | INT4 - bf16 | tasks avg | train tok/s |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        avg = f"{100 * r['tasks_avg']:.1f}%" if r["tasks_avg"] is not None else "-"
        spread = f" ({r['val_ppl_range'][0]:.2f}-{r['val_ppl_range'][1]:.2f})" if len(r["seeds"]) > 1 else ""
        some = len(r["int4_seeds"]) not in (0, len(r["seeds"]))
        int4_seeds = f" (seed {', '.join(r['int4_seeds'])})" if some else ""
        lines.append(f"| {name} | {r['structure']} | {r['params'] / 1e6:.1f}M | {_fmt(r['val_ppl'])}{spread} | "
                     f"{_fmt(r['int4_ppl'])}{int4_seeds} | {_fmt(r['int4_delta'])} | {avg} | "
                     f"{_fmt(r['train_tok_s'], 0)} |")  # fmt: skip
    if len(seeds) > 1:
        lines += ["", "| run | val PPL | INT4 PPL | tasks avg | train tok/s | device |", "|---|---|---|---|---|---|"]
        for name, r in runs.items():
            avg = f"{100 * r['tasks_avg']:.1f}%" if r["tasks_avg"] is not None else "-"
            lines.append(f"| {name} | {_fmt(r['val_ppl'])} | {_fmt(r['int4_ppl'])} | {avg} | "
                         f"{_fmt(r['train_tok_s'], 0)} | {r['device']} |")  # fmt: skip
    if all(name in PAPER_S for name in rows):
        paper = sorted(PAPER_S, key=lambda n: PAPER_S[n][0])
        lines += ["", f"Order by validation perplexity (best first): {_orders(rows, runs, 'val_ppl')}. "
                  f"The paper's S-scale order: {' < '.join(paper)} "
                  f"({', '.join(f'{n} {PAPER_S[n][0]}' for n in paper)})."]  # fmt: skip
        lines.append(f"Order after INT4: {_orders(rows, runs, 'int4_ppl')}.")
    if summary["missing_stages"]:
        lines += ["", f"**Not run** (shown as '-'): {', '.join(summary['missing_stages'])}."]
    task_names = sorted({t for r in rows.values() for t in r["tasks"]})
    if task_names:
        lines += ["", "| model | " + " | ".join(task_names) + " |", "|---|" + "---|" * len(task_names)]
        for name, r in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(100 * r["tasks"][t], 1) if t in r["tasks"] else "-"
                                                      for t in task_names) + " |")  # fmt: skip
    sweep = out / "sweep.json"
    if sweep.is_file():
        s = json.loads(sweep.read_text())
        lines += ["", f"Peak-LR sweep on the Transformer ({s['tokens']:,} tokens each; final validation loss):", "",
                  "| peak LR | val loss |", "|---|---|"]  # fmt: skip
        lines += [f"| {r['lr']:g} | {_fmt(r['val_loss'], 4)} |" for r in s["rows"]]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    if analysis_result is not None:
        lines += ["## Analyses", "", "See [analysis/summary.md](analysis/summary.md) for the tables.", "",
                  "![logit lens](analysis/logit_lens.png)", ""]  # fmt: skip
        lines += [f"![{name} similarity](analysis/{name}/similarity.png)" for name in runs
                  if (out / "analysis" / name / "similarity.png").is_file()]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_ablation_report(out: Path, name: str, results: dict) -> dict[str, Any]:
    """ablation-<name>.json / .png for this table, then ablations.md / ablations.json over every
    ablation table present in `out` (they share the reference run)."""
    rows = {}
    for variant, res in results.items():
        cfg = ModelConfig.load(res["run"] / "config.json")
        rows[variant] = {"params": count_params(cfg)["total"], "val_ppl": res["eval"]["ppl"], "structure": cfg.structure(),
                         "overrides": res["variant"].overrides, "paper_s_ppl": PAPER_ABLATION_PPL.get(variant)}  # fmt: skip
    tokens = max(_run_metrics(r["run"])["train_tokens"] for r in results.values())
    atomic_write_text(out / f"ablation-{name}.json", json.dumps({"ablation": name, "train_tokens": tokens, "rows": rows}, indent=2))
    _plot_ablation(out / f"ablation-{name}.png", name, rows)
    env = _environment()
    tables = {p.stem.removeprefix("ablation-"): json.loads(p.read_text()) for p in sorted(out.glob("ablation-*.json"))}
    summary = {
        "device": env.get("device", "cpu"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": env.get("git"), "train_tokens": tokens,
        "ablations": {t: {v: {"params": r["params"], "val_ppl": r["val_ppl"]} for v, r in table["rows"].items()}
                      for t, table in tables.items()},
    }  # fmt: skip
    atomic_write_text(out / "ablations.json", json.dumps(summary, indent=2))
    lines = ["# Ablations", "", f"- device: {summary['device']}; date: {summary['date']}; commit: {summary['commit']}",
             f"- training tokens per model: {tokens:,}; the reference row is the plain Hyperloop run (`hyperloop`)",
             "- paper column: the paper's S-scale perplexity for the rows it reports (other scale and data: compare the order)"]  # fmt: skip
    for table_name, table in tables.items():
        lines += ["", f"## {table_name}", "", f"![{table_name}](ablation-{table_name}.png)", "",
                  "| variant | structure | params | val PPL | paper (S) |", "|---|---|---|---|---|"]  # fmt: skip
        for variant, r in table["rows"].items():
            lines.append(f"| {variant} | {r['structure']} | {r['params'] / 1e6:.2f}M | {r['val_ppl']:.2f} | "
                         f"{_fmt(r['paper_s_ppl'])} |")  # fmt: skip
    atomic_write_text(out / "ablations.md", "\n".join(lines) + "\n")
    return summary


def _plot_ablation(path: Path, name: str, rows: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2), dpi=110)
    names = list(rows)
    ppl = [rows[n]["val_ppl"] for n in names]
    bars = ax.barh(names, ppl, color=["tab:red" if n == "hyperloop" else "tab:blue" for n in names])
    ax.bar_label(bars, labels=[f"{p:.2f}" for p in ppl], padding=3, fontsize=8)
    ax.set_xlim(min(ppl) * 0.97, max(ppl) * 1.03)
    ax.invert_yaxis()
    ax.set_xlabel("validation perplexity")
    ax.set_title(f"Ablation: {name} (red: reference)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reproduce_from_cli(args) -> None:
    summary = reproduce(
        args.scale, args.out, data=args.data, eval_data=args.eval_data, tasks_dir=args.tasks_dir, steps=args.steps,
        lr_sweep=args.lr_sweep, sweep_tokens=args.sweep_tokens, overrides=args.overrides, ablations=args.ablation,
        gpus=args.gpus, seeds=args.seeds, eval_tokens=args.eval_tokens, analysis_tokens=args.analysis_tokens,
        calib_seqs=args.calib_seqs, device=args.device, report_only=args.report_only,
    )  # fmt: skip
    if summary.get("stopped"):
        return
    print(Path(args.out, "ablations.md" if args.ablation else "report.md").read_text())
