"""Inference against the model's own full forward and a plain per-token reference: the KV cache
(prefill + decode = full forward, left-padded batches = prompts alone), test-time loop counts, early
exit with copy-forward of skipped loops, sampling, the CLI and its one-line errors."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch
from test_model import ARCHS, randomized, small

from hyperloop.checkpoint import save_model
from hyperloop.cli import main
from hyperloop.config import get_preset
from hyperloop.data import demo_tokenizer_path
from hyperloop.data.tokenizer import load_tokenizer
from hyperloop.errors import HyperloopError
from hyperloop.infer import Decoder, GenerationConfig, Sampling, generate
from hyperloop.infer.decoder import collector_paused, short_fallback_messages
from hyperloop.infer.sampling import filter_logits
from hyperloop.infer.tradeoff import decode_perplexity
from hyperloop.model import HyperloopLM

PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 30, 12], [88]]  # different lengths: a left-padded batch
LOOPED = ["looped", "hyperloop"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: intra-op threads only add synchronisation, which costs 100x when other
    processes share the cores (OpenMP workers spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_for(arch: str, **overrides) -> HyperloopLM:
    """The small randomized model of test_model, with a sharper LM head so that top-token
    probabilities spread over (0, 1) and early exit has decisions to make."""
    model = randomized(small(arch, max_seq_len=32, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


def greedy(model, prompts, n=6, **config) -> tuple[list[list[int]], list[list[int]]]:
    out = generate(model, prompts, GenerationConfig(max_new_tokens=n, **config))
    return out.tokens, out.loops_used


# ------------------------------------------------------------------------------------- KV cache
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_then_decode_equals_full_forward(arch, device):
    """Every next-token logit of a left-padded batch equals the full forward of that row alone."""
    model = model_for(arch).to(device)
    g = torch.Generator().manual_seed(2)
    rows = [p + torch.randint(0, 97, (6,), generator=g).tolist() for p in PROMPTS]
    decoder = Decoder(model, len(rows), max(len(p) for p in PROMPTS) + 6, cuda_graph=False)
    got = [decoder.prefill(PROMPTS)]
    for t in range(5):
        tokens = torch.tensor([row[len(p) + t] for row, p in zip(rows, PROMPTS)], device=device)
        got.append(decoder.step(tokens)[0])
    tolerance = 1e-5 if device == "cpu" else 1e-4  # CUDA: SDPA kernels differ between the two paths
    with torch.no_grad():
        for b, (row, prompt) in enumerate(zip(rows, PROMPTS)):
            full = model(torch.tensor(row, device=device)[None])[0]
            want = full[len(prompt) - 1 : len(prompt) + 5]
            torch.testing.assert_close(torch.stack([g[b] for g in got]), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_same_with_and_without_cache_and_batched_or_alone(arch):
    model = model_for(arch)
    cached, _ = greedy(model, PROMPTS)
    recomputed, _ = greedy(model, PROMPTS, use_cache=False)
    alone = [greedy(model, [p])[0][0] for p in PROMPTS]
    assert cached == recomputed == alone
    assert all(len(row) == 6 for row in cached)


@pytest.mark.parametrize("arch", LOOPED)
def test_test_time_loops(arch):
    """--loops K equals the default; K' = 1 and K' = 5 (past the trained 3) are exact too: the cache
    holds one slot per unrolled layer, whatever the count."""
    model = model_for(arch)
    assert greedy(model, PROMPTS, num_loops=3) == greedy(model, PROMPTS)
    for loops in (1, 5):
        tokens, used = greedy(model, PROMPTS, num_loops=loops)
        assert tokens == greedy(model, PROMPTS, num_loops=loops, use_cache=False)[0]
        assert {n for row in used for n in row} == {loops}
    assert greedy(model, PROMPTS, num_loops=1)[0] != greedy(model, PROMPTS)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_step_equals_eager_step(compile):
    """The captured (and optionally compiled) decode step replays the eager one, step after step."""
    model = model_for("hyperloop").cuda()
    eager = Decoder(model, len(PROMPTS), 16, cuda_graph=False)
    graph = Decoder(model, len(PROMPTS), 16, compile=compile)
    a, b = eager.prefill(PROMPTS), graph.prefill(PROMPTS)
    for _ in range(6):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        tokens = a.argmax(dim=-1)
        a, b = eager.step(tokens)[0], graph.step(tokens)[0]
    assert graph.cuda_graph and graph._graph is not None


def test_recording_pauses_the_collector_and_restores_it():
    """A CUDA graph is recorded inside collector_paused (tests/test_gpu.py has the failure it prevents):
    dead reference cycles are collected on entry, the collector is off inside, and afterwards it is
    as it was before, enabled or not, also when the recording raises."""

    class Node:
        pass

    was_enabled = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            node = Node()
            node.me, dead = node, weakref.ref(node)
            del node
            with collector_paused():
                assert dead() is None and not gc.isenabled()
            assert gc.isenabled() == enabled
            with pytest.raises(RuntimeError), collector_paused():
                raise RuntimeError("the recording failed")
            assert gc.isenabled() == enabled
    finally:
        (gc.enable if was_enabled else gc.disable)()


def test_compiled_decoders_of_many_shapes_run_in_one_process(monkeypatch):
    """Each compiled decoder compiles the same step function for its own (batch, cache length), and
    dynamo caps the versions of a function (8 by default, fatal under fullgraph), which a process
    serving many request shapes would pass. With the cap at 1, decoders of three shapes still run and
    match uncompiled ones; cache lengths are rounded up to 256 columns (at most the context), so
    requests of similar lengths share a version. Dynamo's eager backend: the cap is dynamo's."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, **kw, backend="eager"))
    torch._dynamo.reset()
    model = randomized(small("transformer", max_seq_len=300)).eval()
    # dynamo's own patch: monkeypatch's undo would delete the config entry, breaking later compiles
    with torch._dynamo.config.patch(recompile_limit=1):
        for batch, max_len, cache_len in [(1, 16, 256), (2, 16, 256), (1, 280, 300)]:
            compiled, plain = Decoder(model, batch, max_len, compile=True), Decoder(model, batch, max_len)
            assert compiled.cache.max_len == cache_len and plain.cache.max_len == max_len
            prompts = PROMPTS[:batch]
            torch.testing.assert_close(compiled.prefill(prompts), plain.prefill(prompts))
            tokens = torch.tensor([3] * batch)
            torch.testing.assert_close(compiled.step(tokens)[0], plain.step(tokens)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("short", [False, True])
def test_compiling_a_chain_of_custom_ops_prints_no_ir(monkeypatch, short):
    """torch 2.11's inductor formats a message for each custom op it first meets, printing the op's
    arguments' IR recursively, whether or not the message is logged. That is exponential in the depth
    at which the op first appears: a folded mHC decode step did not finish compiling. This test
    emulates it on CPU. Compiled inside short_fallback_messages(), an op first met at the end of a
    chain prints no IR node. Outside it (the control), it does."""
    import torch._inductor.graph as inductor_graph
    import torch._inductor.ir as inductor_ir

    monkeypatch.setattr(inductor_graph, "LazyString", lambda fn, *args: fn(*args))  # torch 2.11: eager
    printed = []
    extern_str = inductor_ir.ExternKernel.__str__
    monkeypatch.setattr(inductor_ir.ExternKernel, "__str__", lambda node: printed.append(1) or extern_str(node))
    last = LAST_OPS[short]

    def chain(x):
        a, b = CHAIN_LINK(x, [])
        for _ in range(3):
            a, b = CHAIN_LINK(a, [b])  # each link takes the one before's outputs, as a folded site does
        return last(a, [b])[0]

    x = torch.randn(8)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), (short_fallback_messages() if short else nullcontext()):
        torch.testing.assert_close(torch.compile(chain, fullgraph=True)(x), chain(x))
    assert (len(printed) == 0) == short


