"""A hyper-connection site as a few Triton kernels, forward and backward (CUDA training): Hyperloop's
(diagonal H_res) and mHC's (Sinkhorn H_res, n a power of two).

Why: a site works on n fp32 streams of width C per token; at 16 x 2048 tokens, n = 4, C = 1024,
each pass over them moves 512 MB. Compiled op by op (hyper.py), a site's forward and backward make
about twenty such passes: the RMS, an fp32 GEMM with 3n output columns and its two backward GEMMs,
the combines, and autograd's sums of the three gradients that reach y. These kernels make about
eleven:

    forward   stats     u = W y, ss = sum(y^2)                        one read of y
              (torch)   h_pre, h_post, h_res from u, ss               (rows, 3n) tensors
              combine   x = sum_j h_pre_j y_j                         one read of y
              write     y' = h_res y + h_post (out + e)               read y, write y'
    backward  write     g_hres = g'.y, g_hpost = g'.(out + e),        read g', y
                        g_out = sum_j h_post_j g'_j
              reduce    g_hpre = gx.y_j                               read y
              (torch)   the coefficients' chain rule on (rows, 3n)
              read      gy = h_res g' + h_pre gx + W^T gu + 2 gss y,  read g', y; write gy
                        gW += gu^T y (partial sums per row group)

The write's and the read's gradients for y are summed inside the read's backward kernel instead of
by autograd (a pass fewer each way): `read` also returns an alias of y, which `write` takes in y's
place; the write's backward hands its incoming gradient g' to that alias untouched, and the read's
backward applies h_res to it. The two functions are only correct as that pair (`read` then `write`
on its alias), which is how HyperConnection uses them.

Where sites follow one another (the model's loop, lm.py), three more passes go:
- a write can take the next site's stats as it writes y' (`next_site`: the stats kernel with the
  write in front, WRITE); that site's read then starts from them (`Ahead`) instead of reading y';
- the last write can return the streams' mean instead of the streams (`merge`), never storing them;
- the first site reads n copies of one stream (expand_streams' broadcast): its kernels read that
  stream once, with W's n blocks summed, and its backward forms the sum of the n copies' gradients.

A full (Sinkhorn) H_res, mHC's: the gates have 2n + n^2 rows; `sinkhorn` projects the n x n logits
in a kernel that keeps its iterates for `sinkhorn_backward`; the writes mix the n streams of a tile
(y'_j = sum_k H_jk y_k + h_post_j (out + e)); and the write's backward, which holds every g'_j,
applies H_res^T to g' itself, so the read's backward gets one gradient stream per stream as for the
diagonal (where the read's backward applies h_res instead).

Every sum is in fp32 whatever the stream dtype, as in hyper.py, and so is every product but those of
the W y projection and its gradients (TF32, see DOT); the results match the op-by-op site to that
precision (tests/test_gpu.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from hyperloop.model.hyper import mean_of_streams_grad

# Block shapes (rows x columns per program, warps) of the kernels with a tl.dot (best of a sweep on
# an H100 at 16 x 2048 tokens, n = 4, C = 1024), and the precision of their products: TF32 on the
# tensor cores with fp32 sums, what torch.backends.cuda.matmul.allow_tf32 gives fp32 matmuls. It
# rounds W y (and its two gradients) to ~5e-4 relative, far below the bf16 rounding of every
# activation in autocast training. fp32-accurate products cost more than the memory traffic here:
# the stats kernel takes 1.4-1.6x as long with three TF32 products ("tf32x3") and 3.7-3.8x with fp32
# FMAs ("ieee") (benchmarks/fused_site.py, results/train-throughput.md).
STATS = dict(BR=64, BC=64, num_warps=4, num_stages=3)
STATS_WRITE = dict(BR=32, BC=64, num_warps=2, num_stages=3)  # with a site's write in front (write=...)
STATS_WRITE_FULL = dict(BR=16, BC=64, num_warps=2, num_stages=3)  # the same with a full H_res (mHC): 422 us vs 966
READ_BWD = dict(BR=64, BC=64, num_warps=4)
WRITE_BWD = dict(BR=16, BC=128, num_warps=4, num_stages=3)
WRITE_BWD_FULL = dict(BR=8, BC=64, num_warps=4, num_stages=3)  # with a full H_res (mHC): 559 us vs 750, H200
READ_BWD_BROADCAST = dict(BR=32, BC=64, num_warps=4)  # the first site's: n stream gradients per tile
ROW_GROUPS = 16  # programs along the rows in the backward kernel (each sums its part of gW)
DOT = "tf32"


class Ahead(NamedTuple):
    """A site's stats of its streams, taken by the previous site's write as it wrote them."""

    u: torch.Tensor  # W y, (rows, 3n)
    ss: torch.Tensor  # sum(y^2), (rows,)


class Coefficients(NamedTuple):
    """What `read` hands to `write`: the gates and the alias of y that routes g' (see above)."""

    h_post: torch.Tensor  # (rows, n)
    h_res: torch.Tensor  # (rows, n)
    stream: torch.Tensor  # alias of y, (rows, n, C)


