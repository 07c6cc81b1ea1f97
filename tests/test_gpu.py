"""The CUDA fast paths (torch.compile, bf16 autocast, the chunked LM-head cross-entropy, the fused
Hyperloop and mHC sites) against the eager fp32 reference: losses and gradients within bf16
tolerance. Skipped without a GPU."""

from __future__ import annotations

import gc

import pytest
import torch

from hyperloop.config import get_preset
from hyperloop.model import HyperloopLM
from hyperloop.model.hyper import HyperConnection, expand_streams, sinkhorn
from hyperloop.train.distributed import compile_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def op_by_op_sites(monkeypatch):
    """Hyper-connection sites on the plain torch ops of hyper.py instead of the fused kernels."""
    monkeypatch.setattr(HyperConnection, "fused", lambda self, y: False)


def test_chunked_cross_entropy_under_bf16_autocast_matches_fp32():
    """The CUDA loss path under bf16 autocast (bf16 products, the head's gradient summed over the
    chunks in fp32 by cuBLAS) against fp32 F.cross_entropy: loss and both gradients."""
    from hyperloop.model.loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3, 700, 256, device="cuda", requires_grad=True)
    weight = (0.05 * torch.randn(1000, 256, device="cuda")).requires_grad_()
    targets = torch.randint(0, 1000, (3, 700), device="cuda")
    targets[0, :50] = -1
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, targets, chunk_rows=256)
    assert ours.dtype == torch.float32 and _rel(ours.detach(), ref.detach()) < 1e-3
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        assert a.dtype == torch.float32 and _rel(a, b) < 1e-2


@pytest.mark.parametrize("arch", ["transformer", "mhc", "looped", "hyperloop"])
def test_compiled_bf16_step_matches_eager_fp32(arch, monkeypatch):
    torch.manual_seed(0)
    cfg = get_preset(f"{arch}-xs").replace(vocab_size=4096, max_seq_len=512)
    model = HyperloopLM(cfg).cuda()
    x = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")
    y = torch.roll(x, -1, dims=1)

    with monkeypatch.context() as patch:
        op_by_op_sites(patch)
        loss_ref = model(x, y)  # eager fp32 (chunked CE on CUDA)
        grads_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    plain = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    assert _rel(loss_ref.detach(), plain.detach()) < 1e-5  # the chunked CE is the plain CE

    compile_blocks(model)  # as training does: each decoder layer compiled in place
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert _rel(loss.detach(), loss_ref.detach()) < 1e-2
    flat = lambda gs: torch.cat([g.float().flatten() for g in gs])  # noqa: E731
    assert _rel(flat(grads), flat(grads_ref)) < 2e-2
    # Per parameter, except those whose gradient is ~0 at init (mHC's near-identity Sinkhorn biases:
    # norms 1e-5 of the largest), where bf16 rounding alone gives relative errors near 1.
    largest = max(r.norm() for r in grads_ref)
    worst = max(_rel(g, r) for g, r in zip(grads, grads_ref) if r.norm() >= 1e-3 * largest)
    assert worst < 5e-2, worst


def test_sinkhorn_kernels_match_autograd():
    """The Sinkhorn kernels against hyper.sinkhorn and its autograd gradient, on logits far from and
    near the identity's (mHC's init)."""
    from hyperloop.model import fused_site
    from hyperloop.model.hyper import sinkhorn

    torch.manual_seed(0)
    for scale, shift in ((3.0, 0.0), (0.1, 4.0)):
        z = (scale * torch.randn(1000, 4, 4, device="cuda") + shift * torch.eye(4, device="cuda")).requires_grad_()
        g = torch.randn(1000, 4, 4, device="cuda")
        ref = sinkhorn(z, 20)
        (g_ref,) = torch.autograd.grad(ref, z, g)
        h, iterates = fused_site.sinkhorn(z.detach(), 20)
        assert _rel(h, ref) < 1e-5 and _rel(fused_site.sinkhorn_backward(iterates, g), g_ref) < 1e-4


