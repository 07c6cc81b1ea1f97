"""`hyperloop bench decode`: prefill and decode throughput and peak memory of random-weight models,
next to HF transformers' `LlamaForCausalLM.generate` of the same shape (`hf-llama-<scale>` rows).

Each row times one warm-up pass (captures the CUDA graph, compiles) and then one timed pass of
prefill + (new_tokens - 1) greedy decode steps over a batch of random prompts. Random weights are
fine for speed: the work per token does not depend on the values (except with early exit, where
it is the point: benchmark exit on a trained checkpoint with benchmarks/decode.py).

Two HF baselines, both `generate` with SDPA attention in the same dtype, greedy:
- `hf-llama-<scale>`: what an HF user runs by default, its dynamic cache, eager;
- `hf-llama-<scale>:static`: `cache_implementation="static"`, with which `generate` compiles the
  model's forward itself on CUDA (CUDA graphs included): HF's own fast path, the fair anchor.
Their prefill is timed as one forward over the prompts, their decode time is the rest of the
`generate` call; ours is compared with the faster HF row of the same batch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hyperloop.config import ModelConfig, get_preset
from hyperloop.errors import HyperloopError
from hyperloop.infer.decoder import Decoder, synchronize
from hyperloop.model import HyperloopLM
from hyperloop.profiling import profile_table

HF_PREFIX = "hf-llama-"
PROFILE_STEPS = 8
STATIC = ":static"


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def random_prompts(vocab_size: int, batch: int, prompt_len: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, vocab_size, (batch, prompt_len), generator=generator)


def _rates(batch: int, prompt_len: int, new_tokens: int, prefill_s: float, decode_s: float) -> dict:
    steps = new_tokens - 1  # the first new token comes out of the prefill
    return {
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": batch * steps / decode_s,
        "decode_ms_per_step": 1e3 * decode_s / steps,
        "e2e_tok_s": batch * new_tokens / (prefill_s + decode_s),
    }


def time_decoder(model: HyperloopLM, batch: int, prompt_len: int, new_tokens: int, *, num_loops: int | None = None,
                 exit_threshold: float | None = None, compile: bool = False, profile: Path | None = None,
                 fuse_int4: bool = True) -> dict:  # fmt: skip
    """Warm-up pass, then a timed pass of prefill + greedy decode with our Decoder. With `profile`
    (a file), then a few steps under the profiler, run without the CUDA graph (its kernels are the
    same; the profiler sees them one by one), to compare their busy time with the graphed step's."""
    device = model.embed.weight.device
    prompts = random_prompts(model.cfg.vocab_size, batch, prompt_len).tolist()
    _reset_memory(device)
    decoder = Decoder(model, batch, prompt_len + new_tokens - 1, num_loops=num_loops,
                      exit_threshold=exit_threshold, compile=compile, fuse_int4=fuse_int4)  # fmt: skip

    def one_pass() -> tuple[float, float, float]:
        synchronize(device)
        start = time.perf_counter()
        tokens = decoder.prefill(prompts).argmax(dim=-1)
        synchronize(device)
        prefilled = time.perf_counter()
        loops = torch.zeros(batch, device=device)
        for _ in range(new_tokens - 1):
            logits, used = decoder.step(tokens)
            tokens = logits.argmax(dim=-1)
            loops += used
        synchronize(device)
        return prefilled - start, time.perf_counter() - prefilled, loops.mean().item() / (new_tokens - 1)

    one_pass()  # warm-up: CUDA graph capture, torch.compile, cuBLAS heuristics
    prefill_s, decode_s, mean_loops = one_pass()
    if profile is not None:
        tokens = decoder.prefill(prompts).argmax(dim=-1)
        graphed, decoder.cuda_graph = decoder.cuda_graph, False
        steps = min(PROFILE_STEPS, new_tokens - 1)
        profile_table(lambda: decoder.step(tokens), steps, device, profile,
                      f"{profile.stem}: decode steps, graphed step {1e3 * decode_s / (new_tokens - 1):.3f} ms")  # fmt: skip
        decoder.cuda_graph = graphed
    cache = decoder.cache
    return {
        **_rates(batch, prompt_len, new_tokens, prefill_s, decode_s),
        "mean_loops": mean_loops,
        "peak_memory_gb": _peak_memory_gb(device),
        "kv_cache_gb": cache.nbytes / 2**30,
        "cuda_graph": decoder.cuda_graph,
    }


def hf_llama_config(cfg: ModelConfig):
    """The HF Llama of a Transformer preset's shape (same dim, heads, FFN, depth, vocabulary)."""
    try:
        from transformers import LlamaConfig
    except ImportError:
        raise HyperloopError("hf-llama rows need HF transformers: pip install transformers") from None
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                       num_hidden_layers=cfg.depth, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                       max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                       tie_word_embeddings=False)  # fmt: skip


def preset_config(name: str) -> ModelConfig:
    """Our preset, or for `hf-llama-<scale>[:static]` the Transformer preset whose shape HF copies."""
    return get_preset(name.replace(HF_PREFIX, "transformer-", 1).removesuffix(STATIC))


