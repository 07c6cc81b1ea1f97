"""INT4 quantization against its definitions: bit packing, the RTN grid, GPTQ versus a plain
column-by-column reference, the loop-aware Hessian, quantized models and checkpoints, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hyperloop.checkpoint import load_model, save_model
from hyperloop.cli import main
from hyperloop.config import ModelConfig
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM
from hyperloop.quant.gptq import Hessian, gptq
from hyperloop.quant.grid import fit_grid, quantize, rtn
from hyperloop.quant.linear import QuantLinear, pack_rows, tinygemm_scales_and_zeros, unpack_rows
from hyperloop.quant.quantize import collect_hessian, quantize_gptq, quantize_rtn, target_names

# A small Hyperloop: begin 1 -> middle 1 x3 -> end 1, two streams; ffn 64 so group size 32 divides it.
TINY = {
    "vocab_size": 64,
    "dim": 32,
    "n_heads": 2,
    "ffn_dim": 64,
    "max_seq_len": 32,
    "begin_layers": 1,
    "middle_layers": 1,
    "num_loops": 3,
    "end_layers": 1,
    "hc_placement": "span",
    "n_streams": 2,
}


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids oversubscribing a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(n: int, dim: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs living near a low-dimensional subspace, with very unequal column scales: the case
    where pushing rounding errors onto correlated columns (GPTQ) beats rounding each weight alone."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g)
    x = low_rank + 0.05 * torch.randn(n, dim, generator=g)
    return x * torch.rand(dim, generator=g).mul(3).exp()


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1], "cpu")
    h.add(x)
    return h.matrix()


# ------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip_is_exact_and_lsb_first(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 24), generator=g, dtype=torch.uint8)
    words = pack_rows(codes, bits)
    per_word = 32 // bits
    assert words.dtype == torch.int32 and words.shape == (64 // per_word, 24)
    assert torch.equal(unpack_rows(words, bits), codes)
    # The layout from its definition: word r of column c holds rows r*P + j at bits j*bits (LSB first).
    for r, c in [(0, 0), (1, 5), (64 // per_word - 1, 23)]:
        expected = sum(int(codes[r * per_word + j, c]) << (bits * j) for j in range(per_word))
        assert int(words[r, c]) & 0xFFFFFFFF == expected


def test_quantlinear_stores_what_it_was_given():
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    q = gptq(weight, hessian_of(correlated_inputs(256, 64)), bits=4, group_size=32, act_order=True).weight
    layer = QuantLinear.from_quantized(q)
    back = layer.unpacked()
    for field in ("codes", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(q, field).to(getattr(back, field).dtype))
    assert torch.equal(back.scales, q.scales)  # scales are fp16-exact, so storing them as fp16 is lossless
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, q.dequantize()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ RTN grid
def test_rtn_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=g) * torch.rand(16, 1, generator=g)
    weight[0, :32] = 0.0  # an all-zero group
    weight[1, 32:64] = weight[1, 32:64].abs() + 0.1  # a group without negative values (0 joins its range)
    q = rtn(weight, bits=4, group_size=32)
    step = q.scales[q.g_idx.long()].T  # (out, in): each weight's own step
    assert int(q.codes.max()) <= 15 and int(q.zeros.max()) <= 15
    assert torch.all((q.dequantize() - weight).abs() <= 0.5 * step * (1 + 1e-6))
    assert torch.all(q.dequantize()[0, :32] == 0)
    # min-max per group: the grid starts at the group's minimum (with 0 included), up to rounding of z
    lo = weight.reshape(16, 4, 32).amin(-1).clamp(max=0.0)
    grid_lo = -q.zeros.T.float() * q.scales.T
    assert torch.all((grid_lo - lo)[1:].abs() <= q.scales.T[1:] / 2 + 1e-6)  # row 0 has the all-zero group


# ------------------------------------------------------------------------------------ GPTQ
def plain_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float
) -> torch.Tensor:
    """GPTQ as the paper derives it: quantize column i, push its error onto the later columns with the
    current inverse Hessian, then eliminate i from that inverse (the OBS update). fp64, one column at a
    time, no Cholesky, no blocks. The grid (fit_grid) is checked on its own in the RTN test."""
    W, H = weight.double().clone(), hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    out = torch.zeros_like(W)
    for i in range(W.shape[1]):
        if i % group_size == 0:
            scale, zero = fit_grid(W[:, i : i + group_size], bits)
            scale, zero = scale.double(), zero.double()
        out[:, i] = (scale * (quantize(W[:, i : i + 1], scale, zero, bits).double() - zero))[:, 0]
        W[:, i + 1 :] -= ((W[:, i] - out[:, i]) / Hinv[i, i])[:, None] * Hinv[i, i + 1 :][None, :]
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return out


def test_gptq_matches_plain_reference():
    x = correlated_inputs(512, 96)
    x[:, 7] = 0.0  # a dead input column
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    H = hessian_of(x)
    # block 32 < 96 columns: exercises the lazy block updates and groups fitted across blocks
    ours = gptq(weight, H, bits=4, group_size=32, block_size=32).weight.dequantize().double()
    ref = plain_gptq(weight, H, bits=4, group_size=32, damp=0.01)
    same = (ours - ref).abs() < 1e-6
    assert same.float().mean() > 0.99  # fp32 vs fp64 may flip a rounding tie or two
    assert torch.all(ours[:, 7] == 0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_beats_rtn_on_correlated_inputs(act_order):
    x = correlated_inputs(1024, 128)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    result = gptq(weight, hessian_of(x), bits=4, group_size=32, act_order=act_order)
    err_gptq = (x @ weight.T - x @ result.weight.dequantize().T).norm()
    err_rtn = (x @ weight.T - x @ rtn(weight, 4, 32).dequantize().T).norm()
    assert err_gptq < 0.7 * err_rtn
    assert result.error == pytest.approx(float(err_gptq**2 / (x @ weight.T).norm() ** 2), rel=1e-3)
    if act_order:  # groups follow the activation order, so g_idx is a permutation of the plain one
        assert torch.equal(result.weight.g_idx.sort().values, torch.arange(128, dtype=torch.int32) // 32)


# ------------------------------------------------------------------------------------ loop-aware Hessian
def inputs_per_call(model: HyperloopLM, name: str, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every input the linear `name` receives in one full forward, by a plain forward hook."""
    calls: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: calls.append(args[0].clone())
    )
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return calls


