"""Training: recipe pieces, exact resume after SIGTERM and kill -9, 2-process DDP/FSDP2 against one
process, non-finite steps, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hyperloop.config import count_params, get_preset
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM
from hyperloop.train.loop import parse_overrides, resolve_config
from hyperloop.train.recipe import TrainConfig, decayed_names, lr_at, token_budget, total_steps

# A very small Hyperloop on the Llama-2 vocabulary: a step takes tens of milliseconds on a CPU.
SMALL = [
    "model.dim=32", "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=32", "train.global_batch=8",
    "train.micro_batch=4", "train.warmup_steps=5", "train.train_tokens=10240", "train.log_every=1",
    "train.eval_every=1000", "train.eval_tokens=256",
]  # fmt: skip


def run_train(data: Path, out: Path, *extra: str, launcher: list[str] | None = None, wait: bool = True):
    cmd = (launcher or [sys.executable, "-m", "hyperloop.train"]) + [
        "--preset", "hyperloop-tiny", "--data", str(data), "--out", str(out), "--set", *SMALL, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(demo_data, tmp_path_factory) -> Path:
    """An uninterrupted 40-step run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run_train(demo_data, out)
    assert result.returncode == 0, result.stderr
    return out


# ------------------------------------------------------------------------------ recipe
def test_lr_schedule_boundaries():
    cfg = TrainConfig(lr=4e-4, min_lr=4e-5, warmup_steps=100)
    steps = 1000
    assert lr_at(0, cfg, steps) == pytest.approx(4e-6)
    assert lr_at(99, cfg, steps) == pytest.approx(4e-4)  # end of warmup: peak
    assert lr_at(100, cfg, steps) == pytest.approx(4e-4)  # cosine starts at the peak
    assert lr_at(550, cfg, steps) == pytest.approx(4e-5 + 0.5 * (4e-4 - 4e-5))  # half way: the mean
    assert lr_at(1000, cfg, steps) == pytest.approx(4e-5)
    after = [lr_at(s, cfg, steps) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_token_budget_is_50_tokens_per_transformer_param():
    cfg = TrainConfig()
    tokens = token_budget(cfg, get_preset("hyperloop-s"), "hyperloop-s")
    assert tokens == int(50 * count_params(get_preset("transformer-s"))["total"])  # ~11.9B, paper: 12.5B
    assert total_steps(cfg, tokens) == math.ceil(tokens / (256 * 2048))
    assert token_budget(TrainConfig(train_tokens=1000), get_preset("hyperloop-s"), "hyperloop-s") == 1000


def test_weight_decay_groups():
    """Decay the projection matrices only (ARCHITECTURE.md, 'Weight decay')."""
    model = HyperloopLM(get_preset("hyperloop-tiny").replace(lora_rank=2))
    decayed = set(decayed_names(model))
    for name, _ in model.named_parameters():
        projection = name.endswith(("wqkv.weight", "wo.weight", "w_gate_up.weight", "w_down.weight", ".A", ".B"))
        assert (name in decayed) == (projection or name == "lm_head.weight"), name


def test_overrides_parse_and_reject_unknown_keys():
    sets = parse_overrides(["model.n_streams=2", "lr=3e-4", "train.compile=off", "hc_span=null"])
    assert sets == {"model": {"n_streams": 2, "hc_span": None}, "train": {"lr": 3e-4, "compile": "off"}}
    with pytest.raises(HyperloopError, match="unknown --set key 'train.lrr'"):
        parse_overrides(["train.lrr=1"])
    cfg = resolve_config("hyperloop-tiny", None, ["model.n_streams=2"])
    assert cfg["model"]["n_streams"] == 2 and cfg["train"]["seq_len"] == 128  # the tiny recipe


# ------------------------------------------------------------------------------ exact resume
def test_resume_after_sigterm_equals_uninterrupted(demo_data, tmp_path, reference_run):
    out = tmp_path / "run"
    proc = run_train(demo_data, out, wait=False)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    stopped_at = int((out / "latest").read_text().strip().split("-")[1])
    assert 5 <= stopped_at < 40, "the run should have been interrupted"
    result = run_train(demo_data, out)
    assert result.returncode == 0, result.stderr
    assert losses(out) == losses(reference_run)


def test_resume_after_kill9_equals_uninterrupted(demo_data, tmp_path, reference_run):
    out = tmp_path / "run"
    proc = run_train(demo_data, out, "train.ckpt_every=10", wait=False)
    while proc.poll() is None and not (out / "latest").exists():
        time.sleep(0.002)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (out / "latest").read_text().strip() == "step-10"
    result = run_train(demo_data, out, "train.ckpt_every=10")
    assert result.returncode == 0, result.stderr
    assert losses(out) == losses(reference_run)  # rows logged after step 10 by the killed run are gone


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_equals_one_process_and_resumes_on_one(demo_data, tmp_path, reference_run, parallel):
    """Global batch 8: one process runs 2 micro-batches of 4 per step, two processes 1 each. The
    2-process checkpoint of step 20 then resumes in one process (N ranks -> M ranks)."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29500 + os.getpid() % 1000 + (parallel == "fsdp")), "-m", "hyperloop.train"]  # fmt: skip
    result = run_train(demo_data, out, f"train.parallel={parallel}", "--max-steps", "20", launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "latest").read_text().strip() == "step-20"
    result = run_train(demo_data, out, f"train.parallel={parallel}")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = losses(out), losses(reference_run)
    assert ours.keys() == ref.keys()
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], abs=1e-5), step


def test_fsdp2_sharded_mhc_matches_the_plain_model(monkeypatch):
    """mHC calls each block once per sub-layer (`branch=`), through forward: FSDP2's all-gather hooks
    fire for both calls, and the sharded model (one gloo rank) gives the plain model's loss and
    gradients."""
    import torch.distributed as dist

    from hyperloop.train.distributed import DistInfo, wrap

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(28400 + os.getpid() % 500))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = get_preset("mhc-xs").replace(vocab_size=256, max_seq_len=32, dim=64, n_heads=2, ffn_dim=96)
        plain, sharded = HyperloopLM(cfg), HyperloopLM(cfg)
        sharded.load_state_dict(plain.state_dict())
        wrap(sharded, DistInfo(rank=0, world_size=2), "fsdp")  # world_size > 1 turns wrapping on; the group has 1 rank
        x = torch.randint(0, cfg.vocab_size, (2, 32))
        losses = []
        for model in (plain, sharded):
            losses.append(model(x, torch.roll(x, -1, dims=1)))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0])
        for (name, p), q in zip(plain.named_parameters(), sharded.parameters(), strict=True):
            g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            torch.testing.assert_close(g, p.grad, msg=name)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ failures
def test_nonfinite_steps_are_skipped_then_stop(demo_data, tmp_path):
    result = run_train(demo_data, tmp_path / "run", "train.lr=1e30", "train.min_lr=1e30", "train.max_nonfinite=2")
    assert result.returncode == 2
    assert "non-finite steps" in result.stderr.strip().splitlines()[-1]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("update skipped") == 3


def test_bad_input_one_line_errors(demo_data, tmp_path):
    cases = [
        (["--set", "train.nope=1"], "unknown --set key"),
        (["--set", "model.vocab_size=1000"], "32000-token"),  # data tokenized for a bigger vocabulary
    ]
    for extra, message in cases:
        result = run_train(demo_data, tmp_path / "bad", *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = run_train(tmp_path / "missing", tmp_path / "bad2")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_corrupt_checkpoint_is_reported_and_left_alone(demo_data, tmp_path):
    out = tmp_path / "run"
    assert run_train(demo_data, out, "--max-steps", "3").returncode == 0
    weights = out / "checkpoints" / "step-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    before = weights.read_bytes()
    result = run_train(demo_data, out)
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert weights.read_bytes() == before and (out / "latest").read_text().strip() == "step-3"


def test_checkpoint_loads_for_inference(demo_data, reference_run):
    from hyperloop.checkpoint import load_model

    loaded = load_model(reference_run)
    assert loaded.meta["step"] == 40 and loaded.tokenizer().vocab_size == 32000
    x = torch.randint(0, 32000, (1, 8))
    assert loaded.model(x).shape == (1, 8, 32000)


def test_bench_train_rows_and_profile(tmp_path):
    """`hyperloop bench train` times full optimizer steps; --profile writes the operator table."""
    from hyperloop.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "hyperloop-tiny", "--micro-batch", "2", "--seq-len", "64", "--steps", "2",
                 "--no-compile", "--profile", str(tmp_path / "prof"), "--json", str(out)]) == 0  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "hyperloop-tiny" and row["tok_s"] > 0 and row["micro_batch"] == 2
    table = (tmp_path / "prof" / "hyperloop-tiny.txt").read_text()
    assert "optimizer steps: 2 repeats" in table and "aten::" in table


def test_bench_train_set_changes_the_model(tmp_path):
    """`--set model.KEY=VALUE` builds our presets with the change (and labels the row); train keys or
    decode benchmarks are refused."""
    from hyperloop.cli import main
    from hyperloop.errors import HyperloopError
    from hyperloop.train.bench import build

    model, _, _ = build("hyperloop-tiny", ["model.hc_bf16_streams=true"])
    assert model.cfg.hc_bf16_streams
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "hyperloop-tiny", "--micro-batch", "1", "--seq-len", "32", "--steps", "1",
                 "--no-compile", "--set", "model.n_streams=2", "--json", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["rows"][0]["model"] == "hyperloop-tiny model.n_streams=2"
    with pytest.raises(HyperloopError, match="model"):
        build("hyperloop-tiny", ["train.lr=1e-3"])
    assert main(["bench", "decode", "--preset", "hyperloop-tiny", "--set", "model.n_streams=2"]) == 2


def test_bench_hf_anchor_trains_without_a_kv_cache():
    """The HF row must time plain training: a KV cache built in every forward (HF's default) costs
    time and makes compiled layers recompile, which would understate the anchor."""
    pytest.importorskip("transformers")
    from hyperloop.train.bench import build

    model, cfg, loss_fn = build("hf-llama-tiny")
    seen = []
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("use_cache")),
                                          with_kwargs=True)  # fmt: skip
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    loss = loss_fn(model, x, x)
    assert seen == [False] and loss.item() > 0
