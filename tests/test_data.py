"""Data pipeline: tokenizers, `prepare`, the loaders and the bundled demo corpus.

Everything runs on the bundled Llama-2 tokenizer and a small corpus cut from the bundled demo text, so
these tests need no network and no ../shared; the few that use ../shared (GPT-2 files, the enwiki
shards) skip when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyperloop.cli import main as cli_main
from hyperloop.data import demo_corpus_path, demo_tokenizer_path
from hyperloop.data.demo import build_demo_corpus
from hyperloop.data.loader import EvalWindows, TokenData, TrainLoader, window_order
from hyperloop.data.prepare import _is_validation, prepare
from hyperloop.data.shards import token_dtype
from hyperloop.data.tokenizer import load_tokenizer
from hyperloop.errors import HyperloopError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
TRICKY = [
    " leading space and  double  spaces",
    "tabs\tand\r\nwindows newlines\n\n\nand trailing space ",
    "unicode: é ñ 中文 😀 \u200b zero-width, and a literal <s> and <|endoftext|>",
    "\n",
]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def docs() -> list[str]:
    """40 real articles (cut to 3000 characters) from the bundled corpus, plus awkward strings."""
    table = pq.read_table(min(demo_corpus_path().glob("*.parquet")), columns=["text"])
    return [t[:3000] for t in table.column("text").to_pylist()[:40]] + TRICKY


def write_parquet(path: Path, texts: list, column: str = "text") -> Path:
    pq.write_table(pa.table({column: pa.array(texts, pa.string())}), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> Path:
    return write_parquet(tmp_path_factory.mktemp("corpus") / "docs.parquet", docs)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare([str(corpus)], str(demo_tokenizer_path()), str(out), val_fraction=0.2, workers=2, progress=False)
    return out


def split_documents(tokens: np.ndarray, bos: int) -> list[list[int]]:
    """Cut a BOS-separated token stream back into documents (without their BOS)."""
    starts = np.flatnonzero(tokens == bos)
    assert len(tokens) == 0 or starts[0] == 0, "a split must start with BOS"
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------------------- tokenizers
def test_llama2_tokenizer_round_trip_and_ids(docs):
    tok = load_tokenizer(demo_tokenizer_path())
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 32000, 1, 2)
    assert tok.sha256 == LLAMA2_SHA256
    assert tok.encode("Hello world") == [15043, 3186]  # HF LlamaTokenizer gives the same ids
    assert tok.encode_batch(docs) == [tok.encode(d) for d in docs]
    for doc in docs:
        assert tok.decode(tok.encode(doc)) == doc


def test_llama2_alias_and_save_load(tmp_path):
    tok = load_tokenizer("llama2")
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.sha256 == tok.sha256 == LLAMA2_SHA256
    assert again.encode("The cat sat.") == tok.encode("The cat sat.")


@pytest.mark.skipif(not (SHARED / "tokenizers" / "gpt2").is_dir(), reason="needs ../shared/data/tokenizers/gpt2")
def test_gpt2_tokenizer(docs, tmp_path):
    tok = load_tokenizer(SHARED / "tokenizers" / "gpt2")
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("gpt2", 50257, 50256, 50256)
    assert tok.encode("Hello world") == [15496, 995]  # the ids tiktoken's gpt2 gives
    assert tok.encode(" Hello  world\n\n x") == [18435, 220, 995, 628, 2124]
    assert 50256 not in tok.encode("a<|endoftext|>b")  # special-token text stays text
    for doc in docs:
        assert tok.decode(tok.encode(doc)) == doc
    tok.save(tmp_path / "g")
    assert load_tokenizer(tmp_path / "g").sha256 == tok.sha256


def make_hf_tokenizer(folder: Path, with_config: bool) -> Path:
    """A tiny byte-level BPE tokenizer.json trained on the spot, with <s> and </s> as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 50, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if with_config:
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "</s>"}, "eos_token": "</s>"}))
    return folder


def test_hf_tokenizer_folder(tmp_path, docs):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "plain", with_config=False))
    assert (tok.kind, tok.bos_id, tok.eos_id) == ("hf", 1, 2)  # found by the usual names
    for doc in docs[:5] + TRICKY:
        assert tok.decode(tok.encode(doc)) == doc
    configured = load_tokenizer(make_hf_tokenizer(tmp_path / "configured", with_config=True))
    assert configured.bos_id == configured.eos_id == 2  # tokenizer_config.json wins over the names
    configured.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer_config.json").is_file()
    assert load_tokenizer(tmp_path / "copy").bos_id == 2


