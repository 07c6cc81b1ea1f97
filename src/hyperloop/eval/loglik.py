"""Batched log-likelihood scoring: the engine under the zero-shot tasks and the lm-eval adapter.

A request is (context tokens, continuation tokens); its score is the sum of log p(continuation
token | everything before it) and whether every continuation token is the argmax ("greedy"), the
two numbers lm-evaluation-harness's `loglikelihood` returns.

How the work is laid out, and why:

1. Truncation follows lm-eval: the model reads (context + continuation)[-(L+1):][:-1] for context
   length L, so an over-long context loses tokens on the left (`pieces`; a continuation longer
   than L, where lm-eval stops, is scored in chunks).
2. Requests whose (truncated) contexts are equal are packed into one row: the context once, then
   each continuation minus its last token (the last token is predicted, never read). A
   `segment_mask` keeps continuations from seeing each other and each continuation restarts its
   RoPE positions where the context ends, so every token sees exactly what it would see alone. The
   first token of every continuation is predicted from the context's last position; a one-token
   continuation (a LAMBADA word, often) costs no extra tokens at all. HellaSwag's validation set
   packs into 1.87M tokens instead of 3.59M as 40,168 separate sequences (Llama-2 tokenizer).
3. Rows are sorted longest first (an out-of-memory shows up at once, and batches are dense) and
   cut into batches of at most `batch_tokens` padded tokens.
4. Only the positions that predict a continuation token go through the final norm and LM head,
   in chunks, so the (tokens x vocabulary) logits never exist for a whole batch.

On CUDA the forward runs under bf16 autocast (the weights stay as loaded); log-softmax is fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from hyperloop.errors import HyperloopError
from hyperloop.eval.masks import MaskedAttention, segment_mask
from hyperloop.model import HyperloopLM

# Positions sent through the LM head at once: 4096 x 32000 fp32 logits are 0.5 GB.
HEAD_CHUNK = 4096


@dataclass(frozen=True)
class Request:
    context: Sequence[int]  # conditioning tokens (BOS first for our models), at least one
    continuation: Sequence[int]  # the tokens to score, at least one


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    greedy: bool  # every continuation token is the argmax of its distribution
    tokens: int  # number of continuation tokens scored


def model_device(model: torch.nn.Module) -> torch.device:
    return model.embed.weight.device


def default_batch_tokens(device: torch.device) -> int:
    """Padded tokens per forward: big on a GPU (an S model at 64K tokens uses a few GB), small on CPU."""
    return 65536 if device.type == "cuda" else 4096


def autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor-core matmuls, fp32 weights kept); nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_logprobs(model: HyperloopLM, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and whether target is the argmax, for hidden states (N, C) and targets (N,),
    through the model's final norm and head in chunks of HEAD_CHUNK positions."""
    logprobs, is_top = [], []
    for h, t in zip(hidden.split(HEAD_CHUNK), targets.split(HEAD_CHUNK)):
        logits = model.logits(h).float()
        logprobs.append(logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1))
        is_top.append(logits.argmax(-1) == t)
    return torch.cat(logprobs), torch.cat(is_top)


# ------------------------------------------------------------------------------------- packing
class _Row:
    """One packed sequence: a shared context, then continuations (each minus its last token).

    tokens / positions / segments are the row's inputs (segment 0 = context, k = k-th continuation);
    predict_at[j] is the row position whose output predicts targets[j], a token of request owners[j].
    """

    def __init__(self, context: tuple[int, ...]):
        self.context = context
        self.tokens, self.positions, self.segments = list(context), list(range(len(context))), [0] * len(context)
        self.predict_at: list[int] = []
        self.targets: list[int] = []
        self.owners: list[int] = []
        self.continuations = 0

    def add(self, request: int, continuation: Sequence[int]) -> None:
        n_ctx, start, fed = len(self.context), len(self.tokens), list(continuation[:-1])
        self.continuations += 1
        self.tokens += fed
        self.positions += range(n_ctx, n_ctx + len(fed))  # as if it followed the context alone
        self.segments += [self.continuations] * len(fed)
        self.predict_at += [n_ctx - 1] + list(range(start, start + len(fed)))
        self.targets += continuation
        self.owners += [request] * len(continuation)


