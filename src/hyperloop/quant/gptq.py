"""GPTQ (Frantar et al., 2023) for one linear layer: quantize W column by column, each time
spreading the rounding error over the columns not yet quantized so that the layer's *output* on the
calibration inputs moves as little as possible.

For a layer y = W x with calibration inputs X, GPTQ minimises ||W X - W_hat X||^2, whose curvature is
the Hessian H = 2 X X^T / N. The steps below follow the reference algorithm:
1. dead inputs (a column of X that is always 0, so H[d, d] = 0) carry no information: their weights
   are set to 0 and H[d, d] to 1 so H stays invertible;
2. optional act-order: quantize the columns with the largest H[d, d] first (they matter most);
3. dampening: H += damp * mean(diag H) * I (1% by default), relative so the scale of H is irrelevant;
4. U = the upper Cholesky factor of H^-1: row i of U holds, for column i, how the error of column i
   should be pushed onto the columns after it;
5. columns are processed in blocks of 128: inside a block the error of every quantized column is
   applied immediately to the block's remaining columns; the rest of W gets the whole block's
   error in one matmul afterwards ("lazy batch" updates - the same result, far fewer memory passes);
6. every `group_size` columns a fresh min-max grid (hyperloop.quant.grid) is fitted on the current,
   error-updated weights of the next group.

Loop-awareness lives in `Hessian`: it sums X^T X over *every call* of the layer, so a shared middle
layer run K times per forward gets one Hessian over all K loop iterations (spec section 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyperloop.errors import HyperloopError
from hyperloop.quant.grid import QuantizedWeight, check_spec, dequantize, fit_grid, quantize

BLOCK_SIZE = 128
DAMP_RETRIES = 4  # each retry multiplies the dampening by 10 (GPTQModel also escalates on failure)


class Hessian:
    """Running sum of X^T X over the inputs of one linear layer (every call, every token).

    The reference keeps a running average over sequences instead (ending at 2 X X^T / sequences); a
    sum scaled once at the end (as GPTQModel does) differs from it only by a constant factor, which
    does not change the result: the dampening is relative to mean(diag H)."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.xtx = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the inputs of one call, x (..., in_features)."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """H = 2 X^T X / N, the Hessian of the layer's squared output error."""
        if self.tokens == 0:
            raise HyperloopError("a layer saw no calibration tokens; check the calibration data")
        return self.xtx * (2.0 / self.tokens)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp: float  # the dampening that made H positive definite (the requested one unless it failed)
    # tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T): the relative output error on the calibration set
    error: float


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative squared output error ||(W - W_hat) X||^2 / ||W X||^2, computed from H = 2 X X^T / N."""
    w, delta = weight.float(), weight.float() - approx.float()
    return float(((delta @ hessian) * delta).sum() / ((w @ hessian) * w).sum().clamp(min=1e-30))


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising the dampening if needed."""
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    mean_diag = hessian.diagonal().mean()
    for _ in range(DAMP_RETRIES):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper, damp
        damp *= 10
    raise HyperloopError(
        f"the Hessian stays singular even with dampening {damp / 10:g}; use more calibration data"
    )


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = BLOCK_SIZE,
) -> GPTQResult:
    """Quantize weight (out, in) given the Hessian (in, in) of its inputs."""
    out_features, in_features = weight.shape
    check_spec(bits, group_size, in_features, out_features)
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()

    dead = H.diagonal() == 0  # step 1
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    original = W.clone()  # the target the error is measured against (dead weights are irrelevant)

    perm = (
        torch.argsort(H.diagonal(), descending=True)
        if act_order
        else torch.arange(in_features, device=W.device)
    )
    W, H = W[:, perm], H[perm][:, perm]  # step 2 (identity without act-order)
    U, used_damp = inverse_cholesky(H, damp)  # steps 3-4

    codes = torch.zeros_like(W)
    scales = torch.zeros(in_features // group_size, out_features, device=W.device)
    zeros = torch.zeros_like(scales)
    for start in range(0, in_features, block_size):  # step 5
        end = min(start + block_size, in_features)
        block = W[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            col = start + j
            if col % group_size == 0:  # step 6: the group's current weights, in and past this block
                group = torch.cat([block[:, j:], W[:, end : col + group_size]], dim=1)[:, :group_size]
                scale, zero = fit_grid(group, bits)
                scales[col // group_size], zeros[col // group_size] = scale[:, 0], zero[:, 0]
            q = quantize(block[:, j : j + 1], scale, zero, bits)
            codes[:, col] = q[:, 0]
            err = (block[:, j : j + 1] - dequantize(q, scale, zero)) / U[col, col]
            block[:, j + 1 :] -= err * U[col, col + 1 : end]
            errors[:, j : j + 1] = err
        W[:, end:] -= errors @ U[start:end, end:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features, device=W.device) // group_size)[inverse].to(torch.int32)
    result = QuantizedWeight(codes[:, inverse].to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, bits)
    return GPTQResult(result, used_damp, output_error(original, result.dequantize(), hessian.float()))
