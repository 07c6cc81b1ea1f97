"""Hyper-connections: n parallel residual streams mixed by small input-dependent matrices.

One site (spec 2b for mHC, 2d for Hyperloop), for streams y of shape (..., n, C):

    z      = RMSNorm(flatten(y))                          no learned weight: W_* absorb it
    H_pre  = sigmoid(a_pre  * (W_pre  z) + b_pre)         (..., n)
    H_post = 2 sigmoid(a_post * (W_post z) + b_post)      (..., n)
    H_res  = diagonal: diag(sigmoid(a_res * (W_res z) + b_res))
             sinkhorn: sinkhorn(a_res * reshape(W_res z) + b_res)   (doubly stochastic)
             identity: I
    y'     = H_res y + H_post (F(H_pre y) + e)            e: loop position embedding (Hyperloop only)

W_pre, W_post, W_res are stored stacked in one matrix so the three projections are one matmul.
The coefficients, and the stream combines that use them, are computed in fp32 whatever the
activation dtype: the streams are the residual stream, and rounding them to bf16 at every site (32
times per mHC-S forward) costs accuracy. The combines are plain multiply-adds over the n streams
(`combine`), which autocast leaves in fp32 and torch.compile fuses into one pass. The streams are
stored in the residual's dtype, or in bf16 between sites with `hc_bf16_streams` (the sums stay fp32).

Training on CUDA runs a diagonal (Hyperloop's) or Sinkhorn (mHC's) site on the Triton kernels of
fused_site.py, forward and backward, with the same math; this file is the reference they are tested
against.

Initialisation (documented in ARCHITECTURE.md): with all streams equal (they start as copies),
H_pre = 1/n makes H_pre y the plain residual stream (so does any H_pre summing to 1: with
`own_stream`, a site reads that stream with weight 0.7 and the others with the rest, which makes the
streams play different roles from the first step). When F is a bare sub-layer (mHC), H_res = I
and H_post = 1 then give exactly y + F(y): a plain Transformer. When F is a whole middle block that
keeps its own residuals (Hyperloop), F(x) = x + delta already contains x, so H_res = r and
H_post = 1 - r (r = res_init, 1/2 by default) make one loop map s -> s + (1 - r) delta instead of
2s + delta (the scale pitfall of spec 2d). a_* start at 0.01 so the input-dependent part starts small
but trainable.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ALPHA_INIT = 0.01
RMS_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for fp32
OWN_PRE_WEIGHT = 0.7  # H_pre of a site's own stream at init when it reads one stream mostly
# Up to this many rows (decoding) a site's projection is a multiply-and-sum, which torch.compile
# turns into one reduction kernel with the weight's fp32 cast; as a matmul cuBLAS ran a cast, a dot
# and a reduce kernel for it (hyperloop-s decode, H100: int4 2,850 -> 2,980 tok/s, bf16 1,480 -> 1,510).
FEW_ROWS = 16
HAS_TRITON = importlib.util.find_spec("triton") is not None


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(logits) projected towards the doubly stochastic matrices by alternating row and column
    normalisation, done in the log domain so large logits cannot overflow. Ends on columns."""
    log_p = logits.float()
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p.exp()


