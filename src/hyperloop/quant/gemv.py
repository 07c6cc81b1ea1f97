"""The one-row int4 GEMV of gemv.cu: QuantLinear's kernel for decoding at batch 1 on CUDA, and the
fused layer of infer/int4_block.py (RMSNorm prologue; residual, SwiGLU, RoPE-and-cache epilogues),
whose attention (`decode_attention`) is a kernel of gemv.cu too.

At one row PyTorch's tinygemm (aten._weight_int4pack_mm) reads its weights at 0.2-1.3 TB/s, far
from an H100's 3.35. On the S and M shapes this kernel is 1.27-1.76x faster (results/int4.md), partly
because on sm_90 small grids are launched as programmatic dependents that fetch their weights while
the kernel before them finishes (gemv.cu). It is compiled from source on first use with
torch.utils.cpp_extension (about a minute, then cached by PyTorch under ~/.cache/torch_extensions),
so it needs the CUDA toolkit (nvcc); where that is missing or the build fails, QuantLinear keeps
tinygemm, as it does with HYPERLOOP_INT4_GEMV=0 set (and decoding runs the layers op by op).
Its operands are a layout of its own, derived from the stored GPTQ tensors (`operands`).
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import cache
from pathlib import Path

import torch

MAX_IN_FEATURES = 16 * 1024  # x is staged in shared memory, 2 bytes an input: 32 KB of the 48 a block gets
GRID_WARPS = 2048  # warps the split over K may fill the grid up to
ROWS_PER_WARP = 2  # gemv.cu's kRows


@cache
def extension():
    """The compiled decode kernels: gemv.cu and model/hc_site.cu (one unit: the site kernel uses
    gemv.cu's helpers), or None where they are not wanted (HYPERLOOP_INT4_GEMV=0) or cannot be built
    (no CUDA toolkit, a failed build)."""
    from torch.utils import cpp_extension

    if os.environ.get("HYPERLOOP_INT4_GEMV") == "0" or cpp_extension.CUDA_HOME is None:
        return None
    print("hyperloop: loading the CUDA decode kernels (the first time they are compiled, about a minute)",
          file=sys.stderr, flush=True)  # fmt: skip
    common = "torch::Tensor x, torch::Tensor words, torch::Tensor grid, int64_t group_size, int64_t split, " \
             "std::optional<torch::Tensor> norm_weight, double eps"  # fmt: skip
    optional = ", ".join(f"std::optional<torch::Tensor> {name}"
                         for name in ("out", "h_post", "h_res", "embedding", "weight", "bias", "alpha"))  # fmt: skip
    sites = "std::vector<torch::Tensor> read_site"
    declarations = (
        f"std::vector<torch::Tensor> int4_gemv({common}, std::optional<torch::Tensor> residual, bool swiglu, "
        f"{sites}, std::vector<torch::Tensor> write_site, double site_eps, int64_t sinkhorn_iters);\n"
        f"std::vector<torch::Tensor> int4_gemv_rope_cache({common}, torch::Tensor cos, torch::Tensor sin, "
        f"torch::Tensor position, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor column, {sites}, "
        "double site_eps, int64_t sinkhorn_iters);\n"
        "torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, "
        "torch::Tensor pad, torch::Tensor column);\n"
        f"std::vector<torch::Tensor> hc_site_decode(torch::Tensor y, {optional}, double eps, bool merge, int64_t sinkhorn_iters);\n"
        "int64_t fold_sum_sets(int64_t rows, int64_t split, int64_t device);"
    )
    package = Path(__file__).parents[1]
    try:
        sources = [(package / name).read_text() for name in ("quant/gemv.cu", "model/hc_site.cu")]
        return cpp_extension.load_inline("hyperloop_decode_kernels", declarations, cuda_sources=sources,
                                         functions=["int4_gemv", "int4_gemv_rope_cache", "decode_attention",
                                                    "hc_site_decode", "fold_sum_sets"], extra_cuda_cflags=["-O3"])  # fmt: skip
    except Exception as error:  # a broken toolkit must not stop decoding: tinygemm still works
        warnings.warn(f"the CUDA decode kernels did not build, using tinygemm instead: {error}", stacklevel=2)
        return None


def available(in_features: int) -> bool:
    return in_features <= MAX_IN_FEATURES and extension() is not None


def split_for(in_features: int, out_features: int) -> int:
    """Warps that share a block's rows and split K: more for matrices with few rows, as long as the
    grid stays within GRID_WARPS and every warp keeps at least 16 chunks of 32 codes. On our S and M
    shapes it picks a split within 0.13 us of the fastest (an H100 sweep: results/int4.json,
    gemv_sweep_2026_11_26)."""
    chunks = in_features // 32
    for split in (4, 2):
        if out_features // ROWS_PER_WARP * split <= GRID_WARPS and chunks >= 16 * split:
            return split
    return 1


def operands(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(words, grid) of gemv.cu on packed's device. packed: GPTQ's qweight layout (K/8, N) int32, the
    codes in the order the kernel will read x (act-order: sorted by group); scales, zeros (groups, N).
    words (N, K/8): each row's words side by side; grid (N, groups, 2) fp16: scale and 1024 + zero
    (the f16 mantissa trick of gemv.cu). `rows`: the weight's rows in the order the kernel is to
    compute them (its epilogues take outputs in pairs: rope_pairs, swiglu_pairs), default 0..N-1."""
    words, grid = packed.T, torch.stack([scales.T.float(), 1024.0 + zeros.T.float()], dim=-1)
    if rows is not None:
        words, grid = words[rows.to(words.device)], grid[rows.to(grid.device)]
    return words.contiguous(), grid.to(packed.device, torch.float16).contiguous()


def rope_pairs(heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a fused q|k|v weight as int4_gemv_rope_cache computes them: elements (i, i + D/2) of
    each head of q, k, then v, pair after pair (the two halves that rotate-half RoPE mixes)."""
    half = head_dim // 2
    first = torch.arange(3 * heads).repeat_interleave(half) * head_dim + torch.arange(half).repeat(3 * heads)
    return torch.stack([first, first + half], dim=1).flatten()


def swiglu_pairs(ffn_dim: int) -> torch.Tensor:
    """Rows of a fused gate|up weight as the swiglu epilogue computes them: (gate_i, up_i) pairs."""
    gate = torch.arange(ffn_dim)
    return torch.stack([gate, gate + ffn_dim], dim=1).flatten()


@torch.library.custom_op("hyperloop::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, words: torch.Tensor, grid: torch.Tensor, group_size: int, split: int,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
              swiglu: bool = False) -> torch.Tensor:  # fmt: skip
    """y = W_hat x for one row x (K,) bf16: (N,), or with `residual` (N,) residual + W_hat x, or with
    `swiglu` silu(gate) * up of the (gate, up) row pairs, (N/2,). With `norm_weight`, x is replaced
    first by RMSNorm(x) * norm_weight (epsilon `eps`). A custom op, so torch.compile keeps it as one call."""
    return extension().int4_gemv(aligned(x), words, grid, group_size, split, norm_weight, eps, residual, swiglu,
                                 [], [], 0.0, 0)[0]  # fmt: skip


@int4_gemv.register_fake
def _(x, words, grid, group_size, split, norm_weight=None, eps=0.0, residual=None, swiglu=False):
    return x.new_empty(words.shape[0] // 2 if swiglu else words.shape[0])


@torch.library.custom_op("hyperloop::int4_gemv_sites", mutates_args=())
def int4_gemv_sites(x: torch.Tensor, words: torch.Tensor, grid: torch.Tensor, group_size: int, split: int,
                    norm_weight: torch.Tensor | None, eps: float, swiglu: bool, read_site: list[torch.Tensor],
                    write_site: list[torch.Tensor], site_eps: float,
                    sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """int4_gemv with an mHC site folded in (model/hc_site.cu; model/decode_site.py drives it), the
    GEMV's output first. `read_site` [partials, bias, alpha]: the site's read, x then its streams
    y' (n, K) and the GEMV's input sum_j h_pre_j y'_j; adds the site's h_post (n,), and its H_res
    logits then H_res after `sinkhorn_iters` iterations (2 * n * n,). `write_site` [streams (n, N),
    h_post, H_res, next site's weight]: the site's write on the GEMV's output, adding y' (n, N) and the
    blocks' sums for the next site's read; with sinkhorn_iters > 0 it takes H_res's logits instead (a
    read that was not folded) and runs the iterations itself."""
    return tuple(extension().int4_gemv(aligned(x), words, grid, group_size, split, norm_weight, eps, None, swiglu,
                                       read_site, write_site, site_eps, sinkhorn_iters))  # fmt: skip


@int4_gemv_sites.register_fake
def _(x, words, grid, group_size, split, norm_weight, eps, swiglu, read_site, write_site, site_eps, sinkhorn_iters):
    rows = words.shape[0]
    return x.new_empty(rows // 2 if swiglu else rows), *_fake_site_outputs(x, rows, split, read_site, write_site)


def _fake_site_outputs(x, rows: int, split: int, read_site: list, write_site: list) -> tuple:
    """The two outputs a folded site adds after a GEMV's of `rows` rows (int4_gemv_sites), for the fakes."""
    if read_site:
        n = x.shape[0]
        return x.new_empty(n, dtype=torch.float32), x.new_empty(2 * n * n, dtype=torch.float32)
    if write_site:
        n = write_site[0].shape[0]
        sums = 2 * n + n * n + 1
        sets = extension().fold_sum_sets(rows, split, x.device.index)  # a set a block of the GEMV
        return x.new_empty(n, rows), x.new_empty(sums, sets, dtype=torch.float32)
    return x.new_empty(0), x.new_empty(0)


@torch.library.custom_op("hyperloop::int4_gemv_rope_cache", mutates_args=("k_cache", "v_cache"))
def int4_gemv_rope_cache(x: torch.Tensor, words: torch.Tensor, grid: torch.Tensor, group_size: int, split: int,
                         norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                         position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         column: torch.Tensor, read_site: list[torch.Tensor], site_eps: float,
                         sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The q|k|v projection of one token (rows in rope_pairs order) with RMSNorm before it: returns q
    (heads * head_dim,) after RoPE, and writes k (after RoPE) and v into column `column` (a 0-d int64
    on the device) of k_cache and v_cache (1, heads, cache_len, head_dim). cos, sin: the RoPE tables
    (positions, head_dim / 2) fp32, read at row `position` (one int64 on the device): the kernel
    indexes them itself, since a compiled step gathering the row for every layer's call made a
    copy per call. `read_site` (empty: none): an mHC site's read folded in, as in int4_gemv_sites; the
    site's h_post and H_res logits and H_res follow q (two empty tensors without)."""
    return tuple(extension().int4_gemv_rope_cache(aligned(x), words, grid, group_size, split, norm_weight, eps, cos,
                                                  sin, position, k_cache, v_cache, column, read_site, site_eps,
                                                  sinkhorn_iters))  # fmt: skip


@int4_gemv_rope_cache.register_fake
def _(x, words, grid, group_size, split, norm_weight, eps, cos, sin, position, k_cache, v_cache, column, read_site,
      site_eps, sinkhorn_iters):  # fmt: skip
    return x.new_empty(words.shape[0] // 3), *_fake_site_outputs(x, words.shape[0], split, read_site, [])


ATTENTION_HEAD_DIMS = (64, 128)  # decode_attention's


@torch.library.custom_op("hyperloop::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pad: torch.Tensor,
                     column: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Attention of one query a row, q (B, H, D) bf16 with D in ATTENTION_HEAD_DIMS, over the columns
    pad[b] .. column of k_cache, v_cache (B, H, T_max, D) (pad (B,), column 0-d, int64 on the device):
    (B, H, D). The fused layer's attention (gemv.cu); infer/decode_attention.py has the Triton one."""
    return extension().decode_attention(q.contiguous(), k_cache, v_cache, pad, column)


@decode_attention.register_fake
def _(q, k_cache, v_cache, pad, column):
    return q.new_empty(q.shape)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x, contiguous and 16-byte aligned: the kernel reads it 16 bytes at a time."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 16 else x
