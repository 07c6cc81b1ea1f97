"""INT4 figures (issue 7); prints JSON, and with --out DIR merges them into DIR/int4.json + DIR/int4.md.

Sections (--sections, default: decode and quant-time, plus ppl when --ckpt is given):
  decode      tokens/s of greedy decoding at batch 1 (KV cache + CUDA graph: hyperloop.infer's Decoder)
              of random-weight models in bf16 and with RTN int4 linears, and the int4 kernel's output
              against the dequantize-then-matmul reference on the same model.
  kernels     (CUDA) every linear shape of --presets at one row: bf16 cuBLAS against tinygemm and our
              GEMV (hyperloop.quant.gemv, where it builds), each timed over distinct weights (more than
              L2 holds) inside a CUDA graph, without launch cost.
  layer-error one RTN-quantized (1024 x 1024) linear: the int4 kernel (tinygemm; its CPU build without
              a GPU) against dequantize-then-matmul in fp32, next to the two roundings it contains:
              the weights rounded to bf16 (what the dequantize path in bf16 does too) and the grid
              (scales, float zeros) rounded to the bf16 that tinygemm reads.
  quant-time  wall time of GPTQ on one model with calib-seqs x calib-len calibration tokens (random
              tokens unless --data is given; the time does not depend on their values).
  ppl         validation perplexity of trained checkpoints: bf16, RTN, GPTQ loop-aware ("all"),
              GPTQ first-loop-only ("first", looped models only), with calibration from --data.

Each run updates only the rows it computed (keyed by preset / checkpoint), so the sections can be
run one command at a time and the markdown always shows everything measured so far. Estimated
times on one H100 (not yet measured):

    python benchmarks/int4.py --sections decode --out results                     # 2-4 min
    python benchmarks/int4.py --sections quant-time --data DATA --out results     # 2-5 min (S, 1024 x 2048)
    python benchmarks/int4.py --sections ppl --ckpt RUN --data DATA --out results  # 3-6 min per S checkpoint
    python benchmarks/int4.py --smoke                                             # tiny, CPU, a minute
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from hyperloop.checkpoint import load_model, save_model
from hyperloop.config import get_preset
from hyperloop.data.loader import TokenData
from hyperloop.eval.perplexity import perplexity
from hyperloop.infer.bench import build_model, random_prompts, time_decoder
from hyperloop.infer.decoder import synchronize
from hyperloop.model import HyperloopLM
from hyperloop.quant.convert import calibration_tokens
from hyperloop.quant.grid import rtn
from hyperloop.quant.linear import QuantLinear
from hyperloop.quant.quantize import quantize_gptq, quantize_rtn, replace_module

SECTIONS = ("decode", "kernels", "layer-error", "quant-time", "ppl")
KERNEL_TOLERANCE = 0.1  # a wrong layout gives O(1); bf16 rounding, 0.004 a layer (reference notes), 0.03 at M's 18
RUN_KEYS = ("command", "device", "torch", "date")  # stored with every row: rows of several runs are merged


def run_info(device: torch.device) -> dict:
    return {
        "command": " ".join(["python benchmarks/int4.py", *map(shlex.quote, sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def model_bytes(model: torch.nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers(recurse=True)]
    return sum(
        t.numel() * t.element_size() for t in tensors if t is not model.rope.cos and t is not model.rope.sin
    )


def set_kernels(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.use_kernel = enabled


@torch.no_grad()
def kernel_error(model: HyperloopLM, device: torch.device) -> float:
    """Relative difference of the logits of 8 tokens (within the kernel's row limit) computed with
    the int4 kernel and with dequantize-then-matmul: bf16 rounding only, if the layouts are right."""
    tokens = random_prompts(model.cfg.vocab_size, 1, 8).to(device)
    fast = model(tokens).float()
    set_kernels(model, False)
    reference = model(tokens).float()
    set_kernels(model, True)
    return float((fast - reference).norm() / reference.norm())


def bench_decode(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for preset in args.presets:
        cfg = get_preset(preset)
        model = build_model(cfg, device, dtype, int4=False)
        float_row = time_decoder(model, 1, args.prompt_len, args.new_tokens, compile=args.compile)
        float_bytes = model_bytes(model)
        quantize_rtn(model, bits=4, group_size=args.group_size)
        int4_row = time_decoder(model, 1, args.prompt_len, args.new_tokens, compile=args.compile)
        # the same int4 layers run op by op (no fused layers: infer/int4_block.py)
        op_by_op = time_decoder(model, 1, args.prompt_len, args.new_tokens, compile=args.compile, fuse_int4=False)
        int4_bytes = model_bytes(model)
        error = kernel_error(model, device)
        # the LM head too (`hyperloop quantize --lm-head`): a quarter of an S model's bytes per token
        replace_module(model, "lm_head", QuantLinear.from_quantized(rtn(model.lm_head.weight, 4, args.group_size)))
        head_row = time_decoder(model, 1, args.prompt_len, args.new_tokens, compile=args.compile)
        row = {
            "preset": preset,
            "dtype": str(dtype).removeprefix("torch."),
            "compile": args.compile,
            "float_tok_s": float_row["decode_tok_s"],
            "int4_tok_s": int4_row["decode_tok_s"],
            "speedup": int4_row["decode_tok_s"] / float_row["decode_tok_s"],
            "int4_op_by_op_tok_s": op_by_op["decode_tok_s"],
            "int4_head_tok_s": head_row["decode_tok_s"],
            "speedup_with_head": head_row["decode_tok_s"] / float_row["decode_tok_s"],
            "float_model_gb": float_bytes / 2**30,
            "int4_model_gb": int4_bytes / 2**30,
            "int4_head_model_gb": model_bytes(model) / 2**30,
            "int4_peak_memory_gb": int4_row["peak_memory_gb"],
            "cuda_graph": int4_row["cuda_graph"],
            "kernel_vs_dequant_rel_error": error,
        }
        print(f"{preset:<16} decode {row['float_tok_s']:8.1f} -> {row['int4_tok_s']:8.1f} tok/s "
              f"({row['speedup']:.2f}x; head too: {row['speedup_with_head']:.2f}x)", file=sys.stderr)  # fmt: skip
        if error > KERNEL_TOLERANCE:
            print(f"WARNING: {preset}: int4 kernel logits differ from the dequantized reference by "
                  f"{error:.3g} (relative): the tinygemm layout is wrong", file=sys.stderr)  # fmt: skip
        rows.append(row)
        del model
    return rows


def linear_shapes(presets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of every distinct linear of the presets' layers: wqkv, wo, w_gate_up, w_down."""
    shapes = set()
    for cfg in map(get_preset, presets):
        d, f = cfg.dim, cfg.ffn_dim
        shapes |= {(d, 3 * d), (d, d), (d, 2 * f), (f, d)}
    return sorted(shapes)


def graphed_us(calls: list) -> float:
    """Microseconds per call of `calls` (closures over distinct weights, so that together they
    exceed the L2 cache as a model's layers do), captured in one CUDA graph: no launch cost."""
    for call in calls[:2]:
        call()  # Triton compiles, cuBLAS picks its kernel
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (5 * len(calls))


@torch.no_grad()
def kernel_row(in_f: int, out_f: int, group_size: int, device: torch.device) -> dict:
    """One linear shape at batch 1: bf16 cuBLAS against tinygemm and our GEMV, the ceiling of what
    int4 can take off the matmuls of a decode step."""
    from hyperloop.quant import gemv
    from hyperloop.quant.linear import int4_tinygemm_weight, pack_rows, tinygemm_scales_and_zeros

    copies = max(4, (256 << 20) // (in_f * out_f // 2))  # 256 MB of int4 weights: far beyond L2
    q = rtn(torch.randn(out_f, in_f) * 0.02, bits=4, group_size=group_size)
    x = torch.randn(1, in_f, device=device, dtype=torch.bfloat16)
    bf16 = [torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) for _ in range(max(4, copies // 4))]
    tiny = [(int4_tinygemm_weight(q.codes.to(device), 8), tinygemm_scales_and_zeros(q.scales, q.zeros).to(device))
            for _ in range(copies)]  # fmt: skip
    row = {"shape": f"{in_f}x{out_f}", "int4_mb": in_f * out_f / 2 / 2**20, "group_size": group_size}
    row["bf16_us"] = graphed_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16])
    row["tinygemm_us"] = graphed_us([lambda w=w, sz=sz: torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz)
                                     for w, sz in tiny])  # fmt: skip
    row["speedup"] = row["bf16_us"] / row["tinygemm_us"]
    row["tinygemm_gb_s"] = row["int4_mb"] * 2**20 / row["tinygemm_us"] / 1e3
    del tiny
    if gemv.available(in_f):
        packed, split = pack_rows(q.codes.T, 4).to(device), gemv.split_for(in_f, out_f)
        ops = [gemv.operands(packed, q.scales, q.zeros) for _ in range(copies)]
        row["gemv_us"] = graphed_us([lambda w=w, g=g: gemv.int4_gemv(x[0], w, g, group_size, split) for w, g in ops])
        row["gemv_vs_tinygemm"] = row["tinygemm_us"] / row["gemv_us"]
        row["gemv_gb_s"] = row["int4_mb"] * 2**20 / row["gemv_us"] / 1e3
    print(f"{row['shape']:>10}: bf16 {row['bf16_us']:.2f} us, tinygemm {row['tinygemm_us']:.2f} us, "
          f"GEMV {row.get('gemv_us', float('nan')):.2f} us", file=sys.stderr)  # fmt: skip
    return row


def bench_quant_time(args, device: torch.device) -> list[dict]:
    cfg = get_preset(args.quant_preset)
    torch.manual_seed(0)
    model = HyperloopLM(cfg).to(device).eval()  # fp32 masters, as `hyperloop quantize` loads them
    seq_len = args.calib_len or cfg.max_seq_len
    if args.data:
        calib = calibration_tokens(args.data, args.calib_seqs, seq_len, vocab_size=cfg.vocab_size)
    else:
        calib = torch.randint(
            0, cfg.vocab_size, (args.calib_seqs, seq_len), generator=torch.Generator().manual_seed(0)
        )
    synchronize(device)
    start = time.perf_counter()
    reports = quantize_gptq(model, calib, 4, args.group_size, loop_hessian="all", batch_size=args.batch_size)
    synchronize(device)
    seconds = time.perf_counter() - start
    row = {
        "preset": args.quant_preset,
        "seconds": seconds,
        "calib_seqs": args.calib_seqs,
        "calib_len": seq_len,
        "calib_source": args.data or "random tokens",
        "group_size": args.group_size,
        "linears": len(reports),
        "weights": "random init",
    }
    print(
        f"{args.quant_preset:<16} GPTQ {seconds:.1f}s for {args.calib_seqs} x {seq_len} tokens",
        file=sys.stderr,
    )
    return [row]


def bench_perplexity(args, device: torch.device) -> list[dict]:
    data = TokenData(args.data)
    rows = []
    for ckpt in args.ckpt:
        loaded = load_model(ckpt, device=device, dtype=torch.float32)
        cfg = loaded.config
        data.check_vocab(cfg.vocab_size)

        def ppl(model: HyperloopLM) -> float:
            return perplexity(model, data, max_tokens=args.eval_tokens, progress=False)["ppl"]

        row = {
            "checkpoint": str(loaded.path),
            "model": cfg.name,
            "structure": cfg.structure(),
            "bf16": ppl(loaded.model),
        }
        model = copy.deepcopy(loaded.model)
        quantize_rtn(model, 4, args.group_size)
        row["rtn"] = ppl(model)
        calib = calibration_tokens(
            args.data, args.calib_seqs, args.calib_len or cfg.max_seq_len, vocab_size=cfg.vocab_size
        )
        modes = ("all", "first") if cfg.num_loops > 1 else ("all",)  # without loops the two are the same
        for mode in modes:
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            quantize_gptq(model, calib, 4, args.group_size, loop_hessian=mode, batch_size=args.batch_size)
            row[f"gptq_{mode}_seconds"] = time.perf_counter() - start
            row[f"gptq_{mode}"] = ppl(model)
        row.update(calib_seqs=args.calib_seqs, eval_tokens=args.eval_tokens, group_size=args.group_size)
        first = f" gptq-first {row['gptq_first']:.3f}" if "gptq_first" in row else ""
        print(f"{cfg.name:<16} ppl bf16 {row['bf16']:.3f} rtn {row['rtn']:.3f} "
              f"gptq-all {row['gptq_all']:.3f}{first}", file=sys.stderr)  # fmt: skip
        rows.append(row)
        del loaded, model
    return rows


@torch.no_grad()
def layer_error(device: torch.device, size: int = 1024, group_size: int = 128, rows: int = 16) -> dict:
    """Where the kernel's error comes from, on one linear with S-like weights (std 0.02)."""
    from hyperloop.quant.linear import int4_tinygemm_weight, tinygemm_scales_and_zeros

    g = torch.Generator().manual_seed(0)
    q = rtn(torch.randn(size, size, generator=g) * 0.02, bits=4, group_size=group_size)
    x = torch.randn(rows, size, generator=g).to(device, torch.bfloat16)
    grid = tinygemm_scales_and_zeros(q.scales, q.zeros)
    if device.type == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(x, int4_tinygemm_weight(q.codes.to(device), 8), group_size, grid.to(device))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, grid)
    w = q.dequantize().to(device)
    gi = q.g_idx.long()
    w_grid = (q.codes.float() - 8) * grid[gi, :, 0].float().T + grid[gi, :, 1].float().T  # what tinygemm holds
    ref = x.float() @ w.T
    rel = lambda y: float((y.float() - ref).norm() / ref.norm())  # noqa: E731
    return {"shape": f"{size}x{size}", "group_size": group_size, "kernel": "tinygemm " + device.type,
            "kernel_vs_dequant": rel(out), "bf16_weights": rel(x.float() @ w.bfloat16().float().T),
            "bf16_grid": rel(x.float() @ w_grid.to(device).T)}  # fmt: skip


