"""The model zoo against the spec: a naive reference forward, causality, reductions, init scale,
gradients, parameter accounting and bad-input errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reference import reference_logits

from hyperloop.config import PAPER_PARAMS, PRESETS, ModelConfig, count_params, get_preset
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM, sinkhorn

# A very small plan: d=32, 2 heads, begin 1 -> middle 2 x3 -> end 1, a 97-token vocabulary.
SMALL = dict(vocab_size=97, dim=32, n_heads=2, max_seq_len=16, begin_layers=1, middle_layers=2,
             num_loops=3, end_layers=1)  # fmt: skip
ARCHS = {
    "transformer": dict(begin_layers=0, middle_layers=4, num_loops=1, end_layers=0),
    "mhc": dict(begin_layers=0, middle_layers=4, num_loops=1, end_layers=0, hc_placement="sublayer",
                h_res="sinkhorn"),
    "looped": dict(),
    "hyperloop": dict(hc_placement="span", h_res="diagonal"),
}  # fmt: skip


def small(arch: str = "hyperloop", **overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **ARCHS[arch], **overrides})


def randomized(cfg: ModelConfig, seed: int = 0) -> HyperloopLM:
    """A model whose HC and LoRA parameters are far from their init, so every term matters."""
    torch.manual_seed(seed)
    model = HyperloopLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("hc.") and name.endswith(("alpha", "bias")):
                p.normal_(0.0, 1.0)
            elif name.endswith(("embedding", ".B")):
                p.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "arch,extra",
    [("transformer", {}), ("mhc", {}), ("looped", {}), ("hyperloop", {}),
     ("hyperloop", {"h_res": "sinkhorn"}), ("hyperloop", {"h_res": "identity", "n_streams": 2}),
     ("hyperloop", {"hc_span": 3}), ("looped", {"lora_rank": 3}), ("mhc", {"h_res": "diagonal", "n_streams": 3})],
)  # fmt: skip
def test_matches_naive_reference(arch, extra):
    cfg = small(arch, **extra)
    model = randomized(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens[None])[0]
    ref = reference_logits(cfg, model.state_dict(), tokens)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_causal(arch):
    model = randomized(small(arch)).eval()
    tokens = torch.randint(0, 97, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_hyperloop_with_hc_switched_off_equals_looped():
    """H_pre = 1/n (the mean of equal streams), H_res = 0, H_post = 1, e = 0: each loop is Middle(s)."""
    hyper = randomized(small("hyperloop", n_streams=3))
    with torch.no_grad():
        for hc in hyper.hc:
            hc.alpha.zero_()
            hc.embedding.zero_()
            n = hc.n
            hc.bias[:n] = torch.logit(torch.tensor(1.0 / n, dtype=torch.float64)).item()  # 1/n each: mean
            hc.bias[n : 2 * n] = 0.0  # H_post = 2 sigmoid(0) = 1
            hc.bias[2 * n :] = -40.0  # H_res = sigmoid(-40) = 0
    looped = HyperloopLM(small("looped"))
    looped.load_state_dict({k: v for k, v in hyper.state_dict().items() if not k.startswith("hc.")})
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(hyper(tokens), looped(tokens), atol=1e-5, rtol=1e-5)


def test_looped_with_one_loop_equals_transformer():
    looped = randomized(small("looped", num_loops=1, begin_layers=1, middle_layers=2, end_layers=1))
    transformer = HyperloopLM(small("transformer", middle_layers=4))
    transformer.load_state_dict(looped.state_dict())
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(looped(tokens), transformer(tokens))


def test_one_stream_identity_is_plain_residual():
    """n = 1, H_res = I, H_pre = H_post = 1: y + F(y), i.e. the Transformer's residual."""
    mhc = randomized(small("mhc", n_streams=1, h_res="identity"))
    with torch.no_grad():
        for hc in mhc.hc:
            hc.alpha.zero_()
            hc.bias.copy_(torch.tensor([40.0, 0.0]))  # sigmoid(40) = 1, 2 sigmoid(0) = 1
    transformer = HyperloopLM(small("transformer"))
    transformer.load_state_dict({k: v for k, v in mhc.state_dict().items() if not k.startswith("hc.")})
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(mhc(tokens), transformer(tokens), atol=1e-5, rtol=1e-5)


