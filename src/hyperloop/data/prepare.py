"""`hyperloop prepare`: a corpus becomes token shards (format in ``shards.py``).

The pipeline, and why it is shaped this way:

1. Every input is opened and checked first (``sources.open_inputs``), so bad input fails in seconds.
2. This process reads documents in batches of a few MB and hands them to ``workers`` tokenizer
   processes; it never has more than two batches per worker in flight, so memory stays bounded on a
   corpus of any size. Results come back in submission order, so the shards do not depend on the
   number of workers or on scheduling: two runs write identical bytes.
3. Each worker decides the split of each document by a stable hash of its text (``_is_validation``),
   unless a separate validation source is given. Hashing the text, not the position, keeps a
   document's split fixed when the corpus is re-ordered or grows, and sends duplicates to one split.
4. Everything is written into a hidden ``.<out>.partial-*`` folder next to ``out`` and renamed to
   ``out`` only when complete: a crash, Ctrl-C or a bad file never leaves a folder that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import chain
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hyperloop.data.shards import (
    DEFAULT_SHARD_TOKENS,
    FORMAT,
    META_FILE,
    SPLITS,
    TOKENIZER_DIR,
    ShardWriter,
    token_dtype,
)
from hyperloop.data.sources import Input, open_inputs
from hyperloop.data.tokenizer import Tokenizer, load_tokenizer
from hyperloop.errors import HyperloopError

# How a batch's documents are routed: by the hash of each text, or all to one split.
HASH, TRAIN, VALIDATION = "hash", "train", "validation"


@dataclass
class Encoded:
    """One tokenized batch, split into train and validation parts (each: tokens + document lengths)."""

    input_index: int
    tokens: dict[str, np.ndarray]
    doc_lengths: dict[str, np.ndarray]
    text_bytes: dict[str, int]
    skipped: int  # null or empty documents, which get no BOS and no tokens


def _is_validation(text_utf8: bytes, val_fraction: float) -> bool:
    """A stable coin: the first 8 bytes of blake2b(text) as a fraction of 2^64, below val_fraction."""
    h = int.from_bytes(hashlib.blake2b(text_utf8, digest_size=8).digest(), "little")
    return h < val_fraction * 2**64


def _flatten(docs: list[list[int]], bos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """[BOS, doc0..., BOS, doc1..., ...] as one array, and each document's length including its BOS."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    bos_at = np.cumsum(lengths) - lengths
    is_text = np.ones(len(tokens), dtype=bool)
    is_text[bos_at] = False
    tokens[bos_at] = bos_id
    tokens[is_text] = np.fromiter(chain.from_iterable(docs), dtype=dtype, count=len(tokens) - len(docs))
    return tokens, lengths


def encode_batch(tok: Tokenizer, input_index: int, route: str, texts: list[str | None], val_fraction: float) -> Encoded:
    """Tokenize one batch of documents and route each to its split (runs in a worker process)."""
    dtype = token_dtype(tok.vocab_size)
    kept = [t for t in texts if t]
    parts: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    text_bytes = {TRAIN: 0, VALIDATION: 0}
    for text in kept:
        utf8 = text.encode("utf-8")
        split = route if route != HASH else (VALIDATION if _is_validation(utf8, val_fraction) else TRAIN)
        parts[split].append(text)
        text_bytes[split] += len(utf8)
    tokens, lengths = {}, {}
    for split, split_texts in parts.items():
        tokens[split], lengths[split] = _flatten(tok.encode_batch(split_texts), tok.bos_id, dtype)
    return Encoded(input_index, tokens, lengths, text_bytes, skipped=len(texts) - len(kept))


# --- worker processes: each holds one single-threaded tokenizer, loaded once -------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    # Ctrl-C goes to the whole process group; the parent handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    _worker_tokenizer.use_one_thread()


def _worker_encode(input_index: int, route: str, texts: list[str | None], val_fraction: float) -> Encoded:
    return encode_batch(_worker_tokenizer, input_index, route, texts, val_fraction)


def _start_method():
    """fork where the OS has it (Linux): workers start at once, and a user's script needs no
    ``if __name__ == "__main__"`` guard, as with HF datasets' ``map(num_proc=...)`` and nanoGPT's prepare
    scripts. The workers only run the tokenizer, never torch, so threads the parent may hold are no
    hazard to them. Elsewhere spawn: macOS frameworks are not fork-safe, and Windows has no fork."""
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _encode_all(
    tasks: Iterable[tuple[int, str, list[str | None]]], tok: Tokenizer, tokenizer_dir: Path,
    val_fraction: float, workers: int,
) -> Iterator[Encoded]:
    """Tokenize the batches of ``tasks`` and yield the results in task order."""
    if workers == 1:  # in this process: no start-up cost, and the tokenizer may use its own threads
        for index, route, texts in tasks:
            yield encode_batch(tok, index, route, texts, val_fraction)
        return
    with ProcessPoolExecutor(workers, _start_method(), _init_worker, (str(tokenizer_dir),)) as pool:
        in_flight: deque[Future] = deque()
        try:
            for index, route, texts in tasks:
                in_flight.append(pool.submit(_worker_encode, index, route, texts, val_fraction))
                if len(in_flight) >= 2 * workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        except BaseException:  # an error or Ctrl-C: drop the queued batches instead of finishing them
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _tasks(train_inputs: list[Input], val_inputs: list[Input]) -> Iterator[tuple[int, str, list[str | None]]]:
    """(input index, route, texts) for every batch of every input, in order."""
    route_train = TRAIN if val_inputs else HASH
    for index, (inp, route) in enumerate(
        chain(((i, route_train) for i in train_inputs), ((i, VALIDATION) for i in val_inputs))
    ):
        for texts in inp.batches():
            yield index, route, texts


