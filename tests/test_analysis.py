"""The analyses of spec section 8 against plain per-token references, the identity-middle-block
invariants, the real model loss, the files written (PNGs opened) and the errors for bad input."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_model import randomized  # random weights with hyper-connections far from their init
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from hyperloop.analysis import LayerStats, Layout, analyze, loop_similarity
from hyperloop.analysis import stats as stats_module
from hyperloop.analysis.plots import LENS_SIZE, SIMILARITY_SIZE, pixel_size
from hyperloop.checkpoint import save_model
from hyperloop.cli import main
from hyperloop.config import ModelConfig
from hyperloop.data.loader import EvalWindows, TokenData
from hyperloop.data.prepare import prepare
from hyperloop.errors import HyperloopError
from hyperloop.model import HyperloopLM
from hyperloop.model.hyper import write_result

WORDS = [f"w{i}" for i in range(40)]
VOCAB = 2 + len(WORDS)  # <s>, <unk>, the words
SMALL = {"vocab_size": VOCAB, "dim": 32, "n_heads": 2, "max_seq_len": 16}
ARCHS = {
    "transformer": {"middle_layers": 4},
    "mhc": {"middle_layers": 4, "hc_placement": "sublayer", "h_res": "sinkhorn"},
    "looped": {"begin_layers": 1, "middle_layers": 2, "num_loops": 3, "end_layers": 1},
    "hyperloop": {"begin_layers": 1, "middle_layers": 2, "num_loops": 3, "end_layers": 1, "hc_placement": "span"},
}


def config(arch: str, **overrides) -> ModelConfig:
    return ModelConfig(name=arch, **{**SMALL, **ARCHS[arch], **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared folder of random 'sentences' over a 42-token word-level tokenizer."""
    root = tmp_path_factory.mktemp("data")
    tok = Tokenizer(WordLevel({"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}},
                                         unk_token="<unk>"))  # fmt: skip
    tok.pre_tokenizer = WhitespaceSplit()
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    rng = random.Random(0)
    for name, docs in (("train", 5), ("val", 30)):
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(docs):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(10, 60)))
                f.write(json.dumps({"text": text}) + "\n")
    out = root / "prepared"
    prepare([str(root / "train.jsonl")], str(root / "tok"), str(out), val_source=[str(root / "val.jsonl")],
            workers=1, progress=False)  # fmt: skip
    return out


def save(tmp_path, model: HyperloopLM, data) -> str:
    return str(save_model(tmp_path / model.cfg.name, model, tokenizer_dir=data / "tokenizer"))


# ------------------------------------------------------------------------------------ layout
def test_layout_names_blocks_and_loop_pairs():
    layout = Layout(tuple(HyperloopLM(config("hyperloop")).plan()))
    assert layout.names() == ["B1", "L1.1", "L1.2", "L2.1", "L2.2", "L3.1", "L3.2", "E1"]
    assert layout.boundaries() == [1, 3, 5, 7]
    assert layout.loop_ends() == [2, 4, 6]
    assert layout.next_loop_pairs() == {0: [(1, 3), (3, 5)], 1: [(2, 4), (4, 6)]}
    sim = torch.zeros(8, 8, dtype=torch.float64)
    sim[1, 3], sim[3, 5], sim[2, 4], sim[4, 6] = 0.5, 0.7, 0.9, 0.1
    table8 = loop_similarity(sim, layout)
    assert table8["per_middle_layer"] == pytest.approx([0.6, 0.5]) and table8["mean"] == pytest.approx(0.55)
    flat = Layout(tuple(HyperloopLM(config("transformer")).plan()))
    assert not flat.looped and flat.boundaries() == [] and flat.loop_ends() == [] and flat.next_loop_pairs() == {}
    assert loop_similarity(torch.eye(4, dtype=torch.float64), flat) is None