def test_fresh_mhc_is_its_plain_transformer_when_alpha_is_zero():
    """The init puts mHC on the plain Transformer; only the a_* perturbation separates them."""
    torch.manual_seed(0)
    mhc = HyperloopLM(small("mhc"))
    with torch.no_grad():
        for hc in mhc.hc:
            hc.alpha.zero_()
    transformer = HyperloopLM(small("transformer"))
    transformer.load_state_dict({k: v for k, v in mhc.state_dict().items() if not k.startswith("hc.")})
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(mhc(tokens), transformer(tokens), atol=1e-3, rtol=1e-3)


def test_sinkhorn_is_doubly_stochastic():
    # 20 iterations converge for logits of moderate spread: the init (4 on the diagonal plus the
    # a_res = 0.01 input term) and unit-variance logits. Very peaked logits converge more slowly.
    torch.manual_seed(0)
    for logits in (4 * torch.eye(4) + 0.01 * torch.randn(256, 4, 4), torch.randn(256, 5, 5)):
        p = sinkhorn(logits, 20)
        assert (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-3, rtol=0)
        torch.testing.assert_close(p.sum(-2), torch.ones(p.shape[:-1]), atol=1e-3, rtol=0)
    assert torch.isfinite(sinkhorn(torch.full((3, 3), 1e4), 20)).all()  # log domain: no overflow


@pytest.mark.parametrize("h_res", ["sinkhorn", "diagonal", "identity"])
def test_site_coefficients_of_a_few_rows_equal_those_of_many(h_res):
    """A decode step's few rows take the projection as a multiply-and-sum, a batch's many rows as a
    matmul (hyper.FEW_ROWS): the same H_pre, H_post and H_res for the same streams."""
    from hyperloop.model import hyper

    hc = hyper.HyperConnection(16, 4, h_res)
    torch.nn.init.normal_(hc.weight, std=0.5)  # coefficients that depend on the streams, not only the biases
    torch.nn.init.constant_(hc.alpha, 1.0)
    y = torch.randn(2, hyper.FEW_ROWS, 4, 16)  # 32 rows: the matmul
    many = hc.coefficients(y)
    few = hc.coefficients(y[:1, :3])  # 3 rows
    for got, want in zip(few, many, strict=True):
        if want is None:  # identity H_res
            assert got is None
        else:
            torch.testing.assert_close(got, want[:1, :3], rtol=1e-5, atol=1e-6)


def test_decode_site_kernel_stays_off_on_cpu_and_a_done_read_passes_through():
    """decode_site.enable turns the one-kernel site on only where it can run (CUDA sm_90+, bf16): on
    the CPU the sites stay on hyper.py; and a site handed a read the previous write already did
    (decode_site.Read) returns it as it is."""
    from hyperloop.model import decode_site

    model = randomized(small())
    decode_site.enable(model)
    assert not any(hc.decode_kernel for hc in model.hc)
    done = decode_site.Read(torch.randn(1, 1, 32), decode_site.Gates(torch.rand(1, 4), torch.rand(1, 4)))
    assert model.hc[1].read(torch.randn(1, 1, 4, 32), done) is done


def test_decode_site_kernel_takes_the_stream_widths_its_launch_can_lay_out():
    """decode_site.fits mirrors hc_site.cu's launch (whole warps, at most 256 threads a block, a
    cluster of up to 8): the S and M widths and narrow ones fit; widths it would reject do not."""
    from hyperloop.model.decode_site import fits

    for n, dim in [(4, 1024), (4, 2048), (8, 2048), (1, 1024), (2, 128), (4, 64), (8, 256), (4, 320)]:
        assert fits(n, dim), (n, dim)  # 4 x 320 = 1280: one block of 160 threads
    for n, dim in [(4, 576), (3, 1024), (1, 64), (4, 40), (8, 4096)]:
        assert not fits(n, dim), (n, dim)  # 4 x 576 = 2304: 288 threads, or no cluster of 8 divides it


