"""`generate`: token ids in, token ids out, for a batch of prompts of any lengths.

What users of HF `generate` / gpt-fast expect: greedy by default, temperature / top-k / top-p
sampling, a seed, stop tokens (a row stops at its first stop token, which is not returned), and a
callback per step for streaming. On top: `num_loops` runs the middle block K' times instead of the
trained K, and `exit_threshold` lets each generated token leave at a loop boundary (early_exit.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hyperloop.errors import HyperloopError
from hyperloop.infer.decoder import Decoder, FullRecompute
from hyperloop.infer.sampling import Sampling, sample
from hyperloop.model import HyperloopLM


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None
    num_loops: int | None = None  # None = the trained loop count
    exit_threshold: float | None = None  # None = never exit early; > 1 also never exits
    use_cache: bool = True  # False recomputes the full forward every step (a check, slow)
    cuda_graph: bool | None = None  # None = on CUDA whenever possible
    compile: bool = False  # torch.compile the decode step (CUDA; pays a compile at the first step)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise HyperloopError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_loops is not None and self.num_loops < 1:
            raise HyperloopError(f"--loops must be at least 1, got {self.num_loops}")
        if self.exit_threshold is not None and not self.use_cache:
            raise HyperloopError("--exit-threshold needs the KV cache (an exited token's skipped loops live "
                                 "there); drop --no-cache")  # fmt: skip
        if self.exit_threshold is not None and self.exit_threshold <= 0:
            raise HyperloopError(f"--exit-threshold is a probability in (0, 1] (above 1: never exit), "
                                 f"got {self.exit_threshold}")  # fmt: skip


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, without the stop token
    loops_used: list[list[int]]  # loops run for each generated token
    finish_reasons: list[str]  # "stop" (a stop token came) or "length" (max_new_tokens reached)


def check_prompts(prompts: list[list[int]], max_new_tokens: int, context: int) -> None:
    if not prompts:
        raise HyperloopError("no prompt given")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise HyperloopError(f"prompt {i} is empty; give at least one token")
        # The last generated token is never fed back, so the cache needs prompt + new - 1 columns.
        if len(prompt) + max_new_tokens - 1 > context:
            raise HyperloopError(f"prompt {i} has {len(prompt)} tokens; with --max-new-tokens {max_new_tokens} "
                                 f"that exceeds the model's context of {context} tokens")  # fmt: skip


def generate(
    model: HyperloopLM,
    prompts: list[list[int]],
    config: GenerationConfig = GenerationConfig(),
    on_step: Callable[[list[int | None]], None] | None = None,
) -> Generation:
    """Continue each prompt (a list of token ids, BOS included if the model wants one).

    on_step: called after every step with the new token of each row (None for a row that has
    stopped, or that stopped at this step) - for streaming.
    """
    check_prompts(prompts, config.max_new_tokens, model.cfg.max_seq_len)
    device = model.embed.weight.device
    batch = len(prompts)
    if config.use_cache:
        width = max(len(p) for p in prompts) + config.max_new_tokens - 1
        runner = Decoder(model, batch, width, num_loops=config.num_loops, exit_threshold=config.exit_threshold,
                         cuda_graph=config.cuda_graph, compile=config.compile)  # fmt: skip
    else:
        runner = FullRecompute(model, config.num_loops)
    generator = None if config.seed is None else torch.Generator(device).manual_seed(config.seed)
    stops = set(config.stop_tokens)

    out = Generation([[] for _ in prompts], [[] for _ in prompts], ["length"] * batch)
    done = [False] * batch
    logits = runner.prefill(prompts)
    loops = torch.full((batch,), runner.num_loops)
    for i in range(config.max_new_tokens):
        tokens = sample(logits, config.sampling, generator)
        new: list[int | None] = []
        for row, (token, used) in enumerate(zip(tokens.tolist(), loops.tolist())):
            if done[row] or token in stops:
                if not done[row]:
                    done[row], out.finish_reasons[row] = True, "stop"
                new.append(None)
                continue
            out.tokens[row].append(token)
            out.loops_used[row].append(used)
            new.append(token)
        if on_step is not None:
            on_step(new)
        if all(done) or i == config.max_new_tokens - 1:
            break
        logits, loops = runner.step(tokens, torch.tensor(done, device=device))
    return out