# ------------------------------------------------------------------------------------ report
KEYS = {"decode": "preset", "kernels": "shape", "layer-error": "shape", "quant-time": "preset", "ppl": "checkpoint"}
COLUMNS = {
    "decode": [("preset", "model"), ("dtype", "float dtype"), ("float_tok_s", "float tok/s"),
               ("int4_op_by_op_tok_s", "int4 op by op tok/s"), ("int4_tok_s", "int4 tok/s"), ("speedup", "speedup"),
               ("int4_head_tok_s", "int4 + head tok/s"),
               ("speedup_with_head", "speedup (head too)"), ("float_model_gb", "float GB"),
               ("int4_model_gb", "int4 GB"), ("int4_head_model_gb", "int4 + head GB"),
               ("kernel_vs_dequant_rel_error", "kernel rel. err")],
    "kernels": [("shape", "in x out"), ("int4_mb", "int4 MB"), ("bf16_us", "bf16 cuBLAS us"),
                ("tinygemm_us", "tinygemm us"), ("speedup", "speedup"), ("tinygemm_gb_s", "tinygemm GB/s"),
                ("gemv_us", "our GEMV us"), ("gemv_vs_tinygemm", "GEMV vs tinygemm"), ("gemv_gb_s", "GEMV GB/s")],
    "layer-error": [("shape", "weight"), ("group_size", "group"), ("kernel", "kernel"),
                    ("kernel_vs_dequant", "kernel vs dequant (fp32)"), ("bf16_weights", "bf16 weights alone"),
                    ("bf16_grid", "bf16 grid alone")],
    "quant-time": [("preset", "model"), ("seconds", "GPTQ seconds"), ("group_size", "group"),
                   ("calib_seqs", "calib seqs"), ("calib_len", "tokens each"),
                   ("calib_source", "calibration")],
    "ppl": [("model", "model"), ("structure", "structure"), ("bf16", "bf16"), ("rtn", "RTN"),
            ("gptq_all", "GPTQ loop-aware"), ("gptq_first", "GPTQ first loop"), ("group_size", "group"),
            ("calib_seqs", "calib seqs"), ("eval_tokens", "tokens")],
}  # fmt: skip
TITLES = {
    "decode": "Decode speed at batch 1 (greedy, KV cache), random weights, RTN int4 linears",
    "kernels": "One linear at batch 1: bf16 cuBLAS against int4 tinygemm and our GEMV (calls captured in a CUDA graph)",
    "layer-error": "One linear layer: int4 kernel against dequantize-then-matmul (relative output error)",
    "quant-time": "GPTQ wall time",
    "ppl": "Validation perplexity after INT4 (trained checkpoints)",
}


