"""Training checkpoints: a model checkpoint (hyperloop.checkpoint format) plus `train_state.pt`
(optimizer, loader position, RNG states, step), written to a temporary folder and renamed, then
`RUN/latest` is rewritten atomically. A crash at any point leaves the previous checkpoint intact
and `latest` pointing at a complete folder. Loading uses `torch.load(weights_only=True)`: tensors
and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from hyperloop.checkpoint import atomic_write_text, read_state_dict, resolve_checkpoint, save_model
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM

STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    # Only this rank's own GPU: a checkpoint written on N GPUs must resume on any number of them.
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_checkpoint(
    run: Path,
    step: int,
    model: HyperloopLM,
    model_sd: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer_dir: Path | None,
    keep: int,
) -> Path:
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model, meta={**meta, "step": step}, tokenizer_dir=tokenizer_dir, state_dict=model_sd)
    torch.save(train_state, tmp / STATE_FILE)
    if final.exists():  # re-saving the same step (e.g. a stop request right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run / "latest", final.name + "\n")
    for old in sorted(_steps(root))[:-keep]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def _steps(root: Path) -> list[int]:
    return [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))]


def load_training_checkpoint(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(model state dict, train state) of the run's latest checkpoint, or None for a fresh run."""
    if not (run / "latest").is_file():
        return None
    ckpt = resolve_checkpoint(run)
    model_sd = read_state_dict(ckpt / "model.safetensors")
    try:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HyperloopError(f"{ckpt} has no {STATE_FILE}: it is not a training checkpoint") from None
    except Exception as err:  # truncated zip, bad pickle opcode, ...: all mean "corrupt"
        raise HyperloopError(
            f"cannot read {ckpt / STATE_FILE}: corrupt or truncated ({type(err).__name__}); "
            f"point {run / 'latest'} at an earlier checkpoint or start a new run"
        ) from None
    return model_sd, state