@pytest.mark.parametrize("h_res, n, dim, broadcast, merge, dtype, dot", [
    ("diagonal", 4, 256, True, True, torch.float32, "ieee"), ("diagonal", 4, 256, False, False, torch.float32, "ieee"),
    ("diagonal", 3, 48, True, False, torch.float32, "ieee"), ("diagonal", 3, 48, False, True, torch.float32, "ieee"),
    ("diagonal", 1, 64, True, True, torch.float32, "ieee"), ("diagonal", 4, 256, False, True, torch.float32, "tf32"),
    ("diagonal", 4, 256, True, False, torch.bfloat16, "tf32"), ("diagonal", 2, 128, False, True, torch.bfloat16, "tf32"),
    ("sinkhorn", 4, 256, True, True, torch.float32, "ieee"), ("sinkhorn", 4, 256, False, False, torch.float32, "ieee"),
    ("sinkhorn", 2, 64, True, False, torch.float32, "ieee"), ("sinkhorn", 4, 256, False, True, torch.float32, "tf32"),
    ("sinkhorn", 4, 256, True, False, torch.bfloat16, "tf32"),
])  # fmt: skip
def test_fused_sites_match_op_by_op(h_res, n, dim, broadcast, merge, dtype, dot, monkeypatch):
    """Two chained sites on the Triton kernels against hyper.py's ops, Hyperloop's (diagonal H_res,
    loop embedding) and mHC's (Sinkhorn H_res): the streams (or, with `merge`, their mean, as the
    model's last site returns) and the gradients of the input, of every HC parameter and of the
    branch. The first site reads a broadcast input (as after expand_streams: the kernels read its one
    stream) or streams that differ, and its write takes the second site's stats; the streams are
    stored in fp32 or bf16 (hc_bf16_streams), the parameters are fp32. With fp32 products in the
    kernels' tl.dot ("ieee") the fp32 results agree to rounding; with the TF32 default, to its
    precision."""
    from hyperloop.model import fused_site

    monkeypatch.setattr(fused_site, "DOT", dot)
    torch.manual_seed(0)
    hyperloop = h_res == "diagonal"
    sites = [HyperConnection(dim, n, h_res, wraps_residual=hyperloop, loop_embedding=hyperloop).cuda() for _ in range(2)]
    branch = torch.nn.Linear(dim, dim).cuda()
    with torch.no_grad():  # away from the init, where the gates are near constants
        for p in [p for s in sites for p in s.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    x0 = torch.randn(3, 100, dim, device="cuda", requires_grad=True)
    mix = torch.linspace(0.5, 1.5, n, device="cuda")[:, None]
    weights = torch.randn(n, dim, device="cuda")

    def run():
        y = (expand_streams(x0, n) if broadcast else x0.unsqueeze(-2) * mix).to(dtype)
        h, coeffs = sites[0].read(y)  # as the model chains them: the first write takes the second read's stats
        y, ahead = sites[0].write(y, torch.tanh(branch(h)), coeffs, next_site=sites[1])
        h, coeffs = sites[1].read(y, ahead)
        y = sites[1].write(y, torch.tanh(branch(h)), coeffs, merge=torch.float32 if merge else None)
        # g' differs across streams and rows (across rows only for a merged output)
        loss = (y.square() * (weights[0] if merge else weights)).sum() + (y if merge else y.mean(-2)).pow(3).sum()
        params = [x0, *branch.parameters(), *[p for s in sites for p in s.parameters()]]
        return y, torch.autograd.grad(loss, params)

    assert sites[0].fused(x0)
    y, grads = run()
    with monkeypatch.context() as patch:
        op_by_op_sites(patch)
        y_ref, grads_ref = run()
    # TF32: W y and its gradients to ~5e-4 (the perturbed alphas here, ~0.3 against 0.01 at init, pass
    # that on to the gates); bf16 streams round where the sums differ
    y_tol, grad_tol = {"ieee": (1e-5, 1e-4), "tf32": (2e-3, 5e-3)}[dot] if dtype == torch.float32 else (1e-2, 3e-2)
    assert y.dtype == (torch.float32 if merge else dtype) and y.shape == y_ref.shape and _rel(y, y_ref) < y_tol
    for g, r in zip(grads, grads_ref, strict=True):
        assert _rel(g, r) < grad_tol


def test_fused_sites_under_fsdp2_match_the_plain_model(monkeypatch):
    """FSDP2 around a Hyperloop model (one rank: the sharding hooks and DTensor parameters without a
    second GPU): the fused sites give the unwrapped model's loss and gradients."""
    import os

    import torch.distributed as dist

    from hyperloop.train.distributed import DistInfo, wrap

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 500))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        torch.manual_seed(0)
        cfg = get_preset("hyperloop-xs").replace(vocab_size=4096, max_seq_len=256)
        plain = HyperloopLM(cfg).cuda()
        sharded = HyperloopLM(cfg).cuda()
        sharded.load_state_dict(plain.state_dict())
        wrap(sharded, DistInfo(rank=0, world_size=2), "fsdp")  # world_size > 1 turns wrapping on; the group has 1 rank
        x = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
        y = torch.roll(x, -1, dims=1)
        losses = []
        for model in (plain, sharded):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses.append(model(x, y))
            losses[-1].backward()
        assert _rel(losses[1].detach(), losses[0].detach()) < 1e-4
        for (name, p), q in zip(plain.named_parameters(), sharded.parameters(), strict=True):
            g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            assert _rel(g, p.grad) < 1e-3, name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["transformer", "mhc", "looped", "hyperloop"])
