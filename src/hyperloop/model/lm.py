"""The one language model class for all four architectures.

A model is a *plan*: begin layers, middle layers run `num_loops` times with shared weights, end
layers (spec 2c). Hyper-connections sit where `cfg.hc_placement` says:
- "none":     plain residual stream (Transformer, Looped).
- "sublayer": n streams from the embedding to the final norm, an mHC site around every attention
              and MLP sub-layer of every unrolled layer (spec 2b).
- "span":     n streams from the end of the begin block to the start of the end block, one site
              around every `cfg.span` unrolled middle layers: by default one per loop (Hyperloop,
              spec 2d), each with its own loop position embedding e_l.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hyperloop.config import ModelConfig
from hyperloop.errors import HyperloopError
from hyperloop.model.hyper import HyperConnection, expand_streams, merge_streams
from hyperloop.model.layers import Block, LoopLoRA, RMSNorm, RotaryEmbedding
from hyperloop.model.loss import chunked_cross_entropy


class Step(NamedTuple):
    """One unrolled layer execution."""

    layer: int  # index into model.layers (the weights)
    loop: int | None  # loop iteration for middle layers, None for begin/end layers
    index: int  # position in the unrolled plan: the KV-cache slot and the mHC site pair


class HyperloopLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.lora_rank:
            for layer in self.middle_layers():
                layer.attn.add_lora(cfg.num_loops, cfg.lora_rank)
                layer.mlp.add_lora(cfg.num_loops, cfg.lora_rank)
        span = cfg.hc_placement == "span"
        self.hc = nn.ModuleList(
            HyperConnection(cfg.dim, cfg.n_streams, cfg.h_res, cfg.sinkhorn_iters,
                            wraps_residual=span, loop_embedding=span and cfg.loop_embedding, res_init=cfg.hc_res_init,
                            own_stream=site % cfg.n_streams if cfg.hc_pre_init == "own" else None)
            for site in range(cfg.num_hc())
        )  # fmt: skip
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.reset_parameters()

    # -------------------------------------------------------------------------------- setup
    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; the projections that write into a residual (wo, w_down) are
        scaled by 1/sqrt(2 x unrolled depth) as in GPT-2, so the stream does not grow with depth.
        Hyper-connections and LoRA adapters initialise themselves (see their reset_parameters)."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("attn.wo", "mlp.w_down"))
                nn.init.normal_(module.weight, std=std / (2 * self.cfg.depth) ** 0.5 if scaled else std)
            elif isinstance(module, (RMSNorm, HyperConnection, LoopLoRA)):
                module.reset_parameters()

    def middle_layers(self) -> list[Block]:
        b, m = self.cfg.begin_layers, self.cfg.middle_layers
        return list(self.layers[b : b + m])

    def plan(self, num_loops: int | None = None) -> list[Step]:
        """The unrolled execution order: begin, middle x K, end."""
        cfg = self.cfg
        loops = cfg.num_loops if num_loops is None else num_loops
        b, m = cfg.begin_layers, cfg.middle_layers
        begin = [(i, None) for i in range(b)]
        middle = [(b + i, loop) for loop in range(loops) for i in range(m)]
        end = [(b + m + i, None) for i in range(cfg.end_layers)]
        return [Step(layer, loop, index) for index, (layer, loop) in enumerate(begin + middle + end)]

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Parameters in the paper's convention (all but the input embedding table by default)."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embedding else total

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        num_loops: int | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
        layer_outputs: list | None = None,
        on_loop_end=None,
    ) -> torch.Tensor:
        """Logits (B, T, V), or the mean cross-entropy when `targets` is given (-1 = ignored).

        num_loops:     run the middle block this many times instead of cfg.num_loops (test time).
        positions:     RoPE positions, (T,) or (B, T); default 0..T-1 (a cache passes its offsets).
        cache:         a KV cache exposing `attend(slot, q, k, v)` (see hyperloop.infer).
        layer_outputs: if a list, receives (Step, hidden) after every unrolled layer, where hidden is
                       the outer residual stream (merged streams when HC is on) - for analyses.
        on_loop_end:   called as on_loop_end(loop, hidden) after each completed loop with the outer
                       stream; returning True skips the remaining loops (early exit, see hyperloop.infer).
        """
        hidden = self.hidden_states(tokens, num_loops=num_loops, positions=positions, cache=cache,
                                    layer_outputs=layer_outputs, on_loop_end=on_loop_end)  # fmt: skip
        if targets is None:
            return self.logits(hidden)
        return self.loss(hidden, targets)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if hidden.is_cuda and isinstance(self.lm_head, nn.Linear):  # never materialise all the logits (model/loss.py)
            return chunked_cross_entropy(self.norm(hidden), self.lm_head.weight, targets)
        logits = self.logits(hidden)
        return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=-1)

    def hidden_states(self, tokens, *, num_loops=None, positions=None, cache=None, layer_outputs=None,
                      on_loop_end=None):  # fmt: skip
        """Run the plan and return the final residual stream (B, T, C), before the final norm."""
        cfg = self.cfg
        loops = cfg.num_loops if num_loops is None else num_loops
        if loops < 1:
            raise HyperloopError(f"num_loops must be >= 1, got {loops}")
        if cfg.hc_placement == "sublayer" and loops != cfg.num_loops:
            raise HyperloopError("an mHC (sublayer) model has one HC per unrolled sub-layer: num_loops is fixed")
        T = tokens.shape[-1]
        if positions is None:
            if T > cfg.max_seq_len:
                raise HyperloopError(f"sequence of {T} tokens exceeds the context length {cfg.max_seq_len}")
            positions = torch.arange(T, device=tokens.device)
        rope = self.rope(positions)
        steps = self.plan(loops)

        def run(step: Step, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
            # Pass the loop only to LoRA and the slot only to a cache: a compiled Block then sees the
            # same arguments at every position and compiles once, not once per layer execution.
            loop = step.loop if cfg.lora_rank else None
            return self.layers[step.layer](x, rope, loop, cache, step.index if cache is not None else 0, branch)

        def record(step: Step, outer: torch.Tensor) -> None:
            if layer_outputs is not None:
                layer_outputs.append((step, outer))

        x = self.embed(tokens)
        residual = x.dtype  # of the outer residual stream; the HC streams may be stored in bf16
        streams = torch.bfloat16 if cfg.hc_bf16_streams else residual
        if cfg.hc_placement == "sublayer":  # mHC: streams everywhere, a site around every sub-layer
            sites = [(step, branch) for step in steps for branch in ("attn", "mlp")]
            y, ahead = expand_streams(x.to(streams), cfg.n_streams), None
            for i, (step, branch) in enumerate(sites):
                hc = self.hc[i]  # = 2 * step.index (+ 1 for the MLP)
                h, coeffs = hc.read(y, ahead)
                out = run(step, h, branch)
                if i == len(sites) - 1:  # the last site: its streams are only averaged, so never stored
                    x = hc.write(y, out, coeffs, merge=residual)
                else:  # each write takes the next site's stats (fused) as it writes the streams
                    y, ahead = hc.write(y, out, coeffs, next_site=self.hc[i + 1])
                if branch == "mlp" and layer_outputs is not None:
                    record(step, x if i == len(sites) - 1 else merge_streams(y, residual))
            return x

        if on_loop_end is not None and cfg.hc_placement == "span" and cfg.middle_layers % cfg.span:
            raise HyperloopError("early exit needs HC spans that end at loop boundaries")
        m = cfg.middle_layers
        b, n_middle = cfg.begin_layers, loops * m
        begin, middle, end = steps[:b], steps[b : b + n_middle], steps[b + n_middle :]
        for step in begin:
            x = run(step, x)
            record(step, x)
        if cfg.hc_placement == "span":  # Hyperloop: y <- H_res y + H_post (Middle(H_pre y) + e)
            y = expand_streams(x.to(streams), cfg.n_streams)

            def site_hc(site: int) -> HyperConnection:  # past the trained loops, reuse the last site
                return self.hc[min(site, len(self.hc) - 1)]

            ahead = None  # this site's stats of y, when the previous site's (fused) write took them
            for site, first in enumerate(range(0, n_middle, cfg.span)):
                hc = site_hc(site)
                h, coeffs = hc.read(y, ahead)
                for step in middle[first : first + cfg.span]:
                    h = run(step, h)
                    if layer_outputs is not None:  # the outer stream as if the span ended here
                        record(step, hc.write(y, h, coeffs, merge=residual))
                done = first + cfg.span  # unrolled middle layers finished so far
                if done >= n_middle:  # the last site: its streams are only averaged, so never stored
                    x = hc.write(y, h, coeffs, merge=residual)
                    if on_loop_end is not None:
                        on_loop_end(done // m - 1, x)
                    break
                y, ahead = hc.write(y, h, coeffs, next_site=site_hc(site + 1))
                if on_loop_end is not None and done % m == 0:
                    x = merge_streams(y, residual)
                    if on_loop_end(done // m - 1, x):
                        break
        else:
            for i, step in enumerate(middle):
                x = run(step, x)
                record(step, x)
                if on_loop_end is not None and (i + 1) % m == 0 and on_loop_end(step.loop, x):
                    break
        for step in end:
            x = run(step, x)
            record(step, x)
        return x
