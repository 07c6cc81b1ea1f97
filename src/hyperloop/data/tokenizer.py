"""Tokenizers behind one small interface, so `prepare`, evaluation and generation never care which
library defines the vocabulary.

Three kinds are recognised from the files on disk:

- ``sentencepiece``: a SentencePiece ``.model`` (the Llama-2 tokenizer of the paper). Encoding is the
  plain ``SentencePieceProcessor.encode(text)``, which is what HF's Llama tokenizer and lm-eval do:
  SentencePiece prepends its dummy-prefix space, so ``encode("Paris")`` is the ids of "▁Paris" and a
  continuation encoded on its own starts with a word boundary. ``decode`` removes that space again.
- ``gpt2``: a folder with GPT-2's ``encoder.json`` + ``vocab.bpe``, run through the `tokenizers`
  library as byte-level BPE. ``<|endoftext|>`` (50256) serves as both BOS and EOS, as in GPT-2.
- ``hf``: a folder with an HF ``tokenizer.json`` (and optionally ``tokenizer_config.json`` naming the
  BOS/EOS tokens).

``encode`` never adds BOS/EOS: `prepare` puts one BOS in front of every document itself, so the
placement of special tokens is decided in one place. Special-token strings inside text (for example a
literal "<|endoftext|>") are encoded as ordinary text, never as control tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from hyperloop.errors import HyperloopError

# The files that define each kind, in the order they are hashed and copied by `save`.
SENTENCEPIECE_FILE = "tokenizer.model"
GPT2_FILES = ("encoder.json", "vocab.bpe")
HF_FILE = "tokenizer.json"
HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")

# Names HF tokenizers commonly give their document-boundary tokens, tried when no config names them.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>")


def _sha256(files: Sequence[Path]) -> str:
    """sha256 of the concatenated bytes of ``files``; for one file it is that file's usual sha256."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


class Tokenizer:
    """A vocabulary with ``encode``/``decode`` and the ids `prepare` and the models need.

    Subclasses set ``kind``, ``vocab_size``, ``bos_id``, ``eos_id`` and ``files`` (the defining files,
    which ``sha256`` fingerprints and ``save`` copies).
    """

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    files: tuple[Path, ...]

    @cached_property
    def sha256(self) -> str:
        return _sha256(self.files)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in one call into the native library."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def use_one_thread(self) -> None:
        """Make ``encode_batch`` single-threaded: `prepare` runs one tokenizer per core in its own process."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Copy the defining files into ``directory`` so that ``load_tokenizer(directory)`` is this tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for file in self.files + self._extra_files():
            shutil.copyfile(file, directory / self._saved_name(file))

    def _saved_name(self, file: Path) -> str:
        return file.name

    def _extra_files(self) -> tuple[Path, ...]:
        """Files that travel with the tokenizer but do not define its ids (not hashed)."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file."""

    kind = "sentencepiece"

    def __init__(self, model_file: Path):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:
            raise HyperloopError(
                f"{model_file} is not a valid SentencePiece model ({str(err).splitlines()[0]}); "
                "pass a tokenizer.model file"
            ) from None
        self.files = (model_file,)
        self._num_threads = -1  # SentencePiece's default: all cores
        self.vocab_size = self._sp.vocab_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0:
            raise HyperloopError(f"SentencePiece model {model_file} has no BOS token; documents need one to separate them")
        if self.eos_id < 0:
            self.eos_id = self.bos_id

    def _saved_name(self, file: Path) -> str:
        # A model file may be called anything.model; the saved folder always holds tokenizer.model.
        return SENTENCEPIECE_FILE

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(list(ids))

    def use_one_thread(self) -> None:
        self._num_threads = 1


class _TokenizersLibraryTokenizer(Tokenizer):
    """Shared code of the kinds that run on the HF `tokenizers` library."""

    def __init__(self, tok) -> None:  # tok: tokenizers.Tokenizer
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def use_one_thread(self) -> None:
        # The library reads this switch on every batch call; it has no per-call thread count.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


