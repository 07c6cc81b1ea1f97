"""Llama-style decoder pieces (spec section 1): RMSNorm, RoPE, causal SDPA attention, SwiGLU, Block.

Projections are fused (q|k|v in one matrix, gate|up in another): the same parameters as separate
matrices, fewer kernel launches. A Block keeps its own residuals, or gives one sub-layer's bare
output F(x) for an mHC site to wrap (spec 2b). A KV cache may carry a fused implementation of the
whole layer for one token (infer/int4_block.py), which the Block then defers to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hyperloop.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, then return in the input's dtype.
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables (rotate-half convention, base 10000), indexed by position."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # Not saved in checkpoints: derived from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) -> cos, sin broadcastable against (B, H, T, D/2)."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 2:  # (B, T, D/2) -> (B, 1, T, D/2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class LoopLoRA(nn.Module):
    """Per-loop low-rank deltas on a shared projection: W x + B_l A_l x, one (A_l, B_l) per loop.
    This is the LoRA-relaxed looped baseline; B starts at zero so training starts from plain looping."""

    def __init__(self, in_features: int, out_features: int, loops: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(loops, rank, in_features))
        self.B = nn.Parameter(torch.zeros(loops, out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.A, std=self.A.shape[-1] ** -0.5)
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor, loop: int) -> torch.Tensor:
        loop = min(loop, self.A.shape[0] - 1)  # past the trained loops, reuse the last adapter
        return F.linear(F.linear(x, self.A[loop]), self.B[loop])


class _Projections(nn.Module):
    """Shared by Attention and MLP: call a named projection, adding its per-loop LoRA if present."""

    lora: nn.ModuleDict

    def project(self, name: str, x: torch.Tensor, loop: int | None) -> torch.Tensor:
        out = getattr(self, name)(x)
        if loop is not None and name in self.lora:
            out = out + self.lora[name](x, loop)
        return out

    def add_lora(self, loops: int, rank: int) -> None:
        for name, linear in self.named_children():
            if isinstance(linear, nn.Linear):
                self.lora[name] = LoopLoRA(linear.in_features, linear.out_features, loops, rank)


class Attention(_Projections):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.lora = nn.ModuleDict()

    def forward(self, x, rope, loop=None, cache=None, slot: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.project("wqkv", x, loop).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the KV cache owns storage and masking (one slot per unrolled layer execution)
            out = cache.attend(slot, q, k, v)
        return self.project("wo", out.transpose(1, 2).reshape(B, T, C), loop)


class MLP(_Projections):
    """SwiGLU: down(silu(gate x) * up x), hidden 2.75 x dim, no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.lora = nn.ModuleDict()

    def forward(self, x: torch.Tensor, loop: int | None = None) -> torch.Tensor:
        gate, up = self.project("w_gate_up", x, loop).chunk(2, dim=-1)
        return self.project("w_down", F.silu(gate) * up, loop)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm x), then x + mlp(norm x). With `branch` ("attn" or
    "mlp") only that sub-layer's output F(x), for a caller that wraps it (mHC's hyper-connection
    sites, lm.py); still through forward, so hooks (FSDP's all-gather) and torch.compile apply."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        loop: int | None = None,
        cache=None,
        slot: int = 0,
        branch: str | None = None,
    ) -> torch.Tensor:
        fused = getattr(cache, "fused_block", None)  # int4 decoding at batch 1 (a KVCache)
        if fused is not None:
            out = fused(self, x, cache, slot, branch)
            if out is not None:
                return out
        attn: Callable = lambda h: self.attn(self.attn_norm(h), rope, loop, cache, slot)  # noqa: E731
        mlp: Callable = lambda h: self.mlp(self.mlp_norm(h), loop)  # noqa: E731
        if branch is not None:
            return {"attn": attn, "mlp": mlp}[branch](x)
        x = x + attn(x)
        return x + mlp(x)
