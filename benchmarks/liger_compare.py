"""liger-kernel's fused Triton ops against ours, on CUDA (issue 11 welcomes a kept library where it
measures faster). Needs `pip install liger-kernel` (measured with 0.8.5).

1. One mHC site (Sinkhorn H_res), forward and backward, at the S shape (16 x 2048 tokens, n = 4,
   C = 1024), fp32 and bf16 streams: our fused kernels (`HyperConnection.read` / `write`) against
   liger's `liger_mhc_coeffs` + `liger_mhc_pre` + `liger_mhc_post_res`. The stream set-up and loss
   are timed alone too, so the site's own cost is the difference.
2. A transformer-s training step (`hyperloop bench train`'s `bench_one`: micro-batch 16 x 2048, bf16,
   per-layer torch.compile, fused AdamW) with liger's RMSNorm and/or fused gate-up SwiGLU patched
   into our layers, between two runs of our own.

    python benchmarks/liger_compare.py --json OUT.json
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

from hyperloop.model import layers  # noqa: E402
from hyperloop.model.hyper import HyperConnection  # noqa: E402
from hyperloop.train.bench import bench_one  # noqa: E402
from hyperloop.train.loop import environment  # noqa: E402


def site_rows(tokens: int, n: int, dim: int) -> list[dict]:
    from liger_kernel.transformers.functional import liger_mhc_coeffs, liger_mhc_post_res, liger_mhc_pre
    from triton.testing import do_bench

    torch.manual_seed(0)
    x0 = torch.randn(tokens, dim, device="cuda", requires_grad=True)
    mix = torch.linspace(0.5, 1.5, n, device="cuda")[:, None]  # n different streams
    scale = torch.ones(dim, device="cuda", requires_grad=True)  # a cheap branch: x * scale
    site = HyperConnection(dim, n, "sinkhorn", wraps_residual=True).cuda()
    # liger's parameters in its own layout: phi (n C, n^2 + 2n), bias, three scalar gains
    phi = site.weight.detach().t().contiguous().requires_grad_()
    bias = site.bias.detach().clone().requires_grad_()
    gains = [a.detach().clone().requires_grad_() for a in site.alpha]

    def ours(y):
        x, coeffs = site.read(y)
        return site.write(y, x * scale, coeffs)

    def liger(y):
        h_pre, h_post, h_res = liger_mhc_coeffs(y, phi.to(y.dtype), bias, *gains, allow_fp32=True, tmax=20)
        return liger_mhc_post_res(y, liger_mhc_pre(y, h_pre) * scale, h_post, h_res)

    def step(site_fn, dtype):
        y = (x0.unsqueeze(-2) * mix).to(dtype)
        site_fn(y).square().mean().backward()

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in (("ours", ours), ("liger", liger), ("set-up and loss alone", lambda y: y)):
            step(fn, dtype)  # compile / autotune outside the timing
            us = do_bench(partial(step, fn, dtype), warmup=5, rep=50) * 1e3
            rows.append({"what": "mHC site fwd+bwd", "streams": str(dtype).removeprefix("torch."), "impl": name,
                         "us": round(us, 1)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def train_rows(steps: int) -> list[dict]:
    from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction
    from liger_kernel.transformers.functional import liger_rms_norm

    def liger_norm(self, x):
        return liger_rms_norm(x, self.weight, self.eps, casting_mode="llama", in_place=False)

    def liger_mlp(self, x, loop=None):
        gate_up = self.project("w_gate_up", x, loop)  # liger's backward gives the 2-D shape: call it in 2-D
        h = LigerFusedGateUpSiLUMulFunction.apply(gate_up.reshape(-1, gate_up.shape[-1]))
        return self.project("w_down", h.view(*gate_up.shape[:-1], h.shape[-1]), loop)

    ours = layers.RMSNorm.forward, layers.MLP.forward
    variants = {"ours": ours, "liger RMSNorm + SwiGLU": (liger_norm, liger_mlp), "liger SwiGLU": (ours[0], liger_mlp),
                "liger RMSNorm": (liger_norm, ours[1]), "ours, again": ours}  # fmt: skip
    rows = []
    try:
        for name, (norm, mlp) in variants.items():
            layers.RMSNorm.forward, layers.MLP.forward = norm, mlp
            torch._dynamo.reset()
            r = bench_one("transformer-s", 16, 2048, steps, True, torch.device("cuda"))
            keep = {k: r[k] for k in ("tok_s", "mfu", "peak_mem_gb")}
            rows.append({"what": "train transformer-s", "impl": name, **keep})
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    finally:
        layers.RMSNorm.forward, layers.MLP.forward = ours
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["site", "train"], default=["site", "train"])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per training row")
    p.add_argument("--json", metavar="FILE", help="also write the rows (and device, date, command) here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/liger_compare.py needs CUDA (liger's kernels and ours are Triton)")
    rows = (site_rows(16 * 2048, 4, 1024) if "site" in args.parts else []) + (
        train_rows(args.steps) if "train" in args.parts else [])  # fmt: skip
    if args.json:
        from importlib.metadata import version

        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/liger_compare.py " + " ".join(sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "env": {**environment(), "liger_kernel": version("liger-kernel")}, "rows": rows,
        }, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
