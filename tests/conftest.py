"""Shared fixtures: token shards prepared from a slice of the bundled demo corpus (no ../shared needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperloop.data import demo_corpus_path, demo_tokenizer_path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """One demo parquet file (about 0.8M Llama-2 tokens) with a 10% validation split."""
    from hyperloop.data.prepare import prepare

    out = tmp_path_factory.mktemp("demo") / "data"
    source = sorted(Path(demo_corpus_path()).glob("*.parquet"))[0]
    prepare([str(source)], str(demo_tokenizer_path()), str(out), val_fraction=0.1, workers=1)
    return out