def merge(old: dict, section: str, rows: list[dict]) -> None:
    """Replace the rows of `section` that were measured again, keep the others."""
    key = KEYS[section]
    measured = {row[key] for row in rows}
    old[section] = [row for row in old.get(section, []) if row[key] not in measured] + rows


def cell(value) -> str:
    if isinstance(value, float):
        return (
            f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}" if abs(value) >= 100 else f"{value:.3f}"
        )
    return "-" if value is None else str(value)


def markdown(results: dict) -> str:
    """One table per section and run (rows measured by the same command share a table)."""
    lines = ["# INT4 quantization (issue 7)", "", "Written by `benchmarks/int4.py`.", ""]
    for section in SECTIONS:
        if not results.get(section):
            continue
        lines += [f"## {TITLES[section]}", ""]
        columns = COLUMNS[section]
        runs: dict[tuple, list[dict]] = {}
        for row in results[section]:
            runs.setdefault(tuple(row[k] for k in RUN_KEYS), []).append(row)
        for (command, device, version, date), rows in runs.items():
            lines += [f"`{command}`  ", f"{device}, torch {version}, {date}", ""]
            lines.append("| " + " | ".join(title for _, title in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
            lines.append("")
    if results.get("notes"):  # kept in int4.json (written by hand), so a rerun does not drop them
        lines += ["Notes:", *(f"- {note}" for note in results["notes"]), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ smoke
# Tiny settings that run on a CPU in about a minute; flags given explicitly still win.
SMOKE = {
    "presets": ["transformer-tiny", "hyperloop-tiny"],
    "quant_preset": "hyperloop-tiny",
    "sections": [s for s in SECTIONS if s != "kernels"],  # kernels: CUDA only
    "group_size": 32,  # the tiny FFN width (352) is not a multiple of 128
    "calib_seqs": 4,
    "calib_len": 64,
    "batch_size": 4,
    "prompt_len": 16,
    "new_tokens": 8,
    "eval_tokens": 2048,
}


def smoke_inputs(args, root: Path) -> None:
    """A random tiny checkpoint and a small prepared folder, unless --ckpt / --data were given."""
    import pyarrow.parquet as pq

    from hyperloop.data import demo_corpus_path, demo_tokenizer_path
    from hyperloop.data.prepare import prepare

    if not args.data:
        texts = (
            pq.read_table(min(demo_corpus_path().glob("*.parquet")), columns=["text"]).slice(0, 60).column(0)
        )
        (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts.to_pylist()))
        prepare([str(root / "docs.jsonl")], str(demo_tokenizer_path()), str(root / "data"), val_fraction=0.2,
                workers=1, progress=False)  # fmt: skip
        args.data = str(root / "data")
    if not args.ckpt:
        torch.manual_seed(0)
        cfg = get_preset("hyperloop-tiny").replace(max_seq_len=64)
        args.ckpt = [
            str(save_model(root / "ckpt", HyperloopLM(cfg), tokenizer_dir=Path(args.data) / "tokenizer"))
        ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None)
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["transformer-s", "hyperloop-s", "transformer-m", "hyperloop-m"],
        help="decode: presets to time (random weights)",
    )
    parser.add_argument("--quant-preset", default="hyperloop-s", help="quant-time: the model to quantize")
    parser.add_argument(
        "--ckpt", nargs="+", default=[], metavar="CKPT", help="ppl: trained checkpoints or run folders"
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="prepared folder: calibration (train) and ppl (validation)",
    )
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-seqs", type=int, default=1024)
    parser.add_argument("--calib-len", type=int, default=None, help="default: the model's context length")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    parser.add_argument("--eval-tokens", type=int, default=1_000_000, help="ppl: validation tokens scored")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="decode: torch.compile the step before the CUDA graph")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="merge into DIR/int4.json and rewrite DIR/int4.md"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: check that everything runs")
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            smoke_inputs(args, Path(tmp))
        sections = args.sections or ["decode", "quant-time"] + ["ppl"] * bool(args.ckpt)
        if "ppl" in sections and not (args.ckpt and args.data):
            parser.error("the ppl section needs --ckpt and --data")
        results: dict = {}
        info = run_info(device)
        if "decode" in sections:
            results["decode"] = bench_decode(args, device, dtype)
        if "kernels" in sections:
            results["kernels"] = [kernel_row(*shape, args.group_size, device) for shape in linear_shapes(args.presets)]
        if "layer-error" in sections:
            results["layer-error"] = [layer_error(device)]
        if "quant-time" in sections:
            results["quant-time"] = bench_quant_time(args, device)
        if "ppl" in sections:
            results["ppl"] = bench_perplexity(args, device)
    for rows in results.values():
        for row in rows:
            row.update(info)
    print(json.dumps(results, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        merged = json.loads((out / "int4.json").read_text()) if (out / "int4.json").is_file() else {}
        for section, rows in results.items():
            merge(merged, section, rows)
        (out / "int4.json").write_text(json.dumps(merged, indent=2) + "\n")
        (out / "int4.md").write_text(markdown(merged))


if __name__ == "__main__":
    main()
