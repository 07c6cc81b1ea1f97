"""Attention of one new token per row over the KV cache, in Triton (CUDA decoding).

Why: the cache keeps fixed shapes (so a decode step can be captured as a CUDA graph), and SDPA then
attends over all T_max columns under a mask: 7.6 us per layer in an H100 profile of the S model's
decode step at T_max 255, a sixth of the step. These kernels read the live column counter and the
row's padding from the device, so the same captured launch visits only the columns a row can see,
pad[b] .. column, in one pass with an online softmax (fp32 sums):

    out_bh = sum_t softmax_t(q_bh . k_bht / sqrt(D)) v_bht,   pad[b] <= t <= column

One program per (row, head) and chunk of CHUNK columns, which it visits BLOCK at a time. With one
chunk (T_max <= CHUNK) it writes the output; with more (flash-decoding), each chunk's program keeps
its running max, sum and weighted values, and a second kernel combines the chunks of a (row, head).
A query of a decode step is never padding (every prompt has a token), so at least one chunk sees a
column.

The fused int4 layer (infer/int4_block.py) attends with a CUDA kernel instead (quant/gemv.cu:
clusters of blocks per head, started while the wqkv GEMV before it finishes). In the bf16 step,
where the kernel before is not ours and cannot start it early, the two run at the same speed
(results/int4.json, cuda_attention_dev_2026_11_26), and this one needs no CUDA toolkit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # cache columns per loop step of a program (the best of a sweep on an H100, D 64 and 128)
CHUNK = 512  # columns per program: a longer cache is split over programs (flash-decoding)


@triton.jit
def _attend_chunk_kernel(q, k, v, out, partial, pad, column, H, q_stride_b, q_stride_h, kv_stride_b, kv_stride_h,
                         out_stride_b, out_stride_h, D: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                         SPLIT: tl.constexpr):  # fmt: skip
    bh, chunk = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    dims = tl.arange(0, D)
    scale = tl.rsqrt(tl.full((), D, tl.float32))  # computed here: inductor passes a Python float as fp64
    query = tl.load(q + b * q_stride_b + h * q_stride_h + dims).to(tl.float32) * scale
    first = tl.maximum(tl.load(pad + b), chunk * CHUNK)
    stop = tl.minimum(tl.load(column) + 1, (chunk + 1) * CHUNK)
    keys = k + b * kv_stride_b + h * kv_stride_h
    values = v + b * kv_stride_b + h * kv_stride_h
    best = tl.full((), float("-inf"), tl.float32)  # running max of the scores
    total = tl.zeros((), tl.float32)  # running sum of exp(score - best)
    acc = tl.zeros((D,), tl.float32)
    for start in range(first // BLOCK * BLOCK, stop, BLOCK):  # no step for a chunk that sees nothing
        cols = start + tl.arange(0, BLOCK)
        seen = (cols >= first) & (cols < stop)
        offsets = cols[:, None] * D + dims[None, :]
        key = tl.load(keys + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
        scores = tl.where(seen, tl.sum(key * query[None, :], axis=1), float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        p = tl.exp(scores - new_best)
        rescale = tl.exp(best - new_best)  # 0 at the first step (best = -inf)
        value = tl.load(values + offsets, mask=seen[:, None], other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(p[:, None] * value, axis=0)
        total = total * rescale + tl.sum(p, axis=0)
        best = new_best
    if SPLIT:  # (max, sum, weighted values) of this chunk for the combine
        row = partial + (bh * tl.num_programs(1) + chunk) * (D + 2)
        tl.store(row + dims, acc)
        tl.store(row + D, best)
        tl.store(row + D + 1, total)
    else:
        tl.store(out + b * out_stride_b + h * out_stride_h + dims, (acc / total).to(out.dtype.element_ty))


@triton.jit
def _combine_kernel(partial, out, H, CHUNKS, out_stride_b, out_stride_h, D: tl.constexpr, CP: tl.constexpr):
    bh = tl.program_id(0)
    chunks, dims = tl.arange(0, CP), tl.arange(0, D)
    rows = partial + (bh * CHUNKS + chunks) * (D + 2)
    used = chunks < CHUNKS
    best = tl.load(rows + D, mask=used, other=float("-inf"))
    weight = tl.where(best > float("-inf"), tl.exp(best - tl.max(best, axis=0)), 0.0)
    total = tl.sum(weight * tl.load(rows + D + 1, mask=used, other=0.0), axis=0)
    acc = tl.sum(weight[:, None] * tl.load(rows[:, None] + dims[None, :], mask=used[:, None], other=0.0), axis=0)
    b, h = bh // H, bh % H
    tl.store(out + b * out_stride_b + h * out_stride_h + dims, (acc / total).to(out.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pad: torch.Tensor,
                     column: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """q (B, H, 1, D) over contiguous k_cache, v_cache (B, H, T_max, D), keys pad[b] .. column
    (device tensors: a 0-d column counter, (B,) padding) -> (B, H, 1, D) in q's dtype."""
    B, H, _, D = q.shape
    chunks = triton.cdiv(k_cache.shape[2], CHUNK)
    out = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    partial = torch.empty(B * H * chunks * (D + 2) if chunks > 1 else 1, device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1))
    warps = max(4, BLOCK * D // 4096)  # a (BLOCK, D) fp32 tile: 128 values a thread
    _attend_chunk_kernel[(B * H, chunks)](q, k_cache, v_cache, out, partial, pad, column, H, *strides, D=D,
                                          BLOCK=BLOCK, CHUNK=CHUNK, SPLIT=chunks > 1, num_warps=warps)  # fmt: skip
    if chunks > 1:
        _combine_kernel[(B * H,)](partial, out, H, chunks, out.stride(0), out.stride(1), D=D,
                                  CP=triton.next_power_of_2(chunks), num_warps=4)  # fmt: skip
    return out
