"""Model checkpoints: one folder per checkpoint, readable by every command.

    CKPT/model.safetensors    the plain (uncompiled, unsharded) state dict
    CKPT/config.json          {"model": ModelConfig, ...extra metadata (step, tokens, data meta)}
    CKPT/tokenizer/           a copy of the tokenizer the model was trained with
    CKPT/quant_config.json    only in quantized checkpoints (see hyperloop.quant)

A CKPT argument may also be a run folder: its `latest` file names the checkpoint to use. Loading
is strict (a missing or unexpected key is an error) and never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperloop.config import ModelConfig
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM

MODEL_FILE, CONFIG_FILE, TOKENIZER_DIR, QUANT_FILE = "model.safetensors", "config.json", "tokenizer", "quant_config.json"


@dataclass
class LoadedModel:
    model: HyperloopLM
    config: ModelConfig
    path: Path  # the checkpoint folder actually read
    meta: dict[str, Any]  # everything in config.json besides "model"

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.path / TOKENIZER_DIR
        return path if path.is_dir() else None

    def tokenizer(self):
        from hyperloop.data.tokenizer import load_tokenizer

        if self.tokenizer_path is None:
            raise HyperloopError(f"checkpoint {self.path} has no tokenizer/ folder")
        return load_tokenizer(self.tokenizer_path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file then rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(
    ckpt_dir: str | Path,
    model: HyperloopLM,
    meta: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder (the caller makes it atomic by writing into a temporary folder)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(ckpt_dir / MODEL_FILE))
    (ckpt_dir / CONFIG_FILE).write_text(json.dumps({"model": model.cfg.to_dict(), **(meta or {})}, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, ckpt_dir / TOKENIZER_DIR, dirs_exist_ok=True)
    return ckpt_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose `latest` names one."""
    path = Path(path)
    if not path.exists():
        raise HyperloopError(f"checkpoint not found: {path}")
    if (path / "latest").is_file():
        name = (path / "latest").read_text().strip()
        path = path / "checkpoints" / name
        if not path.is_dir():
            raise HyperloopError(f"run's latest checkpoint {path} is missing")
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise HyperloopError(f"{path} is not a checkpoint (expected {CONFIG_FILE} and {MODEL_FILE}) nor a run folder")
    return path


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise HyperloopError(f"cannot read {file}: corrupt or truncated ({err})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Build the model a checkpoint describes and load its weights strictly."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise HyperloopError(f"{ckpt / CONFIG_FILE} is not valid JSON: {err}") from None
    cfg = ModelConfig.from_dict(meta.pop("model"))
    if (ckpt / QUANT_FILE).is_file():
        from hyperloop.quant.pack import load_quantized

        model = load_quantized(ckpt, cfg, device=device, dtype=dtype)
        return LoadedModel(model, cfg, ckpt, meta)
    with torch.device("meta"):
        model = HyperloopLM(cfg)
    state = read_state_dict(ckpt / MODEL_FILE)
    load_strict(model, state, ckpt)
    model.to(device=device, dtype=dtype)
    model.rope.to(dtype=torch.float32)  # RoPE tables stay fp32 whatever the weights' dtype
    return LoadedModel(model.eval(), cfg, ckpt, meta)


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """load_state_dict(strict) with a one-line error; `assign` so meta-device models get real tensors."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise HyperloopError(
            f"checkpoint {where} does not match its config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise HyperloopError(f"checkpoint {where} does not match its config: {str(err).splitlines()[-1].strip()}") from None
    # Buffers that are not saved (RoPE tables) were built on the meta device: rebuild them for real.
    if any(b.is_meta for b in model.buffers()):
        cfg = model.cfg
        from hyperloop.model.layers import RotaryEmbedding

        model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
