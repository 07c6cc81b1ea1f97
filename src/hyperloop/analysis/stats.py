"""Running sums over tokens for the two analyses of the paper (spec section 8), so any number of
tokens can be streamed through with memory bounded by one batch.

For the outer residual stream h_i (T x C) after every effective layer i = 1..D:

    similarity[i, j] = mean over tokens t of cos(h_i[t], h_j[t])
    logit lens at i:   p_i = softmax(lm_head(final_norm(h_i)))      (the model's own read-out)
                       CE_i      = mean_t -log p_i[t, target_t]
                       entropy_i = mean_t -sum_v p_i[t, v] log p_i[t, v]
                       accuracy_i = mean_t [argmax_v p_i[t, v] == target_t]

The sums are float64 so the means of millions of tokens do not drift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hyperloop.analysis.layout import Layout

# Tokens are processed in chunks so that neither one (chunk x vocab) fp32 logit matrix nor the
# (layers x chunk x dim) fp64 unit vectors exceed this many elements (128 MB / 256 MB): the read-out of
# a 8 x 2048 batch at vocab 32000 would otherwise take 2 GB per layer.
CHUNK_ELEMENTS = 2**25


class LayerStats:
    """Accumulates the similarity matrix and the logit lens of D effective layers."""

    def __init__(self, depth: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.depth, self.vocab_size = depth, vocab_size
        self.tokens = 0
        zeros = {"dtype": torch.float64, "device": device}
        self.cosine_sum = torch.zeros(depth, depth, **zeros)
        self.ce_sum = torch.zeros(depth, **zeros)
        self.entropy_sum = torch.zeros(depth, **zeros)
        self.correct = torch.zeros(depth, **zeros)

    @torch.no_grad()
    def update(self, hiddens: list[torch.Tensor], targets: torch.Tensor,
               read_out: Callable[[torch.Tensor], torch.Tensor]) -> None:  # fmt: skip
        """Add one batch: `hiddens` are the D outer streams (B, T, C) of the same tokens, `targets`
        (B, T) the next tokens, `read_out` the model's final norm + LM head (hidden -> logits)."""
        if len(hiddens) != self.depth:
            raise ValueError(f"expected {self.depth} layer outputs, got {len(hiddens)}")
        flat = [h.flatten(0, -2) for h in hiddens]  # D x (N, C)
        targets = targets.flatten()
        chunk = max(1, CHUNK_ELEMENTS // max(self.vocab_size, self.depth * flat[0].shape[-1]))
        for start in range(0, targets.numel(), chunk):
            rows = slice(start, start + chunk)
            # sum over tokens of u_i . u_j (unit vectors) for all pairs: one matmul of the flattened rows
            unit = torch.stack([F.normalize(h[rows].double(), dim=-1) for h in flat]).flatten(1)
            self.cosine_sum += unit @ unit.T
            for i, h in enumerate(flat):
                self._add_read_out(i, read_out(h[rows]).float(), targets[rows])
        self.tokens += targets.numel()

    def _add_read_out(self, layer: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        log_p = F.log_softmax(logits, dim=-1)
        self.ce_sum[layer] -= log_p.gather(-1, targets[:, None]).sum().double()
        self.entropy_sum[layer] -= (log_p.exp() * log_p).sum().double()
        self.correct[layer] += (logits.argmax(-1) == targets).sum().double()

    # ----------------------------------------------------------------------------- results
    def similarity(self) -> torch.Tensor:
        """(D, D) mean cosine similarity over the tokens seen (float64, CPU)."""
        return (self.cosine_sum / self._seen()).cpu()

    def logit_lens(self) -> dict[str, list[float]]:
        """Per effective layer: mean CE (nats), mean entropy (nats) and greedy accuracy."""
        n = self._seen()
        return {
            "ce": (self.ce_sum / n).tolist(),
            "entropy": (self.entropy_sum / n).tolist(),
            "accuracy": (self.correct / n).tolist(),
        }

    def _seen(self) -> int:
        if not self.tokens:
            raise ValueError("no tokens were added")
        return self.tokens


def loop_similarity(similarity: torch.Tensor, layout: Layout) -> dict | None:
    """The paper's Table 8: how similar each middle layer's output is to its own output one loop
    later (lower = the loops do more distinct work). None for a model without loops."""
    pairs = layout.next_loop_pairs()
    if not pairs:
        return None
    per_layer = [sum(float(similarity[i, j]) for i, j in p) / len(p) for p in pairs.values()]
    every = [float(similarity[i, j]) for p in pairs.values() for i, j in p]
    return {"mean": sum(every) / len(every), "per_middle_layer": per_layer}
