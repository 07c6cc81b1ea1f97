"""The `hyperloop` command line. Thin by design: each subcommand parses its flags, calls one library
function and prints what it returns. User errors (HyperloopError) print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from hyperloop.errors import HyperloopError


def lazy(target: str):
    """A subcommand handled entirely by `module:function(args)`, imported only when it runs (so
    `hyperloop --help` and the light subcommands start without importing torch-heavy modules)."""

    def run(args: argparse.Namespace) -> None:
        import importlib

        module, name = target.split(":")
        getattr(importlib.import_module(module), name)(args)

    return run


# ----------------------------------------------------------------------------------------- params
def cmd_params(args: argparse.Namespace) -> None:
    from hyperloop.config import PAPER_PARAMS, PRESETS, count_params, get_preset

    names = args.presets or [n for n in PRESETS if n in PAPER_PARAMS]
    rows = []
    for name in names:
        cfg = get_preset(name)
        counts = count_params(cfg)
        rows.append({"preset": name, "params": counts["total"], "paper": PAPER_PARAMS.get(name), **counts})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'preset':<18}{'structure':<24}{'params':>12}{'paper':>10}{'diff':>8}{'hc':>10}")
    for row in rows:
        cfg = get_preset(row["preset"])
        paper = row["paper"]
        diff = f"{100 * (row['params'] / paper - 1):+.2f}%" if paper else ""
        print(
            f"{row['preset']:<18}{cfg.structure():<24}{row['params'] / 1e6:>11.1f}M"
            f"{(f'{paper / 1e6:.1f}M' if paper else '-'):>10}{diff:>8}{row['hc'] / 1e3:>9.1f}K"
        )
    print("(paper convention: every weight except the input embedding table)")


# ---------------------------------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> None:
    from hyperloop.data.prepare import prepare

    meta = prepare(
        sources=args.source,
        tokenizer=args.tokenizer,
        out=args.out,
        val_fraction=args.val_fraction,
        val_source=args.val_source,
        text_column=args.text_column,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    print(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "splits")}, indent=2))


# ------------------------------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "train":
        from hyperloop.train.bench import bench_train

        result = bench_train(args)
    else:
        from hyperloop.infer.bench import bench_decode

        if args.overrides:
            raise HyperloopError("--set applies to `bench train` only")
        result = bench_decode(args)
    print(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------- quantize
def cmd_quantize(args: argparse.Namespace) -> None:
    from hyperloop.quant.convert import quantize_checkpoint

    summary = quantize_checkpoint(
        args.ckpt, args.out, method=args.method, bits=args.bits, group_size=args.group_size,
        calib_data=args.calib_data, calib_seqs=args.calib_seqs, calib_len=args.calib_len,
        act_order=args.act_order, loop_hessian=args.loop_hessian, damp=args.damp,
        batch_size=args.batch_size, seed=args.seed, device=args.device, overwrite=args.overwrite,
        lm_head=args.lm_head,
    )  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"wrote {summary['checkpoint']}: {summary['method']} int{summary['bits']} g{summary['group_size']}, "
          f"{summary['layers']} linears in {summary['seconds']:.1f}s on {summary['device']}")  # fmt: skip
    print(f"linear weights: {summary['linear_bytes_quantized'] / 2**20:.1f} MiB "
          f"({summary['linear_size_ratio']:.3f} x bf16)")  # fmt: skip
    if "mean_error" in summary:
        print(f"relative output error on the calibration set: gptq {summary['mean_error']:.3e}, "
              f"rtn {summary['mean_rtn_error']:.3e} (mean over layers)")  # fmt: skip
        for key, what in (("layers_worse_than_rtn", "GPTQ did worse than RTN"),
                          ("layers_with_raised_damp", "the Hessian needed more dampening")):  # fmt: skip
            if summary[key]:
                print(f"note: {what} on {len(summary[key])} layer(s): {', '.join(summary[key])}")


# ---------------------------------------------------------------------------------------- analyze
def cmd_analyze(args: argparse.Namespace) -> None:
    from hyperloop.analysis import DEFAULT_TOKENS, analyze, summary_markdown

    report = analyze(
        args.checkpoints,
        data=args.data,
        out=args.out,
        tokens=DEFAULT_TOKENS if args.tokens is None else args.tokens,
        labels=args.labels,
        split=args.split,
        seq_len=args.seq_len,
        batch_tokens=args.batch_tokens,
        num_loops=args.loops,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary_markdown(report, details=False))
        print(f"per-layer tables: {report['files']['summary.md']}; figures and JSON in {args.out}")


# ------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> None:
    from hyperloop.eval.runner import evaluate, format_table

    result = evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        tasks=args.tasks,
        tasks_dir=args.tasks_dir,
        limit=args.limit,
        max_tokens=args.max_tokens,
        device=args.device,
        batch_tokens=args.batch_tokens,
        num_loops=args.loops,
        use_hub=not args.offline,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")


# -------------------------------------------------------------------------------------- export-hf
def cmd_export_hf(args: argparse.Namespace) -> None:
    from hyperloop.hf.export import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True) "
          "(needs the hyperloop package installed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hyperloop",
        description="Hyperloop Transformers: train, evaluate, quantize, analyse and serve looped LMs "
        "with hyper-connections, and the Transformer / mHC / Looped baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="Table-1 style parameter counts (paper convention)")
    p.add_argument("presets", nargs="*", metavar="PRESET", help="preset names (default: the 12 Table-1 models)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {preset, params, ...}")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("prepare", help="tokenize a corpus into token shards")
    p.add_argument("--source", nargs="+", required=True, metavar="SRC",
                   help="parquet/jsonl/txt files or folders, hf:NAME[:CONFIG], or 'demo' (bundled Wikipedia sample)")
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="sentencepiece .model, GPT-2 encoder.json+vocab.bpe folder, HF tokenizer folder, "
                   "or 'llama2' (bundled)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: meta.json, tokenizer/, <split>-NNNNN.bin (appears only when complete)")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of documents (by stable hash) held out for validation (default 0.005)")
    p.add_argument("--val-source", nargs="+", default=None, metavar="SRC",
                   help="use these sources as the validation split instead of a hash split")
    p.add_argument("--text-column", default="text", metavar="NAME", help="column/field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="tokenizer processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model (resumes when --out already holds a run)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="P", help="a preset name (see `hyperloop params`)")
    src.add_argument("--config", metavar="FILE", help="a JSON config (a run's config.json works)")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards from `hyperloop prepare`")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (created, or resumed)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override model.* or train.* keys, e.g. train.lr=3e-4 model.n_streams=2")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps")
    p.set_defaults(func=lazy("hyperloop.train.loop:train_from_cli"))

    p = sub.add_parser("bench", help="throughput benchmarks (train or decode)")
    p.add_argument("what", choices=["train", "decode"])
    p.add_argument("--preset", nargs="+", required=True, metavar="P",
                   help="preset(s); `hf-llama-<scale>` benchmarks HF LlamaForCausalLM of that shape (decode: "
                   "generate with its dynamic cache, eager; `hf-llama-<scale>:static`: a static cache, compiled by HF on CUDA)")
    p.add_argument("--micro-batch", type=int, default=None, metavar="B")
    p.add_argument("--seq-len", type=int, default=None, metavar="T")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="timed steps")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="profile 2 more optimizer steps (train) or 8 decode steps, uncaptured (decode) per row; "
                        "DIR/<row>.txt lists the kernels by GPU time")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="train: model.* overrides for our presets, e.g. model.hc_bf16_streams=true")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="decode batch size(s)")
    p.add_argument("--prompt-len", type=int, default=128, metavar="L")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--int4", action="store_true", help="decode with int4 weights (RTN) ")
    p.add_argument("--loops", type=int, default=None, metavar="K", help="decode: run the middle block K times")
    p.add_argument("--exit-threshold", type=float, default=None, metavar="X",
                   help="decode: per-token early exit at top-token probability X (eager, no CUDA graph)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quantize", help="quantize a checkpoint to packed int4 (GPTQ or RTN)",
                       description="Weight-only quantization of every attention and MLP linear (embeddings, "
                       "norms, hyper-connections and the LM head stay bf16) into a packed checkpoint that "
                       "eval, generate and export-hf load like any other.")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the quantized checkpoint")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="GPTQ (default) or round-to-nearest")
    p.add_argument("--bits", type=int, default=4, help="bits per weight: 4 (default; fast CUDA kernel), 2 or 8")
    p.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="input columns sharing one scale and zero (default 128; must divide every input dim)")
    p.add_argument("--calib-data", metavar="DIR", default=None,
                   help="a `hyperloop prepare` folder; GPTQ calibrates on random windows of its train split")
    p.add_argument("--calib-seqs", type=int, default=1024, metavar="N", help="calibration sequences (default 1024)")
    p.add_argument("--calib-len", type=int, default=None, metavar="T",
                   help="tokens per calibration sequence (default: the model's context length)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns in order of decreasing Hessian diagonal (desc_act)")
    p.add_argument("--loop-hessian", choices=["all", "first"], default="all",
                   help="GPTQ on shared middle layers: accumulate inputs of all loops (default) or the first only")
    p.add_argument("--lm-head", action="store_true",
                   help="quantize the LM head too (default: kept in bf16; it is ~1/4 of an S model's weights)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of mean(diag H) (default 0.01)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="calibration sequences per forward (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--json", action="store_true", help="print the full summary (sizes, per-layer errors) as JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="continue a prompt with a KV cache (streams the text)",
                       description="Generate text from a checkpoint. Greedy unless --temperature > 0. A looped "
                       "model can run fewer or more loops than trained (--loops) and let each token exit at a "
                       "loop boundary once its top-token probability reaches --exit-threshold.")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder or a run folder (its latest checkpoint)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="text to continue; repeat for a batch of prompts (streaming needs a single prompt)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop-token", type=int, nargs="+", default=None, metavar="ID",
                   help="token ids that end a row (default: the tokenizer's EOS and BOS)")
    p.add_argument("--loops", type=int, default=None, metavar="K",
                   help="run the middle block K times (default: as trained; past it the last loop's "
                   "hyper-connection and loop embedding are reused)")
    p.add_argument("--exit-threshold", type=float, default=None, metavar="X",
                   help="after each loop, exit once the top-token probability reaches X (above 1: never)")
    p.add_argument("--no-cache", action="store_true", help="recompute the full forward every step (a check; slow)")
    p.add_argument("--compile", action="store_true", help="torch.compile the CUDA decode step (slow start)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print {text, tokens, loops_used, ...} instead of streaming")
    p.set_defaults(func=lazy("hyperloop.infer.text:generate_from_cli"))

    p = sub.add_parser("analyze", help="cross-loop similarity and logit lens of checkpoints, side by side (paper section 8)",
                       description="For each checkpoint: the cosine similarity between the residual-stream outputs of all "
                       "effective layers (heatmap + JSON), the mean similarity of each middle layer with itself one loop "
                       "later (paper Table 8), and the logit lens (CE, entropy, greedy accuracy after every effective "
                       "layer; one plot with all checkpoints). Writes summary.md, analysis.json, logit_lens.png/.json "
                       "and <label>/similarity.png/.json into --out.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint folders or run folders (their latest)")
    p.add_argument("--data", required=True, metavar="DIR", help="token shards from `hyperloop prepare`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="predicted tokens to average over, streamed in batches (default 262144)")
    p.add_argument("--split", default="validation", help="data split (default: validation)")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="window length (default: the shortest context of the checkpoints)")
    p.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                   help="tokens per forward (default: 65536 on CUDA, 4096 on CPU)")
    p.add_argument("--loops", type=int, default=None, metavar="K",
                   help="run the middle block of the looped checkpoints K times instead of as trained")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="one name per checkpoint for tables, plots and folders (default: the config names)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the full result (analysis.json) instead of the tables")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("reproduce", help="the paper's four-way comparison end to end (resumable)",
                       description="Prepare data, train Transformer / mHC / Looped / Hyperloop with the same data, "
                       "tokens and hyperparameters, evaluate, quantize to INT4 (loop-aware GPTQ), analyse, and "
                       "write OUT/report.md + OUT/summary.json. Re-running skips finished stages.")
    p.add_argument("--scale", choices=["tiny", "xs"], required=True,
                   help="tiny: CPU smoke test on the bundled corpus; xs: d=256 at the paper's S structure (GPU)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--data", metavar="DIR", help="prepared shards, or a corpus to prepare (default: bundled demo)")
    p.add_argument("--eval-data", nargs="+", default=[], metavar="DIR", help="more prepared folders for perplexity")
    p.add_argument("--tasks-dir", metavar="DIR", help="zero-shot task files (lm-eval layouts); default: no tasks")
    p.add_argument("--steps", type=int, metavar="N", help="train every model for N steps (a full short schedule)")
    p.add_argument("--lr-sweep", type=float, nargs="+", metavar="LR", help="peak LRs to sweep on the Transformer")
    p.add_argument("--sweep-tokens", type=int, metavar="N", help="training tokens per sweep run (default 20M)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="overrides applied to every model (e.g. train.micro_batch=16)")
    p.add_argument("--eval-tokens", type=int, metavar="N", help="validation tokens for perplexity (default: per scale)")
    p.add_argument("--analysis-tokens", type=int, metavar="N", help="tokens for the analyses (default: per scale)")
    p.add_argument("--calib-seqs", type=int, metavar="N", help="GPTQ calibration sequences (default: per scale)")
    p.add_argument("--ablation", nargs="+", choices=["streams", "h_res", "placement", "structure", "lora", "init", "all"],
                   metavar="NAME", help="train and compare the variants of the paper's ablations instead "
                   "(streams, h_res, placement, structure, lora; init: Hyperloop's H_res/H_post at init; "
                   "or all; writes ablations.md)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train N models at a time, one process per GPU (logs in OUT/logs/)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="train every model once per seed (default: 0); runs of seed S > 0 are named "
                   "<arch>-seedS, and the report gives each figure's mean and range over the seeds")
    p.add_argument("--device", default=None, help="device for eval/quant/analysis (default: cuda if available)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the stages that finished (missing ones show as '-'); compute nothing")
    p.set_defaults(func=lazy("hyperloop.reproduce:reproduce_from_cli"))

    p = sub.add_parser("eval", help="perplexity and the paper's zero-shot tasks (lm-eval semantics)",
                       description="Perplexity over non-overlapping windows of the model's context length on a "
                       "prepared split (every token after the first predicted once, the tail that fills no window "
                       "dropped), and zero-shot ARC-E/C, COPA, HellaSwag, LAMBADA, OpenBookQA, PIQA, RACE, SciQ, "
                       "WinoGrande scored as lm-evaluation-harness scores them. Prints a table; --json writes "
                       "{ppl, tokens, tasks: {name: {acc, acc_norm, n, ...}}, avg}.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (float or int4) or run folder (its latest)")
    p.add_argument("--data", metavar="DIR", help="token shards from `hyperloop prepare` (omit: no perplexity)")
    p.add_argument("--split", default="validation", help="data split for perplexity (default: validation)")
    p.add_argument("--tasks", default="all", metavar="all|none|T1,T2",
                   help="zero-shot tasks (default all: every task whose files are found; named ones must be)")
    p.add_argument("--tasks-dir", metavar="DIR", help="task files as DIR/<task>/<split>.jsonl (else the HF hub)")
    p.add_argument("--offline", action="store_true", help="never try the HF hub for task files")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N documents per task")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="cap the perplexity tokens")
    p.add_argument("--loops", type=int, default=None, metavar="K", help="run the middle block K times (test-time depth)")
    p.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                   help="padded tokens per forward (default: 65536 on CUDA, 4096 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON to OUT")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-hf", help="export a checkpoint as an HF transformers model folder",
                       description="Writes config.json (with auto_map), the modeling code, model.safetensors and the "
                       "tokenizer, so AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) loads it and "
                       "`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True` runs. The modeling "
                       "code wraps the installed hyperloop package, which loading therefore needs. An int4 "
                       "checkpoint is exported with its dequantized weights.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder (float or int4) or run folder (its latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: as stored in the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export_hf)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except HyperloopError as err:
        print(f"hyperloop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hyperloop {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
