"""The demo corpus bundled in ``hyperloop/corpus/``: a few MB of English Wikipedia (CC BY-SA 3.0, see
``corpus/ATTRIBUTION.md``) and the Llama-2 tokenizer, so `prepare`, the CPU demo and the tests run on a
fresh machine with no data and no network.

``build_demo_corpus`` is how the bundled files were cut; it is kept here so the cut can be checked
and redone from the enwiki parquet shards (``../shared/data/enwiki`` on the project's machines).
"""

from __future__ import annotations

from pathlib import Path

from hyperloop.errors import HyperloopError

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"
# The cut: leading articles of the first train shard, in file order, up to this much text, in
# files under 1.9 MB (the repository flags tracked files over 2 MB).
DEMO_CHARS = 7_000_000
DEMO_FILE_CHARS = 3_500_000
DEMO_COLUMNS = ["id", "url", "title", "text"]


def demo_corpus_path() -> Path:
    """The folder of bundled demo parquet files; pass it (or just ``demo``) as a `prepare` source."""
    return CORPUS_DIR


def demo_tokenizer_path() -> Path:
    """The bundled Llama-2 ``tokenizer.model`` (the tokenizer of the paper)."""
    return CORPUS_DIR / "tokenizer.model"


def build_demo_corpus(enwiki_train_shard: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``demo-0000N.parquet`` files holding the leading articles of ``enwiki_train_shard`` (whole
    articles, in file order) until ``DEMO_CHARS`` characters, about ``DEMO_FILE_CHARS`` per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = Path(enwiki_train_shard)
    if not shard.is_file():
        raise HyperloopError(f"{shard} does not exist; pass an enwiki train-NNNNN.parquet shard")
    files: list[list[dict]] = [[]]
    total = file_chars = 0
    for row in _rows(shard):
        if total >= DEMO_CHARS:
            break
        if file_chars >= DEMO_FILE_CHARS:
            files.append([])
            file_chars = 0
        files[-1].append(row)
        total += len(row["text"])
        file_chars += len(row["text"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(column, pa.string()) for column in DEMO_COLUMNS])
    written = [out / f"demo-{i:05d}.parquet" for i in range(len(files))]
    for path, file_rows in zip(written, files):
        table = pa.Table.from_pylist(file_rows, schema=schema)
        pq.write_table(table, path, compression="zstd", row_group_size=64)
    return written


def _rows(shard: Path):
    """The rows of a parquet file in order, read one row group at a time (only as far as needed)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(shard) as file:
        for group in range(file.num_row_groups):
            yield from file.read_row_group(group, columns=DEMO_COLUMNS).to_pylist()
