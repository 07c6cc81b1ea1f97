"""Held-out perplexity over the data helper's evaluation windows.

How tokens are counted (EvalWindows, hyperloop.data.loader): the split is one token stream
(documents back to back, each starting with BOS). Window i holds the seq_len + 1 tokens from
position i * seq_len: the model reads the first seq_len and predicts the last seq_len, with no
context carried over from the previous window. So every token of the stream except the first is
predicted exactly once, BOS separators included (predicting where the next document starts), up
to the (N - 1) % seq_len tail that does not fill a window, and up to `max_tokens`.

    ppl = exp( sum of -log p(target) over those num_windows * seq_len targets / (num_windows * seq_len) )

seq_len is the model's context length (cfg.max_seq_len), as in the paper's 2048-token windows.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from hyperloop.data.loader import EvalWindows, TokenData
from hyperloop.eval.loglik import autocast, default_batch_tokens, model_device, token_logprobs
from hyperloop.model import HyperloopLM


@torch.inference_mode()
def perplexity(
    model: HyperloopLM,
    data: TokenData,
    split: str = "validation",
    *,
    max_tokens: int | None = None,
    batch_tokens: int | None = None,
    num_loops: int | None = None,
    progress: bool = True,
) -> dict:
    """{ppl, loss (mean nats per token), tokens (predicted), windows, seq_len, split}."""
    device = model_device(model)
    seq_len = model.cfg.max_seq_len
    rows = max(1, (batch_tokens or default_batch_tokens(device)) // seq_len)
    windows = EvalWindows(data, seq_len, rows, split=split, max_tokens=max_tokens)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    bar = tqdm(total=windows.num_predicted_tokens, desc=f"perplexity ({split})", unit="tok", unit_scale=True,
               disable=not progress, leave=False)  # fmt: skip
    for x, y in windows:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            hidden = model.hidden_states(x, num_loops=num_loops)
            logprob, _ = token_logprobs(model, hidden.flatten(0, 1), y.flatten())
        nll -= logprob.double().sum()
        bar.update(y.numel())
    bar.close()
    loss = nll.item() / windows.num_predicted_tokens
    return {
        "ppl": math.exp(loss),
        "loss": loss,
        "tokens": windows.num_predicted_tokens,
        "windows": windows.num_windows,
        "seq_len": seq_len,
        "split": split,
    }