def test_validation_after_compiled_training_matches_eager(arch):
    """Validation during training (`eager_no_grad`, after compiled training steps) gives the eager
    model's logits. The HC parameters are perturbed so the streams differ (at init they are near
    copies, which would hide a stream mix-up)."""
    from hyperloop.train.loop import eager_no_grad

    torch.manual_seed(0)
    cfg = get_preset(f"{arch}-xs").replace(vocab_size=4096, max_seq_len=512)
    model = HyperloopLM(cfg).cuda()
    with torch.no_grad():
        for p in model.hc.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model(x).float()
    compile_blocks(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, torch.roll(x, -1, dims=1)).backward()
    model.eval()
    with eager_no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for batch in (4, 2):  # the last validation batch may be smaller
            assert _rel(model(x[:batch]).float(), reference[:batch]) < 2e-2


@pytest.mark.parametrize("batch", [1, 2])  # one row: our GEMV (where it builds); two: tinygemm
def test_compiled_int4_decode_matches_eager(batch):
    """The compiled decode step (torch.compile, then a CUDA graph) of an int4 model gives the eager
    step's logits: the kernel's operands are built before compiling (bf16 weights:
    tests/test_infer.py::test_cuda_graph_step_equals_eager_step)."""
    from hyperloop.infer.bench import build_model
    from hyperloop.infer.decoder import Decoder
    from hyperloop.quant import gemv
    from hyperloop.quant.linear import QuantLinear

    # ffn 768: int4 groups of 128 must divide every linear's input size (xs has 704)
    cfg = get_preset("hyperloop-xs").replace(vocab_size=4096, max_seq_len=256, ffn_dim=768)
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, int4=True)
    prompts = torch.randint(1, cfg.vocab_size, (batch, 16)).tolist()
    fed = torch.randint(1, cfg.vocab_size, (8, batch), device="cuda")  # the same tokens for both (not argmax,
    outputs = []  # which bf16 rounding could send down different paths)
    for compile in (False, True):
        decoder = Decoder(model, batch, 32, compile=compile)
        decoder.prefill(prompts)
        outputs.append(torch.stack([decoder.step(tokens)[0].float() for tokens in fed]))
    assert _rel(outputs[1], outputs[0]) < 2e-2
    kernels = {name for m in model.modules() if isinstance(m, QuantLinear) for name in m._operands}
    assert ("gemv" in kernels) == (batch == 1 and gemv.available(cfg.dim))  # tinygemm: the 16-row prefills


