"""`hyperloop analyze`: the two analyses of spec section 8 for any number of checkpoints, side by side.

For each checkpoint the same windows of a prepared data split are streamed through the model with
its `layer_outputs` hook, which hands over the outer residual stream after every effective (unrolled)
layer - for Hyperloop inside a loop, the merged streams as if the loop ended there. `LayerStats`
folds each batch into running sums and the batch is dropped, so `tokens` can be as large as wanted.

Written to OUT:
    summary.md                 the tables (Table 8, logit lens at loop ends, per-layer details)
    analysis.json              everything below in one file (what `analyze` returns)
    logit_lens.png / .json     CE, entropy and greedy accuracy after every effective layer, all models
    <label>/similarity.png     heatmap of the mean cosine similarity between effective layers
    <label>/similarity.json    the matrix, the layer names and the cross-loop (Table 8) numbers
and, for models with hyper-connections, each site's mean coefficients and stream spread
(`hyperloop.analysis.streams`) in analysis.json and summary.md.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from hyperloop.analysis.layout import Layout
from hyperloop.analysis.plots import plot_logit_lens, plot_similarity
from hyperloop.analysis.stats import LayerStats, loop_similarity
from hyperloop.analysis.streams import SiteStats
from hyperloop.checkpoint import CONFIG_FILE, load_model, resolve_checkpoint
from hyperloop.config import ModelConfig
from hyperloop.data.loader import EvalWindows, TokenData
from hyperloop.errors import HyperloopError
from hyperloop.eval.loglik import autocast, default_batch_tokens
from hyperloop.eval.runner import resolve_device

DEFAULT_TOKENS = 2**18  # 128 windows of 2048: the means settle to about 3 digits


def architecture(cfg: ModelConfig) -> str:
    """Which of the paper's four models a config is (the ablations keep their family's name)."""
    if cfg.hc_placement == "sublayer":
        return "mHC"
    if cfg.hc_placement == "span":
        return "Hyperloop"
    if cfg.num_loops > 1:
        return f"Looped (LoRA r={cfg.lora_rank})" if cfg.lora_rank else "Looped"
    return "Transformer"


def analyze(
    checkpoints: list[str],
    data: str,
    out: str,
    tokens: int = DEFAULT_TOKENS,
    *,
    labels: list[str] | None = None,
    split: str = "validation",
    seq_len: int | None = None,
    batch_tokens: int | None = None,
    num_loops: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run both analyses on every checkpoint over the first `tokens` predicted tokens of `split`
    (in windows of `seq_len`, default: the shortest context of the models), write the files listed
    in the module docstring into `out`, and return their content as one dict.

    batch_tokens: tokens per forward (default as `hyperloop eval`: 64K on CUDA, 4K on CPU).
    num_loops:    run the middle block of the looped models this many times instead of the trained
                  count (Transformer and mHC checkpoints, which have no loop, run as trained).
    device:       default CUDA when available. The numerics are those of `hyperloop eval` (weights as
                  stored, bf16 autocast on CUDA), so the last layer's CE is the eval loss.
    """
    if not checkpoints:
        raise HyperloopError("no checkpoints given; pass one or more checkpoint or run folders")
    if tokens < 1:
        raise HyperloopError(f"--tokens {tokens} must be at least 1")
    if num_loops is not None and num_loops < 1:
        raise HyperloopError(f"--loops {num_loops} must be at least 1")
    if batch_tokens is not None and batch_tokens < 1:
        raise HyperloopError(f"--batch-tokens {batch_tokens} must be at least 1")
    # Read every config first so a bad path fails before minutes of work on the others.
    configs = [ModelConfig.load(resolve_checkpoint(c) / CONFIG_FILE) for c in checkpoints]
    labels = _labels(labels, configs)
    shortest = min(cfg.max_seq_len for cfg in configs)
    seq_len = shortest if seq_len is None else seq_len
    if not 1 <= seq_len <= shortest:
        raise HyperloopError(f"--seq-len {seq_len} must be between 1 and the models' shortest context ({shortest})")
    run_device = resolve_device(device)
    rows = max(1, (batch_tokens or default_batch_tokens(run_device)) // seq_len)
    token_data = TokenData(data)
    windows = EvalWindows(token_data, seq_len, rows, split=split, max_tokens=tokens)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    models = [_analyze_one(checkpoint, label, token_data, windows, num_loops, run_device, progress)
              for checkpoint, label in zip(checkpoints, labels)]  # fmt: skip
    # One colour scale for every heatmap of the run, so they compare at a glance; it starts at the
    # lowest similarity seen (not 0), since trained residual streams are all well above 0.
    floor = min(min(map(min, result["similarity"])) for result, _ in models)
    for result, layout in models:
        result["files"] = _write_model_files(out_dir / result["label"], result, layout, windows.num_predicted_tokens,
                                             floor)  # fmt: skip

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(token_data.path),
        "split": split,
        "tokens": windows.num_predicted_tokens,
        "seq_len": seq_len,
        "windows": windows.num_windows,
        "device": str(run_device),
        "models": [result for result, _ in models],
        "files": {name: str(out_dir / name) for name in ("summary.md", "analysis.json", "logit_lens.png",
                                                         "logit_lens.json")},
    }
    plot_logit_lens(out_dir / "logit_lens.png", [(r["label"], layout, r["logit_lens"]) for r, layout in models],
                    f"Logit lens over {report['tokens']:,} tokens")  # fmt: skip
    lens_keys = ("label", "checkpoint", "architecture", "structure", "layers", "loop_ends", "logit_lens")
    _write_json(out_dir / "logit_lens.json", {"tokens": report["tokens"],
                                               "models": [{k: r[k] for k in lens_keys} for r, _ in models]})  # fmt: skip
    _write_json(out_dir / "analysis.json", report)
    (out_dir / "summary.md").write_text(summary_markdown(report))
    return report