def test_loop_aware_hessian_is_the_sum_over_loops():
    torch.manual_seed(0)
    model = HyperloopLM(ModelConfig(**TINY)).eval()
    tokens = torch.randint(0, 64, (4, 16))
    middle = "layers.1.mlp.w_down"
    calls = inputs_per_call(model, middle, tokens)
    assert len(calls) == 3  # one input per loop
    per_loop = [x.reshape(-1, x.shape[-1]).double().T @ x.reshape(-1, x.shape[-1]).double() for x in calls]

    every = collect_hessian(model, middle, tokens, "all", batch_size=2)
    torch.testing.assert_close(every.xtx.double(), sum(per_loop), rtol=1e-4, atol=1e-4)
    assert every.tokens == 3 * tokens.numel()
    first = collect_hessian(model, middle, tokens, "first", batch_size=2)
    torch.testing.assert_close(first.xtx.double(), per_loop[0], rtol=1e-4, atol=1e-4)
    # the loops really see different inputs, so the choice matters
    assert not torch.allclose(per_loop[0], per_loop[1], rtol=1e-2)
    end = collect_hessian(model, "layers.2.attn.wqkv", tokens, "all", batch_size=4)
    assert end.tokens == tokens.numel()  # begin/end layers run once either way


# ------------------------------------------------------------------------------------ quantized models
def markov_tokens(n: int, length: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Sequences of a sparse random Markov chain (3 successors per token): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(123))
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, length):
        x[:, t] = successors[x[:, t - 1], torch.randint(0, 3, (n,), generator=g)]
    return x


