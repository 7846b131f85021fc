"""`glassforge report`: a self-contained HTML file from a run folder (synthetic runs here; a real one in test_web)."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from glassforge.core.errors import UserError
from glassforge.tools.report import metric_plots, render_report, write_report

RECIPES = Path(__file__).resolve().parents[1] / "src" / "glassforge" / "core" / "recipes"


def fake_run(root: Path, description: str = "a test run") -> Path:
    """A run folder with a recipe and training logs only: no data, eval or release yet."""
    root.mkdir(parents=True)
    text = (RECIPES / "tiny.toml").read_text()
    text = re.sub(r'^description = ".*"$', f'description = "{description}"', text, flags=re.M)
    (root / "recipe.toml").write_text(text)
    for stage, steps in (("pretrain", 12), ("sft", 6)):
        (root / stage).mkdir()
        rows = []
        for s in range(1, steps + 1):
            row = {"step": s, "loss": 5.0 / s, "lr": 1e-3 * min(1, s / 3), "tokens_per_s": 1000.0 + s, "tokens": 4096 * s}
            if s % 4 == 0:
                row["val_loss"] = 5.5 / s
            rows.append(row)
        import json

        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')
    return root


def test_report_of_a_partial_run(tmp_path):
    run = fake_run(tmp_path / "run", description="<script>alert(1)</script> & more")
    path = write_report(run)
    assert path == run / "report.html"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # for sharing: not the atomic write's private 0600
    html = path.read_text()
    assert html.startswith("<!doctype html>")
    # Run text is escaped, and nothing is fetched from anywhere.
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in html
    assert "<link" not in html and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    # Six plots (three per stage), each a real PNG inline.
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', html)
    assert len(images) == 6
    for data, _ in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    alts = {alt for _, alt in images}
    assert "Pretraining loss against training step" in alts and "Chat fine-tuning throughput against training step" in alts
    # Sections that have nothing yet say so instead of failing.
    assert "No evaluation results" in html and "No release" in html and "No data manifest" in html
    # The cut-off last line of a log is skipped, not an error.
    assert ">12<" in html


def test_report_out_and_errors(tmp_path):
    run = fake_run(tmp_path / "run")
    out = write_report(run, tmp_path / "elsewhere" / "r.html")
    assert out.is_file() and not (run / "report.html").exists()
    with pytest.raises(UserError, match="is a folder"):
        write_report(run, tmp_path)
    with pytest.raises(UserError, match="no such run folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        write_report(tmp_path / "empty")


def test_metric_plots_skip_missing_series():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    plots = metric_plots(rows, "pretrain")
    assert [p["title"] for p in plots] == ["Pretraining: loss"]
    assert metric_plots([], "sft") == []


@pytest.mark.slow
def test_report_of_a_real_run_and_its_release(tiny_run, tmp_path):
    html = render_report(tiny_run)
    for needle in ("Evaluation", "validation loss", "Data Merkle root".lower(), "claims pass", "Document lengths"):
        assert needle in html or needle in html.lower(), needle
    assert html.count("<img ") == 10  # three plots for each of three training stages, the length histogram
    # A release on its own (copied out of its run) still reports its training log and attestation.
    release = tmp_path / "release-copy"
    shutil.copytree(tiny_run / "release", release)
    html = render_report(release)
    assert "Pretraining: loss" in html and "Chat fine-tuning: loss" in html and "claims pass" in html
