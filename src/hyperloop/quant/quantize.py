"""Quantize a HyperloopLM in place: RTN, or GPTQ applied sequentially through the network.

What is quantized: the four projections of every Block (attn.wqkv, attn.wo, mlp.w_gate_up,
mlp.w_down), i.e. all linear weights of attention and MLP. They are swapped for QuantLinear, so the
model code runs unchanged. Embeddings, norms, hyper-connection parameters and per-loop LoRA adapters
stay in bf16 (they are small, and the HC mixing is computed in fp32 anyway). The LM head stays in
bf16 by default, as GPTQ and GPTQModel keep `lm_head`: it is a single matrix whose error lands
directly on the logits of every token, with no later layer to compensate. It is about a quarter of
an S model's weights, and at batch-1 decode a quarter of the bytes read per token, so `lm_head=True`
quantizes it too (last, on the inputs the quantized network gives it).

GPTQ order (as in the reference's `true_sequential`): layer by layer in execution order, and within
a layer qkv -> o -> gate_up -> down. Every stage collects the Hessian of its layer's inputs by
running the calibration batches through the *whole model as it is now* - with every earlier stage
already replaced by its quantized weights - so each layer is calibrated on what the quantized
network will really feed it. Running the real forward (rather than re-implementing a per-layer
replay) is what makes this correct for all four architectures at once: the begin/end layers, the
shared middle layer seen K times through Hyperloop's streams, mHC's per-sub-layer mixing and LoRA
deltas. The forward stops as soon as the layer being calibrated has been called for the last time.
The price is one partial forward over the calibration set per stage (4 per distinct layer), which
grows with depth squared where the reference's cached per-layer replay grows linearly (the S-model
wall time is measured by benchmarks/int4.py).

Loop-aware Hessian (spec section 7): a shared middle layer runs K times per forward; with
`loop_hessian="all"` its Hessian sums the inputs of all K executions, with "first" only those of
loop 1 (the forward then stops after that first call) - the ablation that measures what
loop-awareness buys.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM
from hyperloop.quant.gptq import Hessian, gptq, output_error
from hyperloop.quant.grid import check_spec, rtn
from hyperloop.quant.linear import QuantLinear

# The quantized projections of a Block, in execution order (the sequential stages of GPTQ).
LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")
METHODS = ("gptq", "rtn")
LOOP_HESSIANS = ("all", "first")


@dataclass
class LayerReport:
    name: str
    error: float  # GPTQ's relative output error ||(W - W_hat) X||^2 / ||W X||^2 on the calibration set
    rtn_error: float  # the same for round-to-nearest on the same Hessian, as the baseline
    damp: float


def target_names(model: HyperloopLM, lm_head: bool = False) -> list[str]:
    """Fully qualified names of the linears to quantize, in execution order."""
    names = [f"layers.{index}.{name}" for index in range(len(model.layers)) for name in LINEARS]
    return names + ["lm_head"] if lm_head else names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def check_quantizable(model: HyperloopLM, bits: int, group_size: int, lm_head: bool = False) -> None:
    """Fail before any work on a model that is already quantized or has shapes the spec cannot cut."""
    for name in target_names(model, lm_head):
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            raise HyperloopError(
                "this model is already quantized; quantize the original bf16 checkpoint instead"
            )
        check_spec(bits, group_size, module.in_features, module.out_features, name)


def quantize_rtn(model: HyperloopLM, bits: int = 4, group_size: int = 128, lm_head: bool = False) -> None:
    """Round every target weight to its nearest grid point and swap in QuantLinear (no data needed)."""
    check_quantizable(model, bits, group_size, lm_head)
    for name in target_names(model, lm_head):
        weight = model.get_submodule(name).weight.detach()
        replace_module(model, name, QuantLinear.from_quantized(rtn(weight, bits, group_size)))


class _LastCall(Exception):
    """Raised from a hook once the layer being calibrated has seen all the inputs it will use:
    the rest of the forward cannot change its Hessian, so it is skipped."""


@torch.no_grad()
def collect_hessian(
    model: HyperloopLM,
    name: str,
    calib: torch.Tensor,
    loop_hessian: str = "all",
    batch_size: int = 8,
    progress: tqdm | None = None,
) -> Hessian:
    """The Hessian of the inputs of linear `name` over the calibration tokens (N, T).

    A linear of layer i is called once per unrolled step that runs layer i: K times for a shared
    middle layer. "all" accumulates every call, "first" only the first (loop 1). The LM head runs once."""
    if loop_hessian not in LOOP_HESSIANS:
        raise HyperloopError(f"loop_hessian must be one of {LOOP_HESSIANS}, got {loop_hessian!r}")
    calls = 1
    if name.startswith("layers.") and loop_hessian == "all":
        layer = int(name.split(".")[1])
        calls = sum(step.layer == layer for step in model.plan())
    linear = model.get_submodule(name)
    device = linear.weight.device
    hessian = Hessian(linear.in_features, device)
    seen = 0

    def record(module: nn.Module, args: tuple) -> None:
        nonlocal seen
        hessian.add(args[0])
        seen += 1
        if seen == calls:
            raise _LastCall

    # On CUDA the calibration forward runs in bf16 like deployment; the weights stay fp32 masters.
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    handle = linear.register_forward_pre_hook(record)
    try:
        for batch in calib.split(batch_size):
            seen = 0
            try:
                with autocast:
                    model(batch.to(device))  # stopped at the target's last call
            except _LastCall:
                pass
            if progress is not None:
                progress.update(batch.numel())
    finally:
        handle.remove()
    return hessian


@torch.no_grad()
def quantize_gptq(
    model: HyperloopLM,
    calib: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    loop_hessian: str = "all",
    damp: float = 0.01,
    batch_size: int = 8,
    progress: bool = True,
    lm_head: bool = False,
) -> list[LayerReport]:
    """GPTQ every target linear sequentially (see the module docstring) and swap in QuantLinear."""
    check_quantizable(model, bits, group_size, lm_head)
    if calib.dim() != 2 or calib.numel() == 0:
        raise HyperloopError("GPTQ needs calibration tokens shaped (sequences, tokens)")
    model.eval()
    names = target_names(model, lm_head)
    bar = tqdm(
        total=len(names) * calib.numel(), unit="tok", unit_scale=True, desc="gptq", disable=not progress
    )
    reports, quantized = [], {}
    for name in names:
        bar.set_postfix_str(name)
        linear = model.get_submodule(name)
        H = collect_hessian(model, name, calib, loop_hessian, batch_size, bar).matrix()
        result = gptq(linear.weight, H, bits, group_size, act_order, damp)
        baseline = output_error(linear.weight, rtn(linear.weight, bits, group_size).dequantize(), H)
        reports.append(LayerReport(name, result.error, baseline, result.damp))
        # Later stages must see this layer quantized: write W_hat into the float layer for now.
        linear.weight.copy_(result.weight.dequantize().to(linear.weight.dtype))
        quantized[name] = result.weight
    bar.close()
    for name, weight in quantized.items():
        replace_module(model, name, QuantLinear.from_quantized(weight))
    return reports