def combine(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """sum_j weights[..., j] * streams[..., j, :], written out over the n streams rather than as an
    einsum: an einsum becomes a batched matmul of B*T tiny n x n products (a bf16 one under autocast,
    a separate slow kernel either way), while n multiply-adds stay fp32 and torch.compile fuses them
    with the surrounding element-wise work into one pass over the streams."""
    out = weights[..., 0, None] * streams[..., 0, :]
    for j in range(1, weights.shape[-1]):
        out = out + weights[..., j, None] * streams[..., j, :]
    return out


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class HyperConnection(nn.Module):
    decode_kernel = False  # decode_site.enable (the Decoder) turns on the one-kernel site of hc_site.cu

    def __init__(
        self,
        dim: int,
        n_streams: int,
        h_res: str,
        sinkhorn_iters: int = 20,
        wraps_residual: bool = False,
        loop_embedding: bool = False,
        res_init: float = 0.5,
        own_stream: int | None = None,
    ):
        super().__init__()
        self.dim, self.n, self.h_res, self.sinkhorn_iters = dim, n_streams, h_res, sinkhorn_iters
        self.wraps_residual, self.res_init, self.own_stream = wraps_residual, res_init, own_stream
        n = n_streams
        self.res_rows = {"sinkhorn": n * n, "diagonal": n, "identity": 0}[h_res]
        rows = 2 * n + self.res_rows
        self.weight = nn.Parameter(torch.empty(rows, n * dim))  # [W_pre; W_post; W_res]
        self.bias = nn.Parameter(torch.empty(rows))  # [b_pre; b_post; b_res]
        self.alpha = nn.Parameter(torch.empty(3 if self.res_rows else 2))  # a_pre, a_post(, a_res)
        self.embedding = nn.Parameter(torch.zeros(dim)) if loop_embedding else None  # e_l
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.n
        # z has unit RMS, so this std gives W z unit variance; a = 0.01 then keeps it a perturbation.
        nn.init.normal_(self.weight, std=(n * self.dim) ** -0.5)
        nn.init.constant_(self.alpha, ALPHA_INIT)
        res_keep = self.res_init if self.wraps_residual else 1.0  # diagonal H_res at init
        post = 1.0 - self.res_init if self.wraps_residual else 1.0  # H_post at init
        b_pre = torch.full((n,), _logit(1.0 / n))
        if self.own_stream is not None and n > 1:  # read mostly one stream; the weights still sum to 1
            b_pre.fill_(_logit((1.0 - OWN_PRE_WEIGHT) / (n - 1)))
            b_pre[self.own_stream] = _logit(OWN_PRE_WEIGHT)
        b_post = torch.full((n,), _logit(post / 2))
        if self.h_res == "diagonal":
            b_res = torch.full((n,), _logit(res_keep))
        elif self.h_res == "sinkhorn":  # close to the identity: diagonal logits 4 above the rest
            b_res = 4.0 * torch.eye(n).flatten()
        else:
            b_res = torch.zeros(0)
        with torch.no_grad():
            self.bias.copy_(torch.cat([b_pre, b_post, b_res]))
            if self.embedding is not None:
                self.embedding.zero_()

    def coefficients(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """H_pre (..., n), H_post (..., n), H_res ((..., n) diagonal, (..., n, n) sinkhorn, None identity)."""
        n = self.n
        flat = y.flatten(-2).float()
        split = [n, n, self.res_rows]
        with torch.autocast(y.device.type, enabled=False):  # keep the tiny projection in fp32
            # W z with z = flat / rms(flat), computed as (W flat) / rms(flat): the normalised copy of
            # the n*C-wide streams is never written out (one pass over the streams fewer, each way).
            inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + RMS_EPS)
            weight = self.weight.float()
            if flat.shape[:-1].numel() <= FEW_ROWS:
                projected = (flat.unsqueeze(-2) * weight).sum(-1)
            else:
                projected = F.linear(flat, weight)
            pre, post, res = (projected * inv_rms).split(split, dim=-1)
        b_pre, b_post, b_res = self.bias.float().split(split)
        a = self.alpha.float()
        h_pre = torch.sigmoid(a[0] * pre + b_pre)
        h_post = 2.0 * torch.sigmoid(a[1] * post + b_post)
        if self.res_rows:
            res = a[2] * res + b_res
        if self.h_res == "diagonal":
            h_res = torch.sigmoid(res)
        elif self.h_res == "sinkhorn":
            h_res = sinkhorn(res.unflatten(-1, (n, n)), self.sinkhorn_iters)
        else:
            h_res = None
        return h_pre, h_post, h_res

    def read(self, y: torch.Tensor, ahead=None):
        """Start a site: the branch input H_pre y and the coefficients to finish it with. The input is
        in the parameters' dtype, the residual stream's (bf16 streams still feed fp32 branches under
        autocast). CUDA training of a diagonal or Sinkhorn site runs on the Triton kernels of fused_site.py;
        everything else on `_read`; decoding, on hc_site.cu's kernel (decode_site.py) where the Decoder
        turned it on. `ahead`: what the previous site's `write(..., next_site=self)` returned with y
        (a decode_site.Read is this read, already done; a decode_site.FoldedRead, this read left to
        the branch's first int4 GEMV, which the branch then gets as its input)."""
        from hyperloop.model import decode_site

        if isinstance(ahead, decode_site.Read):
            return ahead
        if isinstance(ahead, decode_site.FoldedRead):
            return ahead, None  # the gates come with the branch's output (decode_site.Pending)
        if self.decode_kernel and decode_site.applies(y):
            return decode_site.read(self, y)
        if self.fused(y):
            from hyperloop.model import fused_site

            return fused_site.read(self, y, RMS_EPS, self.weight.dtype, ahead)
        return self._read(y, self.weight.dtype)

    def write(self, y: torch.Tensor, out: torch.Tensor, coeffs, merge: torch.dtype | None = None,
              next_site: HyperConnection | None = None):  # fmt: skip
        """Finish a site: H_res y + H_post (out + e). With `merge`, the mean of those streams in that
        dtype (merge_streams), which the fused kernels give without storing the streams. With
        `next_site`, the site that reads these streams next: returns (streams, ahead) for its
        `read(streams, ahead)`; fused, the write takes that site's stats of the streams as it writes
        them (ahead), which saves the read a pass over them; else ahead is None."""
        if merge is not None and next_site is not None:
            raise ValueError("write: merge (the last site) and next_site exclude each other")
        from hyperloop.model import decode_site

        if isinstance(coeffs, decode_site.Gates) or isinstance(out, decode_site.Pending):  # decoding: decode_site.py
            return decode_site.write(self, y, out, coeffs, merge, next_site)
        if hasattr(coeffs, "stream"):  # from the fused read: fused_site.Coefficients
            from hyperloop.model import fused_site

            return fused_site.write(self, out, coeffs, merge, next_site)
        return write_result(self._write(y, out, coeffs), merge, next_site)

    def fused(self, y: torch.Tensor) -> bool:
        # Not while torch.compile traces: dynamo then sees `_read`, which it compiles as a whole.
        # A Sinkhorn H_res needs n a power of two (its kernel holds n x n tiles).
        sinkhorn_ok = self.h_res == "sinkhorn" and is_power_of_two(self.n)
        return (HAS_TRITON and y.is_cuda and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and (self.h_res == "diagonal" or sinkhorn_ok) and self.dim % 16 == 0)  # fmt: skip

    def _read(self, y: torch.Tensor, dtype: torch.dtype):
        coeffs = self.coefficients(y)
        x = combine(coeffs[0], y.float())
        return x.to(dtype), coeffs

    def _write(self, y: torch.Tensor, out: torch.Tensor, coeffs) -> torch.Tensor:
        _, h_post, h_res = coeffs
        if self.embedding is not None:
            out = out + self.embedding
        if self.h_res == "identity":
            kept = y
        elif self.h_res == "diagonal":  # one gate per stream
            kept = h_res.unsqueeze(-1) * y
        else:  # dense doubly stochastic mixing of the streams: kept_i = sum_j H_res[i, j] y_j
            kept = combine(h_res, y.float().unsqueeze(-3))
        return (kept + h_post.unsqueeze(-1) * out.unsqueeze(-2)).type_as(y)

    def forward(self, y: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x, coeffs = self.read(y)
        return self.write(y, branch(x), coeffs)


def write_result(streams: torch.Tensor, merge: torch.dtype | None = None, next_site: HyperConnection | None = None):
    """What HyperConnection.write returns for the new streams when it does not fuse (also for code
    that wraps `write`): the streams, their mean in `merge`, or (streams, None) with `next_site`."""
    if next_site is not None:
        return streams, None
    return streams if merge is None else merge_streams(streams, merge)


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """(..., C) -> (..., n, C): the streams start as n copies of the residual stream. A broadcast
    view, not n written copies: the first site only reads them (its write makes new streams), and a
    compiled site reads a stride-0 input straight from x, without an n-fold copy in memory."""
    return _Copies.apply(x, n)


class _Copies(torch.autograd.Function):
    """x broadcast to n streams, whose gradient sums the n streams' gradients. When those come as a
    broadcast too (n equal copies: the fused first site gives its input's gradient that way), the sum
    is one of them times n, a pass over x's size; autograd's expand backward would run a strided
    reduction over the stride-0 axis, several times slower (0.5 ms at the S shape on an H100)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (g.select(-2, 0) * ctx.n if g.stride(-2) == 0 else g.sum(-2)), None


def merge_streams(y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(..., n, C) -> (..., C): average the streams (summed in, and returned as, `dtype` if given)."""
    return _MeanOfStreams.apply(y, dtype)


class _MeanOfStreams(torch.autograd.Function):
    """y.mean(-2) whose gradient is a broadcast view of g / n, not n written copies (autograd's mean
    backward writes them all: a pass over the streams that the last site then reads back)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        ctx.shape, ctx.dtype = y.shape, y.dtype
        return y.mean(dim=-2, dtype=dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return mean_of_streams_grad(g, ctx.shape, ctx.dtype), None


def mean_of_streams_grad(g: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of streams of `shape` (..., n, C) from that of their mean: g / n as a broadcast
    view, in the streams' dtype (also what the fused last site's merged write needs)."""
    return (g / shape[-2]).to(dtype).unsqueeze(-2).expand(shape)