def _cols(dim: int, most: int = 128) -> int:
    """Columns per block: the largest power of two dividing dim, at most `most` (at least 16: tl.dot)."""
    return min(most, dim & -dim)


@triton.jit
def _streams(y, rows, rmask, cols, s_yr, s_yn, N: tl.constexpr):
    """The n streams of the (rows, cols) tile as one (rows, n, cols) fp32 tile, for a FULL H_res:
    each stream is read once for the n mixed ones, or for its products with every g'_j in the write's
    backward (a diagonal H_res reads them one at a time)."""
    ks = tl.arange(0, N)
    offs = rows[:, None, None] * s_yr + ks[None, :, None] * s_yn + cols[None, None, :]
    return tl.load(y + offs, mask=rmask[:, None, None], other=0.0).to(tl.float32)


@triton.jit
def _mixed(y, y3, h_res, rows, rmask, cols, j, s_yr, s_yn, N: tl.constexpr, FULL: tl.constexpr):
    """Stream j of H_res y over the (rows, cols) tile, in fp32: h_res (R, n) is diagonal, (R, n, n)
    FULL (then y3 holds the tile's n streams, from _streams)."""
    if FULL:
        hj = tl.load(h_res + rows[:, None] * (N * N) + j * N + tl.arange(0, N)[None, :], mask=rmask[:, None], other=0.0)
        return tl.sum(hj[:, :, None] * y3, axis=1)
    yv = tl.load(y + rows[:, None] * s_yr + j * s_yn + cols[None, :], mask=rmask[:, None], other=0.0)
    return tl.load(h_res + rows * N + j, mask=rmask, other=0.0)[:, None] * yv.to(tl.float32)


