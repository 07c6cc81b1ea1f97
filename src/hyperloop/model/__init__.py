"""The model zoo: one LM class (HyperloopLM) whose config decides the architecture."""

from hyperloop.model.hyper import HyperConnection, sinkhorn
from hyperloop.model.lm import HyperloopLM, Step

__all__ = ["HyperloopLM", "HyperConnection", "Step", "sinkhorn"]