def test_tokenizer_bad_input(tmp_path):
    with pytest.raises(HyperloopError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "vocab.txt").write_text("hello\n")
    with pytest.raises(HyperloopError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(HyperloopError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HyperloopError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- prepare
def test_prepare_round_trip_and_meta(prepared, docs):
    data = TokenData(prepared)
    meta, tok = data.meta, data.tokenizer()
    assert meta["tokenizer"] == {"kind": "sentencepiece", "sha256": LLAMA2_SHA256, "vocab_size": 32000,
                                 "bos_id": 1, "eos_id": 2}
    assert meta["dtype"] == "uint16" and tok.sha256 == LLAMA2_SHA256
    expected = {"train": [], "validation": []}
    for doc in docs:  # the split is a pure function of the text
        expected["validation" if _is_validation(doc.encode(), 0.2) else "train"].append(doc)
    assert expected["train"] and expected["validation"]
    for split, texts in expected.items():
        tokens = np.asarray(data.split_tokens(split))
        got = split_documents(tokens, tok.bos_id)
        assert [tok.decode(ids) for ids in got] == texts
        info = meta["splits"][split]
        assert info["documents"] == len(texts) and info["tokens"] == len(tokens)
        assert info["text_bytes"] == sum(len(t.encode()) for t in texts)
    assert meta["sources"][0]["documents"] == len(docs)


def test_prepare_is_deterministic_across_runs_and_workers(prepared, corpus, tmp_path):
    prepare([str(corpus)], "llama2", str(tmp_path / "again"), val_fraction=0.2, workers=1, progress=False)
    assert shard_bytes(tmp_path / "again") == shard_bytes(prepared)
    first, second = (json.loads((p / "meta.json").read_text()) for p in (prepared, tmp_path / "again"))
    first.pop("created"), second.pop("created")
    assert first == second


def test_shard_boundaries(prepared, corpus, tmp_path):
    """Small shards: whole documents per shard, BOS first, same stream as one shard, loader reads across."""
    limit = 2000
    meta = prepare([str(corpus)], "llama2", str(tmp_path / "small"), val_fraction=0.2, workers=2,
                   shard_tokens=limit, progress=False)
    train = meta["splits"]["train"]
    assert len(train["shards"]) > 3 and sum(train["shard_tokens"]) == train["tokens"]
    for name, n in zip(train["shards"], train["shard_tokens"]):
        shard = np.fromfile(tmp_path / "small" / name, dtype="<u2")
        assert len(shard) == n and shard[0] == 1
        assert n <= limit or np.count_nonzero(shard == 1) == 1  # only a lone long document may exceed it
    whole = np.concatenate([np.fromfile(p, dtype="<u2") for p in sorted((tmp_path / "small").glob("train-*.bin"))])
    assert whole.tobytes() == (prepared / "train-00000.bin").read_bytes()

    tokens = TokenData(tmp_path / "small").split_tokens("train")
    edge = train["shard_tokens"][0]
    assert np.array_equal(tokens[edge - 5:edge + 7], whole[edge - 5:edge + 7])
    assert tokens[edge] == whole[edge] and tokens[-1] == whole[-1] and len(tokens) == len(whole)
    seq_len = edge // 2 + 3  # the second window straddles the first shard boundary
    x, _ = next(iter(EvalWindows(TokenData(tmp_path / "small"), seq_len=seq_len, batch_size=4, split="train")))
    assert torch.equal(x[1], torch.from_numpy(whole[seq_len:2 * seq_len].astype(np.int64)))
    sharded, single = (TrainLoader(TokenData(p), 64, 8, seed=2) for p in (tmp_path / "small", prepared))
    for _ in range(single.blocks_per_epoch):  # every window, straddling shards or not
        assert all(torch.equal(a, b) for a, b in zip(sharded.next_batch(), single.next_batch()))


def test_prepare_formats_agree(tmp_path, docs):
    """The same documents as parquet, JSON lines and a folder of .txt files give the same tokens."""
    texts = docs[:6]
    write_parquet(tmp_path / "a.parquet", texts)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(text, encoding="utf-8", newline="")
    outputs = []
    for source in ("a.parquet", "a.jsonl", "txt"):
        prepare([str(tmp_path / source)], "llama2", str(tmp_path / f"out-{source}"), val_fraction=0, workers=1,
                progress=False)
        outputs.append(shard_bytes(tmp_path / f"out-{source}"))
    assert outputs[0] == outputs[1] == outputs[2]


def test_val_source_and_text_column(tmp_path, docs):
    write_parquet(tmp_path / "train.parquet", docs[:10], column="content")
    write_parquet(tmp_path / "val.parquet", docs[10:13], column="content")
    meta = prepare([str(tmp_path / "train.parquet")], "llama2", str(tmp_path / "out"), val_fraction=0.5,
                   val_source=[str(tmp_path / "val.parquet")], text_column="content", workers=1, progress=False)
    assert meta["splits"]["train"]["documents"] == 10 and meta["splits"]["validation"]["documents"] == 3
    assert meta["split_rule"]["method"] == "source"
    tok = load_tokenizer("llama2")
    val = split_documents(np.asarray(TokenData(tmp_path / "out").split_tokens("validation")), tok.bos_id)
    assert [tok.decode(ids) for ids in val] == docs[10:13]


def test_null_and_empty_documents_are_skipped(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["one doc", None, "", "two doc"])
    meta = prepare([str(tmp_path / "a.parquet")], "llama2", str(tmp_path / "out"), val_fraction=0, workers=1,
                   progress=False)
    assert meta["splits"]["train"]["documents"] == 2 and meta["sources"][0]["skipped_empty"] == 2


def test_token_dtype_widens_past_16_bits():
    assert token_dtype(32000) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")


def make_bad_source(folder: Path, case: str) -> Path:
    if case == "missing":
        return folder / "missing.parquet"
    if case == "no-text-column":
        return write_parquet(folder / "x.parquet", ["a"], column="body")
    if case == "empty-parquet":
        return write_parquet(folder / "x.parquet", ["", None])
    if case == "empty-folder":
        (folder / "empty").mkdir()
        return folder / "empty"
    name, content = {
        "empty-jsonl": ("x.jsonl", ""),
        "jsonl-no-field": ("x.jsonl", '{"body": "a"}\n'),
        "csv": ("x.csv", "text\na\n"),
    }[case]
    (folder / name).write_text(content)
    return folder / name


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("no-text-column", "has no column 'text'"),
        ("empty-parquet", "no document with text"),
        ("empty-jsonl", "no document with text"),
        ("jsonl-no-field", "no 'text' field"),
        ("csv", "unsupported file type"),
        ("empty-folder", "holds no .parquet"),
    ],
)
def test_prepare_bad_sources_fail_cleanly(tmp_path, case, message):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(HyperloopError, match=message):
        prepare([str(make_bad_source(src, case))], "llama2", str(tmp_path / "out"), workers=1, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_error_midway_leaves_nothing_behind(tmp_path, docs):
    """A bad line found after a good file was already tokenized: no output folder, no partial one."""
    folder = tmp_path / "src"
    folder.mkdir()
    write_parquet(folder / "a.parquet", docs[:20])
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(HyperloopError, match="line 2 is not valid JSON"):
        prepare([str(folder)], "llama2", str(tmp_path / "out"), workers=2, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, corpus, prepared):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(HyperloopError, match="--overwrite"):
        prepare([str(corpus)], "llama2", str(out), workers=1, progress=False)
    assert (out / "keep.txt").is_file()
    prepare([str(corpus)], "llama2", str(out), val_fraction=0.2, workers=1, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and shard_bytes(out) == shard_bytes(prepared)
    assert leftovers(tmp_path) == []


def test_prepare_bad_arguments(tmp_path, corpus):
    with pytest.raises(HyperloopError, match="val-fraction"):
        prepare([str(corpus)], "llama2", str(tmp_path / "o"), val_fraction=1.0)
    with pytest.raises(HyperloopError, match="holds no tokenizer"):
        prepare([str(corpus)], str(tmp_path), str(tmp_path / "o"))
    assert leftovers(tmp_path) == []


def test_hf_datasets_source_matches_parquet(tmp_path, docs):
    pytest.importorskip("datasets")
    folder = tmp_path / "hub"
    folder.mkdir()
    write_parquet(folder / "train.parquet", docs[:8])
    prepare(["hf:" + str(folder)], "llama2", str(tmp_path / "via-hf"), val_fraction=0, workers=1, progress=False)
    prepare([str(folder / "train.parquet")], "llama2", str(tmp_path / "direct"), val_fraction=0, workers=1,
            progress=False)
    assert shard_bytes(tmp_path / "via-hf") == shard_bytes(tmp_path / "direct")
    with pytest.raises(HyperloopError, match="no column 'body'"):
        prepare(["hf:" + str(folder)], "llama2", str(tmp_path / "o"), text_column="body", workers=1, progress=False)


def test_cli_prepare(tmp_path, corpus, capsys):
    code = cli_main(["prepare", "--source", str(corpus), "--tokenizer", "llama2", "--out", str(tmp_path / "o"),
                     "--workers", "1", "--val-fraction", "0.2"])
    assert code == 0 and json.loads(capsys.readouterr().out)["splits"]["train"]["documents"] > 0
    code = cli_main(["prepare", "--source", str(tmp_path / "nope"), "--tokenizer", "llama2", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------------- loader
def test_token_data_bad_input(tmp_path, prepared):
    with pytest.raises(HyperloopError, match="does not exist"):
        TokenData(tmp_path / "nothing")
    with pytest.raises(HyperloopError, match="no meta.json"):
        TokenData(tmp_path)
    data = TokenData(prepared)
    with pytest.raises(HyperloopError, match="no split 'test'"):
        data.split_tokens("test")
    data.check_vocab(32000)
    data.check_vocab(32064, sha256=LLAMA2_SHA256)  # a padded model vocabulary is fine
    with pytest.raises(HyperloopError, match="32000-token sentencepiece vocabulary but the model has 50"):
        data.check_vocab(50)
    with pytest.raises(HyperloopError, match="another tokenizer"):
        data.check_vocab(50304, sha256="0" * 64)


def test_truncated_shard_is_reported(tmp_path, corpus):
    prepare([str(corpus)], "llama2", str(tmp_path / "d"), val_fraction=0, workers=1, progress=False)
    shard = tmp_path / "d" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(HyperloopError, match="prepare the data again"):
        TokenData(tmp_path / "d").split_tokens("train")


def test_window_order_is_a_fixed_permutation():
    order = window_order(1000, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, window_order(1000, seed=3, epoch=1))
    assert not np.array_equal(order, window_order(1000, seed=3, epoch=2))
    assert not np.array_equal(order, window_order(1000, seed=4, epoch=1))
    # Pinned: a numpy or code change that moved these would silently change the batches of resumed runs.
    assert window_order(10, seed=0, epoch=0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]


def test_train_batches_are_shifted_windows(prepared):
    data = TokenData(prepared)
    tokens = np.asarray(data.split_tokens("train")).astype(np.int64)
    loader = TrainLoader(data, seq_len=32, micro_batch=4, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = window_order(loader.num_windows, 1, 0)[:4]
    for row, w in zip(x, windows):
        assert torch.equal(row, torch.from_numpy(tokens[w * 32:w * 32 + 32]))


def all_windows(loader: TrainLoader, steps: int) -> list[tuple[int, ...]]:
    """The input rows of ``steps`` batches, as hashable tuples (a window is identified by its tokens)."""
    out = []
    for _ in range(steps):
        x, _ = loader.next_batch()
        out.extend(tuple(row.tolist()) for row in x)
    return out


def test_epoch_covers_distinct_windows_then_reshuffles(prepared):
    data = TokenData(prepared)
    loader = TrainLoader(data, seq_len=64, micro_batch=8, seed=0)
    per_epoch = loader.blocks_per_epoch
    first = all_windows(loader, per_epoch)
    assert loader.epoch == 1 and loader.tokens_seen == per_epoch * 8 * 64
    assert len(set(first)) == len(first) == per_epoch * 8
    second = all_windows(loader, per_epoch)
    assert len(set(second)) == len(second) and second != first


def test_ranks_split_the_global_sequence(prepared):
    """Micro-batch k of rank r is global block k*W + r: 2 ranks see exactly one rank's stream, no overlap."""
    data = TokenData(prepared)
    single = TrainLoader(data, seq_len=32, micro_batch=4, seed=7)
    ranks = [TrainLoader(data, seq_len=32, micro_batch=4, seed=7, rank=r, world_size=2) for r in range(2)]
    steps = single.blocks_per_epoch // 2 + 3  # runs into the second epoch
    seen = [set(), set()]
    for k in range(steps):
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch()
            sx, sy = single.next_batch()
            assert torch.equal(x, sx) and torch.equal(y, sy)
            if k < single.blocks_per_epoch // 2:  # blocks 2k and 2k+1 are both in epoch 0
                seen[r].update(tuple(row.tolist()) for row in x)
    assert seen[0] and not seen[0] & seen[1]
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


@pytest.mark.parametrize("world_before, world_after", [(1, 1), (2, 1), (1, 4), (4, 2)])
def test_resume_gives_exactly_the_next_batches(prepared, world_before, world_after):
    data = TokenData(prepared)
    reference = TrainLoader(data, seq_len=16, micro_batch=4, seed=5)
    stream = [reference.next_batch()[0] for _ in range(24)]

    before = [TrainLoader(data, 16, 4, seed=5, rank=r, world_size=world_before) for r in range(world_before)]
    for _ in range(8 // world_before):
        for loader in before:
            loader.next_batch()
    state = json.loads(json.dumps(before[0].state_dict()))  # checkpoints store it as JSON-able data

    after = [TrainLoader(data, 16, 4, seed=5, rank=r, world_size=world_after) for r in range(world_after)]
    for loader in after:
        loader.load_state_dict(state)
    resumed = [loader.next_batch()[0] for _ in range(16 // world_after) for loader in after]
    assert all(torch.equal(a, b) for a, b in zip(resumed, stream[8:24]))


def test_load_state_dict_rejects_other_settings(prepared):
    data = TokenData(prepared)
    state = TrainLoader(data, 16, 4, seed=5).state_dict()
    with pytest.raises(HyperloopError, match="micro_batch=4"):
        TrainLoader(data, 16, 8, seed=5).load_state_dict(state)
    with pytest.raises(HyperloopError, match="seed=5"):
        TrainLoader(data, 16, 4, seed=6).load_state_dict(state)


def test_loader_too_little_data(prepared):
    with pytest.raises(HyperloopError, match="fewer than one micro-batch"):
        TrainLoader(TokenData(prepared), seq_len=4096, micro_batch=64)
    with pytest.raises(HyperloopError, match="not one window"):
        EvalWindows(TokenData(prepared), seq_len=10**7, batch_size=2)


def test_eval_windows_cover_the_split_once(prepared):
    data = TokenData(prepared)
    tokens = np.asarray(data.split_tokens("validation")).astype(np.int64)
    windows = EvalWindows(data, seq_len=50, batch_size=3)
    batches = list(windows)
    assert len(batches) == len(windows) and all(x.shape[1] == 50 for x, _ in batches)
    targets = torch.cat([y.reshape(-1) for _, y in batches])
    assert windows.num_predicted_tokens == len(targets) == (len(tokens) - 1) // 50 * 50
    assert torch.equal(targets, torch.from_numpy(tokens[1:1 + len(targets)]))  # each token once, in order
    capped = EvalWindows(data, seq_len=50, batch_size=3, max_tokens=420)
    assert capped.num_predicted_tokens == 400 and sum(x.shape[0] for x, _ in capped) == 8


# ---------------------------------------------------------------------------------------- demo corpus
def test_bundled_demo_corpus():
    folder = demo_corpus_path()
    files = sorted(folder.glob("*.parquet"))
    assert files and all(f.stat().st_size < 1.9e6 for f in files)
    chars = sum(sum(map(len, pq.read_table(f, columns=["text"]).column("text").to_pylist())) for f in files)
    assert chars >= 6_000_000  # about 1.5M+ Llama-2 tokens at 3.95 characters a token
    assert "CC BY-SA" in (folder / "ATTRIBUTION.md").read_text()
    assert "Llama 2 is licensed under the LLAMA 2 Community License" in (folder / "LLAMA2_NOTICE").read_text()
    assert load_tokenizer(demo_tokenizer_path()).sha256 == LLAMA2_SHA256


@pytest.mark.skipif(not (SHARED / "enwiki").is_dir(), reason="needs ../shared/data/enwiki")
def test_demo_corpus_is_the_documented_cut(tmp_path):
    rebuilt = build_demo_corpus(SHARED / "enwiki" / "train-00000.parquet", tmp_path)
    bundled = sorted(demo_corpus_path().glob("*.parquet"))
    assert [p.name for p in rebuilt] == [p.name for p in bundled]
    for a, b in zip(rebuilt, bundled):
        assert pq.read_table(a).equals(pq.read_table(b))
