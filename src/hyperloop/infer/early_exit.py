"""Per-token early exit at loop boundaries (the logit-lens observation of paper section 8).

After every loop but the last, the model hands its merged outer stream to `on_loop_end`. This hook
reads it the way the finished model would: through the end block (writing the end block's K/V, as
the token's final pass would) and the final norm + LM head. A row whose top-token probability
reaches the threshold exits: its next token is chosen from these logits.

What an exited token leaves in the cache. Later tokens attend to every earlier token in every slot,
including the slots of the loops this token skipped. We copy the K/V of the loop it exited at into
those slots (same physical layer, later loop): a later token at loop j then sees the exited token's
exit-time state, which is CALM's "propagate the exit state" and the same values Huginn's
latest-step lookup (`latest-m4`) would read, without a lookup at attention time. The end-block slots
already hold what the probe wrote. Rows that exited stop writing (KVCache.write_rows) while the
rest of the batch runs on, so a batch gives each row the tokens it would get alone.

The batch runs in lockstep: the model skips the remaining loops only once every row has exited, and
then the probe has already run the end block, so the forward is stopped outright (AllRowsExited)
rather than running the end block a second time. Prompts (prefill) always run every loop.

On CUDA the Decoder records the step as one CUDA graph per loop (`segment_end` switches the capture
at each probe) and replays them one after the other, reading `exited` between them: the only
per-token host work is that one check per loop. So the state a step leaves (`exited`, `exit_loop`,
`exit_logits`) lives in buffers updated in place, which every segment's graph writes.
"""

from __future__ import annotations

import torch

from hyperloop.config import ModelConfig
from hyperloop.errors import HyperloopError
from hyperloop.infer.cache import KVCache
from hyperloop.model import HyperloopLM


class AllRowsExited(Exception):
    """Raised by the hook to stop the forward: every row has its logits and its cache is complete."""


def check_exit_supported(cfg: ModelConfig) -> None:
    if cfg.hc_placement == "span" and cfg.middle_layers % cfg.span:
        raise HyperloopError(f"early exit needs hyper-connection spans that end at loop boundaries "
                             f"(hc_span={cfg.hc_span} does not divide middle_layers={cfg.middle_layers})")  # fmt: skip


class EarlyExit:
    """The `on_loop_end` hook of one decode step (call `start` before each step, `finish` after)."""

    def __init__(self, model: HyperloopLM, cache: KVCache, threshold: float, num_loops: int):
        check_exit_supported(model.cfg)
        self.model, self.cache, self.threshold, self.num_loops = model, cache, threshold, num_loops
        plan, cfg = model.plan(num_loops), model.cfg
        self.end_steps = plan[cfg.begin_layers + num_loops * cfg.middle_layers :]
        self.loop_slots = [[s.index for s in plan if s.loop == loop] for loop in range(num_loops)]
        batch, device = cache.batch, cache.device
        self.exited = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exit_loop = torch.zeros(batch, dtype=torch.long, device=device)
        self.exit_logits = torch.zeros(batch, cfg.vocab_size, dtype=model.embed.weight.dtype, device=device)
        # While the Decoder records CUDA graphs: ends one loop's graph and starts the next one.
        self.segment_end = None

    def start(self, finished: torch.Tensor) -> None:
        """Begin a step (after `cache.start`). Finished rows (stopped generating) count as exited:
        nobody reads their tokens, and they should not hold the batch back."""
        self.rope = self.model.rope(self.cache.positions)
        self.exited.copy_(finished)
        self.exit_loop.fill_(self.num_loops - 1)
        self.cache.write_rows = ~self.exited

    def __call__(self, loop: int, hidden: torch.Tensor) -> bool:
        if loop == self.num_loops - 1:  # the model's own end block finishes the last loop
            return False
        x = hidden
        for step in self.end_steps:
            x = self.model.layers[step.layer](x, self.rope, None, self.cache, step.index)
        logits = self.model.logits(x[:, -1])
        confident = logits.float().softmax(dim=-1).amax(dim=-1) >= self.threshold
        exit_now = confident & ~self.exited
        self.exit_logits.copy_(torch.where(exit_now.unsqueeze(-1), logits, self.exit_logits))
        self.exit_loop.masked_fill_(exit_now, loop)
        for later in self.loop_slots[loop + 1 :]:
            self.cache.copy_forward(exit_now, self.loop_slots[loop], later)
        self.exited |= exit_now
        self.cache.write_rows = ~self.exited
        if self.segment_end is not None:  # recording: the host check happens between the replays
            self.segment_end()
        elif bool(self.exited.all()):
            raise AllRowsExited
        return False

    def finish(self, logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits (exited rows: their probe's; the others: the model's, None when every
        row exited) and the loops each row ran."""
        self.cache.write_rows = None
        if logits is None:
            logits = self.exit_logits.clone()
        else:
            exited_early = (self.exit_loop < self.num_loops - 1).unsqueeze(-1)
            logits = torch.where(exited_early, self.exit_logits, logits)
        return logits, self.exit_loop + 1
