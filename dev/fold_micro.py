"""Dev: us per call of the int4 GEMVs of an mhc-s layer, plain and with a folded site, in a CUDA graph of
back-to-back calls (each a programmatic dependent of the one before, as in a decode step)."""
import json, os
import torch
from hyperloop.quant import gemv

dev, n = "cuda", 4
S = 2 * n + n * n + 1
torch.manual_seed(0)


def weights(N, K):
    words = torch.randint(-2**31, 2**31 - 1, (N, K // 8), dtype=torch.int32, device=dev)
    grid = torch.stack([torch.full((N, K // 128), 0.01), torch.full((N, K // 128), 1032.0)], -1).half().to(dev)
    return words, grid


def per_call(fn, reps=64):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        g.replay()
    e1.record(); torch.cuda.synchronize()
    return round(e0.elapsed_time(e1) * 1e3 / (20 * reps), 2)


rows = []
C, F = 1024, 2816
bf = dict(device=dev, dtype=torch.bfloat16)
streams = torch.randn(n, C, **bf)
h_post = torch.rand(n, device=dev) * 2
logits = torch.randn(n * n, device=dev)
next_weight = torch.randn(S - 1, n * C, **bf) * 0.02
bias, alpha = torch.randn(S - 1, **bf) * 0.1, torch.ones(3, **bf)
for name, N, K in (("wo", C, C), ("w_down", C, F)):
    w, g = weights(N, K)
    split = gemv.split_for(K, N)
    x = torch.randn(K, **bf)
    rows.append(dict(case=name, split=split, plain=per_call(lambda: gemv.int4_gemv(x, w, g, 128, split))))
    for iters in (0, 20):
        site = [streams, h_post, logits, next_weight]
        rows[-1][f"write_iters{iters}"] = per_call(
            lambda: gemv.int4_gemv_sites(x, w, g, 128, split, None, 0.0, False, [], site, 1e-6, iters))
    print(rows[-1], flush=True)
w, g = weights(2 * F, C)
split = gemv.split_for(C, 2 * F)
norm = torch.ones(C, **bf)
x = torch.randn(C, **bf)
row = dict(case="w_gate_up", split=split,
           plain=per_call(lambda: gemv.int4_gemv(x, w, g, 128, split, norm, 1e-6, None, True)))
for blocks in (8, 128, 256):
    partials = torch.rand(S, blocks, device=dev)
    row[f"read_partials{blocks}"] = per_call(
        lambda: gemv.int4_gemv_sites(streams, w, g, 128, split, norm, 1e-6, True, [partials, bias, alpha], [], 1e-6, 20))
print(row, flush=True)
rows.append(row)
json.dump(rows, open(os.environ.get("OUT", ".") + "/fold_micro.json", "w"), indent=1)
from hyperloop.model import decode_site
out = torch.randn(1, C, **bf)
y = streams[None]
site_row = dict(case="site_kernel",
                write_read=per_call(lambda: decode_site.site(y, out, h_post[None], logits[None], None, next_weight, bias, alpha,
                                                             1e-6, False, 20)))
print(site_row, flush=True)
rows.append(site_row)
json.dump(rows, open(os.environ.get("OUT", ".") + "/fold_micro.json", "w"), indent=1)
