"""Inference: a static KV cache with one slot per unrolled layer execution, batched generation,
test-time loop counts and per-token early exit at loop boundaries (docs/infer.md).

    from hyperloop.infer import generate, GenerationConfig, Sampling
    out = generate(model, [[bos, *ids]], GenerationConfig(max_new_tokens=64, num_loops=2, exit_threshold=0.8))
"""

from hyperloop.infer.cache import KVCache
from hyperloop.infer.decoder import Decoder, FullRecompute
from hyperloop.infer.generate import Generation, GenerationConfig, generate
from hyperloop.infer.sampling import Sampling, sample

__all__ = [
    "Decoder",
    "FullRecompute",
    "Generation",
    "GenerationConfig",
    "KVCache",
    "Sampling",
    "generate",
    "sample",
]