@pytest.mark.parametrize("preset", ["transformer-xs", "hyperloop-xs", "mhc-xs"])
def test_fused_int4_layers_decode_like_the_op_by_op_step(preset):
    """At batch 1 an int4 model's layers run as five fused kernels each (infer/int4_block.py; mHC's
    one sub-layer at a time), eagerly and compiled (graphed, the GEMVs launched as programmatic
    dependents); the logits match those of the same layers run op by op on the dequantized weights,
    with no int4 kernel at all."""
    from hyperloop.infer.bench import build_model
    from hyperloop.infer.decoder import Decoder
    from hyperloop.quant import gemv
    from hyperloop.quant.linear import QuantLinear

    cfg = get_preset(preset).replace(vocab_size=4096, max_seq_len=256, ffn_dim=768)
    if not gemv.available(cfg.dim):
        pytest.skip("the GEMV did not build here")
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, int4=True)
    prompts = torch.randint(1, cfg.vocab_size, (1, 16)).tolist()
    fed = torch.randint(1, cfg.vocab_size, (8, 1), device="cuda")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    outputs = []
    for kernels, compile in ((False, False), (True, False), (True, True)):
        for linear in linears:
            linear.use_kernel = kernels
        decoder = Decoder(model, 1, 100, compile=compile)  # attention over clusters of 4 blocks
        assert (decoder.cache.fused_block is not None) == kernels
        decoder.prefill(prompts)
        outputs.append(torch.stack([decoder.step(tokens)[0].float() for tokens in fed]))
    assert _rel(outputs[1], outputs[0]) < 2e-2 and _rel(outputs[2], outputs[0]) < 2e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel", ["triton", "triton-chunked", "cuda"])
