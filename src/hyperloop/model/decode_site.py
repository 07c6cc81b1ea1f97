"""Hyper-connection sites at decode as one CUDA kernel between two branches (hc_site.cu).

At a few rows a compiled site was three or four small kernels (the RMS and projection reduction, the
gates, the combine, the write), 1-2 us each, about 20 us of a hyperloop-s decode step on an H100
(results/int4.md); an mHC site's Sinkhorn H_res added a chain of forty tiny normalisations, which
held an mhc-s bf16 step to 380 tok/s. Here each loop boundary (Hyperloop) or sub-layer boundary (mHC)
is one kernel that does the previous site's write and the next site's read together:

    y'  = H_res y + h_post (out + e)                                  (previous site's gates)
    x   = sum_j h_pre_j y'_j   with the next site's gates from W y' / rms(y')

and the last boundary gives the streams' mean instead (merge). The math is hyper.py's, in fp32, for
a diagonal H_res (Hyperloop's) or a Sinkhorn one (mHC's, whose iterations the write runs while the
branch's last layer finishes); the streams y' are stored in bf16 as the compiled step stores them.

Launched as a programmatic dependent (sm_90), it joins the chain of early launches of the fused int4
layers (infer/int4_block.py): hyperloop-s int4 decode 2,940 -> 3,037 tok/s on an H100, and an
uncompiled (graphed) bf16 step 573 -> 642. In a compiled bf16 step torch.compile fuses the sites with
the layers around them, which a custom op prevents, and the kernel was 0.9% slower (1,511 -> 1,498):
so the Decoder turns it on (`enable`) for Hyperloop's sites next to the fused int4 layers and in
uncompiled steps, and for mHC's everywhere, for the sites that qualify: CUDA sm_90+, bf16 parameters,
n in 1, 2, 4, 8 (1, 2, 4 for Sinkhorn), and the CUDA decode kernels built (quant/gemv.py: extension).
HyperConnection.read and write then dispatch here for bf16 streams of at most hyper.FEW_ROWS rows
without autograd. With the Sinkhorn kernel a compiled mhc-s bf16 step makes 1,079 tok/s, and int4
(the fused layers one sub-layer at a time) 1,804, 1.67x (results/int4.md).

Next to the fused int4 layers of an mHC model (infer/int4_block.py, one row) the sites between two
sub-layers go further: they fold into the GEMVs around them (hc_site.cu: SiteFold), and cost no
kernel: mhc-s int4 2,271 tok/s (2.10x), mhc-m 1,285 (2.02x). The branch returns its output
`Pending`, its last GEMV not yet run; the site's write runs that GEMV with the write folded in,
which also leaves the next site's sums, and hands the next read a `FoldedRead`, which the branch's
first GEMV finishes. Only the first read and the last write (the merge) stay kernels of their own.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyperloop.model.hyper import FEW_ROWS, RMS_EPS, HyperConnection, write_result
from hyperloop.quant import gemv

STREAMS = (1, 2, 4, 8)  # hc_site.cu's instances
SINKHORN_STREAMS = (1, 2, 4)  # with a Sinkhorn H_res (its weight rows are held in registers)
ONE_BLOCK_WIDTH = 256 * 8  # n x C of a row on one block: 256 threads, 8 columns a thread
MAX_STREAM_WIDTH = 8 * ONE_BLOCK_WIDTH  # on a cluster of 8 blocks


class Gates(NamedTuple):
    """What a kernel read hands the site's write, fp32: h_post (rows, n), and h_res (rows, n) for a
    diagonal H_res or the logits of a Sinkhorn one (rows, n * n), whose iterations the write runs."""

    h_post: torch.Tensor
    h_res: torch.Tensor


class Read(NamedTuple):
    """A site's read, done by the previous site's write: HyperConnection.read returns it as it is."""

    x: torch.Tensor
    gates: Gates


class FoldedRead(NamedTuple):
    """A site's read left to the branch's first int4 GEMV (gemv.int4_gemv_sites): the streams y' (n, C)
    and the sums of W y' and |y'|^2 the blocks of the GEMV that wrote them left, with the site's bias,
    alpha and Sinkhorn iterations (that GEMV's site block runs them). HyperConnection.read hands it to
    the branch as its input."""

    streams: torch.Tensor
    sums: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    iters: int

    def site(self) -> list[torch.Tensor]:
        """gemv.int4_gemv_sites' read_site."""
        return [self.sums, self.bias, self.alpha]


class Pending(NamedTuple):
    """A branch's output whose last int4 GEMV (of `x`, with gemv's operands) has not run: the site's
    write runs it, folding itself in where it can. `gates` and `h_res` (H_res after its iterations):
    the site's, when the branch's first GEMV finished a FoldedRead (else the read's coefficients have
    the gates, with H_res's logits)."""

    x: torch.Tensor
    words: torch.Tensor
    grid: torch.Tensor
    group_size: int
    split: int
    gates: Gates | None
    h_res: torch.Tensor | None


def fits(n: int, dim: int) -> bool:
    """Whether hc_site.cu's launch takes n streams of width dim: whole warps of 8 columns a thread, a
    row on at most 256 threads (n x dim <= 2048), or on a cluster of 8 such blocks (a multiple of 2048)."""
    width = n * dim
    return (n in STREAMS and dim % 64 == 0 and width % 256 == 0 and width <= MAX_STREAM_WIDTH
            and (width <= ONE_BLOCK_WIDTH or width % ONE_BLOCK_WIDTH == 0))  # fmt: skip


def qualifies(hc: HyperConnection) -> bool:
    device = hc.weight.device
    params = [hc.weight, hc.bias, hc.alpha] + ([hc.embedding] if hc.embedding is not None else [])
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9  # the blocks of a row form a cluster
        and (hc.h_res == "diagonal" or hc.h_res == "sinkhorn" and hc.n in SINKHORN_STREAMS)
        and fits(hc.n, hc.dim)
        and all(p.dtype == torch.bfloat16 and p.device == device for p in params)
        and gemv.extension() is not None
    )