@triton.jit
def _stats_kernel(y, w, u, ss, out, e, h_post, h_res, y_new, R, s_yr, s_yn, s_or, C: tl.constexpr, N: tl.constexpr,
                  P: tl.constexpr, PP: tl.constexpr, WRITE: tl.constexpr, HAS_E: tl.constexpr, FULL: tl.constexpr,
                  BR: tl.constexpr, BC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    # WRITE: the streams to take the statistics of are the previous site's write, h_res y + h_post (out + e),
    # stored in y_new on the way (one pass for a site's write and the next site's stats)
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    rmask = rows[:, None] < R
    cols, ps = tl.arange(0, BC), tl.arange(0, PP)
    acc = tl.zeros((BR, PP), tl.float32)
    sq = tl.zeros((BR,), tl.float32)
    for c0 in range(0, C, BC):
        if WRITE:
            o = tl.load(out + rows[:, None] * s_or + c0 + cols[None, :], mask=rmask, other=0.0).to(tl.float32)
            if HAS_E:
                o += tl.load(e + c0 + cols).to(tl.float32)[None, :]
        y3 = y  # unused unless FULL
        if WRITE and FULL:
            y3 = _streams(y, rows, rows < R, c0 + cols, s_yr, s_yn, N)
        for j in tl.static_range(N):
            if WRITE:
                post = tl.load(h_post + rows * N + j, mask=rows < R, other=0.0)
                kept = _mixed(y, y3, h_res, rows, rows < R, c0 + cols, j, s_yr, s_yn, N, FULL)
                new = (kept + post[:, None] * o).to(y_new.dtype.element_ty)
                tl.store(y_new + rows[:, None] * (N * C) + j * C + c0 + cols[None, :], new, mask=rmask)
                yv = new.to(tl.float32)  # the stored values, as the next site would read them
            else:
                yv = tl.load(y + rows[:, None] * s_yr + j * s_yn + c0 + cols[None, :], mask=rmask, other=0.0)
                yv = yv.to(tl.float32)
            sq += tl.sum(yv * yv, axis=1)
            wv = tl.load(w + ps[None, :] * (N * C) + j * C + c0 + cols[:, None], mask=ps[None, :] < P, other=0.0)
            acc = tl.dot(yv, wv, acc, input_precision=DOT)
    tl.store(u + rows[:, None] * P + ps[None, :], acc, mask=rmask & (ps[None, :] < P))
    tl.store(ss + rows, sq, mask=rows < R)


@triton.jit
def _combine_kernel(y, h, x, R, s_yr, s_yn, C: tl.constexpr, N: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < R
    acc = tl.zeros((BR, BC), tl.float32)
    for j in tl.static_range(N):
        hj = tl.load(h + rows * N + j, mask=rmask, other=0.0)
        yv = tl.load(y + rows[:, None] * s_yr + j * s_yn + cols[None, :], mask=rmask[:, None], other=0.0)
        acc += hj[:, None] * yv.to(tl.float32)
    tl.store(x + rows[:, None] * C + cols[None, :], acc.to(x.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _write_kernel(y, out, e, h_post, h_res, y_new, R, s_yr, s_yn, s_or, C: tl.constexpr, N: tl.constexpr,
                  HAS_E: tl.constexpr, MERGE: tl.constexpr, FULL: tl.constexpr, BR: tl.constexpr,
                  BC: tl.constexpr):  # fmt: skip
    # MERGE: y_new is (R, C), the mean of the new streams, which are not stored
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    rmask = rows < R
    o = tl.load(out + rows[:, None] * s_or + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    if HAS_E:
        o += tl.load(e + cols).to(tl.float32)[None, :]
    total = tl.zeros((BR, BC), tl.float32)
    y3 = y  # unused unless FULL
    if FULL:
        y3 = _streams(y, rows, rmask, cols, s_yr, s_yn, N)
    for j in tl.static_range(N):
        post = tl.load(h_post + rows * N + j, mask=rmask, other=0.0)
        new = _mixed(y, y3, h_res, rows, rmask, cols, j, s_yr, s_yn, N, FULL) + post[:, None] * o
        if MERGE:
            total += new
        else:
            tl.store(y_new + rows[:, None] * (N * C) + j * C + cols[None, :], new.to(y_new.dtype.element_ty),
                     mask=rmask[:, None])  # fmt: skip
    if MERGE:
        tl.store(y_new + rows[:, None] * C + cols[None, :], (total / N).to(y_new.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _write_bwd_kernel(g, y, out, e, h_post, h_res, g_res, g_post, g_out, g_e, g_mixed, R, s_gr, s_gn, s_gc, s_yr,
                      s_yn, s_or, C: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, HAS_E: tl.constexpr,
                      FULL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    # with HAS_E, g_e gets this program's column sums of g_out (the embedding's gradient, summed after);
    # g_res: g'_j . y_j per stream, or FULL (n a power of two) g'_j . y_k for every pair. FULL also
    # writes g_mixed = H_res^T g' (the streams' gradient through the mixing), so that the read's
    # backward takes one gradient stream per stream instead of n.
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    rmask = rows < R
    js = tl.arange(0, NP)
    if FULL:
        acc_res = tl.zeros((BR, N, N), tl.float32)
    else:
        acc_res = tl.zeros((BR, NP), tl.float32)
    acc_post = tl.zeros((BR, NP), tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        o = tl.load(out + rows[:, None] * s_or + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if HAS_E:
            o += tl.load(e + cols).to(tl.float32)[None, :]
        go = tl.zeros((BR, BC), tl.float32)
        if FULL:
            y3 = _streams(y, rows, rmask, cols, s_yr, s_yn, N)
            gm = tl.zeros((BR, N, BC), tl.float32)
        for j in tl.static_range(N):
            gv = tl.load(g + rows[:, None] * s_gr + j * s_gn + cols[None, :] * s_gc, mask=rmask[:, None], other=0.0)
            gv = gv.to(tl.float32)
            if FULL:  # g_res[j, k] += g'_j . y_k; g_mixed_k += H[j, k] g'_j
                acc_res += tl.where(js[None, :, None] == j, tl.sum(gv[:, None, :] * y3, axis=2)[:, None, :], 0.0)
                hj = tl.load(h_res + rows[:, None] * (N * N) + j * N + js[None, :], mask=rmask[:, None], other=0.0)
                gm += hj[:, :, None] * gv[:, None, :]
            else:
                yv = tl.load(y + rows[:, None] * s_yr + j * s_yn + cols[None, :], mask=rmask[:, None], other=0.0)
                acc_res += tl.where(js[None, :] == j, tl.sum(gv * yv.to(tl.float32), axis=1)[:, None], 0.0)
            acc_post += tl.where(js[None, :] == j, tl.sum(gv * o, axis=1)[:, None], 0.0)
            go += tl.load(h_post + rows * N + j, mask=rmask, other=0.0)[:, None] * gv
        tl.store(g_out + rows[:, None] * C + cols[None, :], go.to(g_out.dtype.element_ty), mask=rmask[:, None])
        if FULL:
            offs = rows[:, None, None] * (N * C) + js[None, :, None] * C + cols[None, None, :]
            tl.store(g_mixed + offs, gm.to(g_mixed.dtype.element_ty), mask=rmask[:, None, None])
        if HAS_E:
            tl.store(g_e + tl.program_id(0) * C + cols, tl.sum(go, axis=0))
    if FULL:
        offs = rows[:, None, None] * (N * N) + js[None, :, None] * N + js[None, None, :]
        tl.store(g_res + offs, acc_res, mask=rmask[:, None, None])
    else:
        tl.store(g_res + rows[:, None] * N + js[None, :], acc_res, mask=rmask[:, None] & (js[None, :] < N))
    tl.store(g_post + rows[:, None] * N + js[None, :], acc_post, mask=rmask[:, None] & (js[None, :] < N))


@triton.jit
def _read_reduce_kernel(gx, y, g_pre, R, s_xr, s_yr, s_yn, C: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    rmask = rows < R
    js = tl.arange(0, NP)
    acc = tl.zeros((BR, NP), tl.float32)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        gxv = tl.load(gx + rows[:, None] * s_xr + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        for j in tl.static_range(N):
            yv = tl.load(y + rows[:, None] * s_yr + j * s_yn + cols[None, :], mask=rmask[:, None], other=0.0)
            acc += tl.where(js[None, :] == j, tl.sum(gxv * yv.to(tl.float32), axis=1)[:, None], 0.0)
    tl.store(g_pre + rows[:, None] * N + js[None, :], acc, mask=rmask[:, None] & (js[None, :] < N))


@triton.jit
def _read_bwd_kernel(g, y, gx, h_pre, h_res, gu, gss, w, gy, gw, R, rows_per_group, scale, s_gr, s_gn, s_gc,
                     s_yr, s_yn, s_xr, C: tl.constexpr, N: tl.constexpr, NG: tl.constexpr, NH: tl.constexpr,
                     P: tl.constexpr, PP: tl.constexpr, HAS_G: tl.constexpr, MIXED: tl.constexpr, BR: tl.constexpr,
                     BC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    # N streams in y (1 for a broadcast input); each gathers h_res g' over NG of the NH = n streams of g
    # (1, its own; n for a broadcast input, whose one stream stands for all n). h_res: the diagonal
    # H_res; MIXED: g is H_res^T g' already (a full H_res, applied by the write's backward), h_res unread
    chunk, group = tl.program_id(0), tl.program_id(1)  # chunk: BC columns of one stream
    # the stream varies fastest: the N programs that read the same gx tile run side by side (L2 hits)
    j = chunk % N
    cols = (chunk // N) * BC + tl.arange(0, BC)
    ps = tl.arange(0, PP)
    pmask = ps < P
    wv = tl.load(w + ps[:, None] * (N * C) + j * C + cols[None, :], mask=pmask[:, None], other=0.0)  # (PP, BC)
    acc_w = tl.zeros((PP, BC), tl.float32)
    start = group * rows_per_group
    for r0 in range(start, start + rows_per_group, BR):
        rows = r0 + tl.arange(0, BR).to(tl.int64)
        rmask = rows < R
        m2 = rmask[:, None]
        yv = tl.load(y + rows[:, None] * s_yr + j * s_yn + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        guv = tl.load(gu + rows[:, None] * P + ps[None, :], mask=m2 & pmask[None, :], other=0.0)
        gxv = tl.load(gx + rows[:, None] * s_xr + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        pre = tl.load(h_pre + rows * N + j, mask=rmask, other=0.0)
        two_gss = 2.0 * tl.load(gss + rows, mask=rmask, other=0.0)
        acc = pre[:, None] * gxv + two_gss[:, None] * yv
        acc = tl.dot(guv, wv, acc, input_precision=DOT)
        if HAS_G:
            for k in tl.static_range(NG):
                gv = tl.load(g + rows[:, None] * s_gr + (j + k) * s_gn + cols[None, :] * s_gc, mask=m2, other=0.0)
                if MIXED:
                    acc += gv.to(tl.float32)
                else:
                    acc += tl.load(h_res + rows * NH + j + k, mask=rmask, other=0.0)[:, None] * gv.to(tl.float32)
        tl.store(gy + rows[:, None] * (N * C) + j * C + cols[None, :], (acc * scale).to(gy.dtype.element_ty), mask=m2)
        acc_w = tl.dot(tl.trans(guv), yv, acc_w, input_precision=DOT)
    tl.store(gw + group * (P * N * C) + ps[:, None] * (N * C) + j * C + cols[None, :], acc_w, mask=pmask[:, None])


@triton.jit
def _lse(x, axis: tl.constexpr):
    m = tl.max(x, axis)
    return tl.expand_dims(m + tl.log(tl.sum(tl.exp(x - tl.expand_dims(m, axis)), axis)), axis)


@triton.jit
def _matrix_tile(R, N: tl.constexpr, BR: tl.constexpr):
    """Offsets and mask of this program's BR rows of an (R, n, n) tensor, as (BR, n, n) tiles."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR).to(tl.int64)
    i = tl.arange(0, N)
    return rows[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :], rows[:, None, None] < R


@triton.jit
def _sinkhorn_kernel(z, h, iterates, R, N: tl.constexpr, ITERS: tl.constexpr, BR: tl.constexpr):
    # hyper.sinkhorn on (R, n, n) logits z: ITERS row-then-column normalisations in the log domain, h = exp(L).
    # iterates (ITERS + 1, R, n, n) keeps L after each iteration (slot 0: z) for the backward.
    offs, mask = _matrix_tile(R, N, BR)
    L = tl.load(z + offs, mask=mask, other=0.0)
    tl.store(iterates + offs, L, mask=mask)
    for t in range(1, ITERS + 1):
        L = L - _lse(L, 2)  # rows sum to 1
        L = L - _lse(L, 1)  # columns sum to 1
        tl.store(iterates + t * R * N * N + offs, L, mask=mask)
    tl.store(h + offs, tl.exp(L), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(iterates, g_h, g_z, R, N: tl.constexpr, ITERS: tl.constexpr, BR: tl.constexpr):
    # Each normalisation L' = L - lse(L) along an axis has the gradient g - exp(L') sum(g) along it.
    offs, mask = _matrix_tile(R, N, BR)
    L = tl.load(iterates + ITERS * R * N * N + offs, mask=mask, other=0.0)
    g = tl.load(g_h + offs, mask=mask, other=0.0) * tl.exp(L)  # through h = exp(L)
    for back in range(ITERS):
        g = g - tl.exp(L) * tl.expand_dims(tl.sum(g, 1), 1)  # the column step, whose output is L
        L = tl.load(iterates + (ITERS - 1 - back) * R * N * N + offs, mask=mask, other=0.0)
        g = g - tl.exp(L - _lse(L, 2)) * tl.expand_dims(tl.sum(g, 2), 2)  # the row step from L
    tl.store(g_z + offs, g, mask=mask)


SINKHORN_ROWS = 64  # rows per program of the Sinkhorn kernels


def sinkhorn(z: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hyper.sinkhorn of fp32 logits z (rows, n, n), n a power of two: H_res and the iterates that
    `sinkhorn_backward` needs."""
    R, n = z.shape[0], z.shape[1]
    h = torch.empty_like(z)
    iterates = z.new_empty((iters + 1, R, n, n))
    _sinkhorn_kernel[(triton.cdiv(R, SINKHORN_ROWS),)](z, h, iterates, R, N=n, ITERS=iters, BR=SINKHORN_ROWS)
    return h, iterates


def sinkhorn_backward(iterates: torch.Tensor, g_h: torch.Tensor) -> torch.Tensor:
    """The gradient of the logits from that of H_res."""
    iters, R, n = iterates.shape[0] - 1, iterates.shape[1], iterates.shape[2]
    g_z = torch.empty_like(iterates[0])
    _sinkhorn_bwd_kernel[(triton.cdiv(R, SINKHORN_ROWS),)](iterates, g_h.contiguous(), g_z, R, N=n, ITERS=iters,
                                                           BR=SINKHORN_ROWS)  # fmt: skip
    return g_z


def _gates(u, ss, alpha, bias, n: int, full: bool, width: int, eps: float):
    """The site's coefficients from u = W y and ss = sum(y^2) over the n x C = width stream values
    of each row, as HyperConnection.coefficients computes them; also what their gradient needs. The
    sigmoids s give H_pre, H_post / 2 and a diagonal H_res; a `full` (Sinkhorn) H_res is returned as
    its logits (rows, n * n), which `sinkhorn` turns into H_res."""
    inv_rms = torch.rsqrt(ss / width + eps)
    logits = u * inv_rms[:, None]
    alpha = alpha.float()  # a_pre, a_post, a_res, each for its rows of W
    a = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(u.shape[1] - 2 * n)])
    z = a * logits + bias.float()
    s = torch.sigmoid(z[:, : 2 * n] if full else z)
    res = z[:, 2 * n :] if full else s[:, 2 * n :]
    return inv_rms, logits, s, a, s[:, :n].contiguous(), 2.0 * s[:, n : 2 * n], res.contiguous()


def _gates_backward(g_sigmoids, g_sinkhorn, s, logits, inv_rms, a, width: int):
    """Gradients of u, ss, the bias and alpha from those of the sigmoids (H_pre, H_post / 2 and a
    diagonal H_res) and of a Sinkhorn H_res's logits (None if diagonal)."""
    g_z = g_sigmoids * s * (1.0 - s)
    if g_sinkhorn is not None:
        g_z = torch.cat([g_z, g_sinkhorn], -1)
    g_logits = g_z * a
    g_u = g_logits * inv_rms[:, None]
    # logits = u * rsqrt(ss / width + eps): d/d ss = -u / 2 * inv_rms^3 / width, with u = logits / inv_rms
    g_ss = -0.5 * (g_logits * logits).sum(-1) * inv_rms.square() / width
    n = s.shape[1] // (3 if g_sinkhorn is None else 2)
    pre, post, res = (g_z * logits).split([n, n, g_z.shape[1] - 2 * n], -1)
    return g_u, g_ss, g_z.sum(0), torch.stack([pre.sum(), post.sum(), res.sum()])


@functools.cache
def _compiled(fn):
    """fn compiled (built on first use): a site's coefficients are a dozen tiny element-wise kernels."""
    return torch.compile(fn)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n, C) -> (rows, n, C) without a copy where the strides allow (a broadcast y does)."""
    t = t.flatten(0, -3)
    return t if t.stride(-1) == 1 else t.contiguous()


def _np(n: int) -> int:
    return triton.next_power_of_2(n)


def stats(y: torch.Tensor, w: torch.Tensor, dot: str | None = None,
          write: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """u = W y (rows, P) and ss = sum(y^2) (rows,) of streams y (rows, n, C), fp32 W (P, n C), in one
    read of y; `dot` overrides the products' precision (DOT). With write = (out, e, h_post, h_res,
    y_new), of the streams h_res y + h_post (out + e) instead (h_res (rows, n) diagonal or (rows, n, n)),
    written to y_new in the same pass."""
    R, n, C = y.shape
    P = w.shape[0]
    u = y.new_empty((R, P), dtype=torch.float32)
    ss = y.new_empty((R,), dtype=torch.float32)
    out, e, h_post, h_res, y_new = write or (y, None, u, u, y)  # any tensors: not read without WRITE
    full = h_res.dim() == 3
    blocks = STATS if write is None else STATS_WRITE_FULL if full else STATS_WRITE
    _stats_kernel[(triton.cdiv(R, blocks["BR"]),)](
        y, w, u, ss, out, out if e is None else e, h_post, h_res, y_new, R, y.stride(0), y.stride(1), out.stride(0),
        C=C, N=n, P=P, PP=max(16, _np(P)), WRITE=write is not None, HAS_E=e is not None, FULL=full, BR=blocks["BR"],
        BC=_cols(C, blocks["BC"]), DOT=dot or DOT, num_warps=blocks["num_warps"], num_stages=blocks["num_stages"],
    )  # fmt: skip
    return u, ss


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, alpha, eps, dtype, ahead, sinkhorn_iters):
        # sinkhorn_iters: None for a diagonal H_res, else the iterations of a Sinkhorn one (mHC)
        R, n, C = y.shape
        BC = _cols(C)
        w = weight.float().contiguous()
        # n copies of one stream (the first site after expand_streams): read that stream once, as one
        # stream with the n streams' W blocks summed (W y = (sum_j W_j) y_0, sum(y^2) = n sum(y_0^2))
        ctx.broadcast = n > 1 and y.stride(1) == 0
        src, w_src = (y[:, :1], w.view(-1, n, C).sum(1)) if ctx.broadcast else (y, w)
        if ahead is not None:  # the previous site's write took the stats (backward is the same)
            u, ss = ahead.u, ahead.ss
        else:
            u, ss = stats(src, w_src)
            ss = ss * n if ctx.broadcast else ss
        full = sinkhorn_iters is not None
        inv_rms, logits, s, a, h_pre, h_post, h_res = _compiled(_gates)(u, ss, alpha, bias, n, full, n * C, eps)
        iterates = h_res.new_empty(0)
        if full:
            h_res, iterates = sinkhorn(h_res.view(R, n, n), sinkhorn_iters)
        h_src = h_pre.sum(1, keepdim=True) if ctx.broadcast else h_pre
        x = y.new_empty((R, C), dtype=dtype)
        _combine_kernel[(triton.cdiv(R, 32), C // BC)](src, h_src, x, R, src.stride(0), src.stride(1), C=C,
                                                       N=src.shape[1], BR=32, BC=BC)  # fmt: skip
        ctx.save_for_backward(src, w_src, logits, inv_rms, s, a, h_src, h_res, iterates)
        ctx.dtypes = weight.dtype, bias.dtype, alpha.dtype
        return x, h_post, h_res, y.view_as(y)

    @staticmethod
    def backward(ctx, gx, g_post, g_res, g_stream):
        # y, w, h_pre: of the one stream if broadcast; iterates: of a Sinkhorn H_res (else empty)
        y, w, logits, inv_rms, s, a, h_pre, h_res, iterates = ctx.saved_tensors
        R, ny, C = y.shape
        n, P, full = h_res.shape[1], w.shape[0], h_res.dim() == 3
        copies = n // ny  # of each stream of y: n if broadcast, else 1
        g_pre = y.new_empty((R, ny), dtype=torch.float32)
        gx = torch.zeros_like(y[:, 0]) if gx is None else gx
        gx = gx if gx.stride(-1) == 1 else gx.contiguous()
        _read_reduce_kernel[(triton.cdiv(R, 32),)](gx, y, g_pre, R, gx.stride(0), y.stride(0), y.stride(1), C=C,
                                                   N=ny, NP=_np(ny), BR=32, BC=_cols(C))  # fmt: skip
        g_pre = g_pre.expand(R, n)  # broadcast: gx . y_j is the same for every j
        g_post = g_post if g_post is not None else h_res.new_zeros((R, n))
        g_res = g_res if g_res is not None else torch.zeros_like(h_res)
        g_sigmoids = torch.cat([g_pre, 2.0 * g_post] + ([] if full else [g_res]), -1)
        g_sinkhorn = sinkhorn_backward(iterates, g_res).flatten(1) if full else None
        g_u, g_ss, g_bias, g_alpha = _compiled(_gates_backward)(g_sigmoids, g_sinkhorn, s, logits, inv_rms, a, n * C)
        gy = torch.empty((R, ny, C), dtype=y.dtype, device=y.device)
        blocks = READ_BWD_BROADCAST if copies > 1 else READ_BWD
        BR, BC = blocks["BR"], _cols(C, blocks["BC"])
        # as many programs for a broadcast input as for n streams: more row groups, as it has 1/n the columns
        rows_per_group = triton.cdiv(triton.cdiv(R, ROW_GROUPS * copies), BR) * BR
        groups = triton.cdiv(R, rows_per_group)
        gw = y.new_empty((groups, P, ny * C), dtype=torch.float32)
        has_g = g_stream is not None
        g = g_stream if has_g else gy  # any tensor: not read when HAS_G is off
        # A broadcast input gets the sum over its n copies, returned as n copies of 1/n of it (which
        # autograd sums back: exact for n a power of two, else to fp32 rounding).
        _read_bwd_kernel[(ny * C // BC, groups)](
            g, y, gx, h_pre, h_res, g_u, g_ss * copies, w, gy, gw, R, rows_per_group, 1 / copies, g.stride(0),
            g.stride(1), g.stride(2), y.stride(0), y.stride(1), gx.stride(0), C=C, N=ny, NG=copies, NH=n, P=P,
            PP=max(16, _np(P)), HAS_G=has_g, MIXED=full, BR=BR, BC=BC, DOT=DOT, num_warps=blocks["num_warps"],
        )  # fmt: skip
        gw = gw.sum(0).repeat(1, copies)  # broadcast: each W_j saw the same stream
        w_dtype, b_dtype, a_dtype = ctx.dtypes
        return gy.expand(R, n, C), gw.to(w_dtype), g_bias.to(b_dtype), g_alpha.to(a_dtype), None, None, None, None


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, out, h_post, h_res, embedding, merge, next_weight):
        R, n, C = stream.shape
        BC = _cols(C)
        out = out if out.stride(-1) == 1 else out.contiguous()
        h_post = h_post.contiguous()
        ctx.merged, ctx.full = merge is not None, h_res.dim() == 3
        shape, dtype = ((R, C), merge) if ctx.merged else ((R, n, C), stream.dtype)
        y_new = torch.empty(shape, dtype=dtype, device=stream.device)
        u, ss = y_new.new_empty(0), y_new.new_empty(0)
        if next_weight is not None:  # and the next site's stats of y_new, in the same pass
            u, ss = stats(stream, next_weight.float().contiguous(), write=(out, embedding, h_post, h_res, y_new))
        else:
            e = embedding if embedding is not None else out  # any tensor: not read when HAS_E is off
            _write_kernel[(triton.cdiv(R, 32), C // BC)](stream, out, e, h_post, h_res, y_new, R, stream.stride(0),
                                                         stream.stride(1), out.stride(0), C=C, N=n,
                                                         HAS_E=embedding is not None, MERGE=ctx.merged,
                                                         FULL=ctx.full, BR=32, BC=BC)  # fmt: skip
        ctx.save_for_backward(stream, out, h_post, embedding, h_res if ctx.full else None)
        ctx.mark_non_differentiable(u, ss)  # their gradient is the next site's read's (the Ahead it gets)
        return y_new, u, ss

    @staticmethod
    def backward(ctx, g, _g_u, _g_ss):
        stream, out, h_post, embedding, h_res = ctx.saved_tensors
        R, n, C = stream.shape
        if ctx.merged:  # g is the mean's gradient
            g = mean_of_streams_grad(g, stream.shape, stream.dtype)
        g_res = g.new_empty((R, n, n) if ctx.full else (R, n), dtype=torch.float32)
        g_post = g.new_empty((R, n), dtype=torch.float32)
        g_out = torch.empty((R, C), dtype=out.dtype, device=out.device)
        e = embedding if embedding is not None else out
        blocks = WRITE_BWD_FULL if ctx.full else WRITE_BWD
        BR, BC = blocks["BR"], _cols(C, blocks["BC"])
        programs = triton.cdiv(R, BR)
        g_e = torch.empty((programs, C), dtype=torch.float32, device=out.device) if embedding is not None else g_out
        g_mixed = torch.empty(stream.shape, dtype=stream.dtype, device=g.device) if ctx.full else g
        _write_bwd_kernel[(programs,)](g, stream, out, e, h_post, h_res if ctx.full else h_post, g_res, g_post, g_out,
                                       g_e, g_mixed, R, g.stride(0), g.stride(1), g.stride(2), stream.stride(0),
                                       stream.stride(1), out.stride(0), C=C, N=n, NP=_np(n),
                                       HAS_E=embedding is not None, FULL=ctx.full, BR=BR, BC=BC,
                                       num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])  # fmt: skip
        g_e = None if embedding is None else g_e.sum(0).to(embedding.dtype)
        # g untouched: _Read.backward applies a diagonal h_res (module docstring); a full one is applied here
        return g_mixed, g_out, g_post, g_res, g_e, None, None


def read(hc, y: torch.Tensor, eps: float, dtype: torch.dtype, ahead: Ahead | None = None):
    """HyperConnection.read on the kernels: the branch input (..., C) in `dtype` and the coefficients;
    `ahead`: the stats of y for this site, from the previous site's write."""
    iters = hc.sinkhorn_iters if hc.h_res == "sinkhorn" else None
    x, h_post, h_res, stream = _Read.apply(_rows(y), hc.weight, hc.bias, hc.alpha, eps, dtype, ahead, iters)
    return x.unflatten(0, y.shape[:-2]), Coefficients(h_post, h_res, stream)


def write(hc, out: torch.Tensor, coeffs: Coefficients, merge: torch.dtype | None = None, next_site=None):
    """HyperConnection.write on the kernels: the new streams (..., n, C), or with `merge` their mean
    (..., C) in that dtype, without storing them; with `next_site`, also that site's Ahead."""
    weight = None if next_site is None else next_site.weight
    y_new, u, ss = _Write.apply(coeffs.stream, out.flatten(0, -2), coeffs.h_post, coeffs.h_res, hc.embedding,
                                merge, weight)  # fmt: skip
    y_new = y_new.unflatten(0, out.shape[:-1])
    return y_new if next_site is None else (y_new, Ahead(u, ss))