def _analyze_one(checkpoint, label, token_data, windows, num_loops, device, progress):
    """Stream the windows through one checkpoint; returns its result dict and its layout."""
    loaded = load_model(checkpoint, device)
    model, cfg = loaded.model, loaded.config
    token_data.check_vocab(cfg.vocab_size, loaded.tokenizer().sha256 if loaded.tokenizer_path else None)
    num_loops = num_loops if cfg.num_loops > 1 else None  # a 16-layer Transformer "looped" 3x is not a model
    layout = Layout(tuple(model.plan(num_loops)))
    stats = LayerStats(layout.depth, cfg.vocab_size, device)
    bar = tqdm(total=windows.num_predicted_tokens, unit="tok", unit_scale=True, desc=label, disable=not progress)
    with bar, torch.inference_mode():
        for x, y in windows:
            outputs: list = []
            with autocast(device):
                model.hidden_states(x.to(device), num_loops=num_loops, layer_outputs=outputs)
                stats.update([hidden for _, hidden in outputs], y.to(device), model.logits)
            del outputs  # the batch's activations go now: only the running sums stay
            bar.update(y.numel())
    with SiteStats(model) as sites, torch.inference_mode():
        if sites.sites:  # one plain forward more per window, for models with hyper-connections
            for x, _ in windows:
                with autocast(device):
                    model.hidden_states(x.to(device), num_loops=num_loops)
    path = loaded.path
    del loaded, model  # free the weights before the next checkpoint is loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()

    similarity, lens = stats.similarity(), stats.logit_lens()
    names = layout.names()
    result = {
        "label": label,
        "checkpoint": str(path),
        "architecture": architecture(cfg),
        "structure": cfg.structure() + (f", run x{num_loops}" if num_loops not in (None, cfg.num_loops) else ""),
        "num_loops": layout.num_loops,
        "layers": [{"name": names[i], "block": layout.block(s), "layer": s.layer, "loop": s.loop}
                   for i, s in enumerate(layout.steps)],
        "loop_ends": layout.loop_ends(),
        "similarity": similarity.tolist(),
        "loop_similarity": loop_similarity(similarity, layout),
        "logit_lens": lens,
        "hc_sites": sites.summary(),
        # The read-out after the last layer is the model's own prediction: its CE is the eval loss.
        "final": {"ce": lens["ce"][-1], "ppl": math.exp(lens["ce"][-1]), "accuracy": lens["accuracy"][-1]},
    }
    return result, layout


def _write_model_files(folder: Path, result: dict, layout: Layout, tokens: int, floor: float) -> dict[str, str]:
    """The per-model heatmap and its JSON (the matrix, the layer names, the Table 8 numbers)."""
    folder.mkdir(exist_ok=True)
    png, js = folder / "similarity.png", folder / "similarity.json"
    similarity = torch.tensor(result["similarity"], dtype=torch.float64)
    title = f"{result['label']} ({result['structure']}): residual-stream cosine similarity"
    plot_similarity(png, similarity, layout, title, vmin=floor)
    keys = ("label", "checkpoint", "architecture", "structure", "num_loops", "layers", "similarity", "loop_similarity")
    _write_json(js, {"tokens": tokens, **{k: result[k] for k in keys}})
    return {"similarity_png": str(png), "similarity_json": str(js)}


