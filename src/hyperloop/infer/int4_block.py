"""Decoding one token of an int4 model through a decoder layer in five kernels (CUDA, batch 1).

At batch 1 an int4 layer's four matmuls are short (1.6-7 us each with our GEMV on an H100), and a
compiled step spent about as long in the half dozen small kernels around them: the two RMSNorms,
RoPE, the two cache writes, SwiGLU's product, the residual adds, 1-2 us each. gemv.cu folds them into
the GEMVs - the RMSNorm as a prologue (each block of the GEMV normalises the whole input itself), the
rest as epilogues on pairs of output rows - so a layer (model/layers.py: Block) becomes

    q = wqkv(RMSNorm(h))              RoPE on q and k; k, v written into the cache slot
    o = attention(q, cache)           gemv.decode_attention
    h = h + wo(o)
    a = w_gate_up(RMSNorm(h))         silu(gate) * up
    h = h + w_down(a)

(int4 decoding 2.03x bf16 for transformer-s and 2.10x for transformer-m on an H100, against 1.28x
and 1.58x with the same int4 layers run op by op: results/int4.md). The attention is gemv.cu's too:
launched as a programmatic dependent of the wqkv GEMV, it loads the cache's older columns while
that GEMV finishes; and the wqkv kernel reads RoPE's cos/sin from the model's tables at the device
position (a compiled step gathering them for each layer's call made a copy per call).

An mHC model calls its layers one sub-layer at a time (its sites wrap the bare outputs): then the
attention half runs the first three kernels and the MLP half the last two, without the residual adds;
and with `fold_sites` (set by the Decoder: model/decode_site.py, folds) each half's first GEMV
finishes its site's read and its last GEMV is left to the site's write, which folds itself in.

The Decoder installs a FusedInt4Blocks as its cache's `fused_block` when every layer qualifies
(int4 GEMV operands on CUDA, no act-order, no LoRA, bf16 activations, head_dim 64 or 128);
Block.forward hands it each one-token call. The results match the op-by-op step's within bf16 rounding
(tests/test_gpu.py): the fused kernels round once where the op-by-op ones round after each operation.
"""

from __future__ import annotations

import torch

from hyperloop.model import HyperloopLM, decode_site
from hyperloop.model.hyper import RMS_EPS
from hyperloop.model.layers import Block
from hyperloop.quant import gemv
from hyperloop.quant.linear import QuantLinear

# QuantLinear.kernel_operands names of the GEMV operands whose rows are paired for an epilogue
ROPE, SWIGLU = "gemv:rope", "gemv:swiglu"


def _linears(block: Block) -> tuple[torch.nn.Module, ...]:
    return block.attn.wqkv, block.attn.wo, block.mlp.w_gate_up, block.mlp.w_down


