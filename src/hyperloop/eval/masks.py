"""Attention under an explicit mask, through the model's pluggable attention hook.

The model's attention calls `cache.attend(slot, q, k, v)` when a cache is passed (layers.Attention).
`MaskedAttention` stands in for a KV cache there: it stores nothing and runs causal SDPA under a
boolean mask of its own. Two masks are built here:

- `segment_mask`: several continuations packed behind one shared context in a single row. Each
  continuation sees the context and its own earlier tokens, never a sibling, so one forward scores
  every choice of a multiple-choice question while computing the context once (eval.loglik).
- `padding_mask`: left- or right-padded batches with an HF-style `attention_mask` (hf.modeling).

Everything else in the model (norms, MLPs, hyper-connection mixing) acts on each token alone, so a
token's output depends only on the keys its mask row allows: packed or padded rows give the same
logits as the unpacked, unpadded sequence up to floating-point rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskedAttention:
    """A stateless stand-in for a KV cache: attend(q, k, v) = SDPA(q, k, v) under `mask`.

    mask: bool (B, 1, T, T), True where query t may attend to key s. Every row must allow at least
    one key (SDPA returns NaN for a fully masked row); both builders below guarantee the diagonal.
    """

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def attend(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Causal attention restricted to segment 0 (the shared context) and the query's own segment.

    segments: int (B, T); 0 for context tokens, 1, 2, ... for each packed continuation, and a
    negative id for padding at the end of a row (no real token attends to it; its own outputs are
    never read). Returns bool (B, 1, T, T).
    """
    T = segments.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    return (causal & ((seg_k == 0) | (seg_k == seg_q)))[:, None]


def padding_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal mask and RoPE positions for a padded batch.

    attention_mask: (B, T), 1 for real tokens and 0 for padding (on either side). Returns the bool
    (B, 1, T, T) mask (real tokens see earlier real tokens; a padding query sees itself only) and
    (B, T) positions that count real tokens only, so a left-padded prompt gets the positions it
    would have alone.
    """
    valid = attention_mask.bool()
    T = valid.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    mask = (causal & valid[:, None, :]) | eye
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return mask[:, None], positions