# ------------------------------------------------------------------------- plain reference
def plain_reference(model: HyperloopLM, x: torch.Tensor, y: torch.Tensor):
    """Per token and per layer pair, from the definitions: cosine of two vectors, and softmax of
    RMSNorm(h) * g @ W_head^T written out by hand."""
    outputs: list = []
    model.hidden_states(x, layer_outputs=outputs)
    hs = [h.double().flatten(0, 1) for _, h in outputs]
    targets = y.flatten().tolist()
    D, N = len(hs), len(targets)
    sim = torch.zeros(D, D, dtype=torch.float64)
    ce, ent, acc = [0.0] * D, [0.0] * D, [0.0] * D
    g, W, eps = model.norm.weight.double(), model.lm_head.weight.double(), model.cfg.norm_eps
    for i in range(D):
        for t in range(N):
            a = hs[i][t]
            for j in range(D):
                b = hs[j][t]
                sim[i, j] += torch.dot(a, b) / (a.norm() * b.norm()) / N
            logits = (a / torch.sqrt((a * a).mean() + eps) * g) @ W.T
            z = logits - logits.max()
            p = torch.exp(z) / torch.exp(z).sum()
            ce[i] -= math.log(p[targets[t]]) / N
            ent[i] -= float((p * torch.log(p)).sum()) / N
            acc[i] += float(int(torch.argmax(p)) == targets[t]) / N
    return sim, {"ce": ce, "entropy": ent, "accuracy": acc}


@pytest.mark.parametrize("arch", ["mhc", "hyperloop"])
def test_stats_match_plain_reference_across_chunks_and_batches(arch, monkeypatch):
    model = randomized(config(arch))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 7), generator=gen) for _ in range(2)]
    targets = [torch.randint(0, VOCAB, (2, 7), generator=gen) for _ in range(2)]
    # 5 tokens a chunk: the 14-token batches are split unevenly, exercising the chunk boundaries.
    monkeypatch.setattr(stats_module, "CHUNK_ELEMENTS", 5 * max(VOCAB, model.cfg.depth * model.cfg.dim))
    stats = LayerStats(model.cfg.depth, VOCAB)
    with torch.no_grad():
        for x, y in zip(batches, targets):
            outputs: list = []
            model.hidden_states(x, layer_outputs=outputs)
            stats.update([h for _, h in outputs], y, model.logits)
        refs = [plain_reference(model, x, y) for x, y in zip(batches, targets)]
    assert stats.tokens == 28
    ref_sim = sum(r[0] for r in refs) / 2
    torch.testing.assert_close(stats.similarity(), ref_sim, atol=1e-6, rtol=0)
    lens = stats.logit_lens()
    for key in ("ce", "entropy", "accuracy"):
        expected = [(a + b) / 2 for a, b in zip(refs[0][1][key], refs[1][1][key])]
        assert lens[key] == pytest.approx(expected, abs=1e-5), key


# ---------------------------------------------------------------------- end-to-end analyze
@pytest.fixture(scope="module")
def four_models(data, tmp_path_factory):
    """`analyze` over the four architectures at once, with the files it wrote."""
    root = tmp_path_factory.mktemp("four")
    models = {arch: randomized(config(arch), seed=k) for k, arch in enumerate(ARCHS)}
    paths = [save(root / "ckpt", m, data) for m in models.values()]
    report = analyze(paths, str(data), str(root / "out"), tokens=320, batch_tokens=64, progress=False)
    return models, report, root / "out"


def test_last_layer_lens_is_the_model_loss(four_models, data):
    models, report, _ = four_models
    windows = EvalWindows(TokenData(data), seq_len=16, batch_size=4, max_tokens=320)
    assert report["tokens"] == windows.num_predicted_tokens == 320
    for result in report["models"]:
        model = models[result["label"]]
        with torch.no_grad():
            total = sum(float(model(x, y)) * y.numel() for x, y in windows)
        assert result["final"]["ce"] == pytest.approx(total / windows.num_predicted_tokens, abs=1e-5)
        assert result["logit_lens"]["ce"][-1] == result["final"]["ce"]


def test_similarity_is_symmetric_with_unit_diagonal(four_models):
    _, report, _ = four_models
    for result in report["models"]:
        sim = torch.tensor(result["similarity"])
        assert sim.shape == (len(result["layers"]),) * 2
        torch.testing.assert_close(sim, sim.T, atol=1e-12, rtol=0)
        torch.testing.assert_close(sim.diagonal(), torch.ones(len(sim), dtype=sim.dtype), atol=1e-9, rtol=0)
        assert sim.abs().max() <= 1 + 1e-9


