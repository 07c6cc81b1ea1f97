"""The `hyperloop` command line. Thin by design: each subcommand parses its flags, calls one library
function and prints what it returns. User errors (HyperloopError) print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from hyperloop.errors import HyperloopError


# ----------------------------------------------------------------------------------------- params
def cmd_params(args: argparse.Namespace) -> None:
    from hyperloop.config import PRESETS, PAPER_PARAMS, count_params, get_preset

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


# ------------------------------------------------------------------------------------------ train
def cmd_train(args: argparse.Namespace) -> None:
    from hyperloop.train.loop import train_from_cli

    train_from_cli(args)


# ------------------------------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> None:
    if args.what == "train":
        from hyperloop.train.bench import bench_train

        result = bench_train(args)
    else:
        from hyperloop.infer.bench import bench_decode

        result = bench_decode(args)
    print(json.dumps(result, indent=2))


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
                   help="parquet/jsonl/txt files or folders, or hf:NAME[:CONFIG]")
    p.add_argument("--tokenizer", required=True, metavar="TOK",
                   help="sentencepiece .model, GPT-2 encoder.json+vocab.bpe folder, or HF tokenizer folder")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                   help="fraction of documents (by stable hash) held out for validation (default 0.005)")
    p.add_argument("--val-source", nargs="+", default=None, metavar="SRC",
                   help="use these sources as the validation split instead of a hash split")
    p.add_argument("--text-column", default="text", help="column/field holding the text (default: text)")
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="throughput benchmarks (train or decode)")
    p.add_argument("what", choices=["train", "decode"])
    p.add_argument("--preset", nargs="+", required=True, metavar="P",
                   help="preset(s); `hf-llama-<scale>` benchmarks HF LlamaForCausalLM of that shape")
    p.add_argument("--micro-batch", type=int, default=None, metavar="B")
    p.add_argument("--seq-len", type=int, default=None, metavar="T")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="timed steps")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="decode batch size(s)")
    p.add_argument("--prompt-len", type=int, default=128, metavar="L")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--int4", action="store_true", help="decode with int4 weights (RTN) ")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result to this file")
    p.set_defaults(func=cmd_bench)

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
