"""The figures of spec section 8: a similarity heatmap per model, and one logit-lens figure with
every model overlaid.

Figures are built as `matplotlib.figure.Figure` objects and written by the Agg renderer, never
through pyplot: no GUI backend is needed or touched, so this runs on headless machines and never
changes the backend of a notebook that imports it. Sizes are fixed (no tight bounding box) so every
PNG of a kind has the same pixel size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hyperloop.analysis.layout import Layout

DPI = 120
SIMILARITY_SIZE = (7.0, 6.2)  # inches: 840 x 744 pixels
LENS_SIZE = (15.0, 4.6)  # inches: 1800 x 552 pixels
LENS_METRICS = (("ce", "cross-entropy (nats)"), ("entropy", "entropy (nats)"), ("accuracy", "greedy accuracy"))
MAX_TICK_LABELS = 48  # beyond this, label every other layer so the names stay readable


def pixel_size(inches: tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a figure of this size."""
    return round(inches[0] * DPI), round(inches[1] * DPI)


def plot_similarity(path: str | Path, similarity: torch.Tensor, layout: Layout, title: str,
                    vmin: float | None = None) -> None:  # fmt: skip
    """Heatmap of the (D, D) mean cosine similarity, with the begin / loop / end blocks outlined.
    The colours run from `vmin` (default: the lowest value) to 1, the diagonal."""
    sim = similarity.float().numpy()
    depth = layout.depth
    fig = Figure(figsize=SIMILARITY_SIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    low = float(sim.min()) if vmin is None else vmin
    # min(..., 0.999): a matrix of all ones (identical layers) would otherwise get an empty colour range
    image = ax.imshow(sim, cmap="viridis", vmin=min(low, 1.0 - 1e-3), vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="mean cosine similarity over tokens")
    step = 1 if depth <= MAX_TICK_LABELS else 2
    names = layout.names()
    ticks = list(range(0, depth, step))
    fontsize = 8 if depth <= 24 else 6
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=fontsize)
    ax.set_xlabel("effective layer (output)")
    ax.set_ylabel("effective layer (output)")
    for boundary in layout.boundaries():  # pixel edges sit at half-integers
        ax.axhline(boundary - 0.5, color="white", linewidth=1.2)
        ax.axvline(boundary - 0.5, color="white", linewidth=1.2)
    if layout.looped:  # name the blocks along the top edge
        top = ax.secondary_xaxis("top")
        segments = layout.segments()
        top.set_xticks([(start + stop - 1) / 2 for _, start, stop in segments], [n for n, _, _ in segments],
                       fontsize=8)  # fmt: skip
        top.tick_params(length=0)
    ax.set_title(title, fontsize=10)
    fig.savefig(path)


def plot_logit_lens(path: str | Path, curves: list[tuple[str, Layout, dict[str, list[float]]]], title: str) -> None:
    """CE, entropy and greedy accuracy of the read-out after every effective layer, one line per model.
    Loop ends are circled; dotted lines mark where any model's blocks change."""
    fig = Figure(figsize=LENS_SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(LENS_METRICS))
    boundaries = sorted({b for _, layout, _ in curves for b in layout.boundaries()})
    for ax, (key, ylabel) in zip(axes, LENS_METRICS):
        for boundary in boundaries:  # between effective layers `boundary` and `boundary + 1` (1-based)
            ax.axvline(boundary + 0.5, color="0.75", linestyle=":", linewidth=1.0)
        for k, (label, layout, lens) in enumerate(curves):
            color = f"C{k % 10}"
            x = list(range(1, layout.depth + 1))
            ax.plot(x, lens[key], color=color, marker="o", markersize=3, linewidth=1.5, label=label)
            ends = layout.loop_ends()
            ax.scatter([e + 1 for e in ends], [lens[key][e] for e in ends], s=70, facecolors="none",
                       edgecolors=color, linewidths=1.5, zorder=3)  # fmt: skip
        ax.set_xlabel("effective layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if any(layout.looped for _, layout, _ in curves):
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=8, markerfacecolor="none",
                              markeredgecolor="0.3"))  # fmt: skip
        labels.append("loop end")
    axes[0].legend(handles, labels, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)
