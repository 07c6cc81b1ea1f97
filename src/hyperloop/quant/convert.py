"""`hyperloop quantize`: a float checkpoint in, a packed low-bit checkpoint out.

Calibration data for GPTQ is a folder written by `hyperloop prepare` (ideally the model's training
data: the paper calibrates on 1024 sequences of the training distribution). The sequences are
`calib_seqs` windows of `calib_len` tokens drawn at random (fixed by `seed`) from its train split.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from hyperloop.checkpoint import QUANT_FILE, load_model, resolve_checkpoint
from hyperloop.errors import HyperloopError
from hyperloop.quant.linear import QuantLinear
from hyperloop.quant.pack import quant_config, save_quantized
from hyperloop.quant.quantize import (
    LOOP_HESSIANS,
    METHODS,
    check_quantizable,
    quantize_gptq,
    quantize_rtn,
    target_names,
)


def calibration_tokens(
    data_dir: str | Path,
    num_seqs: int,
    seq_len: int,
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer_sha256: str | None = None,
) -> torch.Tensor:
    """(num_seqs, seq_len) int64 tokens: random windows of the train split of a prepared folder."""
    from hyperloop.data.loader import TokenData, TrainLoader

    if num_seqs < 1 or seq_len < 1:
        raise HyperloopError(f"--calib-seqs ({num_seqs}) and --calib-len ({seq_len}) must be at least 1")
    data = TokenData(data_dir)
    if vocab_size is not None:
        data.check_vocab(vocab_size, tokenizer_sha256)
    available = max(len(data.split_tokens("train")) - 1, 0) // seq_len
    if available < num_seqs:
        raise HyperloopError(
            f"calibration needs {num_seqs} windows of {seq_len} tokens but the train split of {data_dir} has "
            f"{available}; lower --calib-seqs or --calib-len, or prepare more data"
        )
    inputs, _ = TrainLoader(data, seq_len, micro_batch=num_seqs, seed=seed).next_batch()
    return inputs


def linear_bytes(model: torch.nn.Module, names: list[str]) -> int:
    """Bytes the named layers take: their buffers if quantized, else their weight in bf16."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        else:
            total += module.weight.numel() * 2
    return total


def quantize_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    calib_data: str | Path | None = None,
    calib_seqs: int = 1024,
    calib_len: int | None = None,
    act_order: bool = False,
    loop_hessian: str = "all",
    damp: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    lm_head: bool = False,
) -> dict[str, Any]:
    """Quantize the checkpoint `ckpt` into the folder `out`; returns a summary (sizes, errors, time)."""
    if method not in METHODS:
        raise HyperloopError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if loop_hessian not in LOOP_HESSIANS:
        raise HyperloopError(
            f"--loop-hessian must be one of {', '.join(LOOP_HESSIANS)}, got {loop_hessian!r}"
        )
    if not 0 < damp < 1:
        raise HyperloopError(f"--damp must be in (0, 1), got {damp}")
    source = resolve_checkpoint(ckpt)
    if (source / QUANT_FILE).is_file():
        raise HyperloopError(f"{source} is already quantized; quantize the original bf16 checkpoint")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HyperloopError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HyperloopError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if method == "gptq" and calib_data is None:
        raise HyperloopError(
            "GPTQ needs calibration data: pass --calib-data DIR (a `hyperloop prepare` folder) "
            "or use --method rtn"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise HyperloopError("--device cuda asked for, but CUDA is not available here")

    # fp32 master weights: GPTQ reads them at full precision; the calibration forward casts to bf16 on CUDA.
    loaded = load_model(source, device=device, dtype=torch.float32)
    model, cfg = loaded.model, loaded.config
    check_quantizable(model, bits, group_size, lm_head)  # bad --bits / --group-size fail before any work
    names = target_names(model, lm_head)
    float_bytes = linear_bytes(model, names)
    settings: dict[str, Any] = {}
    reports = []
    if method == "rtn":
        start = time.perf_counter()
        quantize_rtn(model, bits, group_size, lm_head)
    else:
        seq_len = calib_len or cfg.max_seq_len
        if seq_len > cfg.max_seq_len:
            raise HyperloopError(
                f"--calib-len {seq_len} exceeds the model's context length {cfg.max_seq_len}"
            )
        tokenizer = loaded.tokenizer() if loaded.tokenizer_path else None
        calib = calibration_tokens(
            calib_data, calib_seqs, seq_len, seed, cfg.vocab_size, tokenizer and tokenizer.sha256
        )
        start = time.perf_counter()
        reports = quantize_gptq(
            model, calib, bits, group_size, act_order, loop_hessian, damp, batch_size, progress, lm_head
        )
        settings = {
            "desc_act": act_order,
            "damp_percent": damp,
            "true_sequential": True,
            "loop_hessian": loop_hessian,
            "calibration": {"data": str(calib_data), "seqs": calib_seqs, "seq_len": seq_len, "seed": seed},
        }
    seconds = time.perf_counter() - start

    # Write next to the destination, then swap it in, so `out` never holds half a checkpoint.
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = quant_config(model, method, **settings)
    save_quantized(tmp, model, config, {**loaded.meta, "quantized_from": str(source)}, loaded.tokenizer_path)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)

    quant_bytes = linear_bytes(model, names)
    summary: dict[str, Any] = {
        "checkpoint": str(out),
        "source": str(source),
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "layers": len(names),
        "seconds": round(seconds, 2),
        "device": str(device),
        "linear_bytes_bf16": float_bytes,
        "linear_bytes_quantized": quant_bytes,
        "linear_size_ratio": round(quant_bytes / float_bytes, 4),
        "file_bytes": (out / "model.safetensors").stat().st_size,
    }
    if reports:
        summary.update(
            loop_hessian=loop_hessian,
            act_order=act_order,
            mean_error=sum(r.error for r in reports) / len(reports),
            mean_rtn_error=sum(r.rtn_error for r in reports) / len(reports),
            layers_worse_than_rtn=[r.name for r in reports if r.error > r.rtn_error],
            layers_with_raised_damp=[r.name for r in reports if r.damp > damp],
            per_layer=[vars(r) for r in reports],
        )
    return summary