def _chain_op(name):
    @torch.library.custom_op(f"hyperloop_test::{name}", mutates_args=())
    def op(x: torch.Tensor, extra: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return x + sum(t.sum() for t in extra), 2 * x

    op.register_fake(lambda x, extra: (torch.empty_like(x), torch.empty_like(x)))
    return op


# inductor makes an op's lowering once, when it first meets it: each case's last op is its own
CHAIN_LINK, LAST_OPS = _chain_op("link"), {False: _chain_op("last_control"), True: _chain_op("last")}


# ----------------------------------------------------------------------------------- early exit
def reference_exit_greedy(model, prompt, new_tokens, threshold, loops, confidences=None):
    """Greedy decoding with per-token early exit, written from the definitions: one token at a time,
    a list of keys/values per slot, attention by hand. After each loop but the last a generated token
    reads its merged stream through the end block and head; once the top probability reaches the
    threshold it stops, and each later loop's slot gets the K/V it had at its exit loop. Prompts run
    every loop. Returns (tokens, loops used per token)."""
    cfg = model.cfg
    plan = model.plan(loops)
    b, m = cfg.begin_layers, cfg.middle_layers
    begin, end = plan[:b], plan[b + loops * m :]
    middle = [plan[b + loop * m : b + (loop + 1) * m] for loop in range(loops)]
    keys, values = defaultdict(list), defaultdict(list)
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-2 * torch.arange(half, dtype=torch.float64) / cfg.head_dim)

    def rope(x, pos):  # x: (H, D) of one token
        cos, sin = (pos * inv_freq).cos().float(), (pos * inv_freq).sin().float()
        return torch.cat(
            [x[:, :half] * cos - x[:, half:] * sin, x[:, half:] * cos + x[:, :half] * sin], dim=-1
        )

    def layer(step, x, pos):  # x: (C,) of one token at position pos
        block = model.layers[step.layer]
        q, k, v = block.attn.project("wqkv", block.attn_norm(x), step.loop).view(3, cfg.n_heads, cfg.head_dim)
        keys[step.index].append(rope(k, pos))
        values[step.index].append(v)
        K, V = torch.stack(keys[step.index], dim=1), torch.stack(values[step.index], dim=1)  # (H, S, D)
        weights = torch.softmax(
            (K @ rope(q, pos).unsqueeze(-1)).squeeze(-1) / math.sqrt(cfg.head_dim), dim=-1
        )
        x = x + block.attn.project("wo", (weights.unsqueeze(-1) * V).sum(dim=1).reshape(-1), step.loop)
        return x + block.mlp(block.mlp_norm(x), step.loop)

    def run_end(x, pos):
        for step in end:
            x = layer(step, x, pos)
        return model.logits(x)

    def token(tok, pos, may_exit):
        x = model.embed.weight[tok]
        for step in begin:
            x = layer(step, x, pos)
        streams = x.repeat(cfg.n_streams, 1)  # Hyperloop: n copies
        for loop in range(loops):
            if cfg.hc_placement == "span":
                hc = model.hc[min(loop, len(model.hc) - 1)]
                h, coeffs = hc.read(streams)
                for step in middle[loop]:
                    h = layer(step, h, pos)
                streams = hc.write(streams, h, coeffs)
                x = streams.mean(dim=0)
            else:
                for step in middle[loop]:
                    x = layer(step, x, pos)
            if may_exit and loop < loops - 1:
                logits = run_end(x, pos)
                top = torch.softmax(logits, dim=-1).max().item()
                if confidences is not None:
                    confidences.append(top)
                if top >= threshold:
                    for later in middle[loop + 1 :]:
                        for src, dst in zip(middle[loop], later):
                            keys[dst.index].append(keys[src.index][-1])
                            values[dst.index].append(values[src.index][-1])
                    return logits, loop + 1
                for step in end:  # not exiting: the final pass writes the end block's K/V
                    keys[step.index].pop(), values[step.index].pop()
        return run_end(x, pos), loops

    with torch.no_grad():
        for pos, tok in enumerate(prompt):
            logits, used = token(tok, pos, may_exit=False)
        out, loops_used = [], []
        for i in range(new_tokens):
            out.append(int(logits.argmax()))
            loops_used.append(used)
            if i < new_tokens - 1:
                logits, used = token(out[-1], len(prompt) + i, may_exit=True)
    return out, loops_used


