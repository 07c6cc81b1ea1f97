"""`hyperloop bench train`: training throughput (tokens/s, MFU, peak memory) of presets, side by
side with HF transformers' LlamaForCausalLM of the same shape (`hf-llama-<scale>`).

One timed region = full optimizer steps (forward, backward, clip, fused AdamW) on random tokens,
bf16 autocast on CUDA, after warm-up steps that include compilation. MFU uses 6N + 12 L d T
FLOPs per token (hyperloop.config.flops_per_token) against the device's dense bf16 peak.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hyperloop.config import ModelConfig, flops_per_token
from hyperloop.errors import HyperloopError
from hyperloop.infer.bench import HF_PREFIX, preset_config
from hyperloop.model import HyperloopLM
from hyperloop.profiling import profile_table
from hyperloop.train.distributed import compile_blocks
from hyperloop.train.loop import environment, parse_overrides, peak_flops
from hyperloop.train.recipe import default_train_config, param_groups


def hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    """LlamaForCausalLM with the same layers as our Transformer preset (sdpa, untied head, no GQA)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise HyperloopError("hf-llama-* rows need `pip install transformers`") from None
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def build(preset: str, overrides: list[str] = ()) -> tuple[torch.nn.Module, ModelConfig, Callable]:
    """(model, the config its FLOPs are counted with, loss function of (model, x, y)); `overrides`
    (model.KEY=VALUE) change our presets, not HF's."""
    cfg = preset_config(preset)
    if preset.startswith(HF_PREFIX):
        # use_cache=False: otherwise HF fills a KV cache in every training forward, and its
        # compiled layers recompile on the cache state until they hit the limit and run eagerly.
        return hf_llama(cfg), cfg, lambda m, x, y: m(input_ids=x, labels=x, use_cache=False).loss
    sets = parse_overrides(list(overrides))
    if sets["train"]:
        raise HyperloopError(f"bench train --set takes model.* keys only, got train keys {sorted(sets['train'])}")
    cfg = ModelConfig.from_dict({**cfg.to_dict(), **sets["model"]})
    return HyperloopLM(cfg), cfg, lambda m, x, y: m(x, y)


def bench_one(preset: str, micro_batch: int, seq_len: int, steps: int, compile_on: bool, device,
              profile_dir: str | None = None, overrides: list[str] = ()) -> dict[str, Any]:  # fmt: skip
    model, cfg, loss_fn = build(preset, overrides)
    label = " ".join([preset, *overrides]) if not preset.startswith(HF_PREFIX) else preset
    model.to(device).train()
    cuda = device.type == "cuda"
    groups = param_groups(model, 0.1) if isinstance(model, HyperloopLM) else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    if compile_on and isinstance(model, HyperloopLM):
        compile_blocks(model)
    elif compile_on:  # HF Llama: its decoder layers, as we do ours
        for layer in model.model.layers:
            layer.compile()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step() -> None:
        with autocast:
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up, compilation included
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tok_s = steps * micro_batch * seq_len / elapsed
    if profile_dir:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", label)  # a file name of letters, digits, . _ -
        profile_table(step, 2, device, Path(profile_dir, f"{name}.txt"), f"{label}: optimizer steps")
    peak = peak_flops(device)
    row = {
        "model": label, "tok_s": round(tok_s, 1),
        "mfu": round(tok_s * flops_per_token(cfg, seq_len) / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "micro_batch": micro_batch, "seq_len": seq_len, "compile": compile_on, "warmup_s": round(warmup_s, 1),
    }  # fmt: skip
    return row


def bench_train(args) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile_on = args.compile if args.compile is not None else device.type == "cuda"
    rows = []
    for preset in args.preset:
        recipe = default_train_config(preset)  # its scale's recipe (hf-llama-s: the s recipe)
        micro_batch = args.micro_batch or recipe.micro_batch
        seq_len = args.seq_len or recipe.seq_len
        try:
            rows.append(bench_one(preset, micro_batch, seq_len, args.steps or 10, compile_on, device,
                                  args.profile, args.overrides))  # fmt: skip
        except torch.cuda.OutOfMemoryError:
            rows.append({"model": preset, "error": "out of memory", "micro_batch": micro_batch, "seq_len": seq_len})
        print(rows[-1], flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    result = {"device": environment().get("device", "cpu"), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "env": environment(), "rows": rows}  # fmt: skip
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result
