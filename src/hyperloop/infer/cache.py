"""A static KV cache for looped models: one slot per unrolled layer execution.

A looped model runs its middle layers K times per token with the same weights, but each execution
sees a different input, so each needs its own keys and values: the slot of an execution is its
`Step.index` in `model.plan(K)` (begin layers, then middle layer i of loop l at b + l*m + i, then the
end layers), as in Huginn's per-(layer, iteration) cache (reference-notes section 4).

Everything is preallocated with fixed shapes - per slot (B, H, T_max, D) keys and values, a 0-d
column counter, per-row padding - and a step attends over all T_max columns under a mask (SDPA) or,
for one new token per row on CUDA, in a kernel that reads the column counter on the device and skips
the empty columns (decode_attention.py). Either way a decode step launches the same kernels every
time and can be captured once as a CUDA graph. Each slot is a tensor of its own, written with an
indexed assignment: torch.compile turns that into an in-place write of the new column, whereas
writing into a view of one (slots, ...) tensor made it copy every slot, for every layer, at every
step.

Batches of prompts of different lengths are *left*-padded: row b's prompt occupies columns
pad[b] .. L-1, so all rows write the same column at each step and one counter serves the batch.
A token's RoPE position is its column minus its row's padding, and keys left of pad[b] are masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperloop.model import HyperloopLM
from hyperloop.model.hyper import HAS_TRITON, is_power_of_two

if HAS_TRITON:
    from hyperloop.infer.decode_attention import decode_attention


class KVCache:
    """Keys/values of every unrolled layer execution, plus the masking of a left-padded batch.

    The model calls `attend(slot, q, k, v)`; the decoder calls `start(T)` before each forward over T
    new tokens (it returns their RoPE positions) and `advance(T)` after it.
    """

    def __init__(self, slots: int, batch: int, n_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):  # fmt: skip
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.max_len = max_len
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        # The next column to write. A tensor, not an int, so a captured CUDA graph reads its live value.
        self.column = torch.zeros((), dtype=torch.long, device=device)
        self.key_columns = torch.arange(max_len, device=device)
        # Early exit: rows whose keys/values may still be written this step (None = all rows).
        self.write_rows: torch.Tensor | None = None
        # One new token per row on CUDA: our decode-attention kernel, which visits only the columns
        # written so far (decode_attention.py), instead of SDPA over all T_max under the mask.
        self.decode_kernel = HAS_TRITON
        # A whole Block for one token in a few fused kernels (int4_block.FusedInt4Blocks), set by the Decoder.
        self.fused_block = None
        self._columns = self._mask = self.positions = None

    @classmethod
    def for_model(cls, model: HyperloopLM, batch: int, max_len: int, num_loops: int | None = None) -> KVCache:
        """A cache sized for `model` run with `num_loops` loops (default: the trained count)."""
        cfg = model.cfg
        # Activations follow the embedding's dtype (a quantized model's linears are no guide).
        weight = model.embed.weight
        slots = len(model.plan(num_loops))
        return cls(slots, batch, cfg.n_heads, max_len, cfg.head_dim, dtype=weight.dtype, device=weight.device)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reset(self, pad: torch.Tensor) -> None:
        """Start a new batch whose row b is left-padded by pad[b] columns. Old contents need no
        clearing: every column is written before any query can see it."""
        self.pad.copy_(pad)
        self.column.zero_()
        self.write_rows = None

    def start(self, T: int) -> torch.Tensor:
        """Prepare a forward over T new tokens (columns column .. column+T-1) and return their RoPE
        positions (B, T). Builds SDPA's mask once for all layers of the forward, unless the
        decode-attention kernel (which needs none) will run."""
        columns = self.column + torch.arange(T, device=self.column.device)  # (T,)
        self._mask = None if self._decode_kernel_for(T) else self._sdpa_mask(columns)
        self._columns = columns
        self.positions = (columns.view(1, T) - self.pad.view(-1, 1)).clamp(min=0)
        return self.positions

    def _sdpa_mask(self, columns: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T_max): which cache columns each of the new tokens at `columns` (T,) may see."""
        keys, queries = self.key_columns.view(1, 1, -1), columns.view(1, -1, 1)
        visible = (keys >= self.pad.view(-1, 1, 1)) & (keys <= queries)  # causal, padding hidden
        # A padding query would see no key at all (a softmax of only -inf is NaN): let it see itself.
        # Its output is never read by a real token, whose mask hides padding columns.
        return (visible | (keys == queries)).unsqueeze(1)

    def _decode_kernel_for(self, T: int) -> bool:
        """Whether a forward over T new tokens attends with decode_attention (no mask needed)."""
        return self.decode_kernel and T == 1 and self.device.type == "cuda" and is_power_of_two(self.k[0].shape[3])

    def advance(self, T: int) -> None:
        self.column += T

    def attend(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this execution's new keys/values into its slot, then attend over the slot's columns."""
        k_all, v_all = self.k[slot], self.v[slot]
        if self.write_rows is not None:  # rows that exited keep the K/V written at their exit
            keep = ~self.write_rows.view(-1, 1, 1, 1)
            k = torch.where(keep, k_all[:, :, self._columns], k)
            v = torch.where(keep, v_all[:, :, self._columns], v)
        k_all[:, :, self._columns] = k
        v_all[:, :, self._columns] = v
        if self._decode_kernel_for(q.shape[2]):
            return decode_attention(q, k_all, v_all, self.pad, self.column)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=self._mask)

    def copy_forward(self, rows: torch.Tensor, source: list[int], targets: list[int]) -> None:
        """For the given rows, overwrite the current columns of slots `targets` with those of
        `source` (paired in order): a token that exits early gives the loops it skipped the K/V of
        the loop it exited at, so later tokens attending to it there find its exit state."""
        keep = ~rows.view(-1, 1, 1, 1)
        for src, dst in zip(source, targets, strict=True):
            for store in (self.k, self.v):
                columns = store[dst][:, :, self._columns]
                store[dst][:, :, self._columns] = torch.where(keep, columns, store[src][:, :, self._columns])
