"""`hyperloop eval`: perplexity and the zero-shot suite for one checkpoint, as a table and as JSON.

    {checkpoint, model, num_loops, ppl, loss, tokens, split, seq_len,
     tasks: {name: {acc, acc_norm, n, split, metric, score, [acc_norm_tokens], [ppl]}},
     avg, skipped, seconds}

Per task, `acc` and `acc_norm` are lm-evaluation-harness's (acc_norm divides each choice's
log-likelihood by its length in characters; null where lm-eval does not report it);
`acc_norm_tokens` divides by the number of continuation tokens, which the paper uses for HellaSwag,
OpenBookQA and PIQA (spec 6). `score` is the paper's metric for the task and `avg` their mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperloop.checkpoint import load_model
from hyperloop.data.loader import TokenData
from hyperloop.data.tokenizer import Tokenizer
from hyperloop.errors import HyperloopError
from hyperloop.eval.loglik import Request, score
from hyperloop.eval.perplexity import perplexity
from hyperloop.eval.tasks import Task, examples, load_docs, resolve_tasks
from hyperloop.model import HyperloopLM


def encode_requests(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[Request]:
    """lm-eval's causal `_encode_pair`, with BOS in front of every context: trailing spaces of the
    context move to the continuation; context + continuation is encoded whole, and the continuation
    is what follows the separately encoded context's length. An empty context is just BOS."""
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        moved.append((context[: len(context) - spaces], context[len(context) - spaces :] + continuation))
    unique = list(dict.fromkeys(c for c, _ in moved))  # HellaSwag: one context, four endings
    context_ids = dict(zip(unique, tokenizer.encode_batch(unique)))
    wholes = tokenizer.encode_batch([c + k for c, k in moved])
    bos = [tokenizer.bos_id]
    return [Request(bos + context_ids[c], whole[len(context_ids[c]) :]) for (c, _), whole in zip(moved, wholes)]


@dataclass
class TaskResult:
    task: Task
    split: str
    logprobs: list[list[float]]  # per document, per choice: sum of continuation log-probs
    tokens: list[list[int]]  # per document, per choice: continuation tokens
    greedy: list[list[bool]]  # per document, per choice: continuation is the greedy one
    gold: list[int]
    choice_chars: list[list[int]]  # per document, per choice: lm-eval's acc_norm denominators

    def predictions(self, norm: str = "none") -> list[int]:
        """Argmax choice per document: by log-likelihood ('none'), per character ('chars', lm-eval's
        acc_norm) or per token ('tokens', the paper's); ties go to the first choice, as np.argmax."""
        preds = []
        for lls, chars, tokens in zip(self.logprobs, self.choice_chars, self.tokens):
            denominator = {"none": 1, "chars": chars, "tokens": tokens}[norm]
            with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice divides by 0, as in lm-eval
                preds.append(int(np.argmax(np.asarray(lls) / np.asarray(denominator, dtype=float))))
        return preds

    def accuracy(self, norm: str = "none") -> float:
        return float(np.mean([p == g for p, g in zip(self.predictions(norm), self.gold)]))

    def summary(self) -> dict:
        task = self.task
        out: dict = {"n": len(self.gold), "split": self.split, "metric": task.paper_metric}
        if task.greedy:  # LAMBADA: is the target word the greedy continuation; perplexity of it
            out["acc"] = float(np.mean([g[0] for g in self.greedy]))
            out["acc_norm"] = None
            out["ppl"] = math.exp(-float(np.mean([lp[0] for lp in self.logprobs])))
        else:
            out["acc"] = self.accuracy("none")
            out["acc_norm"] = self.accuracy("chars") if task.acc_norm else None
            if task.token_norm:
                out["acc_norm_tokens"] = self.accuracy("tokens")
        out["score"] = out[task.paper_metric]
        return out


def run_task(
    model: HyperloopLM,
    tokenizer: Tokenizer,
    task: Task,
    docs: list[dict],
    split: str,
    *,
    batch_tokens: int | None = None,
    num_loops: int | None = None,
    progress: bool = True,
) -> TaskResult:
    """Score every choice of every document in one batched pass."""
    built = examples(task, docs)
    requests = encode_requests(tokenizer, [pair for ex in built for pair in ex.requests])
    scores = iter(score(model, requests, batch_tokens=batch_tokens, num_loops=num_loops, progress=progress,
                        desc=task.name))  # fmt: skip
    per_doc = [[next(scores) for _ in ex.requests] for ex in built]
    return TaskResult(
        task,
        split,
        logprobs=[[s.logprob for s in doc] for doc in per_doc],
        tokens=[[s.tokens for s in doc] for doc in per_doc],
        greedy=[[s.greedy for s in doc] for doc in per_doc],
        gold=[ex.gold for ex in built],
        choice_chars=[[len(c) for c in ex.choices] for ex in built],
    )


