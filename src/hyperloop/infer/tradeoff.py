"""What fewer loops cost: perplexity, loops per token and decode speed at a test-time loop count K'
and an early-exit threshold.

Perplexity under early exit has to be measured the way tokens are generated: teacher-forced, token
by token through the Decoder, each token exiting at its own loop boundary and later tokens reading
the exited tokens' copied-forward cache. Without early exit this is the ordinary perplexity of the
model at K' loops (the cached forward equals the full forward), which the tests check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hyperloop.infer.decoder import Decoder, synchronize
from hyperloop.model import HyperloopLM


@torch.no_grad()
def decode_perplexity(model: HyperloopLM, windows: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_loops: int | None = None,
                      exit_threshold: float | None = None, total_tokens: int | None = None) -> dict:  # fmt: skip
    """windows: (x, y) batches of shape (B, T), y the next tokens of x (e.g. data.loader.EvalWindows).
    The first token of each window is a one-token prompt (run at full depth); every later one is a
    decode step. Returns {ppl, tokens, mean_loops, decode_tok_s} (the speed counts decode steps only)."""
    device = model.embed.weight.device
    nll = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    loops_run = torch.zeros((), dtype=torch.long, device=device)
    tokens = decode_tokens = 0
    seconds = 0.0
    decoder = None
    bar = tqdm(
        total=total_tokens, desc=f"loops={num_loops or model.cfg.num_loops} exit={exit_threshold}", unit="tok"
    )
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        batch, T = x.shape
        if decoder is None or decoder.cache.batch != batch or decoder.max_len < T:
            decoder = Decoder(model, batch, T, num_loops=num_loops, exit_threshold=exit_threshold)
        logits = decoder.prefill(x[:, :1].tolist())
        nll += F.cross_entropy(logits.float(), y[:, 0], reduction="sum")
        loops_run += batch * decoder.num_loops
        synchronize(device)
        start = time.perf_counter()
        for t in range(1, T):
            logits, loops = decoder.step(x[:, t])
            nll += F.cross_entropy(logits.float(), y[:, t], reduction="sum")
            loops_run += loops.sum()
        synchronize(device)
        seconds += time.perf_counter() - start
        tokens += batch * T
        decode_tokens += batch * (T - 1)
        bar.update(batch * T)
    bar.close()
    return {
        "loops": decoder.num_loops,
        "exit_threshold": exit_threshold,
        "ppl": math.exp(nll.item() / tokens),
        "tokens": tokens,
        "mean_loops": loops_run.item() / tokens,
        "decode_tok_s": decode_tokens / seconds if seconds else None,
        "cuda_graph": decoder.cuda_graph,
    }
