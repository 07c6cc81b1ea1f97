"""Our tokenizer as an HF fast tokenizer (`tokenizer.json`), encoding exactly as we do.

transformers' own SentencePiece conversion changed behaviour across versions (v5 drops the legacy
Llama normaliser, so leading and double spaces tokenize differently), so the SentencePiece case is
built here with the `tokenizers` library, the way the Llama-2 `tokenizer.json` on the hub is laid
out: a byte-fallback BPE whose merges follow the piece scores, a normaliser that prepends "▁" and
turns spaces into "▁", no pre-tokenizer. Every kind gets a post-processor that puts BOS in front,
because our models saw every document start with BOS and `hyperloop eval` conditions on it; HF
users (and lm-eval's `--model hf`) then get the same inputs by default.

`hf_tokenizer` checks the result against our tokenizer on a set of awkward strings and refuses to
export one that disagrees.
"""

from __future__ import annotations

from hyperloop.data.tokenizer import Tokenizer
from hyperloop.errors import HyperloopError

# Strings whose tokenization differs between SentencePiece and naive conversions.
PROBES = (
    "Hello world", " leading space", "double  space", "trailing space ", "  two leading", "tab\there",
    "line\nbreak\n\nparagraph", "Question: Who?\nAnswer:", " 12,345.67 and 3.14159", "naïve café — “quotes”",
    "漢字とカタカナ", "emoji 🙂👍", "<s> literal </s>", "a_b-c/d\\e", "x", "",
)


def _sentencepiece_backend(tokenizer: Tokenizer):
    """A tokenizers.Tokenizer equivalent to a SentencePiece BPE model (the Llama-2 family). Built from
    the processor's public API (pieces, scores, types); the PROBES check in `hf_tokenizer` rejects
    a model this layout does not reproduce (a unigram model, say)."""
    import sentencepiece
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.files[0]))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    special = {i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)}
    # SentencePiece BPE merges the adjacent pair whose union is the best-scoring piece; as a ranked
    # merge list: every split of every ordinary piece into two vocabulary pieces, best score first.
    merges = []
    for i, piece in enumerate(pieces):
        if i in special:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-sp.get_score(i), vocab[left], vocab[right], left, right))
    merges.sort()
    unk = pieces[sp.unk_id()]
    byte_fallback = any(sp.is_byte(i) for i in range(len(pieces)))
    backend = Backend(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, byte_fallback=byte_fallback,
                                 fuse_unk=True))  # fmt: skip
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("▁")  # does a text start at a word boundary
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if dummy_prefix else [])
                                              + [normalizers.Replace(" ", "▁")])  # fmt: skip
    strip = [decoders.Strip(" ", 1, 0)] if dummy_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return backend, unk


def _gpt2_backend(tokenizer: Tokenizer):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    encoder, merges = tokenizer.files
    backend = Backend(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend, None


def _hf_backend(tokenizer: Tokenizer):
    from tokenizers import Tokenizer as Backend

    return Backend.from_file(str(tokenizer.files[0])), None


def hf_tokenizer(tokenizer: Tokenizer, max_length: int):
    """A transformers PreTrainedTokenizerFast that encodes text as `[BOS] + tokenizer.encode(text)`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    build = {"sentencepiece": _sentencepiece_backend, "gpt2": _gpt2_backend, "hf": _hf_backend}.get(tokenizer.kind)
    if build is None:
        raise HyperloopError(f"no HF export for tokenizers of kind {tokenizer.kind!r}")
    backend, unk = build(tokenizer)
    bos, eos = backend.id_to_token(tokenizer.bos_id), backend.id_to_token(tokenizer.eos_id)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
        pad_token=unk if unk is not None else eos, model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: forward() takes none
        # A special token's text inside a string: HF matches it as the control token unless told to
        # split it; do whatever our tokenizer does (SentencePiece and GPT-2 files treat it as text).
        split_special_tokens=tokenizer.encode(bos) != [tokenizer.bos_id],
    )  # fmt: skip
    for text in PROBES:
        ours, theirs = [tokenizer.bos_id] + tokenizer.encode(text), hf.encode(text)
        if ours != theirs:
            raise HyperloopError(
                f"the HF tokenizer built from this {tokenizer.kind} tokenizer encodes {text!r} as {theirs[:8]}... "
                f"instead of {ours[:8]}...; it cannot be exported faithfully"
            )
    return hf
