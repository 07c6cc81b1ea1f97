"""Reading prepared token shards: ``TokenData`` opens a folder, ``TrainLoader`` feeds training,
``EvalWindows`` feeds evaluation.

Windows. A split is one long token sequence (its shards back to back, documents separated by BOS).
Window ``i`` is the ``seq_len + 1`` tokens starting at ``i * seq_len``: inputs are its first
``seq_len`` tokens, targets its last ``seq_len``. Consecutive windows share one token, so every token
after the first is a target of exactly one window, and windows may cross document (and shard)
boundaries, as in nanoGPT and the paper's packed 2048-token sequences.

Training order. Each epoch is a permutation of all windows, fixed by ``(seed, epoch)``, cut into
blocks of ``micro_batch`` windows (the ``num_windows % micro_batch`` windows left over are skipped
that epoch; the next permutation puts other windows last). All epochs chained give one global
sequence of blocks, and micro-batch ``k`` of rank ``r`` is global block ``k * world_size + r``. So one
rank accumulating ``A`` micro-batches per step and ``W`` ranks accumulating ``A / W`` each consume the
same blocks at every optimizer step, no window repeats within an epoch, and the only state is the
number of blocks consumed globally: a checkpoint written by ``N`` ranks resumes on ``M`` ranks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hyperloop.data.shards import FORMAT, META_FILE, TOKENIZER_DIR
from hyperloop.data.tokenizer import Tokenizer, load_tokenizer
from hyperloop.errors import HyperloopError


class SplitTokens:
    """The tokens of one split as a single read-only sequence over its memory-mapped shards.

    Supports ``len``, integer indexing and step-1 slicing; a slice inside one shard is a view of the
    memory map (no copy), a slice across shards is a new array. ``np.asarray`` reads everything.
    """

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype):
        self._shards = shards
        self._ends = np.cumsum([len(s) for s in shards], dtype=np.int64)
        self.dtype = dtype

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, position: int) -> tuple[int, int]:
        """(shard index, offset in that shard) of a position in [0, len)."""
        shard = int(np.searchsorted(self._ends, position, side="right"))
        return shard, position - (int(self._ends[shard - 1]) if shard else 0)

    def __getitem__(self, key: int | slice) -> np.ndarray | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("SplitTokens supports slices with step 1 only")
            if stop <= start:
                return np.empty(0, dtype=self.dtype)
            shard, offset = self._locate(start)
            pieces = []
            while start < stop:
                take = min(stop - start, len(self._shards[shard]) - offset)
                pieces.append(self._shards[shard][offset:offset + take])
                start, shard, offset = start + take, shard + 1, 0
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        index = key + len(self) if key < 0 else key
        if not 0 <= index < len(self):
            raise IndexError(f"token index {key} out of range for {len(self)} tokens")
        shard, offset = self._locate(index)
        return int(self._shards[shard][offset])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``rows[i] = self[starts[i]:starts[i] + length]``, shape (len(starts), length).

        Windows inside one shard are gathered in one NumPy call through a strided view of the shard
        (no Python loop per window: the loader must keep up with a GPU at short sequence lengths);
        the rare window that straddles two shards is sliced on its own.
        """
        rows = np.empty((len(starts), length), dtype=self.dtype)
        shard_of = np.searchsorted(self._ends, starts, side="right")
        for shard in np.unique(shard_of).tolist():
            picked = np.flatnonzero(shard_of == shard)
            local = starts[picked] - (int(self._ends[shard - 1]) if shard else 0)
            inside = local + length <= len(self._shards[shard])
            if inside.any():
                view = np.lib.stride_tricks.sliding_window_view(self._shards[shard], length)
                rows[picked[inside]] = view[local[inside]]
            for row in picked[~inside].tolist():
                rows[row] = self[int(starts[row]):int(starts[row]) + length]
        return rows


