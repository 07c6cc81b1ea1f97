"""`hyperloop reproduce --scale tiny` end to end with a few steps: four rows, plots that open, the
summary schema, and resumption (a second run reuses every finished stage)."""

from __future__ import annotations

import json

import pytest

from hyperloop.cli import main

ARCHS = ["transformer", "mhc", "looped", "hyperloop"]


@pytest.fixture(scope="module")
def report(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "out"
    assert main(["reproduce", "--scale", "tiny", "--data", str(demo_data), "--out", str(out), "--steps", "4",
                 "--eval-tokens", "4096", "--analysis-tokens", "1024", "--calib-seqs", "4", "--set", "train.eval_tokens=4096"]) == 0  # fmt: skip
    return out


def test_report_has_four_rows_and_the_summary_schema(report):
    summary = json.loads((report / "summary.json").read_text())
    assert {"device", "date", "commit", "train_tokens", "models"} <= set(summary)
    assert summary["train_tokens"] == 4 * 4 * 128  # 4 steps of 4 x 128 tokens
    assert list(summary["models"]) == ARCHS
    for row in summary["models"].values():
        assert {"params", "val_ppl", "int4_ppl", "tasks", "tasks_avg", "train_tok_s"} <= set(row)
        assert row["val_ppl"] > 1 and row["int4_ppl"] > 1
    assert summary["models"]["hyperloop"]["params"] < summary["models"]["transformer"]["params"]
    text = (report / "report.md").read_text()
    assert "smoke test" in text
    for arch in ARCHS:
        assert f"| {arch} |" in text


def test_plots_are_real_images(report):
    from PIL import Image

    for path in [report / "loss_curves.png", report / "analysis" / "logit_lens.png",
                 *(report / "analysis" / a / "similarity.png" for a in ARCHS)]:  # fmt: skip
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
            low, high = image.convert("L").getextrema()
            assert high - low > 50  # not blank


def test_rerun_skips_finished_stages(report, demo_data, capsys):
    before = {p: p.stat().st_mtime_ns for p in (report / "eval").glob("*.json")}
    assert main(["reproduce", "--scale", "tiny", "--data", str(demo_data), "--out", str(report), "--steps", "4",
                 "--eval-tokens", "4096", "--analysis-tokens", "1024", "--calib-seqs", "4", "--set", "train.eval_tokens=4096"]) == 0  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in (report / "eval").glob("*.json")} == before
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("training complete, skipped") == 4


def test_ablation_table(report, demo_data):
    """--ablation trains the variants into the same folder (the reference run is shared) and writes
    the ablation summary schema."""
    assert main(["reproduce", "--scale", "tiny", "--data", str(demo_data), "--out", str(report), "--steps", "4",
                 "--eval-tokens", "4096", "--set", "train.eval_tokens=4096", "--ablation", "h_res"]) == 0  # fmt: skip
    summary = json.loads((report / "ablations.json").read_text())
    assert {"device", "date", "commit", "train_tokens", "ablations"} <= set(summary)
    rows = summary["ablations"]["h_res"]
    assert list(rows) == ["h_res-identity", "h_res-sinkhorn", "hyperloop"]
    assert rows["h_res-sinkhorn"]["params"] > rows["hyperloop"]["params"] > rows["h_res-identity"]["params"]
    assert all(r["val_ppl"] > 1 for r in rows.values())
    assert "## h_res" in (report / "ablations.md").read_text() and (report / "ablation-h_res.png").is_file()


def test_parallel_training_matches_in_process(report, demo_data, tmp_path):
    """--gpus 2 trains two models at a time in `hyperloop train` processes; several ablation tables
    share their reference rows; the runs are the ones the in-process path trains."""
    out = tmp_path / "abl"
    assert main(["reproduce", "--scale", "tiny", "--data", str(demo_data), "--out", str(out), "--steps", "4",
                 "--eval-tokens", "4096", "--set", "train.eval_tokens=4096", "--ablation", "h_res", "lora",
                 "--gpus", "2"]) == 0  # fmt: skip
    summary = json.loads((out / "ablations.json").read_text())
    assert list(summary["ablations"]) == ["h_res", "lora"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        ["h_res-identity", "h_res-sinkhorn", "hyperloop", "looped", "lora-8", "lora-32"])
    for name in ("hyperloop", "looped"):  # same data order, init and schedule as the in-process runs
        losses = [[json.loads(r)["loss"] for r in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(r)] for root in (report, out)]  # fmt: skip
        assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert (out / "logs" / "lora-8.log").is_file()


def test_bad_gpus_count(demo_data, tmp_path):
    from hyperloop.errors import HyperloopError
    from hyperloop.reproduce import reproduce

    with pytest.raises(HyperloopError, match="--gpus"):
        reproduce("tiny", str(tmp_path / "o"), data=str(demo_data), gpus=0)


def test_ablation_variants_follow_the_paper():
    from hyperloop.reproduce import ablation_variants

    names = lambda ablation: [v.name for v in ablation_variants(ablation, "xs")]  # noqa: E731
    assert names("streams") == ["streams-2", "hyperloop", "streams-6", "streams-8", "hyperloop-seed1"]
    assert names("placement") == ["span-1", "span-2", "hyperloop", "span-12"]
    assert names("structure") == ["hyperloop", "looped", "hyperloop-3x4", "looped-3x4", "hyperloop-2x6", "looped-2x6"]
    assert names("lora") == ["looped", "lora-8", "lora-32", "hyperloop"]
    assert names("init") == ["looped", "init-0.1", "hyperloop", "init-0.9", "init-own", "hyperloop-seed1"]


