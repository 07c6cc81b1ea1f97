"""Data parallelism applied from outside the model (torchtitan style): DDP or FSDP2.

Launched with `torchrun`, every rank runs the same training loop. CUDA ranks talk over NCCL, CPU
ranks over gloo. State dicts are always gathered to full, unsharded tensors keyed by parameter
name, so a checkpoint written by N ranks loads on M ranks (or on one process without torchrun).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from hyperloop.model.hyper import HyperConnection


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return DistInfo(rank, world, local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (torchtitan style): all layers share one compiled
    graph, so a looped middle block, or 38 layers, cost one compilation; the model itself stays a
    plain module (plain state-dict names). The hyper-connection sites (Hyperloop's, and mHC's around
    each sub-layer) run between the compiled calls, so their read and write are compiled too (one
    graph each, shared by all sites) where they do not run on the fused kernels (model/fused_site.py):
    eager, the RMSNorm, projections and stream combines over n x C are a dozen memory-bound kernels
    per site."""
    for block in model.layers:
        block.compile()
    if model.cfg.hc_placement != "none":
        read, write = torch.compile(HyperConnection._read), torch.compile(HyperConnection._write)
        for hc in model.hc:  # instance attributes shadow the methods; state dicts are unchanged
            hc._read, hc._write = partial(read, hc), partial(write, hc)


def wrap(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """Return the module the training loop calls. `model` itself stays the plain LM (its state dict,
    its parameters' names); the wrapper only adds gradient synchronisation or sharding."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # shard per block: one all-gather per layer execution
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(wrapped: nn.Module, sync: bool):
    """Skip gradient all-reduce on the micro-steps before the last one of an optimizer step."""
    if sync:
        return nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-step
        wrapped.set_requires_gradient_sync(False)
        return _ResyncOnExit(wrapped)
    return nullcontext()


class _ResyncOnExit:
    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts keyed by parameter name (collective under FSDP)."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether `flag` is True on any rank, agreed by all ranks (for stop requests)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The average of a scalar over ranks (the logged loss is the global batch's mean)."""
    if not info.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
    return value if dist.get_backend() == "nccl" else value / info.world_size