def time_hf_llama(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, device: torch.device,
                  dtype: torch.dtype, static: bool = False) -> dict:  # fmt: skip
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_llama_config(cfg)).to(device=device, dtype=dtype).eval()
    ids = random_prompts(cfg.vocab_size, batch, prompt_len).to(device)
    mask = torch.ones_like(ids)

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    def generate(n: int) -> None:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, cache_implementation="static" if static else None)  # fmt: skip

    _reset_memory(device)
    with torch.no_grad():
        generate(new_tokens if static else 2)  # warm-up (static: compiles for this very cache size)
        prefill_s = timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True))
        total_s = timed(lambda: generate(new_tokens))
    row = {**_rates(batch, prompt_len, new_tokens, prefill_s, total_s - prefill_s), "mean_loops": None,
           "peak_memory_gb": _peak_memory_gb(device), "kv_cache_gb": None, "cuda_graph": False}  # fmt: skip
    return row


def decode_rows(presets: list[str], batches: list[int], prompt_len: int = 128, new_tokens: int = 128, *,
                num_loops: int | None = None, exit_threshold: float | None = None, int4: bool = False,
                compile: bool = False, profile_dir: str | None = None) -> list[dict]:  # fmt: skip
    """One row per (preset, batch); `hf-llama-<scale>` rows give ours a `decode_speedup_vs_hf`.
    With `profile_dir`, each of our rows also writes DIR/<preset>-b<batch>[-int4].txt."""
    if new_tokens < 2 or prompt_len < 1:
        raise HyperloopError("--new-tokens must be at least 2 and --prompt-len at least 1")
    device, dtype = bench_device()
    configs = {name: preset_config(name) for name in presets}
    for name, cfg in configs.items():
        if prompt_len + new_tokens - 1 > cfg.max_seq_len:
            raise HyperloopError(f"--prompt-len + --new-tokens exceed {name}'s context of {cfg.max_seq_len}")
    hf_names = [name for name in configs if name.startswith(HF_PREFIX)]
    if hf_names:
        hf_llama_config(configs[hf_names[0]])  # no transformers: fail now, not after timing the other rows

    rows = []
    bar = tqdm([(name, batch) for name in presets for batch in batches], desc="bench decode", unit="row")
    for name, batch in bar:
        bar.set_postfix_str(f"{name} batch {batch}")
        cfg = configs[name]
        row = {"preset": name, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
        if name.startswith(HF_PREFIX):
            row.update(time_hf_llama(cfg, batch, prompt_len, new_tokens, device, dtype, name.endswith(STATIC)))
        else:
            model = build_model(cfg, device, dtype, int4)
            row.update(
                int4=int4, loops=num_loops or cfg.num_loops, exit_threshold=exit_threshold, compile=compile
            )
            profile = Path(profile_dir, f"{name}-b{batch}{'-int4' * int4}.txt") if profile_dir else None
            row.update(time_decoder(model, batch, prompt_len, new_tokens, num_loops=num_loops,
                                    exit_threshold=exit_threshold, compile=compile, profile=profile))  # fmt: skip
            del model
        rows.append(row)
        bar.write(f"{name:<16} batch {batch:>3}: decode {row['decode_tok_s']:>10.1f} tok/s, "
                  f"prefill {row['prefill_tok_s']:>10.1f} tok/s")  # fmt: skip
    add_speedups(rows)
    return rows


def bench_device() -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 when there is a GPU, else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def environment() -> dict:
    """Where and when a figure was measured."""
    device, dtype = bench_device()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_decode(args: argparse.Namespace) -> dict:
    """`hyperloop bench decode`: the rows, with the command and environment that produced them."""
    rows = decode_rows(args.preset, args.batch, args.prompt_len, args.new_tokens, num_loops=args.loops,
                       exit_threshold=args.exit_threshold, int4=args.int4, compile=bool(args.compile),
                       profile_dir=args.profile)  # fmt: skip
    result = {"command": command_line(args), **environment(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def command_line(args: argparse.Namespace) -> str:
    """The `hyperloop bench decode` command that reproduces this result."""
    words = ["hyperloop bench decode --preset", *args.preset, "--batch", *map(str, args.batch),
             f"--prompt-len {args.prompt_len} --new-tokens {args.new_tokens}"]  # fmt: skip
    if args.loops:
        words.append(f"--loops {args.loops}")
    if args.exit_threshold is not None:
        words.append(f"--exit-threshold {args.exit_threshold}")
    words += ["--int4"] * args.int4 + ["--compile"] * bool(args.compile)
    return " ".join(words)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, int4: bool) -> HyperloopLM:
    """A random-weight model in `dtype` on `device`; with int4, its linears RTN-quantized."""
    torch.manual_seed(0)
    model = HyperloopLM(cfg).to(device=device, dtype=dtype).eval()
    model.rope.to(dtype=torch.float32)  # RoPE tables stay fp32, as load_model keeps them
    if int4:
        from hyperloop.quant.quantize import quantize_rtn

        quantize_rtn(model)
    return model


def add_speedups(rows: list[dict]) -> None:
    """decode_speedup_vs_hf = our decode tok/s / the fastest HF row's of the same batch (when one ran)."""
    hf: dict[int, float] = {}
    for row in rows:
        if row["preset"].startswith(HF_PREFIX):
            hf[row["batch"]] = max(hf.get(row["batch"], 0.0), row["decode_tok_s"])
    for row in rows:
        if not row["preset"].startswith(HF_PREFIX) and row["batch"] in hf:
            row["decode_speedup_vs_hf"] = row["decode_tok_s"] / hf[row["batch"]]
