"""QuantLinear: a bias-free linear layer whose weight is stored as packed low-bit codes.

Storage is GPTQ's packed layout (the "gptq_v2" checkpoint format of GPTQModel, which stores the
true zero point rather than zero - 1), so the tensors mean what GPTQ users expect:

    qweight  int32 (in * bits / 32, out)    word r holds input rows r*P .. r*P+P-1 (P = 32 / bits),
                                            row r*P + j in bits j*bits .. j*bits + bits-1 (LSB first)
    qzeros   int32 (groups, out * bits / 32) the zero points, packed the same way along the outputs
    scales   fp16  (groups, out)
    g_idx    int32 (in,)                     group of every input column
    weight[o, i] = scales[g, o] * (code[i, o] - zero[g, o]),  g = g_idx[i]

Compute. On CUDA with bf16 activations, 4-bit codes and at most KERNEL_MAX_ROWS input rows, the
matmul runs in a kernel that reads the int4 weights straight from memory - the point of int4 when
decoding, which is memory-bound: one row (batch-1 decoding) in our CUDA GEMV (gemv.py, where the
CUDA toolkit can build it), 2 to KERNEL_MAX_ROWS rows (or one, without the GEMV) in PyTorch's
built-in tinygemm kernel (aten._weight_int4pack_mm). Each kernel's operands (the GEMV's row-major
words and fp16 grid; tinygemm's tiled int4 layout and bf16 scales with *float* zeros) are derived
from the stored tensors the first time the layer runs that kernel on a device and cached there (so a
CUDA model holds the stored layout and one or two kernel layouts: about 0.5x of bf16 with one,
instead of 0.26x). With many rows (prefill, perplexity) the GEMM is compute-bound and
tinygemm falls behind cuBLAS (about 0.4x at 64 rows on an H100), so the layer dequantizes and calls
F.linear instead; so does it everywhere else (CPU, fp32/fp16 activations, 2/8-bit codes). That
dequantize-then-matmul path is the reference: it computes exactly the calibration-time weight.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from hyperloop.quant import gemv
from hyperloop.quant.grid import QuantizedWeight, check_spec

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
TINYGEMM_K_TILE = 16  # the kernel tiles the input dimension in 16s, `inner_k_tiles` tiles at a time
# Up to this many rows tinygemm beats a bf16 cuBLAS matmul (reference notes: 1.4-2.3x at 1 row,
# about 1x at 16, 0.4x at 64), beyond it dequantize + cuBLAS is faster.
KERNEL_MAX_ROWS = 16


@cache
def tinygemm_available(device_index: int) -> bool:
    """The kernel exists in this build and the GPU has bf16 tensor cores (sm_80+)."""
    has_op = hasattr(torch.ops.aten, "_weight_int4pack_mm")
    return has_op and torch.cuda.get_device_capability(device_index) >= (8, 0)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) codes in [0, 2^bits) -> (R * bits / 32, C) int32, P = 32 / bits rows per word, LSB first."""
    per_word = 32 // bits
    rows, cols = values.shape
    fields = values.to(torch.int64).reshape(rows // per_word, per_word, cols)
    shifts = (torch.arange(per_word, device=values.device) * bits).view(1, per_word, 1)
    words = (fields << shifts).sum(dim=1)  # the bit fields are disjoint, so the sum is their OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: (R * bits / 32, C) int32 -> (R, C) uint8."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, device=words.device, dtype=torch.int32) * bits).view(1, per_word, 1)
    # Right shifts of a negative int32 bring in copies of the sign bit, but the mask drops them: no
    # int64 detour needed (this runs at every dequantize, where it is most of the cost).
    fields = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return fields.reshape(-1, words.shape[1]).to(torch.uint8)


def int4_tinygemm_weight(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """codes (out, in) in [0, 16) -> the tiled int32 operand of aten._weight_int4pack_mm.

    Since torch 2.5 the converter takes uint8 (out, in / 2) with the even input column in the high
    nibble; earlier releases took the int32 codes (out, in) themselves. Try the current form first.
    """
    pairs = (codes[:, ::2].to(torch.uint8) << 4) | codes[:, 1::2].to(torch.uint8)
    try:
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
    except RuntimeError:
        return torch.ops.aten._convert_weight_to_int4pack(codes.to(torch.int32).contiguous(), inner_k_tiles)


def tinygemm_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(groups, out) scales and integer zeros -> (groups, out, 2) bf16 for tinygemm.

    tinygemm dequantizes w = (q - 8) * scale + zero_f with a float zero, and ours is
    w = scale * (q - z) = (q - 8) * scale + (8 - z) * scale, so zero_f = (8 - z) * scale.
    """
    scales = scales.float()
    return torch.stack([scales, (8 - zeros.float()) * scales], dim=-1).to(torch.bfloat16).contiguous()


class QuantLinear(nn.Module):
    """y = x W_hat^T with W_hat (out, in) held as packed codes, one scale and zero per group."""

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, device=None
    ):
        super().__init__()
        check_spec(bits, group_size, in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups, per_word = in_features // group_size, 32 // bits
        ints = {"dtype": torch.int32, "device": device}
        self.register_buffer("qweight", torch.zeros(in_features // per_word, out_features, **ints))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per_word, **ints))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, **ints) // group_size)
        self.use_kernel = True  # set False to force the dequantize-then-matmul path (for comparisons)
        self._kernel_shapes_ok = (
            bits == 4
            and group_size in TINYGEMM_GROUP_SIZES
            and out_features % 8 == 0
            and in_features % (2 * TINYGEMM_K_TILE) == 0
        )
        # kernel name ("gemv", "tinygemm") -> (device, its operands..., input perm or None), built on first use
        self._operands: dict[str, tuple] = {}

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight) -> QuantLinear:
        out_features, in_features = weight.codes.shape
        layer = cls(in_features, out_features, weight.bits, weight.group_size, device=weight.codes.device)
        layer.qweight.copy_(pack_rows(weight.codes.T, weight.bits))
        layer.qzeros.copy_(pack_rows(weight.zeros.T, weight.bits).T)
        layer.scales.copy_(weight.scales)
        layer.g_idx.copy_(weight.g_idx)
        return layer

    def unpacked(self) -> QuantizedWeight:
        codes = unpack_rows(self.qweight, self.bits).T
        zeros = unpack_rows(self.qzeros.T, self.bits).T
        return QuantizedWeight(codes, self.scales.float(), zeros, self.g_idx, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight W_hat (out, in) as a dense tensor."""
        return self.unpacked().dequantize().to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )

    def _apply(self, fn, recurse=True):
        """Moves follow the module, dtype casts do not touch the grid: `model.to(torch.bfloat16)`
        must not round the fp16 scales to bf16 (three mantissa bits fewer) behind the user's back."""
        self._operands = {}  # rebuilt on the new device at the next call
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = scales.to(self.qweight.device)
        return self

    @property
    def act_order(self) -> bool:
        """Whether the input columns are not in group order (GPTQ's act-order)."""
        return bool((self.g_idx[1:] < self.g_idx[:-1]).any())

    # ------------------------------------------------------------------------------- forward
    def _kernel_on(self, device: torch.device) -> bool:
        """Whether this layer can use the int4 kernel on `device` at all."""
        return self.use_kernel and self._kernel_shapes_ok and device.type == "cuda" and tinygemm_available(device.index)

    def gemv_on(self, device: torch.device) -> bool:
        """Whether one-row inputs on `device` go through our GEMV."""
        return self._kernel_on(device) and gemv.available(self.in_features)

    def _kernel(self, x: torch.Tensor) -> str | None:
        """The kernel for x ("gemv" for one row, else "tinygemm"), or None: dequantize, then F.linear."""
        if not self.use_kernel or x.dtype != torch.bfloat16 or x.numel() > KERNEL_MAX_ROWS * self.in_features:
            return None
        one_row = x.numel() == self.in_features
        if torch.compiler.is_compiling():
            # Trace no device query and no build: a caller that compiles the forward runs
            # prepare_kernel first, and the operands it built decide.
            names = ("gemv", "tinygemm") if one_row else ("tinygemm",)
            return next((n for n in names if n in self._operands and self._operands[n][0] == x.device), None)
        if not self._kernel_on(x.device):
            return None
        return "gemv" if one_row and gemv.available(self.in_features) else "tinygemm"

    def kernel_operands(self, name: str, device: torch.device, rows: torch.Tensor | None = None) -> tuple:
        """The operands of kernel `name` on `device` and the input permutation (or None), built on
        first use. A name "gemv:<order>" keeps GEMV operands whose rows come in the order `rows` (for
        the fused epilogues of infer/int4_block.py), built from `rows` the first time."""
        if name not in self._operands or self._operands[name][0] != device:
            q = self.unpacked()
            codes, perm = q.codes.to(device), None
            if self.act_order:
                # act-order: the kernels need each group's columns side by side, so sort the input
                # columns by group once here and gather the activations the same way per call.
                perm = torch.argsort(q.g_idx.long(), stable=True).to(device)
                codes = codes[:, perm]
            if name.startswith("gemv"):
                packed = self.qweight if perm is None else pack_rows(codes.T, self.bits)
                words, grid = gemv.operands(packed.to(device), q.scales, q.zeros, rows)
                kernel = (words, grid, gemv.split_for(self.in_features, self.out_features))
            else:
                inner_k_tiles = next(t for t in (8, 4, 2) if self.in_features % (t * TINYGEMM_K_TILE) == 0)
                kernel = (int4_tinygemm_weight(codes, inner_k_tiles), tinygemm_scales_and_zeros(q.scales, q.zeros).to(device))
            self._operands[name] = (device, *kernel, perm)
        return self._operands[name][1:]

    def prepare_kernel(self, rows: int = 1) -> None:
        """Build now, eagerly, the operands of the kernel that inputs of `rows` rows will use.
        torch.compile cannot trace building them (it branches on the data), so a caller that compiles
        the forward calls this first."""
        device = self.qweight.device
        x = torch.empty(rows, self.in_features, dtype=torch.bfloat16, device=device)
        if (name := self._kernel(x)) is not None:
            self.kernel_operands(name, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self._kernel(x)
        if name is None:
            return F.linear(x, self.dequantize(x.dtype))
        *kernel, perm = self.kernel_operands(name, x.device)
        flat = x.reshape(-1, self.in_features)
        if perm is not None:
            flat = flat[:, perm]
        if name == "gemv":
            words, grid, split = kernel
            out = gemv.int4_gemv(flat.reshape(-1), words, grid, self.group_size, split)
        else:
            weight, scales_and_zeros = kernel
            out = torch.ops.aten._weight_int4pack_mm(flat.contiguous(), weight, self.group_size, scales_and_zeros)
        return out.reshape(*x.shape[:-1], self.out_features)
