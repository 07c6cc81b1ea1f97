"""`hyperloop export-hf`: a checkpoint as an HF model folder that `AutoModelForCausalLM` loads.

    OUT/config.json                  HyperloopConfig, with auto_map -> the two files below
    OUT/configuration_hyperloop.py   thin wrappers around the installed `hyperloop` package
    OUT/modeling_hyperloop.py        (loading needs `pip install hyperloop`, see modeling_hyperloop)
    OUT/model.safetensors            HyperloopLM's state dict under the prefix "model."
    OUT/generation_config.json
    OUT/tokenizer.json, tokenizer_config.json   our tokenizer, BOS in front of every text

Any checkpoint `hyperloop.checkpoint.load_model` reads can be exported, int4 ones included: the
weights written are those of a plain HyperloopLM that computes what the loaded model computes,
so a quantized projection is written as the float weight it applies (its `dequantize()`); the
export is then a float model of the quantized one, not an int4 HF checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hyperloop.checkpoint import load_model
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM

HERE = Path(__file__).resolve().parent
CODE_FILES = ("configuration_hyperloop.py", "modeling_hyperloop.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hyperloop.HyperloopConfig",
    "AutoModelForCausalLM": "modeling_hyperloop.HyperloopForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plain_state_dict(model: HyperloopLM) -> dict[str, torch.Tensor]:
    """The state dict of a float HyperloopLM equivalent to `model`: its own tensors where the names
    match, and for a module that stores its weight another way (QuantLinear) the weight it applies."""
    with torch.device("meta"):
        expected = HyperloopLM(model.cfg).state_dict()
    have = model.state_dict()
    state = {}
    for name in expected:
        if name in have:
            state[name] = have[name]
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        if not hasattr(owner, "dequantize"):
            raise HyperloopError(f"cannot export {name}: {type(owner).__name__} has neither that tensor nor dequantize()")
        state[name] = owner.dequantize()
    return state


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the HF folder for `checkpoint` to `out` (see the module docstring); returns `out`.

    dtype: float32 / bfloat16 / float16 for the weights (default: as stored). The folder is written
    next to `out` under a temporary name and renamed when complete.
    """
    try:
        from transformers import GenerationConfig
    except ImportError:
        raise HyperloopError("export-hf needs transformers: pip install 'hyperloop[hf]'") from None
    from hyperloop.hf.configuration_hyperloop import HyperloopConfig
    from hyperloop.hf.tokenizer import hf_tokenizer

    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise HyperloopError(f"{out} already exists; pass --overwrite to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise HyperloopError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    loaded = load_model(checkpoint, device="cpu")
    tokenizer = loaded.tokenizer()
    cfg = loaded.config
    state = plain_state_dict(loaded.model)
    if dtype is not None:
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    hf_tok = hf_tokenizer(tokenizer, cfg.max_seq_len)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": hf_tok.pad_token_id}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        config = HyperloopConfig(hyperloop=cfg.to_dict(), architectures=["HyperloopForCausalLM"], auto_map=AUTO_MAP, **ids)
        config.save_pretrained(tmp)
        for name in CODE_FILES:
            shutil.copyfile(HERE / name, tmp / name)
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # No KV cache is exposed to HF (see modeling_hyperloop), so generate() must not ask for one.
        GenerationConfig(**ids, use_cache=False).save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 records its own class name (TokenizersBackend), which 4.x cannot resolve;
    PreTrainedTokenizerFast is the name both read as "the tokenizer in tokenizer.json"."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2) + "\n")