class TokenData:
    """A folder written by `prepare`: ``meta.json``, ``tokenizer/`` and the ``.bin`` shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise HyperloopError(f"data folder {path} does not exist; run `hyperloop prepare --out {path}` first")
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise HyperloopError(f"{path} has no {META_FILE}, so it is not a prepared folder; run `hyperloop prepare`")
        self.meta: dict = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise HyperloopError(
                f"{path} is in format {self.meta.get('format')!r}, this hyperloop reads {FORMAT!r}; prepare it again"
            )
        self._splits: dict[str, SplitTokens] = {}

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with (the copy saved in the folder)."""
        return load_tokenizer(self.path / TOKENIZER_DIR)

    def split_tokens(self, split: str) -> SplitTokens:
        """All tokens of ``split``; shard files are checked against meta.json and memory-mapped once."""
        if split not in self._splits:
            splits = self.meta["splits"]
            if split not in splits:
                raise HyperloopError(f"{self.path} has no split '{split}' (it has: {', '.join(splits)})")
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            shards = []
            for name, n_tokens in zip(splits[split]["shards"], splits[split]["shard_tokens"]):
                file = self.path / name
                expected = n_tokens * dtype.itemsize
                if not file.is_file() or file.stat().st_size != expected:
                    raise HyperloopError(
                        f"shard {file} is missing or not {expected} bytes as meta.json says; prepare the data again"
                    )
                shards.append(np.memmap(file, dtype=dtype, mode="r"))
            self._splits[split] = SplitTokens(shards, dtype)
        return self._splits[split]

    def check_vocab(self, vocab_size: int, sha256: str | None = None) -> None:
        """Raise if a model with ``vocab_size`` embeddings cannot read these tokens: the data's
        tokenizer has more ids than the model, or (when ``sha256`` is given, e.g. from a checkpoint) it is
        a different tokenizer. A larger model vocabulary is fine (models pad it, e.g. 50257 -> 50304)."""
        tok = self.meta["tokenizer"]
        if tok["vocab_size"] > vocab_size:
            raise HyperloopError(
                f"{self.path} was tokenized with a {tok['vocab_size']}-token {tok['kind']} vocabulary but the model "
                f"has {vocab_size} embeddings; prepare the data with the model's tokenizer or raise model.vocab_size"
            )
        if sha256 is not None and sha256 != tok["sha256"]:
            raise HyperloopError(
                f"{self.path} was tokenized with another tokenizer (sha256 {tok['sha256'][:12]}) than the model's "
                f"({sha256[:12]}); prepare the data with the model's tokenizer"
            )