def test_decode_attention_kernels_match_masked_sdpa(head_dim, kernel, monkeypatch):
    """One query per row over a left-padded cache: the kernels visit only columns pad[b] .. column,
    SDPA all of them under the cache's mask; the same result (fp32 reference, bf16 inputs). With
    chunks of 256 columns the Triton kernel splits a 600-column cache over three programs; the CUDA
    one of the fused int4 layer (gemv.cu) spreads a head over a cluster of 8 blocks at 600 columns,
    2 at 40, and 1 at 16."""
    import torch.nn.functional as F

    from hyperloop.infer import decode_attention as triton_kernels
    from hyperloop.infer.cache import KVCache
    from hyperloop.quant import gemv

    if kernel == "cuda" and gemv.extension() is None:
        pytest.skip("the CUDA kernels did not build here")
    monkeypatch.setattr(triton_kernels, "CHUNK", 256 if kernel == "triton-chunked" else 1024)
    B, H = 3, 4
    for T in (600, 40, 16):
        cache = KVCache(1, B, H, T, head_dim, dtype=torch.bfloat16, device="cuda")
        cache.k[0].normal_()
        cache.v[0].normal_()
        for column, pad in [(0, [0, 0, 0]), (min(70, T - 1), [0, 5, min(70, T - 1)]), (T - 1, [0, T // 9, T // 2]),
                            (T - 3, [T - 3, T - 4, 1])]:  # fmt: skip
            cache.reset(torch.tensor(pad))
            cache.column.fill_(column)
            cache.start(1)
            q = torch.randn(B, 1, H, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # strided
            k, v = cache.k[0].float(), cache.v[0].float()
            want = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=cache._sdpa_mask(cache._columns))
            if kernel == "cuda":
                got = gemv.decode_attention(q[:, :, 0], cache.k[0], cache.v[0], cache.pad, cache.column).unsqueeze(2)
            else:
                got = triton_kernels.decode_attention(q, cache.k[0], cache.v[0], cache.pad, cache.column)
            assert got.shape == want.shape and got.dtype == torch.bfloat16
            assert _rel(got, want) < 1e-2, (T, column, pad)


@pytest.mark.parametrize("preset", ["transformer-xs", "hyperloop-xs"])
def test_decoding_with_the_attention_kernel_matches_sdpa(preset):
    """A whole graphed decode (prefill, then steps) gives the same logits with the decode-attention
    kernel as with SDPA over the masked cache."""
    from hyperloop.infer.bench import build_model
    from hyperloop.infer.decoder import Decoder

    cfg = get_preset(preset).replace(vocab_size=512, max_seq_len=256)
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, int4=False)
    prompts = [torch.randint(1, cfg.vocab_size, (n,)).tolist() for n in (5, 17, 9)]
    fed = torch.randint(1, cfg.vocab_size, (6, 3), device="cuda")
    outputs = []
    for kernel in (False, True):
        decoder = Decoder(model, 3, 40)
        decoder.cache.decode_kernel = kernel
        outputs.append(torch.stack([decoder.prefill(prompts).float()] + [decoder.step(t)[0].float() for t in fed]))
    assert _rel(outputs[1], outputs[0]) < 2e-2


@pytest.mark.parametrize("h_res, n, dim, rows", [("diagonal", 4, 1024, 1), ("diagonal", 4, 64, 1),
    ("diagonal", 1, 1024, 3), ("diagonal", 8, 512, 2), ("diagonal", 2, 128, 16), ("sinkhorn", 4, 1024, 1),
    ("sinkhorn", 4, 2048, 2), ("sinkhorn", 2, 128, 16), ("sinkhorn", 1, 512, 3)])  # fmt: skip
def test_decode_site_kernel_matches_hyper_py(h_res, n, dim, rows):
    """hc_site.cu's one-kernel site (a cluster of up to 8 blocks a row, or one block for narrow
    streams) gives hyper.py's read of broadcast streams, and a write followed by the next site's read,
    by the merge, or alone: the gates to fp32 rounding, the streams and x within bf16 rounding.
    Hyperloop's sites (diagonal H_res, a loop embedding) and mHC's (Sinkhorn H_res, whose read gives
    the logits and whose write runs the iterations)."""
    from hyperloop.model import decode_site

    hyperloop = h_res == "diagonal"
    sites = [HyperConnection(dim, n, h_res, wraps_residual=hyperloop, loop_embedding=hyperloop) for _ in range(2)]
    with torch.no_grad():
        for hc in sites:  # input-dependent gates and a non-zero embedding
            hc.alpha.fill_(0.5)
            if hyperloop:
                hc.embedding.normal_()
    sites = [hc.to("cuda", torch.bfloat16) for hc in sites]
    if not decode_site.qualifies(sites[0]):
        pytest.skip("the site kernel needs sm_90 and the CUDA decode kernels built")
    first, second = sites

    def h_res_of(gates):  # the kernel's read gives a Sinkhorn site's logits
        return gates.h_res if hyperloop else sinkhorn(gates.h_res.unflatten(-1, (n, n)), first.sinkhorn_iters)

    second.decode_kernel = True  # first's write then does second's read too
    y = expand_streams(torch.randn(rows, 1, dim, device="cuda", dtype=torch.bfloat16), n)
    out = [torch.randn(rows, 1, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        x, gates = decode_site.read(first, y)
        want_x, want = first._read(y, torch.bfloat16)
        assert _rel(x, want_x) < 1e-2
        assert _rel(gates.h_post, want[1].flatten(0, 1)) < 1e-4 and _rel(h_res_of(gates), want[2].flatten(0, 1)) < 1e-4
        y_new, (x2, gates2) = decode_site.write(first, y, out[0], gates, None, second)
        want_y = first._write(y, out[0], want)
        assert _rel(y_new, want_y) < 1e-2  # the reference adds e to out in bf16
        want_x2, want2 = second._read(y_new, torch.bfloat16)
        assert _rel(x2, want_x2) < 1e-2 and _rel(h_res_of(gates2), want2[2].flatten(0, 1)) < 1e-4
        assert _rel(decode_site.write(first, y, out[0], gates, None, None), want_y) < 1e-2
        merged = decode_site.write(second, y_new, out[1], gates2, torch.bfloat16, None)
        assert _rel(merged, second._write(y_new, out[1], want2).float().mean(-2)) < 1e-2


@pytest.mark.parametrize("n, dim, out_features", [(4, 1024, 1024), (4, 256, 768), (2, 512, 512), (1, 256, 256)])
def test_mhc_site_folded_into_the_gemvs_matches_hyper_py(n, dim, out_features):
    """An mHC site folded into the int4 GEMVs around it (hc_site.cu: SiteFold): the GEMV closing a
    branch writes y' = H_res y + h_post out (H_res from the read's logits, y a broadcast as after the
    embedding) and leaves its blocks' sums of the next site's W y' and |y'|^2; the GEMV opening the
    next branch turns them into that site's gates and reads x = sum_j h_pre_j y'_j through its RMSNorm.
    Against hyper.py's write and read around the same GEMVs (small and split grids)."""
    from hyperloop.model import decode_site
    from hyperloop.model.hyper import RMS_EPS
    from hyperloop.quant import gemv
    from hyperloop.quant.grid import rtn
    from hyperloop.quant.linear import QuantLinear

    sites = [HyperConnection(dim, n, "sinkhorn") for _ in range(2)]
    with torch.no_grad():
        for hc in sites:
            hc.alpha.fill_(0.5)
    first, second = [hc.to("cuda", torch.bfloat16) for hc in sites]
    if not (decode_site.qualifies(first) and gemv.available(dim)):
        pytest.skip("the site kernel needs sm_90 and the CUDA decode kernels built")

    def operands(in_features: int, out: int) -> tuple:
        linear = QuantLinear.from_quantized(rtn(torch.randn(out, in_features) * 0.05, bits=4, group_size=128))
        words, grid, split, _ = linear.cuda().kernel_operands("gemv:test", torch.device("cuda"))
        return words, grid, 128, split

    closing, opening = operands(out_features, dim), operands(dim, out_features)
    norm_weight = (1 + 0.2 * torch.randn(dim, device="cuda")).to(torch.bfloat16)
    y = expand_streams(torch.randn(1, 1, dim, device="cuda", dtype=torch.bfloat16), n)
    h = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, gates = decode_site.read(first, y)
        write_site = [y.flatten(0, -3)[0], gates.h_post.reshape(-1), gates.h_res.reshape(-1), second.weight]
        out, y_new, sums = gemv.int4_gemv_sites(h, *closing, None, 0.0, False, [], write_site, RMS_EPS,
                                                first.sinkhorn_iters)  # fmt: skip
        assert torch.equal(out, gemv.int4_gemv(h, *closing))
        want_y = first._write(y, out.view(1, 1, dim), first.coefficients(y))
        assert _rel(y_new.view(want_y.shape), want_y) < 1e-2
        # a set of sums a block of the write, as the fake (torch.compile) sizes them
        assert sums.shape == (2 * n + n * n + 1, gemv.extension().fold_sum_sets(dim, closing[3], y.device.index))

        z, h_post, res = gemv.int4_gemv_sites(y_new, *opening, norm_weight, 1e-5, False, [sums, second.bias,
                                              second.alpha], [], RMS_EPS, second.sinkhorn_iters)  # fmt: skip
        want_x, want_gates = second._read(y_new.view(1, 1, n, dim), torch.bfloat16)
        _, want_post, want_res = want_gates
        logits, h_res = res.view(2, n, n)  # the logits, and H_res from the GEMV's site block
        assert _rel(h_post, want_post.flatten()) < 1e-4
        assert _rel(sinkhorn(logits, second.sinkhorn_iters), want_res.view(n, n)) < 1e-4
        assert _rel(h_res, want_res.view(n, n)) < 1e-4
        assert _rel(z, gemv.int4_gemv(want_x.flatten(), *opening, norm_weight=norm_weight, eps=1e-5)) < 1e-2

        # the write that closes this branch takes that H_res as it is (no iterations of its own)
        write_site = [y_new, h_post, h_res.flatten(), second.weight]
        _, y_last, _ = gemv.int4_gemv_sites(h, *closing, None, 0.0, False, [], write_site, RMS_EPS, 0)
        want_last = second._write(y_new.view(1, 1, n, dim), out.view(1, 1, dim), want_gates)
        assert _rel(y_last.view(want_last.shape), want_last) < 1e-2


@pytest.mark.parametrize("arch", ["hyperloop", "mhc"])
@pytest.mark.parametrize("batch, int4", [(3, False), (1, True)])
def test_decoding_with_the_site_kernel_matches_hyper_py(arch, batch, int4):
    """A Hyperloop or mHC decode (prefill, then steps; graphed, and compiled with the fused int4 layers
    at batch 1, where the Decoder turns the kernel on and mHC's sites fold into the GEMVs) gives the
    same logits as hyper.py's sites in an uncompiled step (compiling 32 Sinkhorn sites takes minutes)."""
    from hyperloop.infer.bench import build_model
    from hyperloop.infer.decoder import Decoder
    from hyperloop.model import decode_site

    cfg = get_preset(f"{arch}-xs").replace(vocab_size=512, max_seq_len=256, ffn_dim=768)  # int4: groups of 128
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, int4=int4)
    if not decode_site.qualifies(model.hc[0]):
        pytest.skip("the site kernel needs sm_90 and the CUDA decode kernels built")
    with torch.no_grad():
        for hc in model.hc:
            hc.alpha.fill_(0.5)
    prompts = [torch.randint(1, cfg.vocab_size, (n,)).tolist() for n in (5, 17, 9)[:batch]]
    fed = torch.randint(1, cfg.vocab_size, (6, batch), device="cuda")
    outputs = []
    for kernel in (False, True):
        decoder = Decoder(model, batch, 40, compile=int4 and kernel)
        assert all(hc.decode_kernel for hc in model.hc)
        fused = decoder.cache.fused_block
        assert fused is None or fused.fold_sites == (arch == "mhc")  # mHC's sites fold into the int4 GEMVs
        for hc in model.hc:
            hc.decode_kernel = kernel
        if fused is not None:
            fused.fold_sites = fused.fold_sites and kernel
        outputs.append(torch.stack([decoder.prefill(prompts).float()] + [decoder.step(t)[0].float() for t in fed]))
    assert _rel(outputs[1], outputs[0]) < 2e-2


@pytest.mark.parametrize("exits", ["all", "some", "none"])
def test_graphed_early_exit_matches_eager(exits):
    """Early exit recorded as one CUDA graph per loop, with the host check between replays, gives the
    eager early-exit step's logits and loop counts."""
    from hyperloop.infer.bench import build_model
    from hyperloop.infer.decoder import Decoder

    cfg = get_preset("hyperloop-xs").replace(vocab_size=64, max_seq_len=128)  # 64 tokens: probes near 1/64
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, int4=False)
    prompts = torch.randint(1, cfg.vocab_size, (3, 8)).tolist()
    fed = torch.randint(1, cfg.vocab_size, (12, 3), device="cuda")

    def run(threshold: float, graphed: bool):
        decoder = Decoder(model, 3, 24, exit_threshold=threshold, cuda_graph=graphed)
        assert decoder.cuda_graph == graphed
        decoder.prefill(prompts)
        return [decoder.step(tokens) for tokens in fed]

    def spread(steps) -> bool:
        loops = torch.stack([used for _, used in steps])
        return bool(loops.min() < loops.max())

    if exits == "some":  # the first threshold that splits the rows (random weights: confidences ~0.02-0.04)
        threshold = next(t for t in torch.arange(0.02, 0.06, 0.0025).tolist() if spread(run(t, False)))
    else:
        threshold = {"all": 1e-9, "none": 1.01}[exits]
    want, got = run(threshold, False), run(threshold, True)
    for (want_logits, want_loops), (got_logits, got_loops) in zip(want, got, strict=True):
        assert torch.equal(got_loops, want_loops)
        assert _rel(got_logits, want_logits) < 1e-2


def test_a_graph_the_collector_frees_during_a_capture_does_not_break_it():
    """An earlier decoder, dropped, keeps its CUDA graph in a reference cycle until Python's collector
    frees it; freed in the middle of the next decoder's capture, it made that capture fail
    (pytorch/pytorch#161037). The decoder collects before recording and pauses the collector while
    it records. Here a hook plays the automatic collector: mid-capture, it collects if it may."""
    from hyperloop.infer.bench import build_model
    from hyperloop.infer.decoder import Decoder

    cfg = get_preset("transformer-xs").replace(vocab_size=512, max_seq_len=128)
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, int4=False)
    prompts = torch.randint(1, cfg.vocab_size, (2, 8)).tolist()
    fed = torch.randint(1, cfg.vocab_size, (3, 2), device="cuda")

    def collect_mid_capture(module, args):
        if torch.cuda.is_current_stream_capturing() and gc.isenabled():
            gc.collect()

    hook = model.lm_head.register_forward_pre_hook(collect_mid_capture)
    outputs = []
    try:
        for _ in range(2):  # the second capture meets the first decoder's graph, dead in its cycle
            decoder = Decoder(model, 2, 16)
            decoder.prefill(prompts)
            outputs.append(torch.stack([decoder.step(tokens)[0] for tokens in fed]))
            del decoder
    finally:
        hook.remove()
    assert _rel(outputs[1], outputs[0]) < 1e-3
