"""Packed low-bit checkpoints: the ordinary checkpoint folder plus `quant_config.json`.

    CKPT/model.safetensors   for every quantized linear `NAME`: NAME.qweight, NAME.qzeros, NAME.scales,
                             NAME.g_idx (GPTQ's packed layout, see hyperloop.quant.linear); every other
                             tensor (embeddings, norms, HC, LoRA, LM head) in bf16
    CKPT/config.json         {"model": ModelConfig, ...the source checkpoint's metadata, "quantized_from"}
    CKPT/tokenizer/          copied from the source checkpoint
    CKPT/quant_config.json   how it was made and which modules are quantized (below)

`hyperloop.checkpoint.load_model` sees quant_config.json and calls `load_quantized`, so every
command that takes a checkpoint (eval, generate, export-hf, ...) takes a quantized one as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hyperloop.checkpoint import MODEL_FILE, QUANT_FILE, load_strict, read_state_dict, save_model
from hyperloop.config import ModelConfig
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM
from hyperloop.quant.grid import SUPPORTED_BITS
from hyperloop.quant.linear import QuantLinear
from hyperloop.quant.quantize import replace_module

FORMAT = "hyperloop-quant-v1"
CHECKPOINT_FORMAT = "gptq_v2"  # GPTQModel's name for the packed layout with true (not zero - 1) zeros


def quant_config(model: HyperloopLM, method: str, **settings: Any) -> dict[str, Any]:
    """The quant_config.json of a quantized model: GPTQConfig's field names where they exist."""
    modules = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    if not modules:
        raise HyperloopError("the model has no quantized layers to save")
    first = model.get_submodule(modules[0])
    return {
        "format": FORMAT,
        "quant_method": method,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "bits": first.bits,
        "group_size": first.group_size,
        "sym": False,
        "lm_head": "lm_head" in modules,
        "modules": modules,
        **settings,
    }


def save_quantized(
    ckpt_dir: str | Path,
    model: HyperloopLM,
    config: dict[str, Any],
    meta: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write a quantized checkpoint folder; float tensors are stored in bf16, the quantized layers'
    buffers as they are (int32 codes and zeros, fp16 scales)."""
    quantized = tuple(f"{name}." for name in config["modules"])
    state = {
        key: value if key.startswith(quantized) or not value.is_floating_point() else value.to(torch.bfloat16)
        for key, value in model.state_dict().items()
    }
    ckpt_dir = save_model(ckpt_dir, model, meta, tokenizer_dir, state_dict=state)
    (ckpt_dir / QUANT_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return ckpt_dir


def read_quant_config(ckpt_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((ckpt_dir / QUANT_FILE).read_text())
    except json.JSONDecodeError as err:
        raise HyperloopError(f"{ckpt_dir / QUANT_FILE} is not valid JSON: {err}") from None
    if config.get("format") != FORMAT:
        raise HyperloopError(
            f"{ckpt_dir} is a quantized checkpoint in format {config.get('format')!r}; "
            f"this hyperloop reads {FORMAT!r}"
        )
    bits, group_size = config.get("bits"), config.get("group_size")
    if bits not in SUPPORTED_BITS or not isinstance(group_size, int):
        raise HyperloopError(
            f"{ckpt_dir / QUANT_FILE} has bits={bits!r}, group_size={group_size!r}; "
            f"expected bits in {SUPPORTED_BITS} and an integer group size"
        )
    if not isinstance(config.get("modules"), list):
        raise HyperloopError(f"{ckpt_dir / QUANT_FILE} does not list its quantized modules")
    return config


def load_quantized(
    ckpt_dir: str | Path,
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> HyperloopLM:
    """Build the model, swap the quantized linears for QuantLinear and load the weights strictly.

    `dtype` casts the float weights (embeddings, norms, HC, head; default: bf16 as stored); the
    quantized layers keep their int codes and fp16 scales and compute in the activations' dtype."""
    ckpt_dir = Path(ckpt_dir)
    config = read_quant_config(ckpt_dir)
    with torch.device("meta"):
        model = HyperloopLM(cfg)
        for name in config["modules"]:
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise HyperloopError(
                    f"{ckpt_dir / QUANT_FILE} names module {name}, which the model does not have"
                ) from None
            replace_module(
                model,
                name,
                QuantLinear(linear.in_features, linear.out_features, config["bits"], config["group_size"]),
            )
    load_strict(model, read_state_dict(ckpt_dir / MODEL_FILE), ckpt_dir)
    model.to(device=device, dtype=dtype)
    model.rope.to(dtype=torch.float32)  # RoPE tables stay fp32 whatever the weights' dtype
    return model.eval()
