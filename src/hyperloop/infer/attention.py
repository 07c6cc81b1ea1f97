"""Attention of one new token per row over the KV cache, in one Triton kernel (flash-decoding).

A decode step's query is one token, its keys every filled column of the cache. SDPA with the cache's
mask (what prefill uses) runs a general kernel over all max_len columns: about 7.6 us per layer on an
H100 at batch 1 for a 255-column cache, 18% of an S model's step. This kernel reads only the columns
that can be visible - from the row's padding up to the current column, which it reads from the
cache's device counter, so a captured CUDA graph stays right as the cache fills - and splits them
among programs so that even batch 1 keeps the GPU busy. Each split keeps a running max, sum and
weighted sum of values (the online softmax); the splits are merged in torch, which torch.compile
fuses with what follows.

Only on CUDA with Triton (`usable`); elsewhere, and for prefill, the cache calls SDPA with its mask.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only PyTorch
    triton = None

BLOCK = 32  # key columns per iteration
TARGET_PROGRAMS = 256  # about two per SM on an H100: split the columns until (rows x heads) x splits reaches it


def usable(q: torch.Tensor) -> bool:
    """One query column, on CUDA, a power-of-two head size (the kernel's vector width)."""
    head_dim = q.shape[-1]
    return triton is not None and q.is_cuda and q.shape[2] == 1 and head_dim & (head_dim - 1) == 0


def split_length(batch_heads: int, max_len: int) -> int:
    """Columns per program: a multiple of BLOCK, so that about TARGET_PROGRAMS programs run."""
    splits = max(1, min(TARGET_PROGRAMS // batch_heads, -(-max_len // BLOCK)))
    return -(-max_len // (splits * BLOCK)) * BLOCK


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pad_ptr, column_ptr, acc_ptr, max_ptr, sum_ptr, H, splits, scale,
                                 stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                                 D: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        row_head, split = tl.program_id(0), tl.program_id(1)
        b, h = row_head // H, row_head % H
        first = tl.load(pad_ptr + b)  # keys left of the row's padding are hidden
        end = tl.load(column_ptr) + 1  # the query's own column (its key is written) is the last
        lo = split * SPLIT
        hi = tl.minimum(lo + SPLIT, end)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        keys = k_ptr + b * stride_kb + h * stride_kh
        values = v_ptr + b * stride_kb + h * stride_kh
        # A finite floor instead of -inf keeps exp() of empty splits at 0 rather than NaN.
        running_max = -1e30
        running_sum = 0.0
        acc = tl.zeros((D,), tl.float32)
        for start in range(lo, hi, BLOCK):
            t = start + tl.arange(0, BLOCK)
            visible = (t < hi) & (t >= first)
            k = tl.load(keys + t[:, None] * stride_kt + d[None, :], mask=visible[:, None], other=0.0)
            s = tl.where(visible, tl.sum(k.to(tl.float32) * q[None, :], axis=1), -1e30)
            new_max = tl.maximum(running_max, tl.max(s, axis=0))
            p = tl.where(visible, tl.exp(s - new_max), 0.0)
            alpha = tl.exp(running_max - new_max)
            v = tl.load(values + t[:, None] * stride_kt + d[None, :], mask=visible[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            running_sum = running_sum * alpha + tl.sum(p, axis=0)
            running_max = new_max
        part = row_head * splits + split
        tl.store(acc_ptr + part * D + d, acc)
        tl.store(max_ptr + part, running_max)
        tl.store(sum_ptr + part, running_sum)

    @triton_op("hyperloop::decode_attention", mutates_args={})
    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor,
                         column: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """q (B, H, 1, D); k, v (B, H, max_len, D) with unit stride along D; pad (B,); column: 0-d,
        the query's column. Returns softmax(q k^T / sqrt(D)) v over columns pad[b] .. column."""
        B, H, _, D = q.shape
        max_len = k.shape[2]
        split = split_length(B * H, max_len)
        splits = -(-max_len // split)
        acc = torch.empty((B * H, splits, D), device=q.device, dtype=torch.float32)
        maxima = torch.empty((B * H, splits), device=q.device, dtype=torch.float32)
        sums = torch.empty((B * H, splits), device=q.device, dtype=torch.float32)
        wrap_triton(_decode_attention_kernel)[(B * H, splits)](
            q, k, v, pad, column, acc, maxima, sums, H, splits, D**-0.5, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2), D=D, BLOCK=BLOCK, SPLIT=split)  # fmt: skip
        weight = torch.exp(maxima - maxima.max(dim=1, keepdim=True).values)  # merge the splits
        out = (acc * weight[..., None]).sum(dim=1) / (sums * weight).sum(dim=1, keepdim=True)
        return out.view(B, H, 1, D).to(q.dtype)
