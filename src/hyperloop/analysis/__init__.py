"""Why Hyperloop works (spec section 8): cross-loop representation similarity and the logit lens,
as tables, JSON and plots, for any checkpoints side by side. Entry point: `analyze`."""

from hyperloop.analysis.layout import Layout
from hyperloop.analysis.report import DEFAULT_TOKENS, analyze, summary_markdown
from hyperloop.analysis.stats import LayerStats, loop_similarity

__all__ = ["DEFAULT_TOKENS", "LayerStats", "Layout", "analyze", "loop_similarity", "summary_markdown"]