def test_unlooped_models_have_no_loop_table(four_models):
    _, report, out = four_models
    by_label = {r["label"]: r for r in report["models"]}
    assert by_label["transformer"]["loop_similarity"] is None and by_label["mhc"]["loop_similarity"] is None
    assert len(by_label["looped"]["loop_similarity"]["per_middle_layer"]) == 2
    summary = (out / "summary.md").read_text()
    assert "| transformer | Transformer | 4L | n/a (no loops) |" in summary
    assert "| mhc | mHC | 4L +mHC | n/a (no loops) |" in summary
    assert f"| hyperloop | Hyperloop | 1L -> 2L x3 -> 1L +HC | {by_label['hyperloop']['loop_similarity']['mean']:.3f}" in summary


def test_files_are_real_pngs_of_the_expected_size(four_models):
    _, report, out = four_models
    expected = [(out / "logit_lens.png", LENS_SIZE)]
    expected += [(out / r["label"] / "similarity.png", SIMILARITY_SIZE) for r in report["models"]]
    for path, inches in expected:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == pixel_size(inches), path
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{path} looks blank"
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["models"][2]["similarity"] == report["models"][2]["similarity"]
    per_model = json.loads((out / "hyperloop" / "similarity.json").read_text())
    assert per_model["loop_similarity"] == report["models"][3]["loop_similarity"]
    lens = json.loads((out / "logit_lens.json").read_text())
    assert [m["label"] for m in lens["models"]] == list(ARCHS)


