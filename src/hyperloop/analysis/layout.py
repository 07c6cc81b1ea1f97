"""Where each effective (unrolled) layer sits in a model's plan: its name, its block, the loop
boundaries to mark on the plots, and which layers are "the same middle layer in the next loop".

Everything is derived from `HyperloopLM.plan()`, the model's own execution order, so the analyses
can never disagree with the forward about which output belongs to which layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperloop.model import Step


@dataclass(frozen=True)
class Layout:
    steps: tuple[Step, ...]  # model.plan(num_loops)

    # ----------------------------------------------------------------------------- structure
    @property
    def depth(self) -> int:
        return len(self.steps)

    @property
    def num_loops(self) -> int:
        """Middle-block iterations; 0 when there is no middle block."""
        return 1 + max((s.loop for s in self.steps if s.loop is not None), default=-1)

    @property
    def looped(self) -> bool:
        """A Transformer or mHC model is a plan with one loop and nothing to compare across loops."""
        return self.num_loops > 1

    @property
    def _first_middle(self) -> int:
        return min((s.layer for s in self.steps if s.loop is not None), default=0)

    @property
    def _middle_layers(self) -> int:
        return len({s.layer for s in self.steps if s.loop is not None})

    def block(self, step: Step) -> str:
        """'begin', 'loop k' (1-based) or 'end'; every layer of an unlooped model is in 'layers'."""
        if not self.looped:
            return "layers"
        if step.loop is not None:
            return f"loop {step.loop + 1}"
        return "begin" if step.layer < self._first_middle else "end"

    def names(self) -> list[str]:
        """Short labels for the axes: B1.., L<loop>.<layer in the block>.., E1.. (or 1..D unlooped)."""
        if not self.looped:
            return [str(i + 1) for i in range(self.depth)]
        end_start = self._first_middle + self._middle_layers
        names = []
        for s in self.steps:
            if s.loop is not None:
                names.append(f"L{s.loop + 1}.{s.layer - self._first_middle + 1}")
            elif s.layer < self._first_middle:
                names.append(f"B{s.layer + 1}")
            else:
                names.append(f"E{s.layer - end_start + 1}")
        return names

    def segments(self) -> list[tuple[str, int, int]]:
        """Consecutive runs of one block as (name, start, stop) over effective-layer indices."""
        segments: list[tuple[str, int, int]] = []
        for i, step in enumerate(self.steps):
            name = self.block(step)
            if segments and segments[-1][0] == name:
                segments[-1] = (name, segments[-1][1], i + 1)
            else:
                segments.append((name, i, i + 1))
        return segments

    def boundaries(self) -> list[int]:
        """Effective-layer indices where a new block starts (begin | loop 1 | loop 2 | ... | end)."""
        return [start for _, start, _ in self.segments()[1:]]

    def loop_ends(self) -> list[int]:
        """Index of the last layer of every loop: where a looped model could exit early, and where
        Hyperloop's merged streams are those the next block really reads (with one HC per loop)."""
        return [stop - 1 for name, _, stop in self.segments() if name.startswith("loop")] if self.looped else []

    def next_loop_pairs(self) -> dict[int, list[tuple[int, int]]]:
        """For every middle layer (0-based position in the middle block), the (i, j) effective-layer
        index pairs of that layer in loop l and in loop l + 1. Empty for an unlooped model."""
        where = {(s.layer, s.loop): i for i, s in enumerate(self.steps) if s.loop is not None}
        pairs: dict[int, list[tuple[int, int]]] = {}
        for (layer, loop), i in where.items():
            if (layer, loop + 1) in where:
                pairs.setdefault(layer - self._first_middle, []).append((i, where[(layer, loop + 1)]))
        return dict(sorted(pairs.items()))
