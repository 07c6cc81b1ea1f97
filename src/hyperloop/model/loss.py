"""Cross-entropy of the LM head without materialising the (tokens x 32000) logits at once.

A training step of the S models at micro-batch 16 x 2048 would otherwise hold bf16 logits (2 GB),
their fp32 copy for the softmax (4 GB) and the gradient of both. Here the rows go through the head
in chunks, and the gradients w.r.t. the hidden states and the head weight are computed in the same
pass (they only need the chunk's softmax), so backward is a multiply by the incoming scalar. Peak
extra memory: one chunk of logits. Used on CUDA; the CPU keeps the plain `F.cross_entropy` path.
"""

from __future__ import annotations

import torch


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        """hidden (N, C), weight (V, C), targets (N,) with -1 = ignored -> mean CE over the kept rows."""
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        acc = torch.promote_types(torch.float32, hidden.dtype)  # softmax and sums: fp32 at least
        h_all, w = hidden.to(compute), weight.to(compute)
        kept = targets != -1
        count = kept.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=acc)
        total = torch.zeros((), device=hidden.device, dtype=acc)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t, k = h_all[start : start + chunk_rows], targets[start : start + chunk_rows], kept[start : start + chunk_rows]
            logits = (h @ w.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            safe_t = t.clamp(min=0)
            total += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * k).sum()
            # d(mean CE)/d(logits) = (softmax - onehot(target)) / count, zero on ignored rows
            grad_logits = torch.exp(logits - lse[:, None])
            grad_logits.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
            grad_logits = (grad_logits * (k / count)[:, None]).to(compute)
            grad_hidden[start : start + chunk_rows] = (grad_logits @ w).to(hidden.dtype)
            grad_weight += (grad_logits.T @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 4096):
    return ChunkedLinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(), chunk_rows)
