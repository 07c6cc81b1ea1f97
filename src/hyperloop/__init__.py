"""hyperloop: Hyperloop Transformers (arXiv 2604.21254) and the Transformer, mHC and Looped baselines."""

__version__ = "0.1.0"