class GPT2Tokenizer(_TokenizersLibraryTokenizer):
    """GPT-2's byte-level BPE from ``encoder.json`` + ``vocab.bpe`` (the files tiktoken's gpt2 pins)."""

    kind = "gpt2"

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizerCore
        from tokenizers import decoders, models, pre_tokenizers

        encoder, merges = (folder / name for name in GPT2_FILES)
        try:
            tok = HFTokenizerCore(models.BPE.from_file(str(encoder), str(merges)))
        except Exception as err:  # noqa: BLE001 -- the tokenizers library raises plain Exception subclasses
            raise HyperloopError(f"{folder} does not hold a valid GPT-2 encoder.json + vocab.bpe ({err})") from None
        # GPT-2 has no prefix space and splits words with its own regex, which ByteLevel(use_regex) is.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        super().__init__(tok)
        self.files = (encoder, merges)
        eot = tok.token_to_id("<|endoftext|>")
        if eot is None:
            raise HyperloopError(f"{encoder} has no <|endoftext|> token; is it GPT-2's encoder.json?")
        self.bos_id = self.eos_id = eot


class HFTokenizer(_TokenizersLibraryTokenizer):
    """An HF ``tokenizer.json``; BOS/EOS come from ``tokenizer_config.json`` when it names them."""

    kind = "hf"

    def __init__(self, file: Path):
        from tokenizers import Tokenizer as HFTokenizerCore

        try:
            tok = HFTokenizerCore.from_file(str(file))
        except Exception as err:  # noqa: BLE001 -- as above
            raise HyperloopError(f"{file} is not a valid HF tokenizer.json ({str(err).splitlines()[0]})") from None
        super().__init__(tok)
        self.files = (file,)
        self._configs = tuple(file.parent / n for n in HF_CONFIG_FILES if (file.parent / n).is_file())
        bos = self._special_id("bos_token", _BOS_NAMES)
        eos = self._special_id("eos_token", _EOS_NAMES)
        if bos is None and eos is None:
            raise HyperloopError(
                f"{file} names no BOS or EOS token; add \"bos_token\" to a tokenizer_config.json beside it"
            )
        # Like GPT-2, a tokenizer with only an end-of-text token uses it as the document separator.
        self.bos_id = bos if bos is not None else eos
        self.eos_id = eos if eos is not None else bos

    def _special_id(self, key: str, fallback_names: Sequence[str]) -> int | None:
        for config in self._configs:
            value = json.loads(config.read_text(encoding="utf-8")).get(key)
            if isinstance(value, dict):  # {"content": "<s>", ...} in newer transformers configs
                value = value.get("content")
            if isinstance(value, str) and self._tok.token_to_id(value) is not None:
                return self._tok.token_to_id(value)
        for name in fallback_names:
            if self._tok.token_to_id(name) is not None:
                return self._tok.token_to_id(name)
        return None

    def _extra_files(self) -> tuple[Path, ...]:
        return self._configs


def bundled_llama2() -> Path:
    """The Llama-2 tokenizer.model shipped inside the package (see corpus/LLAMA2_NOTICE)."""
    return Path(__file__).resolve().parent.parent / "corpus" / SENTENCEPIECE_FILE


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open the tokenizer at ``path``: a ``.model`` file, a ``tokenizer.json`` file, or a folder holding
    ``tokenizer.model`` (preferred: it is the original SentencePiece definition), ``tokenizer.json``, or
    GPT-2's ``encoder.json`` + ``vocab.bpe``. The name ``llama2``, when no such path exists, means the
    Llama-2 tokenizer bundled with the package."""
    p = Path(path).expanduser()
    if not p.exists() and str(path) == "llama2":
        p = bundled_llama2()
    if not p.exists():
        raise HyperloopError(f"tokenizer {path} does not exist; pass a .model file or a tokenizer folder (or 'llama2')")
    if p.is_file():
        if p.suffix == ".model":
            return SentencePieceTokenizer(p)
        if p.name == HF_FILE:
            return HFTokenizer(p)
        raise HyperloopError(
            f"{p} is not a tokenizer file; pass a SentencePiece .model, a tokenizer.json, "
            "or a folder with encoder.json + vocab.bpe"
        )
    if (p / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(p / SENTENCEPIECE_FILE)
    if (p / HF_FILE).is_file():
        return HFTokenizer(p / HF_FILE)
    if all((p / name).is_file() for name in GPT2_FILES):
        return GPT2Tokenizer(p)
    raise HyperloopError(
        f"{p} holds no tokenizer: expected tokenizer.model, tokenizer.json, or encoder.json + vocab.bpe"
    )
