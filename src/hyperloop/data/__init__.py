"""Data: tokenizers, `prepare` (corpus -> token shards), and the memory-mapped loaders.

The names below are imported on first use (PEP 562), so ``import hyperloop.data`` and
``hyperloop prepare`` do not import torch: only the loaders need it.
"""

from hyperloop.data.demo import demo_corpus_path, demo_tokenizer_path

_LAZY = {
    "load_tokenizer": "hyperloop.data.tokenizer",
    "Tokenizer": "hyperloop.data.tokenizer",
    "prepare": "hyperloop.data.prepare",
    "TokenData": "hyperloop.data.loader",
    "TrainLoader": "hyperloop.data.loader",
    "EvalWindows": "hyperloop.data.loader",
}

__all__ = [
    "EvalWindows",
    "TokenData",
    "Tokenizer",
    "TrainLoader",
    "demo_corpus_path",
    "demo_tokenizer_path",
    "load_tokenizer",
    "prepare",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hyperloop.data' has no attribute {name!r}")
