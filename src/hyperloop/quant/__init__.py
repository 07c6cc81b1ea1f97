"""Weight-only low-bit quantization (docs/quant.md): RTN and loop-aware GPTQ, packed int4 checkpoints,
and QuantLinear (tinygemm int4 kernel on CUDA, dequantize-then-matmul elsewhere).

    from hyperloop.quant import quantize_gptq, quantize_rtn
    quantize_gptq(model, calib_tokens, bits=4, group_size=128, loop_hessian="all")   # in place

Modules, from the bottom up: grid (the min-max grid, RTN), gptq (one layer), linear (QuantLinear and
the bit packing), quantize (whole models), pack (checkpoints), convert (`hyperloop quantize`).
"""

from hyperloop.quant.convert import quantize_checkpoint
from hyperloop.quant.linear import QuantLinear
from hyperloop.quant.pack import load_quantized, save_quantized
from hyperloop.quant.quantize import quantize_gptq, quantize_rtn

__all__ = [
    "QuantLinear",
    "load_quantized",
    "quantize_checkpoint",
    "quantize_gptq",
    "quantize_rtn",
    "save_quantized",
]