@pytest.mark.parametrize("h_res", ["sinkhorn", "diagonal", "identity"])
def test_stream_combines_stay_fp32_under_bf16_autocast(h_res):
    """The streams are the residual stream: under bf16 autocast, reading one stream out and keeping
    the streams through H_res must not round them to bf16 (einsum would run as a bf16 matmul)."""
    from hyperloop.model.hyper import HyperConnection

    hc = HyperConnection(16, 4, h_res)
    y = 1.0 + 1e-4 * torch.randn(2, 3, 4, 16)  # bf16 keeps 8 significant bits: it would drop the 1e-4
    one_hot = torch.zeros(2, 3, 4)
    one_hot[..., 1] = 1.0
    keep = {"sinkhorn": torch.eye(4).expand(2, 3, 4, 4), "diagonal": torch.ones(2, 3, 4), "identity": None}[h_res]
    hc.coefficients = lambda _: (one_hot, torch.zeros(2, 3, 4), keep)  # H_pre = e_1, H_post = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.einsum("...n,...nc->...c", one_hot, y)  # what autocast makes of the read's einsum
        x, coeffs = hc.read(y)
        written = hc.write(y, torch.zeros(2, 3, 16), coeffs)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(x, y[..., 1, :], rtol=0, atol=0)
    torch.testing.assert_close(written, y, rtol=0, atol=0)


def test_merge_streams_is_the_mean_with_the_mean_gradient():
    """merge_streams' own backward (a broadcast view of g / n) gives the mean's gradient, in the
    streams' dtype when they are merged in another one."""
    from hyperloop.model.hyper import merge_streams

    y = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(merge_streams, (y,))
    y16 = y.detach().to(torch.bfloat16).requires_grad_()
    merged = merge_streams(y16, torch.float32)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, y16.float().mean(-2))
    merged.square().sum().backward()
    assert y16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y16.grad.float(), (2 * merged / 4).unsqueeze(-2).expand(2, 3, 4, 8), atol=1e-2, rtol=1e-2)


def test_expand_streams_gradient_sums_the_copies_also_when_it_comes_broadcast():
    """expand_streams' backward sums the n streams' gradients: a gradient given as n broadcast copies
    (the fused first site returns it so) gives the same sum as the same values written out."""
    from hyperloop.model.hyper import expand_streams

    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: expand_streams(t, 3), (x,))
    g = torch.randn(2, 5, 1, 8, dtype=torch.float64).expand(2, 5, 3, 8)
    (broadcast,) = torch.autograd.grad(expand_streams(x, 3), x, g)
    (written,) = torch.autograd.grad(expand_streams(x, 3), x, g.contiguous())
    torch.testing.assert_close(broadcast, written)
    torch.testing.assert_close(broadcast, 3 * g[..., 0, :])


def test_site_write_refuses_merge_with_next_site():
    from hyperloop.model.hyper import HyperConnection, expand_streams

    sites = [HyperConnection(8, 2, "diagonal", wraps_residual=True) for _ in range(2)]
    y = expand_streams(torch.randn(1, 3, 8), 2)
    h, coeffs = sites[0].read(y)
    with pytest.raises(ValueError, match="exclude each other"):
        sites[0].write(y, h, coeffs, merge=torch.float32, next_site=sites[1])
    new, ahead = sites[0].write(y, h, coeffs, next_site=sites[1])  # unfused: the streams, no stats
    assert new.shape == y.shape and ahead is None


@pytest.mark.parametrize("arch", ["hyperloop", "mhc"])
def test_bf16_streams_are_stored_in_bf16_and_change_little(arch, monkeypatch):
    """hc_bf16_streams: every site writes bf16 streams; the branches still get the residual's dtype
    (fp32 here); the logits stay close to those of fp32 streams and gradients flow."""
    from hyperloop.model.hyper import HyperConnection, write_result

    torch.manual_seed(0)
    cfg = get_preset(f"{arch}-tiny")
    model = HyperloopLM(cfg)
    fast = HyperloopLM(cfg.replace(hc_bf16_streams=True))
    fast.load_state_dict(model.state_dict())
    seen = {"read": set(), "write": set()}
    read, write = HyperConnection.read, HyperConnection.write

    def spy_read(self, y, ahead=None):
        x, coeffs = read(self, y, ahead)
        seen["read"].add(x.dtype)
        return x, coeffs

    def spy_write(self, y, out, coeffs, merge=None, next_site=None):
        new = write(self, y, out, coeffs)
        seen["write"].add(new.dtype)
        return write_result(new, merge, next_site)

    monkeypatch.setattr(HyperConnection, "read", spy_read)
    monkeypatch.setattr(HyperConnection, "write", spy_write)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    logits = fast(tokens)
    assert seen["write"] == {torch.bfloat16}
    assert seen["read"] == {torch.float32}
    assert logits.dtype == torch.float32
    assert ((logits - model(tokens)).norm() / logits.norm()).item() < 2e-2
    fast(tokens, tokens).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.hc.parameters())


