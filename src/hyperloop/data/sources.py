"""Where documents come from: parquet, JSON-lines and text files, folders of them, and HF datasets.

Every input is opened (and its text column checked) before any tokenization starts, so a typo in the
fifth path fails in a second instead of after the first four files. Inputs then yield their documents
as lists of strings, a few megabytes at a time, in a fixed order: folder contents sorted by path,
rows in file order. That order is what makes two runs of `prepare` write identical shards.

Formats:
- ``.parquet``: the text column (FineWeb / FineWeb-Edu / our enwiki layout), read row group by row group.
- ``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz``: one JSON object a line, the text in one field.
- ``.txt``: the whole file is one document (a folder of ``.txt`` files is a folder of documents).
- ``hf:NAME[:CONFIG]``: the ``train`` split of an HF dataset, streamed (needs the `datasets` package).
  ``NAME`` may also be a local folder of data files, which `datasets` reads without a hub.
- ``demo``: the small Wikipedia corpus bundled with the package (when no file of that name exists).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hyperloop.errors import HyperloopError

PARQUET = (".parquet",)
JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TXT = (".txt",)
HF_PREFIX = "hf:"
# Documents travel to the tokenizer processes in batches of about this many characters: big enough
# that the per-batch cost (pickling, a process hop) is noise, small enough to keep every core busy.
BATCH_CHARS = 4_000_000


def _suffix(path: Path) -> str:
    """The format suffix, counting a trailing .gz: 'x.jsonl.gz' -> '.jsonl.gz'."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return "".join(suffixes).lower()


@dataclass
class Input:
    """One readable input: a file, or an HF dataset stream. ``name`` is what meta.json records."""

    name: str
    kind: str  # parquet | jsonl | txt | hf
    text_column: str
    num_documents: int | None = None  # known up front for parquet and txt; drives the progress bar
    _dataset: object = None  # the opened HF IterableDataset

    def batches(self) -> Iterator[list[str | None]]:
        """The documents in order, in lists of about BATCH_CHARS characters (None for a null text)."""
        batch: list[str | None] = []
        chars = 0
        for text in self._texts():
            batch.append(text)
            chars += len(text) if text else 0
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    def _texts(self) -> Iterator[str | None]:
        if self.kind == "parquet":
            return self._parquet_texts()
        if self.kind == "jsonl":
            return self._jsonl_texts()
        if self.kind == "txt":
            return iter([_read_txt(Path(self.name))])
        return (row.get(self.text_column) for row in self._dataset)

    def _parquet_texts(self) -> Iterator[str | None]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.name) as file:
            for group in range(file.num_row_groups):
                yield from file.read_row_group(group, columns=[self.text_column]).column(0).to_pylist()

    def _jsonl_texts(self) -> Iterator[str | None]:
        opener = gzip.open if self.name.endswith(".gz") else open
        with opener(self.name, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(_utf8_lines(lines, self.name), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise HyperloopError(
                        f"{self.name} line {number} is not valid JSON; JSON-lines files hold one object a line"
                    ) from None
                if not isinstance(record, dict) or self.text_column not in record:
                    raise HyperloopError(
                        f"{self.name} line {number} has no '{self.text_column}' field; pass --text-column NAME"
                    )
                text = record[self.text_column]
                if text is not None and not isinstance(text, str):
                    raise HyperloopError(
                        f"{self.name} line {number}: '{self.text_column}' is {type(text).__name__}, not text"
                    )
                yield text


def _utf8_lines(lines, name: str) -> Iterator[str]:
    """Iterate a text file, turning a decoding failure into a user error naming the file."""
    try:
        yield from lines
    except UnicodeDecodeError:
        raise HyperloopError(f"{name} is not UTF-8 text; convert it to UTF-8 first") from None


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HyperloopError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from None


def _open_parquet(path: Path, text_column: str) -> Input:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as err:
        raise HyperloopError(f"{path} is not a readable parquet file ({err})") from None
    schema = metadata.schema.to_arrow_schema()
    if text_column not in schema.names:
        raise HyperloopError(
            f"{path} has no column '{text_column}' (columns: {', '.join(schema.names)}); pass --text-column NAME"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise HyperloopError(f"column '{text_column}' of {path} holds {kind}, not text; pass --text-column NAME")
    return Input(str(path), "parquet", text_column, num_documents=metadata.num_rows)


def _open_hf(spec: str, text_column: str) -> Input:
    try:
        import datasets
    except ImportError:
        raise HyperloopError(
            f"{spec} needs the HF `datasets` package: pip install 'hyperloop[datasets]'"
        ) from None
    name, _, config = spec[len(HF_PREFIX):].partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train", streaming=True)
        first = next(iter(dataset), None)
    except Exception as err:  # noqa: BLE001 -- datasets raises many types (hub, network, file format); all mean "cannot read"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HyperloopError(
            f"cannot stream {spec} through `datasets` ({reason}); check the name and that the hub is reachable"
        ) from None
    if first is not None and text_column not in first:
        raise HyperloopError(
            f"{spec} has no column '{text_column}' (columns: {', '.join(first)}); pass --text-column NAME"
        )
    info = dataset.info.splits.get("train") if dataset.info.splits else None
    return Input(spec, "hf", text_column, num_documents=info.num_examples if info else None, _dataset=dataset)


def _open_file(path: Path, text_column: str) -> Input:
    suffix = _suffix(path)
    if suffix in PARQUET:
        return _open_parquet(path, text_column)
    if suffix in JSONL:
        return Input(str(path), "jsonl", text_column)
    if suffix in TXT:
        return Input(str(path), "txt", text_column, num_documents=1)
    raise HyperloopError(
        f"{path}: unsupported file type '{suffix or path.name}'; use .parquet, .jsonl or .txt (or hf:NAME)"
    )


def _folder_files(folder: Path) -> list[Path]:
    known = PARQUET + JSONL + TXT
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and _suffix(p) in known
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise HyperloopError(f"{folder} holds no .parquet, .jsonl or .txt files")
    return files


def open_inputs(specs: list[str], text_column: str = "text") -> list[Input]:
    """Expand ``specs`` (files, folders, ``hf:`` names, ``demo``) into opened, checked inputs."""
    from hyperloop.data.demo import demo_corpus_path

    inputs: list[Input] = []
    for spec in specs:
        if spec.startswith(HF_PREFIX):
            inputs.append(_open_hf(spec, text_column))
            continue
        path = Path(spec).expanduser()
        if not path.exists() and spec == "demo":
            path = demo_corpus_path()
        if not path.exists():
            raise HyperloopError(f"source {spec} does not exist; pass a file, a folder, or hf:NAME")
        files = _folder_files(path) if path.is_dir() else [path]
        inputs.extend(_open_file(f, text_column) for f in files)
    return inputs
