"""lm-evaluation-harness model adapter, registered as `hyperloop`.

    lm_eval --model hyperloop --model_args checkpoint=CKPT[,num_loops=K][,batch_tokens=N] --tasks ...

lm-eval (0.4) finds models only in its own registry, which a module fills by being imported (it
reads no plugin entry points). So either import this module before calling
`lm_eval.simple_evaluate(model="hyperloop", ...)`, or run lm-eval's own command line through

    python -m hyperloop.eval.harness [lm_eval arguments]

which registers the model and hands every argument to lm-eval unchanged.

The adapter is a `TemplateLM`: lm-eval builds the prompts and splits context / continuation
(`_encode_pair`); `tok_encode` puts BOS first, as our models saw at every document start and as
`hyperloop eval` does, so both score identical token sequences. Scoring goes through the same
batched engine as `hyperloop eval` (eval.loglik), and generation through hyperloop.infer.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval only does so while it is empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hyperloop.checkpoint import load_model
from hyperloop.eval.loglik import Request, score
from hyperloop.eval.runner import resolve_device

GENERATION_BATCH = 16  # prompts generated together (left-padded) in generate_until


@register_model("hyperloop")
class HyperloopEvalLM(TemplateLM):
    """A hyperloop checkpoint (any architecture, float or int4) as an lm-eval model. model_args:
    checkpoint (required), num_loops (test-time depth), batch_tokens, device, max_gen_toks."""

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        num_loops: int | None = None,
        batch_tokens: int | None = None,
        max_gen_toks: int = 256,
        **_lm_eval_extras,  # batch_size, max_batch_size, ...: the engine batches by tokens instead
    ):
        super().__init__()
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's command line defaults to cuda:0; like its HF model, fall back to the CPU
        loaded = load_model(checkpoint, device=resolve_device(device))
        self.model, self.tok = loaded.model, loaded.tokenizer()
        self.num_loops = int(num_loops) if num_loops is not None else None
        self.batch_tokens = int(batch_tokens) if batch_tokens is not None else None
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # the whole context of an empty-context request

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        return ids if add_special_tokens is False else [self.tok.bos_id] + ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------------- requests
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list:
        requests = [Request(context, continuation) for context, continuation in pairs]
        return score(self.model, requests, batch_tokens=self.batch_tokens, num_loops=self.num_loops,
                     progress=not disable_tqdm, desc="hyperloop loglikelihood")  # fmt: skip

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        results = []
        for (key, _, _), s in zip(requests, scores):
            results.append((s.logprob, s.greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: BOS, then disjoint windows of max_length predicted tokens,
        each conditioned on the tokens before it inside its window (lm-eval's rolling windows)."""
        pairs, owners = [], []
        for doc, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)  # fmt: skip
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owners.append(doc)
        totals = [0.0] * len(requests)
        for doc, s in zip(owners, self._score(pairs, disable_tqdm)):
            totals[doc] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generation through hyperloop.infer (KV cache), batched by identical generation settings;
        the text is cut at the first `until` string, as lm-eval's HF model does."""
        from hyperloop.infer.generate import GenerationConfig, generate
        from hyperloop.infer.sampling import Sampling
        from hyperloop.infer.text import completion_text

        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="hyperloop generate_until", disable=disable_tqdm)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.get("max_gen_toks", self._max_gen_toks)), self.max_length)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            config = GenerationConfig(max_new_tokens=max_new, sampling=Sampling(temperature=temperature),
                                      stop_tokens=(self.eot_token_id,), num_loops=self.num_loops)  # fmt: skip
            keep = self.max_length - max_new + 1  # prompt tokens that fit with max_new new ones
            for start in range(0, len(members), GENERATION_BATCH):
                batch = members[start : start + GENERATION_BATCH]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in batch]
                out = generate(self.model, prompts, config)
                for i, prompt, tokens in zip(batch, prompts, out.tokens):
                    text = completion_text(self.tok, prompt, tokens)
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `hyperloop` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
