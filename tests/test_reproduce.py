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
    assert (captured.out + captured.err).count("nothing to do") == 4  # the four training runs were complete
