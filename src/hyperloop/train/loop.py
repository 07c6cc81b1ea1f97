"""`hyperloop train`: the training loop, readable top to bottom.

get batch -> forward -> backward (x micro-steps) -> clip -> step -> log / evaluate / checkpoint.

The run folder holds config.json (exactly what resumes the run), metrics.jsonl, TensorBoard
events and checkpoints/. Running the same command again continues from RUN/latest. SIGTERM and
SIGINT finish the current step, write a checkpoint and exit 0.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hyperloop import __version__
from hyperloop.config import ModelConfig, flops_per_token, get_preset, read_json
from hyperloop.data.loader import EvalWindows, TokenData, TrainLoader
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM
from hyperloop.train import distributed
from hyperloop.train.checkpoint import (
    load_training_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from hyperloop.train.recipe import (
    TrainConfig,
    default_train_config,
    lr_at,
    param_groups,
    token_budget,
    total_steps,
)

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


# ------------------------------------------------------------------------------ configuration
def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`model.n_streams=2 train.lr=3e-4` -> {"model": {...}, "train": {...}}; values parsed as JSON
    when they parse (numbers, true/false/null), else kept as strings. A bare key goes to whichever
    of the two configs has it."""
    model_keys = set(ModelConfig.__dataclass_fields__)
    train_keys = set(TrainConfig.__dataclass_fields__)
    out: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise HyperloopError(f"--set expects key=value, got '{item}'")
        section, _, name = key.rpartition(".")
        if not section:
            section = "model" if name in model_keys else "train" if name in train_keys else ""
        known = model_keys if section == "model" else train_keys if section == "train" else set()
        if name not in known:
            raise HyperloopError(f"unknown --set key '{key}' (use model.<field> or train.<field>; see --help)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[section][name] = value
    return out


def resolve_config(preset: str | None, config_file: str | None, overrides: list[str]) -> dict[str, Any]:
    """The full run config {"preset", "model", "train"} from a preset or a JSON file plus --set."""
    sets = parse_overrides(overrides)
    if config_file:
        data = read_json(config_file)
        preset = data.get("preset")
        model_dict = data.get("model", data if "train" not in data else {})
        train_dict = {**default_train_config(preset).to_dict(), **data.get("train", {})}
    else:
        model_dict = get_preset(preset).to_dict()
        train_dict = default_train_config(preset).to_dict()
    model = ModelConfig.from_dict({**model_dict, **sets["model"]})
    train = TrainConfig.from_dict({**train_dict, **sets["train"]})
    return {"preset": preset, "model": model.to_dict(), "train": train.to_dict()}


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    env = {"hyperloop": __version__, "git": _git_sha(), "torch": torch.__version__, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name())
    return env


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------ the loop
class _StopFlag:
    """Set by SIGTERM / SIGINT while training; the loop checks it between steps. Used as a context
    manager so the previous handlers come back when training ends (e.g. inside `reproduce`)."""

    def __enter__(self) -> _StopFlag:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True


@contextmanager
def eager_no_grad():
    """no_grad with every compiled function run eagerly. On CUDA (torch 2.11) the inference graphs
    that mHC's compiled blocks get on their first no_grad call give wrong logits, while their training
    graphs are right (tests/test_gpu.py); validation is a small share of a run, so it runs eagerly."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        yield


def evaluate(model, data: TokenData, train: TrainConfig, device, autocast) -> float:
    """Mean validation cross-entropy over the first eval_tokens predicted tokens."""
    windows = EvalWindows(data, train.seq_len, train.micro_batch, split="validation", max_tokens=train.eval_tokens)
    total = torch.zeros((), device=device, dtype=torch.float64)
    model.eval()
    with eager_no_grad():
        for x, y in windows:
            with autocast:
                total += model(x.to(device), y.to(device)).double() * y.numel()
    model.train()
    return (total / windows.num_predicted_tokens).item()


def train(run_config: dict[str, Any], data_dir: str, out: str, max_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by `run_config` into the folder `out`; returns a summary."""
    info = distributed.init_distributed()
    try:
        return _train(run_config, data_dir, Path(out), max_steps, info)
    finally:
        distributed.shutdown()


def _prepare_run_folder(run: Path, run_config: dict[str, Any], info: distributed.DistInfo) -> None:
    """Create the run folder, or check that an existing one is this run (so resuming is safe)."""
    saved_file = run / "config.json"
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())
        for key in ("model", "train"):
            if saved.get(key) != run_config[key]:
                diff = sorted(k for k in run_config[key] if saved.get(key, {}).get(k) != run_config[key][k])
                raise HyperloopError(
                    f"{run} already holds a run with a different {key} config ({', '.join(diff)}); "
                    "rerun with the same flags to resume, or use a new --out"
                )
    elif info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps({**run_config, "env": environment()}, indent=2) + "\n")


