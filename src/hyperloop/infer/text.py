"""`hyperloop generate`: text in, text out, streamed as it is generated."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TextIO

import torch

from hyperloop.checkpoint import load_model
from hyperloop.data.tokenizer import Tokenizer
from hyperloop.errors import HyperloopError
from hyperloop.infer.generate import GenerationConfig, generate
from hyperloop.infer.sampling import Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def completion_text(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> str:
    """The text `generated` adds after `prompt`. Decoding the two together, not the completion on its
    own, keeps the word boundary between them (SentencePiece drops a leading space when decoding)."""
    return tokenizer.decode(prompt + generated)[len(tokenizer.decode(prompt)) :]


class TextStream:
    """`on_step` callback printing row 0's completion as it grows. A trailing U+FFFD is a multi-byte
    character whose bytes have not all arrived yet: it is held back until the next token."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], out: TextIO | None = None):
        # sys.stdout is looked up now, not at import: it may have been replaced since (pytest, notebooks)
        self.tokenizer, self.prompt, self.out = tokenizer, prompt, out or sys.stdout
        self.generated: list[int] = []
        self.printed = 0

    def __call__(self, new: list[int | None]) -> None:
        if new[0] is None:
            return
        self.generated.append(new[0])
        text = completion_text(self.tokenizer, self.prompt, self.generated).rstrip("\ufffd")
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


def generate_from_cli(args: argparse.Namespace) -> None:
    for text in args.prompt:
        if not text.strip():
            raise HyperloopError("--prompt is empty; give some text to continue")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_k, args.top_p),
        seed=args.seed,
        num_loops=args.loops,
        exit_threshold=args.exit_threshold,
        use_cache=not args.no_cache,
        compile=args.compile,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load_model(args.checkpoint, device=device, dtype=dtype)
    tokenizer = loaded.tokenizer()
    # Documents in the training data start with BOS (DESIGN section 4), so a prompt does too, and the
    # model ends a document by predicting the next one's BOS: both BOS and EOS stop by default.
    prompts = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in args.prompt]
    stops = tuple(args.stop_token) if args.stop_token is not None else (tokenizer.eos_id, tokenizer.bos_id)
    config = dataclasses.replace(config, stop_tokens=stops)

    stream = TextStream(tokenizer, prompts[0]) if len(prompts) == 1 and not args.json else None
    if stream is not None:
        print(args.prompt[0], end="", flush=True)
    start = time.perf_counter()
    result = generate(loaded.model, prompts, config, on_step=stream)
    seconds = time.perf_counter() - start

    records = [
        {"prompt": text, "text": completion_text(tokenizer, prompt, tokens), "tokens": tokens, "loops_used": loops,
         "mean_loops": sum(loops) / max(len(loops), 1), "finish_reason": reason}
        for text, prompt, tokens, loops, reason in zip(args.prompt, prompts, result.tokens, result.loops_used,
                                                       result.finish_reasons)
    ]  # fmt: skip
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else records, indent=2))
        return
    if stream is not None:
        print()
    else:
        print("\n\n".join(r["prompt"] + r["text"] for r in records))
    count = sum(len(t) for t in result.tokens)
    loops = [n for row in result.loops_used for n in row]
    print(f"[{count} tokens in {seconds:.2f} s, {count / seconds:.1f} tok/s; "
          f"mean loops per token {sum(loops) / max(len(loops), 1):.2f}]", file=sys.stderr)  # fmt: skip