@pytest.fixture(scope="module")
def trained() -> HyperloopLM:
    """TINY trained for 40 AdamW steps on the Markov chain (its entropy floor is ppl 3)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the autouse `one_thread`
    model = HyperloopLM(ModelConfig(**TINY))
    data = markov_tokens(256, 17)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = data[step % 16 * 16 : step % 16 * 16 + 16]
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def perplexity(model: HyperloopLM, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(tokens[:, :-1], tokens[:, 1:]).item())


def test_quantized_model_stays_close(trained):
    test = markov_tokens(32, 17, seed=1)
    calib = markov_tokens(16, 16, seed=2)
    float_ppl = perplexity(trained, test)
    assert float_ppl < 20  # it learned something (uniform would be 64)
    with torch.no_grad():
        float_logits = trained(test[:, :-1])
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(trained)
        if method == "rtn":
            quantize_rtn(model, bits=4, group_size=32)
        else:
            reports = quantize_gptq(model, calib, bits=4, group_size=32, batch_size=16, progress=False)
            assert [r.name for r in reports] == target_names(model)
        assert all(isinstance(model.get_submodule(n), QuantLinear) for n in target_names(model))
        with torch.no_grad():
            logits = model(test[:, :-1])
        assert (logits - float_logits).norm() / float_logits.norm() < 0.1
        assert perplexity(model, test) == pytest.approx(float_ppl, rel=0.03)


def test_gptq_reports_lower_layer_error_than_rtn(trained):
    model = copy.deepcopy(trained)
    reports = quantize_gptq(
        model, markov_tokens(16, 16, seed=2), bits=4, group_size=32, batch_size=16, progress=False
    )
    assert sum(r.error for r in reports) < sum(r.rtn_error for r in reports)


def test_lm_head_is_quantized_last_on_request(trained):
    """lm_head=True adds the LM head as the last GPTQ stage: the model still runs through its
    QuantLinear (CPU logits path), close to the float model, and GPTQ beats RTN on it."""
    test = markov_tokens(32, 17, seed=1)
    model = copy.deepcopy(trained)
    reports = quantize_gptq(model, markov_tokens(16, 16, seed=2), bits=4, group_size=32, batch_size=16,
                            progress=False, lm_head=True)  # fmt: skip
    assert [r.name for r in reports] == target_names(model) + ["lm_head"]
    assert isinstance(model.lm_head, QuantLinear)
    assert reports[-1].error < reports[-1].rtn_error
    with torch.no_grad():
        logits, float_logits = model(test[:, :-1]), trained(test[:, :-1])
    assert (logits - float_logits).norm() / float_logits.norm() < 0.1
    assert perplexity(model, test) == pytest.approx(perplexity(trained, test), rel=0.05)


def test_dtype_casts_keep_the_grid():
    model = HyperloopLM(ModelConfig(**TINY))
    quantize_rtn(model, bits=4, group_size=32)
    before = model.layers[0].attn.wqkv.scales.clone()
    model.to(torch.bfloat16)
    layer = model.layers[0].attn.wqkv
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, before)
    assert model.embed.weight.dtype == torch.bfloat16


@pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch"
)
def test_tinygemm_zero_convention():
    """The CUDA path's scales-and-zeros (float zero, codes centred on 8) checked through the CPU
    build of the same tinygemm kernel: within bf16 tolerance of dequantize-then-matmul."""
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    q = rtn(weight, bits=4, group_size=32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, packed, 32, tinygemm_scales_and_zeros(q.scales, q.zeros)
    )
    ref = x.float() @ q.dequantize().T
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the int4 kernel path needs CUDA")
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_kernel_matches_dequantize_path(act_order):
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(4)) * 0.05
    q = gptq(weight, hessian_of(correlated_inputs(1024, 512)), bits=4, group_size=128, act_order=act_order)
    layer = QuantLinear.from_quantized(q.weight).cuda()
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    fast = layer(x)
    layer.use_kernel = False
    reference = layer(x)
    assert "tinygemm" in layer._operands  # the first call really went through tinygemm
    assert ((fast.float() - reference.float()).norm() / reference.float().norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the int4 GEMV needs CUDA")
@pytest.mark.parametrize(("out_features", "in_features", "group_size", "act_order"), [
    (264, 512, 128, False), (264, 512, 128, True),  # 264 rows: a block's 16 rows do not divide them
    (1024, 2816, 128, False),  # few rows, long rows: K split over 4 warps
    (512, 1024, 32, False), (256, 1024, 256, True),
])  # fmt: skip
def test_cuda_one_row_gemv_matches_dequantize_path(out_features, in_features, group_size, act_order):
    from hyperloop.quant import gemv

    if not gemv.available(in_features):
        pytest.skip("the GEMV did not build here (no CUDA toolkit)")
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(5)) * 0.05
    hessian = hessian_of(correlated_inputs(2 * in_features, in_features))
    q = gptq(weight, hessian, bits=4, group_size=group_size, act_order=act_order)
    layer = QuantLinear.from_quantized(q.weight).cuda()
    x = torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16) * 3
    fast = layer(x)
    assert "gemv" in layer._operands and fast.shape == (1, 1, out_features)
    reference = x.double() @ layer.dequantize(torch.float64).T  # the exact dequantized weight
    assert ((fast.double() - reference).norm() / reference.norm()) < 5e-3


@pytest.mark.parametrize("act_order", [False, True])
def test_gemv_operands_hold_the_dequantized_weight(act_order):
    """gemv.cu's layout, read back the way the kernel reads it (in float64, on the CPU): code k of row
    n in bits 4(k % 8) of words[n, k // 8], and a group's (scale, 1024 + zero) in grid, give the
    stored weight, its columns in the order the layer gathers x."""
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(6)) * 0.05
    q = gptq(weight, hessian_of(correlated_inputs(512, 256)), bits=4, group_size=64, act_order=act_order)
    layer = QuantLinear.from_quantized(q.weight)
    words, grid, split, perm = layer.kernel_operands("gemv", torch.device("cpu"))
    assert split in (1, 2, 4) and (perm is not None) == act_order
    shifts = torch.arange(0, 32, 4)
    codes = ((words.long()[:, :, None] >> shifts) & 0xF).flatten(1).double()  # (N, K)
    group = torch.arange(256) // 64
    scale, zero = grid[:, group, 0].double(), grid[:, group, 1].double() - 1024
    expected = layer.dequantize(torch.float64)
    assert torch.equal(scale * (codes - zero), expected if perm is None else expected[:, perm])


def test_epilogue_row_pairs_are_the_pairs_the_kernel_decodes():
    """gemv.cu's RoPE epilogue decodes pair p as (part, head, i) and writes element i and i + D/2;
    rope_pairs must put exactly those rows of the q|k|v weight at 2p, 2p + 1. The SwiGLU epilogue
    takes pair p as (gate_p, up_p). Both orders are permutations of all the rows."""
    from hyperloop.quant import gemv

    heads, head_dim, half = 3, 8, 4
    rows = gemv.rope_pairs(heads, head_dim)
    assert torch.equal(rows.sort().values, torch.arange(3 * heads * head_dim))
    for pair in range(3 * heads * half):  # the index arithmetic of finish_pair in gemv.cu
        part, head, i = pair // (heads * half), pair % (heads * half) // half, pair % half
        first = (part * heads + head) * head_dim + i
        assert rows[2 * pair].item() == first and rows[2 * pair + 1].item() == first + half
    rows = gemv.swiglu_pairs(5)
    assert rows.view(5, 2).tolist() == [[i, i + 5] for i in range(5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the int4 GEMV needs CUDA")
def test_gemv_prologue_and_epilogues_match_the_plain_operations():
    """The RMSNorm prologue and the residual, SwiGLU and RoPE-plus-cache-write epilogues of gemv.cu
    against the same operations written out in float64 on the dequantized weight."""
    from hyperloop.quant import gemv

    if not gemv.available(256):
        pytest.skip("the GEMV did not build here")
    torch.manual_seed(0)
    in_features, eps, cuda = 256, 1e-5, torch.device("cuda")

    def layer(out_features: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        linear = QuantLinear.from_quantized(rtn(torch.randn(out_features, in_features) * 0.05, bits=4, group_size=64))
        words, grid, split, _ = linear.cuda().kernel_operands("gemv:test", cuda, rows)
        return linear.dequantize(torch.float64), (words, grid, 64, split)

    def close(fast: torch.Tensor, exact: torch.Tensor) -> None:
        assert ((fast.double() - exact).norm() / exact.norm()).item() < 1e-2

    x = torch.randn(in_features, device=cuda, dtype=torch.bfloat16)
    norm_weight = (1 + 0.2 * torch.randn(in_features, device=cuda)).to(torch.bfloat16)
    normed = x.double() * torch.rsqrt(x.double().pow(2).mean() + eps) * norm_weight.double()

    weight, operands = layer(128)
    residual = torch.randn(128, device=cuda, dtype=torch.bfloat16)
    close(gemv.int4_gemv(x, *operands, residual=residual), residual.double() + weight @ x.double())

    weight, operands = layer(2 * 96, gemv.swiglu_pairs(96))
    gate, up = (weight @ normed).split(96)
    close(gemv.int4_gemv(x, *operands, norm_weight=norm_weight, eps=eps, swiglu=True), F.silu(gate) * up)

    heads, head_dim, column, position = 2, 32, 5, 3  # a left-padded row: its position is not its column
    weight, operands = layer(3 * heads * head_dim, gemv.rope_pairs(heads, head_dim))
    k_cache, v_cache = (torch.zeros(1, heads, 16, head_dim, device=cuda, dtype=torch.bfloat16) for _ in range(2))
    table = torch.rand(16, head_dim // 2, device=cuda, dtype=torch.float64) * 6  # angles by position
    angles = table[position]
    q, *site = gemv.int4_gemv_rope_cache(x, *operands, norm_weight, eps, table.cos().float(), table.sin().float(),
                                         torch.tensor([[position]], device=cuda), k_cache, v_cache,
                                         torch.tensor(column, device=cuda), [], 0.0, 0)  # fmt: skip
    assert all(t.numel() == 0 for t in site)  # no site folded in
    q_exact, k_exact, v_exact = (weight @ normed).view(3, heads, head_dim)
    for fast, exact in ((q.view(heads, head_dim), q_exact), (k_cache[0, :, column], k_exact)):
        first, second = exact.chunk(2, dim=-1)  # rotate-half RoPE
        close(fast, torch.cat([first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()], -1))
    close(v_cache[0, :, column], v_exact)
    written = torch.zeros(16, dtype=torch.bool)
    written[column] = True
    assert not k_cache[0, :, ~written].any() and not v_cache[0, :, ~written].any()  # only the token's column


def test_use_kernel_false_wins_over_built_kernel_operands():
    """Once prepare_kernel has built the operands, use_kernel = False still forces the dequantize
    path (benchmarks/int4.py measures the kernel's error against it)."""
    layer = QuantLinear.from_quantized(rtn(torch.randn(64, 128), bits=4, group_size=32))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    layer._operands["tinygemm"] = (x.device, None, None, None)  # as if built for this device
    layer.use_kernel = False
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(x.dtype)))


