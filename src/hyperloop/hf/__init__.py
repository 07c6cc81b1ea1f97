"""HF transformers interop: `hyperloop export-hf` writes a folder that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads.

    export                   the export (weights, config with auto_map, code, tokenizer)
    configuration_hyperloop  HyperloopConfig    } copied into every export; they wrap the installed
    modeling_hyperloop       HyperloopForCausalLM} hyperloop package rather than copying the model
    tokenizer                our tokenizer as an HF fast tokenizer that encodes identically

Only `export` is imported here: the other modules need the optional transformers package.
"""

from hyperloop.hf.export import export_hf

__all__ = ["export_hf"]
