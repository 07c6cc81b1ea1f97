"""The on-disk token format, written by `prepare` and read by the loader (DESIGN.md section 4).

A prepared folder holds ``meta.json``, ``tokenizer/`` and, per split, flat little-endian ``.bin``
shards: the documents back to back, each one BOS followed by its tokens. No header, no index: a shard
is ``np.memmap``-able as it is, and its length is its file size over the token width. A document
never straddles two shards, so each shard is a valid corpus on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

FORMAT = "hyperloop-tokens/1"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")
# 100M tokens (200 MB of uint16) a shard, as nanoGPT's FineWeb shards: large enough that a corpus
# is a handful of files, small enough to copy and checksum one at a time.
DEFAULT_SHARD_TOKENS = 100_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Appends whole documents to ``<split>-NNNNN.bin`` files, starting a new file before a document
    that would push the current one past ``shard_tokens`` (a longer document gets a shard of its own)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[str] = []
        self.shard_sizes: list[int] = []  # tokens in each shard
        self._file: BinaryIO | None = None

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append the documents laid out back to back in ``tokens`` with the given lengths."""
        doc_ends = np.cumsum(doc_lengths)
        doc, n_docs = 0, len(doc_lengths)
        while doc < n_docs:
            begin = int(doc_ends[doc - 1]) if doc else 0
            room = self.shard_tokens - (self.shard_sizes[-1] if self._file else 0)
            # The documents doc..last-1 are the ones that still fit in this shard.
            last = int(np.searchsorted(doc_ends, begin + room, side="right"))
            if last == doc:
                if self._file is not None:  # an open shard always holds a document already
                    self._close()
                    continue
                last = doc + 1  # a fresh shard takes one document even when it is oversized
            if self._file is None:
                self._open()
            end = int(doc_ends[last - 1])
            self._file.write(tokens[begin:end].astype(self.dtype, copy=False).tobytes())
            self.shard_sizes[-1] += end - begin
            doc = last

    def close(self) -> None:
        if self._file is not None:
            self._close()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 -- stays open across write() calls
        self.shards.append(name)
        self.shard_sizes.append(0)

    def _close(self) -> None:
        self._file.close()
        self._file = None
