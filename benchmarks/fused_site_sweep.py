"""Block shapes of two fused-site kernels (src/hyperloop/model/fused_site.py) on CUDA.

Times every (rows, columns, warps, stages) block at one shape with triton.testing.do_bench and prints
the fastest next to the configured shape: the write + next-site-stats kernel (`_stats_kernel` with
WRITE; configured in STATS_WRITE / STATS_WRITE_FULL) or the write's backward (`_write_bwd_kernel`,
WRITE_BWD / WRITE_BWD_FULL). Run it when a kernel or the GPU changes; the configured shapes with a
full H_res come from this sweep at the S shape (write+stats on an H100, the write backward on an H200).

    python benchmarks/fused_site_sweep.py                          # write+stats, mHC's full H_res
    python benchmarks/fused_site_sweep.py --h-res diagonal         # Hyperloop's
    python benchmarks/fused_site_sweep.py --kernel write-bwd       # the write's backward
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=["write-stats", "write-bwd"], default="write-stats")
    p.add_argument("--h-res", choices=["sinkhorn", "diagonal"], default="sinkhorn")
    p.add_argument("--rows", type=int, default=16 * 2048, help="tokens (default: 16 x 2048)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dim", type=int, default=1024)
    args = p.parse_args()
    import triton
    from triton.testing import do_bench

    from hyperloop.model import fused_site as fs

    R, n, C, full = args.rows, args.n, args.dim, args.h_res == "sinkhorn"
    P = 2 * n + (n * n if full else n)
    dev = "cuda"
    y = torch.randn(R, n, C, device=dev)
    out = torch.randn(R, C, device=dev, dtype=torch.bfloat16)
    h_post = torch.rand(R, n, device=dev)
    h_res = torch.rand((R, n, n) if full else (R, n), device=dev)
    w = torch.randn(P, n * C, device=dev)
    y_new, u, ss = torch.empty_like(y), torch.empty(R, P, device=dev), torch.empty(R, device=dev)
    if args.kernel == "write-stats":
        configured = lambda: fs.stats(y, w, write=(out, None, h_post, h_res, y_new))  # noqa: E731
        shapes = [(BR, BC, warps, stages) for BR, BC, warps, stages in
                  itertools.product((8, 16, 32, 64), (32, 64, 128), (2, 4, 8), (1, 2, 3))
                  if (4096 if full else 8192) >= BR * BC >= 32 * warps]  # fmt: skip

        def launch(BR, BC, warps, stages):
            fs._stats_kernel[(triton.cdiv(R, BR),)](
                y, w, u, ss, out, out, h_post, h_res, y_new, R, y.stride(0), y.stride(1), out.stride(0), C=C, N=n,
                P=P, PP=max(16, triton.next_power_of_2(P)), WRITE=True, HAS_E=False, FULL=full, BR=BR, BC=BC,
                DOT=fs.DOT, num_warps=warps, num_stages=stages,
            )  # fmt: skip
    else:
        g = torch.randn_like(y)
        g_res = torch.empty((R, n, n) if full else (R, n), device=dev)
        g_post, g_out, g_mixed = torch.empty(R, n, device=dev), torch.empty_like(out), torch.empty_like(y)
        configured = lambda: fs._Write.backward(ctx, g, None, None)  # noqa: E731
        ctx = type("Ctx", (), {"saved_tensors": (y, out, h_post, None, h_res if full else None), "merged": False,
                               "full": full})()  # fmt: skip
        shapes = [(BR, BC, warps, stages) for BR, BC, warps, stages in
                  itertools.product((8, 16, 32), (32, 64, 128), (2, 4, 8), (1, 3))
                  if 4096 >= BR * BC >= 32 * warps]  # fmt: skip

        def launch(BR, BC, warps, stages):
            fs._write_bwd_kernel[(triton.cdiv(R, BR),)](
                g, y, out, out, h_post, h_res if full else h_post, g_res, g_post, g_out, g_out, g_mixed, R,
                g.stride(0), g.stride(1), g.stride(2), y.stride(0), y.stride(1), out.stride(0), C=C, N=n,
                NP=triton.next_power_of_2(n), HAS_E=False, FULL=full, BR=BR, BC=BC, num_warps=warps, num_stages=stages,
            )  # fmt: skip

    print(f"{args.kernel}, {args.h_res}: configured block shape {do_bench(configured) * 1e3:.0f} us", flush=True)
    results = []
    print("us, (BR, BC, warps, stages):", flush=True)
    for shape in shapes:
        try:
            results.append((do_bench(partial(launch, *shape)) * 1e3, *shape))
            print(f"  {results[-1][0]:.0f}  {shape}", flush=True)  # as it goes: a cut-off sweep still tells
        except Exception as e:  # noqa: BLE001 - shapes that need too much shared memory or registers
            print(f"skipped BR, BC, warps, stages = {shape}: {type(e).__name__}")
    results.sort()
    print("fastest (us, BR, BC, warps, stages):")
    for r in results[:8]:
        print(f"  {r[0]:.0f}  {r[1:]}")


if __name__ == "__main__":
    main()