def pieces(request: Request, max_len: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(context, continuation) pairs that each fit in max_len input tokens, lm-eval's truncation: the
    context keeps its last max_len + 1 - len(continuation) tokens. A continuation longer than max_len
    (where lm-eval gives up) is scored in consecutive chunks of max_len tokens, each conditioned on
    what fits of the tokens before it, like lm-eval's rolling windows."""
    if not request.context or not request.continuation:
        raise HyperloopError("a log-likelihood request needs a non-empty context and continuation")
    full, start = tuple(request.context) + tuple(request.continuation), len(request.context)
    out = []
    for begin in range(start, len(full), max_len):
        chunk = full[begin : begin + max_len]
        out.append((full[:begin][-(max_len + 1 - len(chunk)) :], chunk))
    return out


def pack(requests: Sequence[Request], max_len: int) -> list[_Row]:
    """Group the requests' pieces by context and pack each group into rows of at most max_len tokens."""
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for index, request in enumerate(requests):
        for context, continuation in pieces(request, max_len):
            groups.setdefault(context, []).append((index, continuation))
    rows = []
    for context, members in groups.items():
        row = _Row(context)
        for index, continuation in members:
            if row.targets and len(row.tokens) + len(continuation) - 1 > max_len:
                rows.append(row)
                row = _Row(context)
            row.add(index, continuation)
        rows.append(row)
    return rows


def _batches(rows: list[_Row], batch_tokens: int) -> Iterator[list[_Row]]:
    """Longest rows first; each batch holds as many rows as fit in batch_tokens padded tokens."""
    rows = sorted(rows, key=lambda r: len(r.tokens), reverse=True)
    start = 0
    while start < len(rows):
        per_batch = max(1, batch_tokens // len(rows[start].tokens))
        yield rows[start : start + per_batch]
        start += per_batch


def _batch_tensors(batch: list[_Row], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tokens / positions / segments (padding is segment -1, which no real token
    attends to) and the flat (row, at, targets, owners) index of every scored token."""
    T = len(batch[0].tokens)
    pad = [T - len(r.tokens) for r in batch]

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return {
        "tokens": tensor([r.tokens + [0] * p for r, p in zip(batch, pad)]),
        "positions": tensor([r.positions + [0] * p for r, p in zip(batch, pad)]),
        "segments": tensor([r.segments + [-1] * p for r, p in zip(batch, pad)]),
        "row": tensor([i for i, r in enumerate(batch) for _ in r.targets]),
        "at": tensor([p for r in batch for p in r.predict_at]),
        "targets": tensor([t for r in batch for t in r.targets]),
        "owners": tensor([o for r in batch for o in r.owners]),
    }


# ------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def score(
    model: HyperloopLM,
    requests: Sequence[Request],
    *,
    batch_tokens: int | None = None,
    num_loops: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> list[Score]:
    """Score every request (see the module docstring); results come back in request order."""
    device = model_device(model)
    batch_tokens = batch_tokens or default_batch_tokens(device)
    rows = pack(requests, model.cfg.max_seq_len)
    logprob = torch.zeros(len(requests), dtype=torch.float64, device=device)
    misses = torch.zeros(len(requests), dtype=torch.long, device=device)  # non-argmax tokens
    bar = tqdm(total=sum(len(r.tokens) for r in rows), desc=desc, unit="tok", unit_scale=True,
               disable=not progress, leave=False)  # fmt: skip
    for batch in _batches(rows, batch_tokens):
        inputs = _batch_tensors(batch, device)
        with autocast(device):
            hidden = model.hidden_states(inputs["tokens"], positions=inputs["positions"], num_loops=num_loops,
                                         cache=MaskedAttention(segment_mask(inputs["segments"])))  # fmt: skip
            lp, top = token_logprobs(model, hidden[inputs["row"], inputs["at"]], inputs["targets"])
        logprob.index_add_(0, inputs["owners"], lp.double())
        misses.index_add_(0, inputs["owners"], (~top).long())
        bar.update(sum(len(r.tokens) for r in batch))
    bar.close()
    lengths = [len(r.continuation) for r in requests]
    return [Score(float(lp), int(m) == 0, n) for lp, m, n in zip(logprob.tolist(), misses.tolist(), lengths)]