class FusedInt4Blocks:
    """Runs a Block for one token (batch 1) in the five kernels of the module docstring."""

    def __init__(self, model: HyperloopLM):
        """Builds every layer's GEMV operands, the wqkv and w_gate_up rows in their epilogue's pairs."""
        cfg, device = model.cfg, model.embed.weight.device
        for block in model.layers:
            wqkv, wo, w_gate_up, w_down = _linears(block)
            wqkv.kernel_operands(ROPE, device, gemv.rope_pairs(cfg.n_heads, cfg.head_dim))
            w_gate_up.kernel_operands(SWIGLU, device, gemv.swiglu_pairs(cfg.ffn_dim))
            wo.kernel_operands("gemv", device)
            w_down.kernel_operands("gemv", device)
        self.linears = [linear for block in model.layers for linear in _linears(block)]
        self.fold_sites = False  # the Decoder's to set (see the module docstring)
        # the kernel reads fp32 tables (load_model keeps them so; a model cast whole to bf16 would not)
        self.cos, self.sin = model.rope.cos.float(), model.rope.sin.float()

    @classmethod
    def for_model(cls, model: HyperloopLM) -> FusedInt4Blocks | None:
        """The fused layers of `model`, or None where some layer cannot run them."""
        device, norms = model.embed.weight.device, [p for b in model.layers for p in (b.attn_norm.weight, b.mlp_norm.weight)]
        qualifies = (
            model.embed.weight.dtype == torch.bfloat16
            and model.cfg.head_dim in gemv.ATTENTION_HEAD_DIMS
            and all(norm.dtype == torch.bfloat16 for norm in norms)
            and not any(block.attn.lora or block.mlp.lora for block in model.layers)
            and all(
                isinstance(linear, QuantLinear) and linear.bits == 4 and linear.gemv_on(device) and not linear.act_order
                for block in model.layers
                for linear in _linears(block)
            )
        )
        return cls(model) if qualifies else None

    def __call__(self, block: Block, x, cache, slot: int, branch: str | None = None):
        """Block.forward(x, branch=branch) for x (1, 1, dim) bf16 through `cache` (a KVCache) at its
        `positions`, or None for any other x (a prefill, another dtype): the caller then runs the block
        op by op. With `branch` ("attn" or "mlp"), that sub-layer's bare output F(x), or with
        `fold_sites` a decode_site.Pending; x may then be a decode_site.FoldedRead."""
        read = x if isinstance(x, decode_site.FoldedRead) else None
        if read is None and (x.shape[:2] != (1, 1) or x.dtype != torch.bfloat16):
            return None
        wqkv, wo, w_gate_up, w_down = _linears(block)
        attn_norm, mlp_norm, heads = block.attn_norm, block.mlp_norm, block.attn.n_heads

        def operands(linear: QuantLinear, name: str = "gemv") -> tuple:
            words, grid, split, _ = linear.kernel_operands(name, self.cos.device)
            return words, grid, linear.group_size, split

        def last(linear: QuantLinear, h: torch.Tensor, residual: torch.Tensor | None, gates):
            if branch and self.fold_sites:  # the site's write runs it (decode_site.write)
                if not read:
                    return decode_site.Pending(h, *operands(linear), None, None)
                h_post, res = gates  # res: H_res's logits, then H_res (the site block's iterations)
                logits, h_res = res.chunk(2)
                return decode_site.Pending(h, *operands(linear), decode_site.Gates(h_post, logits), h_res)
            return gemv.int4_gemv(h, *operands(linear), residual=residual).view(1, 1, -1)

        h = read.streams if read else x.reshape(-1)
        site = read.site() if read else []  # a read the first GEMV finishes: its gates come out with the output
        iters = read.iters if read else 0
        gates = None
        if branch != "mlp":
            k_cache, v_cache = cache.k[slot], cache.v[slot]
            q, *gates = gemv.int4_gemv_rope_cache(h, *operands(wqkv, ROPE), attn_norm.weight, attn_norm.eps, self.cos,
                                                  self.sin, cache.positions, k_cache, v_cache, cache.column, site,
                                                  RMS_EPS, iters)  # fmt: skip
            out = gemv.decode_attention(q.view(1, heads, -1), k_cache, v_cache, cache.pad, cache.column)
            if branch == "attn":
                return last(wo, out.reshape(-1), None, gates)
            h = gemv.int4_gemv(out.reshape(-1), *operands(wo), residual=h)
        if read:
            gated, *gates = gemv.int4_gemv_sites(h, *operands(w_gate_up, SWIGLU), mlp_norm.weight, mlp_norm.eps, True,
                                                 site, [], RMS_EPS, iters)  # fmt: skip
        else:  # (not int4_gemv_sites: its two empty outputs would only cost allocations)
            gated = gemv.int4_gemv(h, *operands(w_gate_up, SWIGLU), norm_weight=mlp_norm.weight, eps=mlp_norm.eps,
                                   swiglu=True)  # fmt: skip
        return last(w_down, gated, None if branch else h, gates)
