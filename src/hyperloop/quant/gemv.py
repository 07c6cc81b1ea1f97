"""The one-row int4 GEMV of gemv.cu: QuantLinear's kernel for decoding at batch 1 on CUDA.

At one row PyTorch's tinygemm (aten._weight_int4pack_mm) reads its weights at 0.2-1.3 TB/s, far
from an H100's 3.35. On the S and M shapes this kernel is 1.05-1.34x faster (0.96x on the smallest,
1024 x 1024, where both take about 2.2 us) and closer to the dequantized weight (results/int4.md).
It is compiled from source on first use with torch.utils.cpp_extension (about a minute, then cached
by PyTorch under ~/.cache/torch_extensions), so it needs the CUDA toolkit (nvcc); where that is
missing or the build fails, QuantLinear keeps tinygemm, as it does with HYPERLOOP_INT4_GEMV=0 set.
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
    """The compiled gemv.cu, or None where it is not wanted (HYPERLOOP_INT4_GEMV=0) or cannot be
    built (no CUDA toolkit, a failed build)."""
    from torch.utils import cpp_extension

    if os.environ.get("HYPERLOOP_INT4_GEMV") == "0" or cpp_extension.CUDA_HOME is None:
        return None
    print("hyperloop: loading the int4 GEMV CUDA kernel (the first time it is compiled, about a minute)",
          file=sys.stderr, flush=True)  # fmt: skip
    declaration = "torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor words, torch::Tensor grid, int64_t group_size, int64_t split);"
    try:
        source = Path(__file__).with_name("gemv.cu").read_text()
        return cpp_extension.load_inline("hyperloop_int4_gemv", declaration, cuda_sources=source,
                                         functions=["int4_gemv"], extra_cuda_cflags=["-O3"])  # fmt: skip
    except Exception as error:  # a broken toolkit must not stop decoding: tinygemm still works
        warnings.warn(f"the int4 GEMV kernel did not build, using tinygemm instead: {error}", stacklevel=2)
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


def operands(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(words, grid) of gemv.cu on packed's device. packed: GPTQ's qweight layout (K/8, N) int32, the
    codes in the order the kernel will read x (act-order: sorted by group); scales, zeros (groups, N).
    words (N, K/8): each row's words side by side; grid (N, groups, 2) fp16: scale and 1024 + zero
    (the f16 mantissa trick of gemv.cu)."""
    grid = torch.stack([scales.T.float(), 1024.0 + zeros.T.float()], dim=-1)
    return packed.T.contiguous(), grid.to(packed.device, torch.float16).contiguous()


@torch.library.custom_op("hyperloop::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, words: torch.Tensor, grid: torch.Tensor, group_size: int, split: int) -> torch.Tensor:
    """y (N,) = W_hat x for one row x (K,) bf16. A custom op, so torch.compile keeps it as one call."""
    if x.data_ptr() % 16:  # the kernel reads x 16 bytes at a time
        x = x.clone()
    return extension().int4_gemv(x.contiguous(), words, grid, group_size, split)


@int4_gemv.register_fake
def _(x, words, grid, group_size, split):
    return x.new_empty(words.shape[0])