def enable(model: torch.nn.Module, compiled_layers: bool = False) -> None:
    """Turn the kernel on for each of the model's sites that qualifies (decode_kernel). With
    `compiled_layers` (a compiled step whose layers are torch ops, not the fused int4 kernels) keep a
    diagonal site on torch.compile's kernels, which fuse it with the layers around it (see above)."""
    for hc in model.hc:
        hc.decode_kernel = qualifies(hc) and not (compiled_layers and hc.h_res == "diagonal")


def folds(model: torch.nn.Module) -> bool:
    """Whether an mHC model's sites may fold into the fused int4 layers' GEMVs (see above): each takes
    the kernel, with a Sinkhorn H_res (of at most 4 streams: qualifies)."""
    return model.cfg.hc_placement == "sublayer" and all(hc.decode_kernel and hc.h_res == "sinkhorn" for hc in model.hc)


def iterations(hc: HyperConnection) -> int:
    """The kernel's `sinkhorn_iters`: 0 for a diagonal H_res."""
    return hc.sinkhorn_iters if hc.h_res == "sinkhorn" else 0


def applies(y: torch.Tensor) -> bool:
    """Whether streams y (..., n, C) take the kernel: bf16 on CUDA, a few rows, no autograd."""
    return y.is_cuda and y.dtype == torch.bfloat16 and not torch.is_grad_enabled() and y.shape[:-2].numel() <= FEW_ROWS


@torch.library.custom_op("hyperloop::hc_site_decode", mutates_args=())
def site(y: torch.Tensor, out: torch.Tensor | None, h_post: torch.Tensor | None, h_res: torch.Tensor | None,
         embedding: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
         alpha: torch.Tensor | None, eps: float, merge: bool, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """hc_site.cu on y (rows, n, C): with `out` (and the gates) a write, with `weight` (bias, alpha) a
    read, `merge` a write that returns the mean; `sinkhorn_iters` > 0 for a Sinkhorn H_res. Returns
    (y', x or the mean, h_post, h_res), each empty where the call does not make it. A custom op, so
    torch.compile keeps it as one call."""
    return tuple(gemv.extension().hc_site_decode(y, out, h_post, h_res, embedding, weight, bias, alpha, eps, merge,
                                                 sinkhorn_iters))  # fmt: skip


@site.register_fake
def _(y, out, h_post, h_res, embedding, weight, bias, alpha, eps, merge, sinkhorn_iters):
    rows, n, C = y.shape
    reads, writes = weight is not None, out is not None
    res = n * n if sinkhorn_iters else n
    gates = [y.new_empty((rows, width) if reads else 0, dtype=torch.float32) for width in (n, res)]
    return y.new_empty((rows, n, C) if writes and not merge else 0), y.new_empty((rows, C) if reads or merge else 0), *gates


def read(hc: HyperConnection, y: torch.Tensor) -> Read:
    """The site's branch input and gates from streams y (..., n, C) (the first site's read)."""
    _, x, h_post, h_res = site(y.flatten(0, -3), None, None, None, None, hc.weight, hc.bias, hc.alpha, RMS_EPS, False,
                               iterations(hc))  # fmt: skip
    return Read(x.view(*y.shape[:-2], hc.dim), Gates(h_post, h_res))


def write(hc: HyperConnection, y: torch.Tensor, out: torch.Tensor, gates: Gates, merge: torch.dtype | None,
          next_site: HyperConnection | None):  # fmt: skip
    """HyperConnection.write for gates from the kernel: with a next site that takes the kernel too
    (and the same kind of H_res: one kernel instance does both), its read in the same kernel,
    returned as (y', Read) for next_site.read(y', ahead). For a Pending output, the write folded
    into its last GEMV where a next site takes it, returned as (y', FoldedRead)."""
    if isinstance(out, Pending):
        gates = out.gates if out.gates is not None else gates
        if next_site is not None and next_site.decode_kernel:
            # H_res from the folded read's site block, else its logits and the write runs the iterations
            h_res, iters = (out.h_res, 0) if out.h_res is not None else (gates.h_res.reshape(-1), iterations(hc))
            write_site = [y.flatten(0, -3)[0], gates.h_post.reshape(-1), h_res, next_site.weight]
            _, y_new, sums = gemv.int4_gemv_sites(out.x, out.words, out.grid, out.group_size, out.split, None, 0.0,
                                                  False, [], write_site, RMS_EPS, iters)  # fmt: skip
            return y_new.view(y.shape), FoldedRead(y_new, sums, next_site.bias, next_site.alpha,
                                                   iterations(next_site))
        out = gemv.int4_gemv(out.x, out.words, out.grid, out.group_size, out.split)
    streams, written = y.flatten(0, -3), out.reshape(-1, hc.dim).contiguous()
    reads_next = next_site is not None and next_site.decode_kernel and next_site.h_res == hc.h_res
    weight, bias, alpha = (next_site.weight, next_site.bias, next_site.alpha) if reads_next else (None, None, None)
    y_new, x, h_post, h_res = site(streams, written, gates.h_post, gates.h_res, hc.embedding, weight, bias, alpha,
                                   RMS_EPS, merge is not None, iterations(hc))  # fmt: skip
    shape = (*y.shape[:-2], hc.dim)
    if merge is not None:
        return x.view(shape).to(merge)
    y_new = y_new.view(y.shape)
    if reads_next:
        return y_new, Read(x.view(shape), Gates(h_post, h_res))
    return write_result(y_new, None, next_site)