def _pick_tokenizer(loaded, data: TokenData | None) -> Tokenizer | None:
    """The checkpoint's tokenizer (else the data's), after checking the two agree with the model."""
    own = loaded.tokenizer() if loaded.tokenizer_path is not None else None
    if data is not None:
        data.check_vocab(loaded.config.vocab_size, sha256=own.sha256 if own is not None else None)
    tokenizer = own if own is not None else (data.tokenizer() if data is not None else None)
    if tokenizer is not None and tokenizer.vocab_size > loaded.config.vocab_size:
        raise HyperloopError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {loaded.config.vocab_size} embeddings"
        )
    return tokenizer


def resolve_device(device: str | None) -> torch.device:
    """None or 'auto': CUDA when available, else the CPU; otherwise the named device, which must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise HyperloopError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise HyperloopError(f"device {device} requested but CUDA is not available; use --device cpu")
    return resolved


def evaluate(
    checkpoint: str | Path,
    data: str | Path | None = None,
    *,
    split: str = "validation",
    tasks: str = "all",
    tasks_dir: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    device: str | None = None,
    batch_tokens: int | None = None,
    num_loops: int | None = None,
    use_hub: bool = True,
    progress: bool = True,
) -> dict:
    """Perplexity on `data`'s `split` (when data is given) and the zero-shot `tasks`; see the module
    docstring for the result. With tasks='all', tasks whose documents cannot be found are listed
    under `skipped`; a task named explicitly must be found."""
    started = time.perf_counter()
    selected, named = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise HyperloopError(f"--limit must be at least 1, got {limit}")
    found, skipped = [], {}  # documents first: a missing task fails before any model work
    for task in selected:
        try:
            docs, task_split = load_docs(task, tasks_dir, use_hub=use_hub)
        except HyperloopError as err:
            if named:
                raise
            skipped[task.name] = str(err)
            continue
        found.append((task, docs[:limit] if limit is not None else docs, task_split))
    token_data = TokenData(data) if data is not None else None
    loaded = load_model(checkpoint, device=resolve_device(device))
    tokenizer = _pick_tokenizer(loaded, token_data)
    if found and tokenizer is None:
        raise HyperloopError(f"checkpoint {loaded.path} has no tokenizer/ folder; pass --data (its tokenizer is used)")
    model, cfg = loaded.model, loaded.config
    result: dict = {
        "checkpoint": str(loaded.path), "model": cfg.name, "num_loops": num_loops or cfg.num_loops,
        "ppl": None, "loss": None, "tokens": None, "windows": None, "split": None, "seq_len": cfg.max_seq_len,
    }  # fmt: skip
    if token_data is not None:
        result.update(perplexity(model, token_data, split, max_tokens=max_tokens, batch_tokens=batch_tokens,
                                 num_loops=num_loops, progress=progress))  # fmt: skip
    result["tasks"] = {
        task.name: run_task(model, tokenizer, task, docs, task_split, batch_tokens=batch_tokens, num_loops=num_loops,
                            progress=progress).summary()
        for task, docs, task_split in found
    }  # fmt: skip
    result["skipped"] = skipped
    scores = [t["score"] for t in result["tasks"].values()]
    result["avg"] = float(np.mean(scores)) if scores else None
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def format_table(result: dict) -> str:
    """The on-screen report: perplexity line, one row per task (percentages), the paper-metric average."""

    def pct(value: float | None) -> str:
        return f"{100 * value:9.2f}" if value is not None else f"{'-':>9}"

    lines = [f"checkpoint  {result['checkpoint']}  ({result['model']}, {result['num_loops']} loops)"]
    if result["ppl"] is not None:
        lines.append(
            f"perplexity  {result['ppl']:.3f}  (loss {result['loss']:.4f} nats; {result['tokens']:,} predicted tokens "
            f"of '{result['split']}' in {result['windows']} windows of {result['seq_len']})"
        )
    if result["tasks"]:
        lines.append(f"{'task':<18}{'split':<12}{'n':>7}{'acc':>9}{'acc_norm':>9}{'acc_tok':>9}{'score':>9}")
        for name, t in result["tasks"].items():
            ppl = f"   (ppl {t['ppl']:.2f})" if "ppl" in t else ""
            lines.append(f"{name:<18}{t['split']:<12}{t['n']:>7}{pct(t['acc'])}{pct(t['acc_norm'])}"
                         f"{pct(t.get('acc_norm_tokens'))}{pct(t['score'])}{ppl}")  # fmt: skip
        lines.append(f"{'average of the paper metric (score)':<64}{pct(result['avg'])}")
    lines += [f"skipped {name}: {reason}" for name, reason in result["skipped"].items()]
    return "\n".join(lines)