def test_train_command_passes_set_only_with_overrides(tmp_path):
    """A variant without overrides must not end its command in a bare `--set` (argparse rejects it)."""
    from hyperloop.reproduce import Variant, train_command

    plain = train_command(Variant("transformer", "transformer-xs"), [], tmp_path / "d", tmp_path / "r")
    assert "--set" not in plain
    tuned = train_command(Variant("init-0.1", "hyperloop-xs", ["model.hc_res_init=0.1"]), ["train.lr=0.002"],
                          tmp_path / "d", tmp_path / "r")  # fmt: skip
    assert tuned[tuned.index("--set"):] == ["--set", "model.hc_res_init=0.1", "train.lr=0.002"]


def test_report_only_lists_the_stages_that_did_not_run(report, tmp_path):
    import shutil

    from hyperloop.errors import HyperloopError
    from hyperloop.reproduce import reproduce

    partial = tmp_path / "partial"
    shutil.copytree(report, partial, ignore=shutil.ignore_patterns("checkpoints", "quant"))
    (partial / "eval" / "looped-int4.json").unlink()
    shutil.rmtree(partial / "analysis")
    assert main(["reproduce", "--scale", "tiny", "--out", str(partial), "--report-only"]) == 0
    summary = json.loads((partial / "summary.json").read_text())
    assert summary["models"]["looped"]["int4_ppl"] is None and summary["models"]["mhc"]["int4_ppl"] > 1
    assert summary["missing_stages"] == ["int4 of looped", "analysis"]
    assert not (partial / "eval" / "looped-int4.json").exists()  # reported as missing, not computed
    text = (partial / "report.md").read_text()
    assert "**Not run** (shown as '-'): int4 of looped, analysis." in text and "| looped |" in text
    with pytest.raises(HyperloopError, match="no trained runs"):
        reproduce("tiny", str(tmp_path / "empty"), report_only=True)


def test_seeds_name_the_runs_and_set_train_seed():
    from hyperloop.reproduce import main_variants

    variants = main_variants("xs", [0, 2])
    assert [v.name for v in variants] == ARCHS + [f"{a}-seed2" for a in ARCHS]
    assert variants[0].overrides == [] and variants[-1].overrides == ["train.seed=2"]


def test_report_over_seeds_gives_means_ranges_and_every_run(report, tmp_path):
    """Runs of a second seed next to the first (here copies of seed 0's with other figures) are
    averaged per architecture; the range is over seeds; each run keeps its own row."""
    import shutil

    two = tmp_path / "two"
    shutil.copytree(report, two, ignore=shutil.ignore_patterns("checkpoints", "quant"))
    for arch in ARCHS:
        shutil.copytree(two / "runs" / arch, two / "runs" / f"{arch}-seed1")
        for suffix in ("", "-int4"):
            result = json.loads((two / "eval" / f"{arch}{suffix}.json").read_text())
            result["ppl"] += 10.0
            (two / "eval" / f"{arch}-seed1{suffix}.json").write_text(json.dumps(result))
    assert main(["reproduce", "--scale", "tiny", "--out", str(two), "--report-only", "--seeds", "0", "1"]) == 0
    summary = json.loads((two / "summary.json").read_text())
    assert list(summary["models"]) == ARCHS and len(summary["runs"]) == 8
    for arch in ARCHS:
        row, first = summary["models"][arch], summary["runs"][arch]
        assert row["seeds"] == {"0": arch, "1": f"{arch}-seed1"}
        assert row["val_ppl"] == pytest.approx(first["val_ppl"] + 5.0)
        assert row["val_ppl_range"] == pytest.approx([first["val_ppl"], first["val_ppl"] + 10.0])
        assert row["int4_ppl"] == pytest.approx(first["int4_ppl"] + 5.0)
        assert summary["runs"][f"{arch}-seed1"]["val_ppl"] == pytest.approx(first["val_ppl"] + 10.0)
    text = (two / "report.md").read_text()
    assert "seeds 0, 1" in text and "| hyperloop-seed1 |" in text and summary["missing_stages"] == []
    assert "seed 0: " in text and "seed 1: " in text  # each seed's own order, next to the mean's

    # Seed 0 without INT4 for hyperloop, seed 1 trained on another device: the INT4 - bf16 column
    # pairs each run with its own bf16 figure, and tok/s averages only the first device's runs.
    (two / "eval" / "hyperloop-int4.json").unlink()
    config = json.loads((two / "runs" / "hyperloop-seed1" / "config.json").read_text())
    config.setdefault("env", {})["device"] = "Other GPU"
    (two / "runs" / "hyperloop-seed1" / "config.json").write_text(json.dumps(config))
    assert main(["reproduce", "--scale", "tiny", "--out", str(two), "--report-only", "--seeds", "0", "1"]) == 0
    summary = json.loads((two / "summary.json").read_text())
    row, runs = summary["models"]["hyperloop"], summary["runs"]
    assert row["int4_seeds"] == ["1"] and row["int4_ppl"] == pytest.approx(runs["hyperloop-seed1"]["int4_ppl"])
    assert row["int4_delta"] == pytest.approx(runs["hyperloop-seed1"]["int4_ppl"] - runs["hyperloop-seed1"]["val_ppl"])
    assert row["train_tok_s"] == pytest.approx(runs["hyperloop"]["train_tok_s"])
    text = (two / "report.md").read_text()
    assert "(seed 1) |" in text and "Other GPU (seed 1)" in text and "Order after INT4: mean: -" in text


def test_bad_seeds(demo_data, tmp_path):
    from hyperloop.errors import HyperloopError
    from hyperloop.reproduce import reproduce

    for seeds, ablations in (([0, 0], None), ([], None), ([1], ["init"]), ([-1], None)):
        with pytest.raises(HyperloopError, match="--seeds"):
            reproduce("tiny", str(tmp_path / "o"), data=str(demo_data), seeds=seeds, ablations=ablations)