@pytest.mark.parametrize("res_init", [0.1, 0.5, 0.9])
def test_hyperloop_site_maps_s_to_s_plus_a_share_of_delta_at_init(res_init):
    """With equal streams s and the block returning s + delta, a Hyperloop site at init (input-
    dependent part off) writes H_res s + H_post (s + delta) = s + (1 - res_init) delta."""
    from hyperloop.model.hyper import HyperConnection, expand_streams

    hc = HyperConnection(16, 4, "diagonal", wraps_residual=True, res_init=res_init)
    with torch.no_grad():
        hc.alpha.zero_()
    s, delta = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    y = expand_streams(s, 4)
    x, coeffs = hc.read(y)
    torch.testing.assert_close(x, s)
    expected = expand_streams(s + (1 - res_init) * delta, 4)
    torch.testing.assert_close(hc.write(y, x + delta, coeffs), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["hyperloop", "mhc"])
def test_mean_pre_init_keeps_the_streams_interchangeable_and_own_breaks_it(arch):
    """With the input-dependent parts off (a = 0), H_pre = 1/n and streams that start as copies,
    every per-stream bias gets the same gradient at every site: nothing can make the streams
    differ. hc_pre_init='own' computes the same function at init (its H_pre still sums to 1) but
    gives the streams different gradients from the first step."""
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, logits = {}, {}
    for pre_init in ("mean", "own"):
        torch.manual_seed(0)
        model = HyperloopLM(small(arch, hc_pre_init=pre_init))
        with torch.no_grad():
            for hc in model.hc:
                hc.alpha.zero_()
        out = model(tokens)
        out.logsumexp(-1).sum().backward()
        logits[pre_init] = out.detach()
        n = model.cfg.n_streams
        grads[pre_init] = torch.stack([hc.bias.grad[n : 2 * n] for hc in model.hc])  # b_post, one row per site
    torch.testing.assert_close(logits["own"], logits["mean"], rtol=1e-4, atol=1e-5)
    mean_g, own_g = grads["mean"], grads["own"]
    assert own_g.abs().max() > 0
    torch.testing.assert_close(mean_g, mean_g[:, :1].expand_as(mean_g), rtol=1e-4, atol=1e-9)  # all streams alike
    spread = (own_g - own_g.mean(1, keepdim=True)).abs().max(1).values / own_g.abs().max(1).values
    # The last site writes into the mean merge, which uses every stream alike; the others write into
    # a site that reads its own stream most.
    assert (spread[:-1] > 1e-3).all()


def test_activations_stay_well_scaled_through_loops_at_init():
    """At init a Hyperloop loop maps s -> about s + delta (spec 2d); the naive H_res = H_post = 1
    would map it to 2s + delta and blow the stream up by 2^K."""
    cfg = get_preset("hyperloop-tiny").replace(vocab_size=512, num_loops=6)
    torch.manual_seed(0)
    hyper = HyperloopLM(cfg)
    looped = HyperloopLM(cfg.replace(hc_placement="none"))
    looped.load_state_dict({k: v for k, v in hyper.state_dict().items() if not k.startswith("hc.")})
    tokens = torch.randint(0, 512, (2, 64))

    def layer_rms(model):
        outputs: list = []
        with torch.no_grad():
            model(tokens, layer_outputs=outputs)
        return torch.stack([h.pow(2).mean().sqrt() for _, h in outputs])

    embed_rms = hyper.embed(tokens).pow(2).mean().sqrt()
    hyper_rms, looped_rms = layer_rms(hyper), layer_rms(looped)
    assert ((hyper_rms / looped_rms) > 0.5).all() and ((hyper_rms / looped_rms) < 1.05).all()
    assert hyper_rms.max() < 2 * embed_rms
    with torch.no_grad():  # the naive init, for contrast
        for hc in hyper.hc:
            hc.bias[hc.n : 2 * hc.n] = 0.0
            hc.bias[2 * hc.n :] = 40.0
    assert layer_rms(hyper).max() > 30 * embed_rms