def _read_windows(tokens: SplitTokens, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 tensors of shape (len(windows), seq_len) for the given window indices."""
    rows = tokens.windows(windows.astype(np.int64) * seq_len, seq_len + 1)
    # astype makes each one contiguous int64 array, which torch then shares without a copy.
    return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))


def _count_windows(tokens: SplitTokens, seq_len: int) -> int:
    return max(len(tokens) - 1, 0) // seq_len


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijection of uint64 that scrambles every bit (wraps mod 2^64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def window_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of window indices for ``(seed, epoch)``: windows sorted by a keyed 64-bit hash.

    Written out instead of drawn from ``numpy.random`` because NumPy does not promise the same stream
    across versions, and a run resumed after an upgrade must still get exactly the next batch. The hash
    is a bijection, so there are no ties. Cost: one argsort per epoch (about a second per 10M windows).
    """
    key = _splitmix64(_splitmix64(np.array([seed & 2**64 - 1], dtype=np.uint64)) ^ np.uint64(epoch))
    return np.argsort(_splitmix64(np.arange(num_windows, dtype=np.uint64) ^ key), kind="stable")


class TrainLoader:
    """Training batches from a split: ``next_batch()`` -> (x, y), int64 CPU tensors (micro_batch, seq_len),
    y being x shifted by one token. Order and sharding across ranks are described in the module docstring.
    All ranks must call ``next_batch`` the same number of times; the state is then identical on every rank."""

    def __init__(
        self, data: TokenData, seq_len: int, micro_batch: int, seed: int = 0,
        rank: int = 0, world_size: int = 1, split: str = "train",
    ):
        if seq_len < 1 or micro_batch < 1:
            raise HyperloopError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be at least 1")
        if not 0 <= rank < world_size:
            raise HyperloopError(f"rank {rank} is outside a world of {world_size}")
        self.tokens = data.split_tokens(split)
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.rank, self.world_size, self.split = rank, world_size, split
        self.num_windows = _count_windows(self.tokens, seq_len)
        self.blocks_per_epoch = self.num_windows // micro_batch
        if self.blocks_per_epoch == 0:
            raise HyperloopError(
                f"split '{split}' of {data.path} has {len(self.tokens)} tokens, fewer than one micro-batch of "
                f"{micro_batch} x {seq_len} + 1; use a smaller micro_batch or seq_len, or more data"
            )
        self._blocks_consumed = 0  # global: by all ranks together
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next global block belongs to (0-based)."""
        return self._blocks_consumed // self.blocks_per_epoch

    @property
    def tokens_seen(self) -> int:
        """Target tokens consumed by all ranks together (micro-batches x micro_batch x seq_len)."""
        return self._blocks_consumed * self.micro_batch * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, block = divmod(self._blocks_consumed + self.rank, self.blocks_per_epoch)
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, window_order(self.num_windows, self.seed, epoch)
        windows = self._order[block * self.micro_batch:(block + 1) * self.micro_batch]
        self._blocks_consumed += self.world_size
        return _read_windows(self.tokens, windows, self.seq_len)

    def state_dict(self) -> dict:
        """Rank-independent position: save it from any one rank."""
        return {
            "seed": self.seed, "seq_len": self.seq_len, "micro_batch": self.micro_batch,
            "split": self.split, "num_windows": self.num_windows, "blocks_consumed": self._blocks_consumed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped: the next batch is the one the saving run would have drawn next
        (on any number of ranks). The order-defining settings and the data size must match."""
        for key in ("seed", "seq_len", "micro_batch", "split", "num_windows"):
            if state.get(key) != getattr(self, key):
                raise HyperloopError(
                    f"the loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{getattr(self, key)!r}; resume with the same data and settings"
                )
        self._blocks_consumed = int(state["blocks_consumed"])


class EvalWindows:
    """The windows of a split in order, in batches of up to ``batch_size``: each iteration yields (x, y)
    int64 tensors of shape (rows, seq_len), the last batch possibly shorter.

    Every token of the split except the first is predicted exactly once, up to the tail: the
    ``(tokens - 1) % seq_len`` last tokens that do not fill a window are not scored, and ``max_tokens``
    caps the predicted tokens. ``num_predicted_tokens = num_windows * seq_len`` is the exact count, the
    denominator of the mean loss. Each window's context restarts at its first token.
    """

    def __init__(
        self, data: TokenData, seq_len: int, batch_size: int, split: str = "validation",
        max_tokens: int | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise HyperloopError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be at least 1")
        self.tokens = data.split_tokens(split)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_windows = _count_windows(self.tokens, seq_len)
        if max_tokens is not None:
            self.num_windows = min(self.num_windows, max_tokens // seq_len)
        if self.num_windows == 0:
            raise HyperloopError(
                f"split '{split}' of {data.path} has {len(self.tokens)} tokens, not one window of {seq_len} + 1"
                + (f" within max_tokens={max_tokens}" if max_tokens is not None else "")
                + "; use a smaller seq_len or prepare with a validation split (--val-fraction / --val-source)"
            )
        self.num_predicted_tokens = self.num_windows * seq_len

    def __len__(self) -> int:
        return math.ceil(self.num_windows / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_windows, self.batch_size):
            windows = np.arange(start, min(start + self.batch_size, self.num_windows))
            yield _read_windows(self.tokens, windows, self.seq_len)