def test_s_size_linears_take_under_030_of_bf16():
    """Bytes of the packed tensors (exactly what lands in safetensors) for one S-size layer."""
    d, f = 1024, 2816
    shapes = [(3 * d, d), (d, d), (2 * f, d), (d, f)]  # wqkv, wo, w_gate_up, w_down as (out, in)
    packed = sum(
        sum(b.numel() * b.element_size() for b in QuantLinear(i, o, 4, 128).buffers()) for o, i in shapes
    )
    bf16 = sum(o * i * 2 for o, i in shapes)
    assert packed / bf16 <= 0.30


# ------------------------------------------------------------------------------------ checkpoints + CLI
@pytest.fixture(scope="module")
def calib_data(tmp_path_factory):
    """About 15k Llama-2 tokens prepared from the start of the bundled demo corpus."""
    import pyarrow.parquet as pq

    from hyperloop.data import demo_corpus_path, demo_tokenizer_path
    from hyperloop.data.prepare import prepare

    root = tmp_path_factory.mktemp("quant-data")
    texts = pq.read_table(min(demo_corpus_path().glob("*.parquet")), columns=["text"]).slice(0, 40).column(0)
    lines = [json.dumps({"text": str(t)[:1500]}) for t in texts.to_pylist()]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(root / "docs.jsonl")], str(demo_tokenizer_path()), str(root / "data"), val_fraction=0.2,
            workers=1, progress=False)  # fmt: skip
    return root / "data"


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, calib_data):
    """A random TINY model with the Llama-2 vocabulary of the calibration data, saved with its tokenizer."""
    torch.manual_seed(0)
    model = HyperloopLM(ModelConfig(**{**TINY, "vocab_size": 32000}))
    return save_model(tmp_path_factory.mktemp("ckpt") / "float", model, {"step": 7}, calib_data / "tokenizer")


