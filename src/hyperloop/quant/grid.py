"""The integer grid that GPTQ and RTN share: asymmetric min-max per group of input columns.

A weight matrix W (out, in) is cut along its input dimension into groups of `group_size` columns.
Each output row of each group gets its own scale s and integer zero z, fitted on the range of the
group's weights *including 0* (so an exact 0 stays representable, as in the GPTQ reference):

    s = (max(w, 0) - min(w, 0)) / (2^bits - 1),   z = round(-min(w, 0) / s)
    q = clamp(round(w / s) + z, 0, 2^bits - 1),   w_hat = s (q - z)

Scales are rounded *up* to fp16 before the codes are chosen: fp16 is how the checkpoint stores
them, so the codes are chosen for the scales that will actually be used, and rounding up keeps the
whole range on the grid (every weight within half a step of its code).

`QuantizedWeight` holds codes + grid for one matrix in plain (unpacked) tensors; `rtn` is the
round-to-nearest baseline (every weight snapped to its nearest grid point, no error feedback).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperloop.errors import HyperloopError

SUPPORTED_BITS = (2, 4, 8)  # widths that pack whole codes into an int32 word (GPTQ's packing)
# The smallest normal fp16: a scale below it would lose precision (or vanish) once stored as fp16.
MIN_SCALE = 2.0**-14


def check_spec(bits: int, group_size: int, in_features: int, out_features: int, name: str = "weight") -> None:
    """One-line errors for a (bits, group_size) that cannot quantize a (out, in) weight."""
    if bits not in SUPPORTED_BITS:
        raise HyperloopError(
            f"--bits {bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    if group_size < 1:
        raise HyperloopError(f"--group-size must be positive, got {group_size}")
    if in_features % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
        hint = f"; try --group-size {divisors[0]}" if divisors else ""
        raise HyperloopError(
            f"group size {group_size} does not divide the input dimension {in_features} of {name}{hint}"
        )
    per_word = 32 // bits
    if out_features % per_word:  # zeros are packed along the output dimension
        raise HyperloopError(
            f"{name} has {out_features} outputs, not a multiple of {per_word} as {bits}-bit packing needs"
        )


def fit_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (each (..., 1), fp32) of the min-max grid of every row of w (..., group)."""
    w = w.float()
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0.0)
    empty = (lo == 0) & (hi == 0)  # an all-zero row: any grid works, use [-1, 1] like the reference
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    levels = 2**bits - 1
    exact = ((hi - lo) / levels).clamp(min=MIN_SCALE)
    scale = exact.half()
    scale = torch.where(
        scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale
    ).float()
    zero = torch.round(-lo / scale).clamp(0, levels)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of w on the grid (scale, zero)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


@dataclass
class QuantizedWeight:
    """Codes and grid of one (out, in) matrix, unpacked.

    codes:  (out, in) uint8 in [0, 2^bits)
    scales: (groups, out) fp32 (values exactly representable in fp16)
    zeros:  (groups, out) uint8
    g_idx:  (in,) int32, the group of every input column: i // group_size, or a permutation of
            that when GPTQ ran in activation order (groups are then formed in that order)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[0]

    def dequantize(self) -> torch.Tensor:
        """W_hat (out, in) in fp32."""
        g = self.g_idx.long()
        return dequantize(self.codes.float(), self.scales[g].T, self.zeros[g].T.float())


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest on the min-max grid of each group (the baseline GPTQ improves on)."""
    out_features, in_features = weight.shape
    check_spec(bits, group_size, in_features, out_features)
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale, zero = fit_grid(groups, bits)
    codes = quantize(groups, scale, zero, bits).reshape(out_features, in_features)
    g_idx = torch.arange(in_features, device=weight.device, dtype=torch.int32) // group_size
    return QuantizedWeight(
        codes.to(torch.uint8), scale[..., 0].T.contiguous(), zero[..., 0].T.to(torch.uint8), g_idx, bits
    )
