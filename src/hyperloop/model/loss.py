"""Cross-entropy of the LM head without materialising the (tokens x 32000) logits at once.

A training step of the S models at micro-batch 16 x 2048 would otherwise hold bf16 logits (2 GB),
their fp32 copy for the softmax (4 GB) and the gradient of both. Here the rows go through the head
in chunks, and the gradients w.r.t. the hidden states and the head weight are computed in the same
pass (they only need the chunk's softmax), so backward is a multiply by the incoming scalar. Peak
extra memory: one chunk of logits. Used on CUDA; the CPU keeps the plain `F.cross_entropy` path.
"""

from __future__ import annotations

import functools

import torch

ADDMM_OUT_DTYPE = "dtype" in torch.ops.aten.addmm.overloads()  # torch.addmm(..., out_dtype=): newer PyTorch


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, acc: torch.dtype):
    """For one chunk of logits (N, V): sum_i weights_i * CE_i, and its gradient w.r.t. the logits,
    (softmax - onehot(target)) * weights, in the logits' dtype. Element-wise work only: on CUDA it is
    compiled into a pass or two over the chunk, where written out op by op it is about ten passes over
    an fp32 copy (some 36 GB of traffic per Transformer-S step, ~8% of it by a bandwidth estimate)."""
    dtype, logits = logits.dtype, logits.to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    columns = torch.arange(logits.shape[-1], device=logits.device)
    onehot = columns[None, :] == targets[:, None]
    grad = (torch.exp(logits - lse[:, None]) - onehot.to(acc)) * weights[:, None].to(acc)
    return ((lse - picked) * weights).sum(), grad.to(dtype)


@functools.cache
def compiled_softmax_cross_entropy():
    return torch.compile(softmax_cross_entropy, dynamic=False)  # built on first use: importing dynamo is slow


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        """hidden (N, C), weight (V, C), targets (N,) with -1 = ignored -> mean CE over the kept rows."""
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        acc = torch.promote_types(torch.float32, hidden.dtype)  # softmax and sums: fp32 at least
        chunk_loss = compiled_softmax_cross_entropy() if hidden.is_cuda else softmax_cross_entropy
        h_all, w = hidden.to(compute), weight.to(compute)
        kept = targets != -1
        weights = kept.to(acc) / kept.sum().clamp(min=1)  # d(mean CE)/d(CE_i): zero on ignored rows
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        # The head's gradient summed over the chunks in `acc`: on CUDA inside the matmul (bf16 products,
        # fp32 output added to the running sum by cuBLAS), not as a bf16 result cast and added per chunk
        # (two passes over the V x C sum per chunk: ~2 ms of a Transformer-S step on an H100).
        fused_sum = hidden.is_cuda and compute != acc and ADDMM_OUT_DTYPE
        total = torch.zeros((), device=hidden.device, dtype=acc)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = h_all[rows]
            loss, grad_logits = chunk_loss(h @ w.T, targets[rows].clamp(min=0), weights[rows], acc)
            total += loss
            grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
            if fused_sum:
                grad_weight = torch.addmm(grad_weight, grad_logits.T, h, out_dtype=acc)
            else:
                grad_weight += (grad_logits.T @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 4096):
    return ChunkedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(), chunk_rows)