def test_quantize_cli_round_trip(llama_ckpt, calib_data, tmp_path, capsys):
    out = tmp_path / "int4"
    args = [str(llama_ckpt), "--out", str(out), "--group-size", "32", "--calib-data", str(calib_data),
            "--calib-seqs", "4", "--calib-len", "16", "--device", "cpu", "--json"]  # fmt: skip
    assert main(["quantize", *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "gptq" and summary["linear_size_ratio"] < 0.35
    config = json.loads((out / "quant_config.json").read_text())
    assert config["bits"] == 4 and config["loop_hessian"] == "all" and len(config["modules"]) == 12
    assert config["lm_head"] is False  # kept in bf16 unless --lm-head

    loaded = load_model(out, dtype=torch.float32)
    assert loaded.meta["step"] == 7 and loaded.tokenizer_path is not None
    assert isinstance(loaded.model.layers[1].mlp.w_down, QuantLinear)
    reference = load_model(llama_ckpt, dtype=torch.float32).model
    tokens = torch.randint(0, 32000, (2, 12))
    with torch.no_grad():
        ours, float_logits = loaded.model(tokens), reference(tokens)
    assert (ours - float_logits).norm() / float_logits.norm() < 0.1

    # the stored float tensors are bf16, the quantized ones packed
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert state["embed.weight"].dtype == torch.bfloat16
    assert state["layers.0.attn.wqkv.qweight"].dtype == torch.int32

    # --lm-head: the head is packed too, and says so in quant_config.json
    head = tmp_path / "int4-head"
    assert main(["quantize", str(llama_ckpt), "--out", str(head), "--method", "rtn", "--group-size", "32",
                 "--lm-head", "--device", "cpu"]) == 0  # fmt: skip
    config = json.loads((head / "quant_config.json").read_text())
    assert config["lm_head"] is True and config["modules"][-1] == "lm_head"
    assert load_file(str(head / "model.safetensors"))["lm_head.qweight"].dtype == torch.int32
    with torch.no_grad():
        head_logits = load_model(head, dtype=torch.float32).model(tokens)
    assert (head_logits - float_logits).norm() / float_logits.norm() < 0.1

    # a quantized checkpoint cannot be quantized again
    again = ["quantize", str(out), "--out", str(tmp_path / "again"), "--method", "rtn", "--group-size", "32"]
    assert main(again) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [(["--method", "rtn", "--group-size", "48"], "group size 48 does not divide the input dimension"),
     (["--method", "rtn", "--bits", "3", "--group-size", "32"], "--bits 3 is not supported"),
     (["--group-size", "32"], "GPTQ needs calibration data"),
     (["--group-size", "32", "--calib-data", "/nonexistent"], "/nonexistent does not exist")],
)  # fmt: skip
def test_bad_input_is_one_line(llama_ckpt, tmp_path, capsys, flags, message):
    assert main(["quantize", str(llama_ckpt), "--out", str(tmp_path / "q"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_library_errors():
    model = HyperloopLM(ModelConfig(**TINY))
    with pytest.raises(HyperloopError, match="does not divide"):
        quantize_rtn(model, bits=4, group_size=48)
    quantize_rtn(model, bits=4, group_size=32)
    with pytest.raises(HyperloopError, match="already quantized"):
        quantize_rtn(model, bits=4, group_size=32)


def test_gemv_build_can_be_declined_and_a_failed_build_falls_back(monkeypatch):
    """HYPERLOOP_INT4_GEMV=0 skips the build; a build that raises gives one warning and None (the
    layers then keep tinygemm), not an error in the middle of decoding."""
    from torch.utils import cpp_extension

    from hyperloop.quant import gemv

    builds = []

    def failing_build(*args, **kwargs):
        builds.append(args[0])
        raise RuntimeError("nvcc: not usable")

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/a/cuda/toolkit")
    monkeypatch.setattr(cpp_extension, "load_inline", failing_build)
    try:
        gemv.extension.cache_clear()
        monkeypatch.setenv("HYPERLOOP_INT4_GEMV", "0")
        assert not gemv.available(1024) and builds == []
        gemv.extension.cache_clear()
        monkeypatch.delenv("HYPERLOOP_INT4_GEMV")
        with pytest.warns(UserWarning, match="did not build, using tinygemm"):
            assert not gemv.available(1024)
        assert builds == ["hyperloop_decode_kernels"]
    finally:
        gemv.extension.cache_clear()  # the next caller builds (or not) for real
