"""HF model of an exported hyperloop model (copied next to the weights by `hyperloop export-hf`).

A thin wrapper, not a second copy of the model: `HyperloopForCausalLM.model` is the installed
package's `hyperloop.model.HyperloopLM`, so loading an export needs `pip install hyperloop` (with
the same or a compatible version). The wrapper adds what HF's `from_pretrained`, `generate()` and
lm-eval's `--model hf` expect: an `input_ids` / `attention_mask` / `labels` forward returning
`CausalLMOutputWithPast`, and GenerationMixin (which PreTrainedModel no longer brings since
transformers 4.50).

Padding: a batch with zeros in `attention_mask` (left-padded prompts in `generate()`, say) runs
under an explicit causal + key-padding mask with positions that count real tokens only, so each
row gets the logits it would get alone. Generation recomputes the whole prefix at every step (no
KV cache is exposed to HF): correct for every architecture, slow for long outputs; use
`hyperloop generate` for fast decoding.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hyperloop.config import ModelConfig
from hyperloop.eval.masks import MaskedAttention, padding_mask
from hyperloop.model import HyperloopLM
from hyperloop.model.layers import RotaryEmbedding

from .configuration_hyperloop import HyperloopConfig


class HyperloopForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HyperloopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]  # accelerate never splits a decoder layer
    _supports_cache_class = False

    def __init__(self, config: HyperloopConfig):
        super().__init__(config)
        self.model = HyperloopLM(ModelConfig.from_dict(config.hyperloop))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Parameters need nothing: HyperloopLM initialises its own and an export loads them all. The
        RoPE tables are buffers derived from the config, never saved; transformers 5 builds the model
        on the meta device and hands them back uninitialised, so they are recomputed here."""
        if isinstance(module, RotaryEmbedding):
            cfg = self.model.cfg
            fresh = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_loops: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) and, with `labels`, the mean next-token cross-entropy (label -100 ignored,
        labels not shifted by the caller, as in every HF causal LM)."""
        cache = positions = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask, positions = padding_mask(attention_mask)
            cache = MaskedAttention(mask)
        loops = num_loops if num_loops is not None else self.config.num_loops
        logits = self.model(input_ids, positions=positions, cache=cache, num_loops=loops)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs) -> dict:
        """Every step feeds the whole sequence (no KV cache), so nothing but ids and mask is passed."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
