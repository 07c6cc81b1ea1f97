"""Block shapes of the write + next-site-stats kernel (fused_site._stats_kernel with WRITE) on CUDA.

Times every (rows, columns, warps, stages) block at one shape with triton.testing.do_bench and prints
the fastest, next to the configured shape (fused_site.STATS_WRITE / STATS_WRITE_FULL). Run it when
the kernel or the GPU changes; the configured shapes come from this sweep on an H100 at the S shape.

    python benchmarks/fused_site_sweep.py                      # mHC's full H_res: n = 4, C = 1024
    python benchmarks/fused_site_sweep.py --h-res diagonal     # Hyperloop's
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    configured = do_bench(lambda: fs.stats(y, w, write=(out, None, h_post, h_res, y_new)))
    print(f"{args.h_res}: configured block shape {configured * 1e3:.0f} us; "
          f"the stats kernel alone {do_bench(lambda: fs.stats(y_new, w)) * 1e3:.0f} us", flush=True)
    results = []
    for BR, BC, warps, stages in itertools.product((8, 16, 32, 64), (32, 64, 128), (2, 4, 8), (1, 2, 3)):
        if BR * BC > (4096 if full else 8192) or BR * BC < 32 * warps:
            continue

        def run(BR=BR, BC=BC, warps=warps, stages=stages):
            fs._stats_kernel[(triton.cdiv(R, BR),)](
                y, w, u, ss, out, out, h_post, h_res, y_new, R, y.stride(0), y.stride(1), out.stride(0), C=C, N=n,
                P=P, PP=max(16, triton.next_power_of_2(P)), WRITE=True, HAS_E=False, FULL=full, BR=BR, BC=BC,
                DOT=fs.DOT, num_warps=warps, num_stages=stages,
            )  # fmt: skip

        try:
            results.append((do_bench(run) * 1e3, BR, BC, warps, stages))
        except Exception as e:  # noqa: BLE001 - shapes that need too much shared memory or registers
            print(f"skipped BR={BR} BC={BC} warps={warps} stages={stages}: {type(e).__name__}")
    results.sort()
    print("fastest (us, BR, BC, warps, stages):")
    for r in results[:8]:
        print(f"  {r[0]:.0f}  {r[1:]}")


if __name__ == "__main__":
    main()
