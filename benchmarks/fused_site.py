"""The fused Hyperloop site kernels (src/hyperloop/model/fused_site.py) at one shape, on CUDA.

For fp32 and bf16 streams: the stats kernel (RMS and the 3n projections in one read of the
streams) with each tl.dot precision (TF32, three TF32 products, fp32 FMAs), then one whole site,
forward and backward (a middle site, and one that is first and last), on the kernels and on the
op-by-op reference (hyper.py, compiled as training compiles it). Prints a markdown table; --json
FILE also writes the rows.

    python benchmarks/fused_site.py                       # S shape: 16 x 2048 tokens, n = 4, C = 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hyperloop.model.hyper import HyperConnection, expand_streams  # noqa: E402
from hyperloop.train.loop import environment  # noqa: E402


def bench_ms(fn, reps: int = 30) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=reps)


def stats_rows(rows: int, n: int, dim: int, dtype: torch.dtype) -> list[dict]:
    from hyperloop.model import fused_site

    y = torch.randn(rows, n, dim, device="cuda").to(dtype)
    w = torch.randn(3 * n, n * dim, device="cuda")
    out = []
    for precision in ("tf32", "tf32x3", "ieee"):
        ms = bench_ms(partial(fused_site.stats, y, w, precision))
        out.append({"what": "stats kernel", "streams": str(dtype).removeprefix("torch."), "precision": precision,
                    "us": round(ms * 1e3, 1), "TB_s": round(y.numel() * y.element_size() / ms / 1e9, 2)})  # fmt: skip
    return out


def site_rows(batch: int, seq: int, n: int, dim: int, dtype: torch.dtype) -> list[dict]:
    """One site, forward and backward, with a cheap branch; fused kernels against the compiled ops.
    Two kinds of site: a middle one (n different streams in, n out) and one that is both first and
    last (the n copies of expand_streams in, the streams' mean out, as the model's ends are)."""
    torch.manual_seed(0)
    site = HyperConnection(dim, n, "diagonal", wraps_residual=True, loop_embedding=True).cuda()
    x0 = torch.randn(batch, seq, dim, device="cuda", requires_grad=True)
    mix = torch.linspace(0.5, 1.5, n, device="cuda")[:, None]
    scale = torch.ones(dim, device="cuda", requires_grad=True)
    read, write = torch.compile(HyperConnection._read), torch.compile(HyperConnection._write)
    site._read, site._write = partial(read, site), partial(write, site)  # as train.distributed.compile_blocks

    def step(fused: bool, ends: bool) -> None:
        y = expand_streams(x0.to(dtype), n) if ends else (x0.unsqueeze(-2) * mix).to(dtype)
        site.fused = lambda y: fused
        h, coeffs = site.read(y)
        y = site.write(y, h * scale, coeffs, merge=torch.float32 if ends else None)
        y.square().mean().backward()

    out = []
    for ends in (False, True):
        for fused in (False, True):
            step(fused, ends)  # compile / autotune outside the timing
            ms = bench_ms(partial(step, fused, ends), reps=50)
            out.append({"what": "first+last site fwd+bwd" if ends else "middle site fwd+bwd",
                        "streams": str(dtype).removeprefix("torch."),
                        "precision": "fused kernels" if fused else "compiled ops (reference)", "us": round(ms * 1e3, 1)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--json", metavar="FILE", help="also write the rows (and device, date, command) here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fused_site.py needs CUDA (the kernels are Triton)")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += stats_rows(args.batch * args.seq_len, args.streams, args.dim, dtype)
        rows += site_rows(args.batch, args.seq_len, args.streams, args.dim, dtype)
    print("| what | streams | precision / path | us | TB/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['streams']} | {r['precision']} | {r['us']} | {r.get('TB_s', '-')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/fused_site.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "env": environment(), "rows": rows,
        }, indent=1) + "\n")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