def _input_split(index: int, n_train_inputs: int, has_val_inputs: bool) -> str:
    """What meta.json says about where an input's documents went."""
    if index >= n_train_inputs:
        return VALIDATION
    return TRAIN if has_val_inputs else "train+validation (hash)"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HyperloopError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HyperloopError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing ``out`` is removed only after that."""
    _check_out(out, overwrite)  # again: something may have appeared there while we worked
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


class _Progress:
    """A tqdm bar over documents, with tokens and text MB/s as its postfix."""

    def __init__(self, total_documents: int | None, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_documents, unit="doc", disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.start = time.perf_counter()
        self.tokens = self.text_bytes = 0

    def update(self, documents: int, tokens: int, text_bytes: int) -> None:
        self.tokens += tokens
        self.text_bytes += text_bytes
        seconds = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tok, {self.text_bytes / seconds / 1e6:.1f} MB/s", refresh=False)
        self.bar.update(documents)

    def close(self) -> None:
        self.bar.close()


def prepare(
    sources: list[str],
    tokenizer: str,
    out: str,
    val_fraction: float = 0.005,
    val_source: list[str] | None = None,
    text_column: str = "text",
    workers: int | None = None,
    overwrite: bool = False,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> dict:
    """Tokenize ``sources`` with ``tokenizer`` into ``out`` and return the meta dict written there.

    Validation documents are those whose text hash falls below ``val_fraction``, or, when
    ``val_source`` is given, exactly the documents of ``val_source`` (``val_fraction`` then unused).
    ``workers`` tokenizer processes (default: all cores; 1 = in this process). Shards hold at most
    ``shard_tokens`` tokens, except a single longer document. Null and empty documents are skipped.
    """
    if not sources:
        raise HyperloopError("no sources given; pass --source with files, folders or hf:NAME")
    if not 0 <= val_fraction < 1:
        raise HyperloopError(f"--val-fraction {val_fraction} is outside [0, 1); 0.005 holds out 0.5%")
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise HyperloopError(f"--workers {workers} must be at least 1")
    if shard_tokens < 1:
        raise HyperloopError(f"shard_tokens {shard_tokens} must be at least 1")
    out_path = Path(out).expanduser().resolve()
    _check_out(out_path, overwrite)
    tok = load_tokenizer(tokenizer)
    train_inputs = open_inputs(list(sources), text_column)
    val_inputs = open_inputs(list(val_source), text_column) if val_source else []
    inputs = train_inputs + val_inputs

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stick to the published folder; mkdir honours the umask.
    tmp = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        tok.save(tmp / TOKENIZER_DIR)
        dtype = token_dtype(tok.vocab_size)
        writers = {split: ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        documents = {split: 0 for split in SPLITS}
        text_bytes = {split: 0 for split in SPLITS}
        per_input = [{"documents": 0, "skipped_empty": 0} for _ in inputs]
        known = [i.num_documents for i in inputs]
        bar = _Progress(sum(known) if None not in known else None, progress)
        try:
            for enc in _encode_all(_tasks(train_inputs, val_inputs), tok, tmp / TOKENIZER_DIR, val_fraction, workers):
                for split in SPLITS:
                    writers[split].write(enc.tokens[split], enc.doc_lengths[split])
                    documents[split] += len(enc.doc_lengths[split])
                    text_bytes[split] += enc.text_bytes[split]
                n_docs = sum(len(lengths) for lengths in enc.doc_lengths.values())
                per_input[enc.input_index]["documents"] += n_docs
                per_input[enc.input_index]["skipped_empty"] += enc.skipped
                bar.update(n_docs + enc.skipped, sum(len(t) for t in enc.tokens.values()), sum(enc.text_bytes.values()))
        finally:
            bar.close()
            for writer in writers.values():
                writer.close()

        if documents[TRAIN] == 0:
            if documents[VALIDATION]:
                raise HyperloopError(f"every document went to validation; lower --val-fraction (now {val_fraction})")
            raise HyperloopError(f"no document with text in {', '.join(sources)}; pass a non-empty corpus")
        if val_inputs and documents[VALIDATION] == 0:
            raise HyperloopError(f"no document with text in {', '.join(val_source)}; pass a non-empty --val-source")
        meta = {
            "format": FORMAT,
            "tokenizer": {
                "kind": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            },
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "splits": {
                split: {
                    "documents": documents[split],
                    "tokens": sum(writers[split].shard_sizes),
                    "text_bytes": text_bytes[split],
                    "shards": writers[split].shards,
                    "shard_tokens": writers[split].shard_sizes,
                }
                for split in SPLITS
            },
            "split_rule": (
                {"method": "source", "validation_sources": list(val_source)} if val_inputs
                else {"method": "hash", "val_fraction": val_fraction, "hash": "blake2b-64(utf8 text) / 2^64"}
            ),
            "sources": [
                {"source": inp.name, "split": _input_split(index, len(train_inputs), bool(val_inputs)), **counts}
                for index, (inp, counts) in enumerate(zip(inputs, per_input))
            ],
            "text_column": text_column,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out_path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
