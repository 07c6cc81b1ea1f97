"""HF config of an exported hyperloop model (copied next to the weights by `hyperloop export-hf`).

The hyperloop ModelConfig travels whole under `hyperloop`, so the exported model is built by the
installed `hyperloop` package exactly as a native checkpoint is. The top-level fields are the names
HF and lm-evaluation-harness read (vocab_size, hidden_size, max_position_embeddings, ...).
`num_loops` is the loop count the forward uses: it defaults to the trained count and may be
overridden at load time (`from_pretrained(dir, num_loops=K)`, or `--model_args ...,num_loops=K` in
lm-eval) without changing the weights - the test-time depth knob of looped models.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class HyperloopConfig(PretrainedConfig):
    model_type = "hyperloop"

    def __init__(self, hyperloop: dict | None = None, num_loops: int | None = None, **kwargs):
        from hyperloop.config import ModelConfig  # the installed package defines the architecture

        cfg = ModelConfig.from_dict(hyperloop) if hyperloop else ModelConfig()
        self.hyperloop = cfg.to_dict()
        self.num_loops = num_loops if num_loops is not None else cfg.num_loops
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.dim
        self.num_attention_heads = cfg.n_heads
        self.intermediate_size = cfg.ffn_dim
        self.num_hidden_layers = cfg.n_layers  # distinct layers; the unrolled depth is begin + K x middle + end
        self.max_position_embeddings = cfg.max_seq_len
        self.rms_norm_eps = cfg.norm_eps
        self.rope_theta = cfg.rope_base
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