@pytest.mark.parametrize("arch", LOOPED)
def test_early_exit_matches_reference_and_batching(arch):
    model = model_for(arch)
    seen: list[float] = []
    for prompt in PROMPTS:
        reference_exit_greedy(model, prompt, 8, math.inf, 3, confidences=seen)
    threshold = sorted(seen)[len(seen) // 2]  # the median probe confidence: some tokens exit, some not
    want = [reference_exit_greedy(model, p, 8, threshold, 3) for p in PROMPTS]
    tokens, used = greedy(model, PROMPTS, n=8, exit_threshold=threshold)
    assert tokens == [w[0] for w in want]
    assert used == [w[1] for w in want]
    decode_loops = {n for row in used for n in row[1:]}
    assert len(decode_loops) >= 2, f"threshold {threshold} should give mixed exits, got {decode_loops}"
    alone = [greedy(model, [p], n=8, exit_threshold=threshold) for p in PROMPTS]
    assert (tokens, used) == ([a[0][0] for a in alone], [a[1][0] for a in alone])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exit_threshold_above_one_never_exits(arch):
    model = model_for(arch)
    tokens, used = greedy(model, PROMPTS, exit_threshold=1.01)
    assert tokens == greedy(model, PROMPTS)[0]
    assert {n for row in used for n in row} == {model.cfg.num_loops}


def test_exit_everywhere_uses_one_loop():
    model = model_for("hyperloop")
    tokens, used = greedy(model, PROMPTS, exit_threshold=1e-9)
    assert [row[1:] for row in used] == [[1] * 5] * len(PROMPTS)
    assert tokens == [reference_exit_greedy(model, p, 6, 1e-9, 3)[0] for p in PROMPTS]


def test_decode_perplexity_without_exit_is_the_model_perplexity():
    model = model_for("hyperloop")
    x = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        want = math.exp(model(x, y).item())
    got = decode_perplexity(model, [(x, y)])
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["mean_loops"] == 3 and got["tokens"] == 20
    exited = decode_perplexity(model, [(x, y)], exit_threshold=1e-9)
    assert exited["mean_loops"] == pytest.approx((2 * 3 + 18 * 1) / 20)


# ------------------------------------------------------------------------------------- sampling
def plain_top_p(probs: list[float], p: float) -> set[int]:
    """The nucleus by its definition: the most likely tokens, in order, until their mass reaches p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return kept


def test_top_p_and_top_k_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9):
        kept = filter_logits(logits, Sampling(temperature=1.0, top_p=p)).isfinite()
        for row in range(4):
            want = plain_top_p(logits[row].softmax(-1).tolist(), p)
            assert set(kept[row].nonzero().flatten().tolist()) == want
    kept = filter_logits(logits, Sampling(temperature=0.7, top_k=5)).isfinite()
    assert kept.sum(-1).tolist() == [5] * 4
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = model_for("hyperloop")
    sampled = {"sampling": Sampling(temperature=1.5, top_p=0.95), "seed": 7}
    assert greedy(model, PROMPTS, **sampled) == greedy(model, PROMPTS, **sampled)
    assert greedy(model, PROMPTS, **{**sampled, "seed": 8})[0] != greedy(model, PROMPTS, **sampled)[0]
    assert (
        greedy(model, PROMPTS, sampling=Sampling(temperature=2.0, top_k=1), seed=1)[0]
        == greedy(model, PROMPTS)[0]
    )


def test_stop_tokens_end_each_row():
    model = model_for("looped")
    free, _ = greedy(model, PROMPTS, n=6)
    stop = free[1][2]  # row 1 stops at its third token, other rows wherever it appears
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, stop_tokens=(stop,)))
    for row, reason in zip(range(3), out.finish_reasons):
        cut = free[row].index(stop) if stop in free[row] else 6
        assert out.tokens[row] == free[row][:cut]
        assert reason == ("stop" if stop in free[row] else "length")


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "prompts,config,match",
    [([[]], {}, "empty"),
     ([list(range(30))], {"max_new_tokens": 5}, "exceeds the model's context"),
     ([[1]], {"num_loops": 0}, "--loops must be at least 1"),
     ([[1]], {"exit_threshold": 0.5, "use_cache": False}, "needs the KV cache"),
     ([[1]], {"exit_threshold": 0.0}, "exit-threshold"),
     ([[1]], {"max_new_tokens": 0}, "max-new-tokens")],
)  # fmt: skip
def test_bad_input_is_one_clear_error(prompts, config, match):
    model = model_for("hyperloop")
    with pytest.raises(HyperloopError, match=match):
        generate(model, prompts, GenerationConfig(**config))


def test_mhc_loops_are_fixed_and_sampling_values_checked():
    with pytest.raises(HyperloopError, match="mHC"):
        greedy(model_for("mhc"), PROMPTS, num_loops=2)
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(HyperloopError):
            Sampling(**bad)


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init tiny Hyperloop with the Llama-2 tokenizer (generation needs no training)."""
    torch.manual_seed(0)
    model = HyperloopLM(get_preset("hyperloop-tiny").replace(max_seq_len=64))
    tokenizer_dir = tmp_path_factory.mktemp("tok")
    load_tokenizer(demo_tokenizer_path()).save(tokenizer_dir)
    return save_model(tmp_path_factory.mktemp("ckpt"), model, tokenizer_dir=tokenizer_dir)


def test_cli_generate_json_and_stream_agree(checkpoint, capsys):
    args = [str(checkpoint), "--prompt", "The river", "--max-new-tokens", "6", "--stop-token", "-1"]
    assert main(["generate", *args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) >= {"text", "tokens", "loops_used"} and len(record["tokens"]) == 6
    assert record["loops_used"] == [3] * 6
    assert main(["generate", *args]) == 0
    assert capsys.readouterr().out == "The river" + record["text"] + "\n"
    assert main(["generate", *args, "--loops", "1", "--exit-threshold", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loops_used"] == [1] * 6


@pytest.mark.parametrize(
    "extra,match",
    [(["--prompt", ""], "--prompt is empty"), (["--prompt", "word " * 80], "exceeds the model's context"),
     (["--prompt", "Hi", "--loops", "0"], "--loops must be at least 1")],
)  # fmt: skip
def test_cli_bad_input_one_line(checkpoint, capsys, extra, match):
    assert main(["generate", str(checkpoint), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_bench_decode_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--preset", "hyperloop-tiny", "hf-llama-tiny", "hf-llama-tiny:static",
                 "--batch", "2", "--prompt-len", "4", "--new-tokens", "3", "--json", str(out),
                 "--profile", str(tmp_path / "prof")]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    table = (tmp_path / "prof" / "hyperloop-tiny-b2.txt").read_text()  # ours only: HF rows are not profiled
    assert "decode steps" in table and "2 repeats" in table and "aten::" in table
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["hyperloop-tiny-b2.txt"]
    assert [r["preset"] for r in rows] == ["hyperloop-tiny", "hf-llama-tiny", "hf-llama-tiny:static"]
    fastest_hf = max(rows[1]["decode_tok_s"], rows[2]["decode_tok_s"])
    assert rows[0]["decode_speedup_vs_hf"] == pytest.approx(rows[0]["decode_tok_s"] / fastest_hf)