def _train(run_config, data_dir, run: Path, max_steps, info) -> dict[str, Any]:
    mcfg = ModelConfig.from_dict(run_config["model"])
    tcfg = TrainConfig.from_dict(run_config["train"])
    data = TokenData(data_dir)
    data.check_vocab(mcfg.vocab_size)
    per_step = tcfg.micro_batch * info.world_size
    if tcfg.global_batch % per_step:
        raise HyperloopError(
            f"global_batch {tcfg.global_batch} is not a multiple of micro_batch x ranks = {per_step}; "
            "change train.global_batch or train.micro_batch"
        )
    if tcfg.seq_len > mcfg.max_seq_len:
        raise HyperloopError(f"train.seq_len {tcfg.seq_len} exceeds model.max_seq_len {mcfg.max_seq_len}")
    accum = tcfg.global_batch // per_step
    tokens_per_step = tcfg.global_batch * tcfg.seq_len
    steps = total_steps(tcfg, token_budget(tcfg, mcfg, run_config.get("preset")))
    stop_at = min(steps, max_steps) if max_steps is not None else steps

    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    use_bf16 = tcfg.dtype == "bf16" or (tcfg.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    compile_on = tcfg.compile == "on" or (tcfg.compile == "auto" and device.type == "cuda")

    _prepare_run_folder(run, run_config, info)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = HyperloopLM(mcfg).to(device)
    # Wrap before building the optimizer: FSDP2 replaces the parameters by sharded ones.
    if compile_on:
        distributed.compile_blocks(model)
    wrapped = distributed.wrap(model, info, tcfg.parallel)
    optimizer = torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
        fused=device.type == "cuda",
    )  # fmt: skip
    loader = TrainLoader(data, tcfg.seq_len, tcfg.micro_batch, tcfg.seed, info.rank, info.world_size)

    step, nonfinite = 0, 0
    resumed = load_training_checkpoint(run)
    if resumed is not None:
        model_sd, state = resumed
        distributed.load_full_state(model, optimizer, model_sd, state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, nonfinite = state["step"], state["nonfinite"]

    log = _Logger(run, info, step) if info.is_main else None
    if log and resumed is None:
        log.text(f"config: {json.dumps(run_config)}\nenv: {json.dumps(environment())}")
    flops = flops_per_token(mcfg, tcfg.seq_len)
    peak = peak_flops(device)
    meta = {"preset": run_config.get("preset"), "data": data.meta.get("tokenizer")}

    def save(step: int) -> None:
        model_sd, optim_sd = distributed.full_state(model, optimizer)  # collective under FSDP
        if info.is_main:
            state = {"optimizer": optim_sd, "loader": loader.state_dict(), "rng": rng_state(),
                     "step": step, "nonfinite": nonfinite}  # fmt: skip
            save_training_checkpoint(run, step, model, model_sd, state, {**meta, "tokens": step * tokens_per_step},
                                     data.path / "tokenizer", tcfg.keep_checkpoints)  # fmt: skip

    if step >= stop_at:
        if log:
            log.text(f"nothing to do: the run is at step {step} of {stop_at}")
        return {"step": step, "steps": steps, "run": str(run)}

    with _StopFlag() as stop, tqdm(total=stop_at, initial=step, desc=run.name, unit="step",
                                   disable=not info.is_main, dynamic_ncols=True) as bar:
        model.train()
        t_last, step_last = time.perf_counter(), step
        stopped_by_signal = False
        while step < stop_at:
            lr = lr_at(step, tcfg, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with distributed.no_sync(wrapped, sync=micro == accum - 1), autocast:
                    loss = wrapped(x, y)
                    (loss / accum).backward()
                loss_sum += loss.detach()
            loss_avg = distributed.mean_over_ranks(loss_sum / accum, info)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            if torch.isfinite(loss_avg) and torch.isfinite(grad_norm):
                optimizer.step()
            else:  # skip the update, keep the data position (the batch is consumed)
                nonfinite += 1
                if log:
                    log.text(f"step {step + 1}: non-finite loss/grad ({loss_avg.item()}, {grad_norm.item()}), update skipped")
                if nonfinite > tcfg.max_nonfinite:
                    raise HyperloopError(
                        f"{nonfinite} non-finite steps (train.max_nonfinite={tcfg.max_nonfinite}); "
                        "lower train.lr or check the data; the last good checkpoint is in RUN/checkpoints"
                    )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % tcfg.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                tok_s = (step - step_last) * tokens_per_step / (now - t_last)
                t_last, step_last = now, step
                row = {"step": step, "tokens": step * tokens_per_step, "loss": loss_avg.item(), "lr": lr,
                       "grad_norm": grad_norm.item(), "tok_s": tok_s}  # fmt: skip
                if peak:
                    row["mfu"] = tok_s * flops / (peak * info.world_size)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if log:
                    log.metrics(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
            if step % tcfg.eval_every == 0 or step == steps:
                val = evaluate(wrapped, data, tcfg, device, autocast)
                if log:
                    log.metrics({"step": step, "tokens": step * tokens_per_step, "val_loss": val, "val_ppl": math.exp(val)})
            if distributed.any_rank(stop.requested, info, device):
                stopped_by_signal = True
                break
            if step % tcfg.ckpt_every == 0 and step < stop_at:
                save(step)
    save(step)
    if log:
        log.text(f"{'stopped by signal' if stopped_by_signal else 'finished'} at step {step}/{steps}; "
                 f"checkpoint {run / 'checkpoints' / f'step-{step}'}")  # fmt: skip
        log.close()
    return {"step": step, "steps": steps, "run": str(run), "stopped": stopped_by_signal}


class _Logger:
    """metrics.jsonl + TensorBoard + a text log, on rank 0 only. On resume, rows past the
    checkpoint's step (logged by the interrupted process after its last checkpoint) are dropped,
    so metrics.jsonl reads as one uninterrupted run."""

    def __init__(self, run: Path, info, resume_step: int):
        self.file = run / "metrics.jsonl"
        if self.file.exists():
            rows = [r for r in self.file.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if json.loads(r).get("step", 0) <= resume_step]
            self.file.write_text("".join(r + "\n" for r in kept))
        self.handle = self.file.open("a")
        self.log = (run / "train.log").open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)

    def metrics(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        for key, value in row.items():
            if key not in ("step", "tokens"):
                self.tb.add_scalar(key, value, row["step"])

    def text(self, message: str) -> None:
        tqdm.write(message)
        self.log.write(message + "\n")
        self.log.flush()

    def close(self) -> None:
        self.handle.close()
        self.log.close()
        self.tb.close()


def train_from_cli(args) -> None:
    run_config = resolve_config(args.preset, args.config, args.overrides)
    summary = train(run_config, args.data, args.out, args.max_steps)
    print(json.dumps(summary))


def main() -> None:
    """`python -m hyperloop.train ...` (for torchrun) takes the same flags as `hyperloop train`."""
    from hyperloop.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