def _labels(labels: list[str] | None, configs: list[ModelConfig]) -> list[str]:
    """One folder-safe, unique name per checkpoint: the given labels, else the config names."""
    if labels is not None and len(labels) != len(configs):
        raise HyperloopError(f"{len(labels)} labels for {len(configs)} checkpoints; give one label per checkpoint")
    names = labels or [cfg.name for cfg in configs]
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model" for name in names]
    unique: list[str] = []
    for name in safe:  # the same preset twice (e.g. two steps of one run): number the repeats
        candidate, k = name, 2
        while candidate in unique:
            candidate, k = f"{name}-{k}", k + 1
        unique.append(candidate)
    return unique


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


# ------------------------------------------------------------------------------------ summary
def summary_markdown(report: dict, details: bool = True) -> str:
    """The report's tables as markdown: Table 8, the logit lens at loop ends, then (with `details`)
    each model's heatmap and per-layer table."""
    lines = [
        "# Representation analysis (Hyperloop paper, section 8)",
        "",
        (f"{report['tokens']:,} predicted tokens of the `{report['split']}` split of `{report['data']}` "
        f"({report['windows']} windows of {report['seq_len']}), on {report['device']}, "
        f"{report['date']}."),
        "",
        "## Cross-loop similarity (paper Table 8)",
        "",
        ("Mean cosine similarity, over tokens, between a middle layer's output and the same layer's output "
        "one loop later. Lower means the loops do more distinct work."),
        "",
        "| model | architecture | structure | mean | per middle layer |",
        "|---|---|---|---|---|",
    ]
    for m in report["models"]:
        loops = m["loop_similarity"]
        if loops is None:
            lines.append(f"| {m['label']} | {m['architecture']} | {m['structure']} | n/a (no loops) | |")
        else:
            per_layer = " / ".join(f"{v:.3f}" for v in loops["per_middle_layer"])
            lines.append(f"| {m['label']} | {m['architecture']} | {m['structure']} | {loops['mean']:.3f} | {per_layer} |")
    lines += [
        "",
        "## Logit lens",
        "",
        ("The outer residual stream after each effective layer (Hyperloop: the merged streams) read out "
        "through the final norm and LM head. CE and entropy in nats; the last layer is the model itself."),
        "",
        "| model | final CE | final PPL | final accuracy | CE at loop ends |",
        "|---|---|---|---|---|",
    ]
    for m in report["models"]:
        ce = m["logit_lens"]["ce"]
        ends = " / ".join(f"{ce[i]:.3f}" for i in m["loop_ends"]) or "n/a (no loops)"
        final = m["final"]
        lines.append(f"| {m['label']} | {final['ce']:.4f} | {final['ppl']:.2f} | {final['accuracy']:.4f} | {ends} |")
    if details:
        lines += ["", "![logit lens](logit_lens.png)", ""]
        for m in report["models"]:
            lines += _model_section(m)
    return "\n".join(lines)


def _model_section(m: dict) -> list[str]:
    lens, sim = m["logit_lens"], m["similarity"]
    lines = [
        f"## {m['label']}: {m['architecture']}, {m['structure']}",
        "",
        f"Checkpoint `{m['checkpoint']}`.",
        "",
        f"![similarity]({m['label']}/similarity.png)",
        "",
        "| # | layer | block | CE | entropy | accuracy | similarity to previous layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, layer in enumerate(m["layers"]):
        previous = f"{sim[i][i - 1]:.3f}" if i else ""
        lines.append(f"| {i + 1} | {layer['name']} | {layer['block']} | {lens['ce'][i]:.3f} | "
                     f"{lens['entropy'][i]:.3f} | {lens['accuracy'][i]:.4f} | {previous} |")  # fmt: skip
    if m.get("hc_sites"):
        lines += ["", "Hyper-connection sites (token means; spread: how far apart the streams are after the "
                  "site, 0 = still copies; H_res: its diagonal):", "",
                  "| site | spread | H_pre | H_post | H_res | a |", "|---|---|---|---|---|---|"]  # fmt: skip
        for site in m["hc_sites"]:
            res = site.get("h_res")
            diagonal = [row[i] for i, row in enumerate(res)] if res and isinstance(res[0], list) else res
            lines.append(f"| {site['site']} | {site['spread']:.4f} | {_numbers(site['h_pre'])} | "
                         f"{_numbers(site['h_post'])} | {_numbers(diagonal) if diagonal else '-'} | "
                         f"{_numbers(site['alpha'])} |")  # fmt: skip
    return lines + [""]


def _numbers(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)