@pytest.mark.parametrize("arch,extra", [(a, {}) for a in ARCHS] + [("looped", {"lora_rank": 2})])
def test_every_parameter_gets_a_gradient(arch, extra):
    model = HyperloopLM(small(arch, **extra))
    tokens = torch.randint(0, 97, (2, 12))
    model(tokens, tokens).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not name.endswith(".A"):  # LoRA A gets zero gradient while B is still at its zero init
            assert p.grad.abs().sum() > 0, name


def test_lora_changes_each_loop_differently():
    model = randomized(small("looped", lora_rank=2))
    base = HyperloopLM(small("looped"))
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora." not in k})
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(model(tokens), base(tokens))


def test_test_time_loops():
    model = randomized(small("hyperloop"))
    tokens = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, num_loops=3), model(tokens))
        assert model(tokens, num_loops=5).shape == (1, 8, 97)
        assert not torch.allclose(model(tokens, num_loops=1), model(tokens))
    with pytest.raises(HyperloopError, match="num_loops"):
        model(tokens, num_loops=0)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_table1_param_counts(name):
    got, paper = count_params(get_preset(name))["total"], PAPER_PARAMS[name]
    assert abs(got / paper - 1) < 0.003, (name, got, paper)


@pytest.mark.parametrize(
    "cfg",
    [PRESETS[n] for n in PRESETS if n.endswith("-tiny")]
    + [small("hyperloop", hc_span=1), small("hyperloop", h_res="sinkhorn", n_streams=2),
       small("hyperloop", h_res="identity", loop_embedding=False), small("looped", lora_rank=4),
       small("mhc", h_res="diagonal")],
    ids=lambda c: f"{c.name}:{c.structure()}:{c.h_res}",
)  # fmt: skip
def test_analytic_count_equals_allocated(cfg):
    assert count_params(cfg)["total"] == HyperloopLM(cfg).num_params()


def test_config_json_round_trip(tmp_path):
    cfg = get_preset("hyperloop-xs").replace(n_streams=6, hc_span=2)
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "bad,match",
    [({"n_streams": 0}, "n_streams"), ({"n_heads": 5}, "does not divide"), ({"h_res": "dense"}, "h_res"),
     ({"hc_placement": "everywhere"}, "hc_placement"), ({"num_loops": 0}, "num_loops"),
     ({"hc_span": 2}, "hc_span"), ({"lora_rank": 4, "num_loops": 1}, "lora_rank"), ({"hc_res_init": 1.0}, "hc_res_init")],
)  # fmt: skip
def test_bad_structure_is_one_clear_error(bad, match):
    with pytest.raises(HyperloopError, match=match):
        ModelConfig(**{**SMALL, **bad})


def test_unknown_key_and_preset():
    with pytest.raises(HyperloopError, match="unknown model config key.*n_stream"):
        ModelConfig.from_dict({"n_stream": 4})
    with pytest.raises(HyperloopError, match="unknown preset 'hyperloop-xxl'"):
        get_preset("hyperloop-xxl")


def test_cli_params_json_and_errors():
    out = subprocess.run([sys.executable, "-m", "hyperloop", "params", "hyperloop-s", "--json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert '"preset": "hyperloop-s"' in out.stdout
    bad = subprocess.run([sys.executable, "-m", "hyperloop", "params", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "unknown preset 'nope'" in bad.stderr


def test_chunked_cross_entropy_matches_plain():
    """The CUDA loss path (gradients computed chunk by chunk in the forward) against F.cross_entropy."""
    from hyperloop.model.loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 37))
    targets[0, :5] = -1  # ignored positions
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=-1)
    ours = chunked_cross_entropy(hidden, weight, targets, chunk_rows=10)
    torch.testing.assert_close(ours, ref)
    g_ref = torch.autograd.grad(2.5 * ref, (hidden, weight))
    g_ours = torch.autograd.grad(2.5 * ours, (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
