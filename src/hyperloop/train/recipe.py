"""The training recipe (spec section 4, paper Appendix A) as a config, plus its pieces: the token
budget, the learning-rate schedule and the optimizer's parameter groups.

Defaults are the paper's: AdamW (0.9, 0.95), weight decay 0.1, peak LR 4e-4, linear warmup then
cosine decay to 4e-5, clip 1.0, 256 x 2048-token batches, 50 tokens per parameter of the vanilla
Transformer of the same scale. Presets may carry scale-specific defaults (RECIPES) and every field
can be overridden with `--set train.<field>=<value>`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from hyperloop.config import ModelConfig, count_params, get_preset, known_fields
from hyperloop.errors import HyperloopError


@dataclass
class TrainConfig:
    seq_len: int = 2048
    global_batch: int = 256  # sequences per optimizer step, across all ranks
    micro_batch: int = 16  # sequences per forward/backward on one rank
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 1000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Token budget: train_tokens if set, else tokens_per_param x params of budget_model
    # (default: the vanilla Transformer of the model's scale, as in the paper).
    train_tokens: int | None = None
    tokens_per_param: float = 50.0
    budget_model: str | None = None
    seed: int = 0
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: str = "auto"  # auto (on for CUDA) | on | off
    parallel: str = "ddp"  # ddp | fsdp (used when launched with torchrun)
    log_every: int = 10
    eval_every: int = 250
    eval_tokens: int = 1_048_576
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    max_nonfinite: int = 5  # stop the run after this many skipped non-finite steps

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise HyperloopError(f"invalid train config: {msg}")

        for key in ("seq_len", "global_batch", "micro_batch", "log_every", "eval_every", "ckpt_every"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1")
        need(self.warmup_steps >= 0 and self.keep_checkpoints >= 1, "warmup_steps >= 0 and keep_checkpoints >= 1")
        need(0 < self.min_lr <= self.lr, "need 0 < min_lr <= lr")
        need(self.dtype in ("auto", "bf16", "fp32"), "dtype must be auto, bf16 or fp32")
        need(self.compile in ("auto", "on", "off"), "compile must be auto, on or off")
        need(self.parallel in ("ddp", "fsdp"), "parallel must be ddp or fsdp")
        need(self.train_tokens is None or self.train_tokens > 0, "train_tokens must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        cfg = cls(**known_fields(cls, data, "train config"))
        cfg.validate()
        return cfg


# Scale-specific defaults. tiny: a CPU smoke test (300 steps of 512 tokens in about a minute on 2
# cores: the 32000-way LM head is most of the work).
# xs: the one-GPU reproduction (d=256): a smaller global batch so ~200M tokens give ~1500 steps.
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, global_batch=4, micro_batch=4, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                 train_tokens=4 * 128 * 300, eval_every=100, eval_tokens=32_768, ckpt_every=100, log_every=10),
    "xs": dict(global_batch=64, micro_batch=32, lr=1e-3, min_lr=1e-4, warmup_steps=150, train_tokens=200 * 2**20,
               eval_every=250, eval_tokens=2**20, ckpt_every=250),
    "m": dict(warmup_steps=2000),
    "l": dict(warmup_steps=2000),
}  # fmt: skip


def scale_of(preset: str | None) -> str | None:
    return preset.rsplit("-", 1)[-1] if preset and "-" in preset else None


def default_train_config(preset: str | None) -> TrainConfig:
    return TrainConfig.from_dict(RECIPES.get(scale_of(preset) or "", {}))


def token_budget(train: TrainConfig, model: ModelConfig, preset: str | None) -> int:
    """Tokens to train on: explicit, or tokens_per_param x the reference Transformer's params."""
    if train.train_tokens is not None:
        return train.train_tokens
    reference = train.budget_model or (f"transformer-{scale_of(preset)}" if scale_of(preset) else None)
    params = count_params(get_preset(reference) if reference else model)["total"]
    return int(train.tokens_per_param * params)


def total_steps(train: TrainConfig, tokens: int) -> int:
    return max(1, math.ceil(tokens / (train.global_batch * train.seq_len)))


def lr_at(step: int, train: TrainConfig, steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then cosine from lr down to min_lr at `steps`.
    `step` counts optimizer steps from 0 (the LR used for the update that produces step+1)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, steps - train.warmup_steps))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the matrices that project activations (attention, MLP, LM head, LoRA);
    none on the input embedding (a lookup table: decay would shrink only rarely seen rows' signal
    relative to frequent ones), the RMSNorm gains, and the hyper-connection parameters (small
    gating/mixing parameters whose values, not their size, carry the function)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_projection = p.dim() >= 2 and not name.startswith(("embed.", "hc."))
        (decay if is_projection else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decayed_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters param_groups decays (for tests and the docs)."""
    ids = {id(p) for p in param_groups(model, 1.0)[0]["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]
