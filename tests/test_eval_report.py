"""The evaluation report as a page: ``report.html`` written beside the CSV / JSON / Markdown outputs, with the
metrics table (sortable), the notes, the per-metric plots and the prediction-vs-GT render grid; loaded in
headless Chromium from ``file://``."""

from __future__ import annotations

import re

import numpy as np
import pytest
from browser.page_driver import require_browser, run_page

from evaluation.gso import EvalConfig
from evaluation.report import write_report
from evaluation.results import METRIC_COLUMNS, ObjectScores, fail

CHAMFER = {"mug": 0.031, "shoe": 0.012, "lamp": 0.047}


def _scores() -> list[ObjectScores]:
    rng = np.random.default_rng(0)
    out = []
    for i, (name, chamfer) in enumerate(CHAMFER.items()):
        s = ObjectScores(name, frame="gltf")
        s.metrics = {c: 0.5 + 0.1 * i for c in METRIC_COLUMNS} | {"chamfer": chamfer, "clip": None}
        s.fscores = {0.1: 0.9 - 0.1 * i}
        s.renders = rng.random((16, 24, 24, 3))
        s.gt_views = rng.random((16, 24, 24, 3))
        out.append(s)
    broken = fail(ObjectScores("<bad>"), "load", "mesh.glb is <empty> & unreadable")
    return [*out, broken]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_report")
    run = {
        "results": _scores(),
        "notes": {"clip": "CLIP weights not available offline"},
        "only_gt": ["bowl"],
        "pred_kind": "batch",
        "batch_rows": 5,
        "skipped": [{"id": "x1", "status": "failed", "reason": "status failed: StageError"}],
        "seconds": 1.5,
    }
    paths = write_report(run, EvalConfig(), out, pred_dir="out/run", gt_dir="/data/gso30")
    return paths


def test_report_html_holds_the_table_notes_and_plots(report):
    page = report["html"].read_text()
    assert report["html"].name == "report.html"
    body = page.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == 4 and 'class="failed"' in body
    assert "&lt;bad&gt;" in page and "<bad>" not in page  # names and reasons are escaped
    assert "mesh.glb is &lt;empty&gt; &amp; unreadable" in page
    mean = re.search(r"<tfoot><tr>(.*?)</tr></tfoot>", page, re.S).group(1)
    assert f'data-v="{float(np.mean(list(CHAMFER.values())))!r}"' in mean
    for text in (
        "clip is empty: CLIP weights not available offline",
        "ground truth without prediction",
        "x1",
    ):
        assert text in page
    assert 'src="plots/renders_grid.png"' in page and 'src="plots/chamfer.png"' in page
    assert (report["html"].parent / "plots" / "renders_grid.png").is_file()


@pytest.mark.e2e
def test_report_html_in_browser(report, tmp_path):
    require_browser()
    images = "Array.from(document.images)"
    names = "Array.from(document.querySelectorAll('tbody tr td:first-child'))"
    steps = [
        {"wait": f"{images}.length > 0 && {images}.every(i => i.complete)"},
        {"eval": f"{images}.filter(i => i.naturalWidth > 0).length", "as": "loaded"},
        {"eval": f"{images}.length", "as": "images"},
        {"eval": "document.querySelectorAll('table.metrics tbody tr').length", "as": "rows"},
        {"click": "table.metrics thead th:nth-child(3)"},  # chamfer, ascending
        {"eval": f"{names}.map(t => t.textContent)", "as": "by_chamfer"},
        {"click": "table.metrics thead th:nth-child(3)"},  # descending
        {"eval": "document.querySelector('tbody tr td:first-child').textContent", "as": "worst"},
        {"screenshot": "report.png", "full_page": True},
    ]
    res = run_page(report["html"].resolve().as_uri(), steps, tmp_path)
    got = res["results"]
    assert got["rows"] == 4 and got["images"] == got["loaded"] >= 8  # 7+ metric plots and the grid
    assert got["by_chamfer"] == ["shoe", "mug", "lamp", "<bad>"]  # empty cells last
    assert got["worst"] == "lamp" and res["errors"] == []