@pytest.mark.parametrize("arch", ["looped", "hyperloop"])
def test_identity_middle_block_gives_unit_loop_similarity_and_a_flat_lens(arch, data, tmp_path):
    # A tiny norm eps makes the final RMSNorm exactly scale-invariant, so a Hyperloop stream that the
    # hyper-connections only rescale reads out the same.
    model = randomized(config(arch, norm_eps=1e-12, init_std=0.2))  # large weights: every layer matters
    with torch.no_grad():
        for layer in model.middle_layers():  # zeroed output projections: every middle layer is x -> x
            layer.attn.wo.weight.zero_()
            layer.mlp.w_down.weight.zero_()
        for hc in model.hc:  # e_l is added to the middle block's output, so it is part of the loop's work
            hc.embedding.zero_()
    report = analyze([save(tmp_path, model, data)], str(data), str(tmp_path / "out"), tokens=160, progress=False)
    result = report["models"][0]
    assert result["loop_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert result["loop_similarity"]["per_middle_layer"] == pytest.approx([1.0, 1.0], abs=1e-6)
    middle = slice(0, 7)  # the begin layer's output and the six middle-layer outputs
    for key in ("ce", "entropy", "accuracy"):
        curve = result["logit_lens"][key][middle]
        assert curve == pytest.approx([curve[0]] * len(curve), abs=1e-5), key
    ce = result["logit_lens"]["ce"]
    assert abs(ce[-1] - ce[0]) > 0.01  # the end layer still moves the read-out: the flat part is not vacuous


# ------------------------------------------------------------------------------ CLI, errors
def test_cli_prints_json_and_writes_the_files(data, tmp_path, capsys):
    ckpt, flat = save(tmp_path, randomized(config("hyperloop")), data), save(tmp_path, randomized(config("mhc")), data)
    code = main(["analyze", ckpt, ckpt, flat, "--data", str(data), "--out", str(tmp_path / "out"), "--tokens", "64",
                 "--loops", "4", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["label"] for m in report["models"]] == ["hyperloop", "hyperloop-2", "mhc"]  # repeats are numbered
    assert report["models"][0]["num_loops"] == 4 and len(report["models"][0]["layers"]) == 10
    assert report["models"][0]["similarity"] == report["models"][1]["similarity"]
    assert report["models"][2]["num_loops"] == 1 and len(report["models"][2]["layers"]) == 4  # --loops: looped only
    assert (tmp_path / "out" / "hyperloop-2" / "similarity.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [(["--tokens", "8"], "not one window"), (["--loops", "0"], "--loops 0 must be at least 1"),
     (["--labels", "a", "b"], "2 labels for 1 checkpoints"), (["--seq-len", "999"], "shortest context"),
     (["--split", "test"], "has no split 'test'")],
)  # fmt: skip
def test_cli_bad_input_is_one_line_and_nonzero(args, message, data, tmp_path, capsys):
    ckpt = save(tmp_path, randomized(config("mhc")), data)
    assert main(["analyze", ckpt, "--data", str(data), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyperloop analyze: error:") and message in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_and_foreign_vocabulary_are_user_errors(data, tmp_path):
    with pytest.raises(HyperloopError, match="checkpoint not found"):
        analyze([str(tmp_path / "nope")], str(data), str(tmp_path / "out"), tokens=64)
    too_small = randomized(config("looped", vocab_size=VOCAB - 2))
    with pytest.raises(HyperloopError, match="embeddings"):
        analyze([save(tmp_path, too_small, data)], str(data), str(tmp_path / "out"), tokens=64, progress=False)


# ------------------------------------------------------------------------------ hyper-connection sites
def _reference_site_stats(model: HyperloopLM, windows) -> list[dict]:
    """Per site, straight from the definitions: rerun each site's write on the inputs it gets."""
    records: dict[int, list] = {}
    originals = [hc.write for hc in model.hc]

    def spy(index, write):
        def run(y, out, coeffs, merge=None, next_site=None):
            new = write(y, out, coeffs)
            records.setdefault(index, []).append((new.double(), [c for c in coeffs]))
            return write_result(new, merge, next_site)

        return run

    for index, hc in enumerate(model.hc):
        hc.write = spy(index, originals[index])
    with torch.no_grad():
        for x, _ in windows:
            model.hidden_states(x)
    for hc in model.hc:
        del hc.write
    rows = []
    for index, calls in sorted(records.items()):
        spreads, pres = [], []
        for streams, (h_pre, _, _) in calls:
            for token in streams.reshape(-1, *streams.shape[-2:]):  # (n, C) per token
                m = token.mean(0)
                spreads.append(math.sqrt(((token - m) ** 2).sum(-1).mean() / (m**2).sum()))
            pres.append(h_pre.double().reshape(-1, h_pre.shape[-1]))
        rows.append({"site": index, "spread": sum(spreads) / len(spreads), "h_pre": torch.cat(pres).mean(0)})
    return rows


@pytest.mark.parametrize("arch", ["mhc", "hyperloop"])
def test_site_stats_match_a_per_token_reference(arch, data):
    from hyperloop.analysis.streams import SiteStats

    model = randomized(config(arch), seed=3).eval()
    windows = EvalWindows(TokenData(data), seq_len=16, batch_size=4, max_tokens=160)
    expected = _reference_site_stats(model, windows)
    with SiteStats(model) as stats, torch.no_grad():
        for x, _ in windows:
            model.hidden_states(x)
    rows = stats.summary()
    assert [r["site"] for r in rows] == [e["site"] for e in expected] == list(range(len(model.hc)))
    for row, ref in zip(rows, expected):
        assert row["spread"] == pytest.approx(ref["spread"], rel=1e-6) and row["spread"] > 1e-3
        torch.testing.assert_close(torch.tensor(row["h_pre"], dtype=torch.float64), ref["h_pre"], rtol=1e-6, atol=1e-9)
    assert all("write" not in vars(hc) for hc in model.hc)  # the class method is back


def test_fresh_hyperloop_streams_start_as_near_copies_with_the_documented_init(data, tmp_path):
    """At init the streams barely separate (a = 0.01), and the mean coefficients are the documented
    ones: H_pre = 1/n, H_res = r, H_post = 1 - r. The report and summary carry the table; models
    without hyper-connections have no sites."""
    torch.manual_seed(0)
    models = [HyperloopLM(config("hyperloop", hc_res_init=0.3)), HyperloopLM(config("looped"))]
    report = analyze([save(tmp_path / "c", m, data) for m in models], str(data), str(tmp_path / "out"), tokens=64,
                     batch_tokens=64, progress=False)  # fmt: skip
    hyper, looped = report["models"]
    assert looped["hc_sites"] == [] and len(hyper["hc_sites"]) == 3
    n = models[0].cfg.n_streams
    for site in hyper["hc_sites"]:
        assert site["spread"] < 0.02
        assert site["h_pre"] == pytest.approx([1 / n] * n, abs=2e-3)
        assert site["h_res"] == pytest.approx([0.3] * n, abs=2e-3)
        assert site["h_post"] == pytest.approx([0.7] * n, abs=2e-3)
        assert site["alpha"] == pytest.approx([0.01] * 3)
    assert "| site | spread | H_pre | H_post | H_res | a |" in (tmp_path / "out" / "summary.md").read_text()
