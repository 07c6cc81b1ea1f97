"""Model configuration, the preset registry, and parameter accounting in the paper's convention.

One dataclass describes all four architectures of the paper (spec sections 2-3):
- Transformer: `middle_layers=L, num_loops=1`, no hyper-connections.
- mHC: the same plan with `hc_placement="sublayer"` (a dense-Sinkhorn HC around every sub-layer).
- Looped: `begin_layers -> middle_layers x num_loops -> end_layers`, no hyper-connections.
- Hyperloop: Looped + `hc_placement="span"` (by default one diagonal HC around each loop).
The ablations of the paper are the remaining fields (n_streams, hc_span, h_res, lora_rank, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperloop.errors import HyperloopError

HC_PLACEMENTS = ("none", "sublayer", "span")
H_RES_KINDS = ("diagonal", "sinkhorn", "identity")
HC_PRE_INITS = ("mean", "own")


def known_fields(cls, data: dict[str, Any], what: str) -> dict[str, Any]:
    """`data` if every key is a field of the dataclass `cls`, else a one-line error naming the strays."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HyperloopError(f"unknown {what} key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


def read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HyperloopError(f"config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise HyperloopError(f"config file {path} is not valid JSON: {err}") from None


@dataclass
class ModelConfig:
    """Everything needed to build a model; `to_dict()` / `from_dict()` round-trip it through JSON."""

    name: str = "custom"
    vocab_size: int = 32000  # Llama-2 tokenizer
    dim: int = 1024
    n_heads: int = 16
    ffn_dim: int | None = None  # SwiGLU hidden size; None -> 2.75 x dim (spec section 1)
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # Plan: begin block -> middle block applied num_loops times with shared weights -> end block.
    begin_layers: int = 0
    middle_layers: int = 16
    num_loops: int = 1
    end_layers: int = 0
    # Hyper-connections (spec 2b, 2d).
    hc_placement: str = "none"  # none | sublayer (mHC) | span (Hyperloop)
    hc_span: int | None = None  # unrolled middle layers per HC when placement == span; None = one per loop
    n_streams: int = 4
    h_res: str = "diagonal"  # diagonal (Hyperloop) | sinkhorn (mHC) | identity
    sinkhorn_iters: int = 20
    loop_embedding: bool = True  # e_l of spec 2d, one per span-HC
    # Hyperloop sites at init: diagonal H_res = hc_res_init, H_post = 1 - hc_res_init, so one loop maps
    # a stream s to s + (1 - hc_res_init) delta (spec 2d asks for about s + delta; 0.5 gives s + delta/2).
    hc_res_init: float = 0.5
    # H_pre at init: "mean" reads every stream with weight 1/n; "own" makes site s read mostly stream
    # s mod n (weights OWN_PRE_WEIGHT and the rest shared, still summing to 1). With "mean", the
    # n streams are interchangeable: while they are copies they get equal gradients, and only the
    # small input-dependent terms (a = 0.01) can separate them. "own" breaks that symmetry at init.
    hc_pre_init: str = "mean"
    # Store the streams in bf16 between sites (the combines still sum in fp32, branch inputs and the
    # merged stream keep the residual's dtype). Halves the memory traffic of every site; off by default
    # because it rounds the residual streams (results/train-throughput.md has the speed and loss A/B).
    hc_bf16_streams: bool = False
    lora_rank: int = 0  # per-loop LoRA on the shared middle layers (LoRA-relaxed looped baseline)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.ffn_dim is None:
            self.ffn_dim = int(round(2.75 * self.dim))
        self.validate()

    # ------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise HyperloopError(f"invalid model config '{self.name}': {msg}")

        for key in ("vocab_size", "dim", "n_heads", "ffn_dim", "max_seq_len", "middle_layers", "num_loops"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, f"{key} must be a positive integer")
        for key in ("begin_layers", "end_layers", "lora_rank"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, f"{key} must be an integer >= 0")
        need(self.dim % self.n_heads == 0, f"n_heads={self.n_heads} does not divide dim={self.dim}")
        need((self.dim // self.n_heads) % 2 == 0, "the head dimension must be even for RoPE")
        need(self.hc_placement in HC_PLACEMENTS, f"hc_placement must be one of {HC_PLACEMENTS}")
        need(self.h_res in H_RES_KINDS, f"h_res must be one of {H_RES_KINDS}")
        need(isinstance(self.n_streams, int) and self.n_streams >= 1, "n_streams must be >= 1")
        need(self.sinkhorn_iters >= 1, "sinkhorn_iters must be >= 1")
        need(0.0 < self.hc_res_init < 1.0, "hc_res_init must be in (0, 1)")
        need(self.hc_pre_init in HC_PRE_INITS, f"hc_pre_init must be one of {HC_PRE_INITS}")
        need(isinstance(self.hc_bf16_streams, bool), "hc_bf16_streams must be true or false")
        if self.hc_span is not None:
            need(isinstance(self.hc_span, int) and self.hc_span >= 1, "hc_span must be a positive integer or null")
            need(self.hc_placement == "span", "hc_span only applies to hc_placement='span'")
        need(self.lora_rank == 0 or self.num_loops > 1, "lora_rank needs a looped model (num_loops > 1)")

    # ------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_layers(self) -> int:
        """Distinct (weight-holding) decoder layers."""
        return self.begin_layers + self.middle_layers + self.end_layers

    @property
    def depth(self) -> int:
        """Unrolled depth: begin + K x middle + end (spec 2c)."""
        return self.begin_layers + self.num_loops * self.middle_layers + self.end_layers

    @property
    def span(self) -> int:
        """Unrolled middle layers covered by one span hyper-connection (the default: one loop)."""
        return self.hc_span or self.middle_layers

    def num_hc(self, num_loops: int | None = None) -> int:
        """Number of hyper-connection sites (each with its own parameters)."""
        loops = self.num_loops if num_loops is None else num_loops
        if self.hc_placement == "sublayer":
            return 2 * (self.begin_layers + loops * self.middle_layers + self.end_layers)
        if self.hc_placement == "span":
            return math.ceil(loops * self.middle_layers / self.span)
        return 0

    def structure(self) -> str:
        """Human-readable plan, e.g. '2L -> 4L x3 -> 2L' or '16L'."""
        if self.num_loops == 1 and not self.begin_layers and not self.end_layers:
            core = f"{self.middle_layers}L"
        else:
            core = f"{self.begin_layers}L -> {self.middle_layers}L x{self.num_loops} -> {self.end_layers}L"
        tag = {"none": "", "sublayer": " +mHC", "span": " +HC"}[self.hc_placement]
        return core + tag

    # ------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**known_fields(cls, data, "model config"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        data = read_json(path)
        return cls.from_dict(data.get("model", data))

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})


# ------------------------------------------------------------------------------------- presets
# Table 1 of the paper: (dim, Transformer depth, (begin, middle, loops, end) of the looped models).
_SCALES = {
    "s": (1024, 16, (2, 4, 3, 2)),
    "m": (2048, 18, (3, 4, 3, 3)),
    "l": (2048, 38, (4, 10, 3, 4)),
}


def _four(scale: str, dim: int, depth: int, loop: tuple[int, int, int, int], **common: Any) -> dict[str, ModelConfig]:
    begin, middle, loops, end = loop
    plain = dict(dim=dim, middle_layers=depth, num_loops=1, **common)
    looped = dict(dim=dim, begin_layers=begin, middle_layers=middle, num_loops=loops, end_layers=end, **common)
    return {
        f"transformer-{scale}": ModelConfig(name=f"transformer-{scale}", **plain),
        f"mhc-{scale}": ModelConfig(name=f"mhc-{scale}", hc_placement="sublayer", h_res="sinkhorn", **plain),
        f"looped-{scale}": ModelConfig(name=f"looped-{scale}", **looped),
        f"hyperloop-{scale}": ModelConfig(name=f"hyperloop-{scale}", hc_placement="span", h_res="diagonal", **looped),
    }


PRESETS: dict[str, ModelConfig] = {}
for _scale, (_dim, _depth, _loop) in _SCALES.items():
    PRESETS.update(_four(_scale, _dim, _depth, _loop))
# xs: the S depth and loop structure at d=256 with 4 heads of 64 (the GPU reproduction, issue 10).
PRESETS.update(_four("xs", 256, 16, (2, 4, 3, 2), n_heads=4))
# tiny: a few million parameters (mostly the 32000-token head), for tests and the CPU demo.
PRESETS.update(_four("tiny", 128, 8, (1, 2, 3, 1), n_heads=4, max_seq_len=256))

# The paper's Table 1 (spec section 3), in its convention (all weights but the input embedding).
PAPER_PARAMS: dict[str, float] = {
    "transformer-s": 238.0e6, "mhc-s": 241e6, "looped-s": 135.5e6, "hyperloop-s": 135.7e6,
    "transformer-m": 990.5e6, "mhc-m": 997.5e6, "looped-m": 579.4e6, "hyperloop-m": 579.7e6,
    "transformer-l": 2018e6, "mhc-l": 2033e6, "looped-l": 990.5e6, "hyperloop-l": 990.8e6,
}  # fmt: skip


def get_preset(name: str) -> ModelConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise HyperloopError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})") from None


# ----------------------------------------------------------------------------- param accounting
def hc_site_params(cfg: ModelConfig, with_embedding: bool) -> int:
    """Parameters of one hyper-connection: W_pre, W_post, W_res (rows x nC), their biases, the
    scalars a_pre, a_post, a_res, and optionally the loop position embedding e_l (spec 2b/2d)."""
    n, width = cfg.n_streams, cfg.n_streams * cfg.dim
    res_rows = {"sinkhorn": n * n, "diagonal": n, "identity": 0}[cfg.h_res]
    rows = 2 * n + res_rows
    scalars = 3 if res_rows else 2
    return rows * width + rows + scalars + (cfg.dim if with_embedding else 0)


def lora_params(cfg: ModelConfig) -> int:
    """Per-loop LoRA adapters (A: r x in, B: out x r) on the four projections of each middle layer."""
    d, f, r = cfg.dim, cfg.ffn_dim, cfg.lora_rank
    per_layer = r * ((d + 3 * d) + (d + d) + (d + 2 * f) + (f + d))  # qkv, o, gate_up, down
    return cfg.num_loops * cfg.middle_layers * per_layer


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Analytic counts (no allocation). `total` follows the paper: everything but the input embedding."""
    d, f = cfg.dim, cfg.ffn_dim
    layer = 4 * d * d + 3 * d * f + 2 * d  # wqkv + wo, SwiGLU, two RMSNorm weights
    layers = cfg.n_layers * layer
    hc = cfg.num_hc() * hc_site_params(cfg, with_embedding=cfg.hc_placement == "span" and cfg.loop_embedding)
    lora = lora_params(cfg)
    head = cfg.vocab_size * d + d  # untied LM head + final norm
    total = layers + hc + lora + head
    return {"total": total, "layers": layers, "hc": hc, "lora": lora, "head": head, "embedding": cfg.vocab_size * d}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12 L d T (PaLM appendix B): N counts each matmul weight once
    per use, so a looped layer counts K times; attention is the non-causal 12 L d T, the
    convention under which the paper's 98K tok/s per H100 is about 20% MFU."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = 4 * d * d + 3 * d * f
    hc = cfg.num_hc() * hc_site_params(cfg, with_embedding=False)
    lora = lora_params(cfg)  # each loop's adapter is used once per token
    n = cfg.depth * per_layer + hc + lora + cfg.vocab_size * d
    return 6.0 * n + 12.0 * cfg.depth * d * seq_len
