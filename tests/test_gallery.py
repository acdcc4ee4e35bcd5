"""The run gallery (``flows.gallery``): ``<run>/index.html`` from a run folder, tested in headless Chromium.

A small run is made the way the batch job makes one (``finalize`` into ``objects/<id>/``, a results table
with the ``qc_*`` columns): a clean object, one flagged by its checks, one failed row whose message tries to
inject markup, and one row without QC columns (its values come from ``meta.json``). In the browser, from
``file://`` and from an S3 server through presigned links: one card per row, the filters change the count,
previews load, a GLB opens in the viewer and renders something.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import trimesh
from browser.page_driver import require_browser, run_page
from flows_testutil import moto_s3
from PIL import Image

from flows.gallery import GALLERY_NAME, THREE_LINK, GalleryConfig, gallery_link, main, write_gallery
from flows.io import storage
from flows.io.manifest import RESULT_SCHEMA, result_row
from flows.qc_results import QC_RESULT_FIELDS, qc_row_columns
from pipeline.finalize import finalize
from pipeline.options import PipelineOptions
from pipeline.qc import QCConfig, qc_input_image
from pipeline.results import GeneratedObject

ASSETS = Path(__file__).resolve().parents[1] / "flows" / "gallery_assets"
OPTS = PipelineOptions(texture_size=64, preview_size=48, device="cpu", write_obj=False)
QC = QCConfig(clip_model=None, min_color_psnr=0.0, min_texture_coverage=0.0)
EVIL = "</script><script>window.__pwned = 1</script><b>bold</b>"
BACKGROUND = (0x2B, 0x2E, 0x33)  # the viewer's clear colour (gallery.js)


class PositionColour:
    device = torch.device("cpu")

    def __call__(self, points):
        return torch.as_tensor(points, dtype=torch.float32).clamp(-1.0, 1.0) * 0.8


def _disc(radius: float, size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    u, v = (2 * xx + 1) / size - 1, (2 * yy + 1) / size - 1
    img = np.full((size, size, 3), 127, np.uint8)
    img[u**2 + v**2 <= radius**2] = (200, 90, 40)
    return img


def _object(obj_id: str, disc_radius: float) -> GeneratedObject:
    s = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    return GeneratedObject(
        id=obj_id,
        seed=0,
        views_strip=np.zeros((8, 48, 3), np.uint8),
        ccm_strip=np.zeros((8, 48, 3), np.uint8),
        vertices=np.asarray(s.vertices, np.float32),
        faces=np.asarray(s.faces, np.int64)[:, ::-1].copy(),
        color_field=PositionColour(),
        input_rgba=qc_input_image(_disc(disc_radius)),
    )


def _results_table(rows: list[dict]) -> pa.Table:
    extra = [f for f in QC_RESULT_FIELDS if f.name not in RESULT_SCHEMA.names]
    schema = pa.schema(list(RESULT_SCHEMA) + extra)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as the batch job leaves it: objects/<id>/ + results.parquet with qc_* columns."""
    root = tmp_path_factory.mktemp("gallery")
    run, inputs = root / "run", root / "inputs"
    inputs.mkdir()
    rows = []
    for obj_id, radius in (("clean", 0.5), ("flagged", 0.3), ("old", 0.5)):
        Image.fromarray(_disc(radius)).save(inputs / f"{obj_id}.png")
        res = finalize(_object(obj_id, radius), run / "objects", OPTS, QC)
        assert res.ok, res.error_message
        outputs = {k: res.path(k) for k in res.outputs}
        row = result_row(
            obj_id,
            "ok",
            image_uri=str(inputs / f"{obj_id}.png"),
            output_uri=res.location,
            outputs=outputs,
            preview_uri=outputs["preview"],
            attempts=1,
        )
        if obj_id != "old":  # "old": results written before the qc_* columns existed
            row.update(qc_row_columns(res))
        rows.append(row)
    failed = result_row("broken", "failed", error_class="StageError", error_message=EVIL, attempts=2)
    failed.update(qc_row_columns(None))
    rows.append(failed)
    table = _results_table(rows)
    pq.write_table(table, run / "results.parquet")
    return run


def _page_data(index: Path) -> dict:
    html = index.read_text()
    m = re.search(r'<script id="gallery-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------------------ no browser
def test_vendored_three_is_complete_and_linked():
    """Every ``import ... from`` of the vendored modules is one the page links; files match VENDORED.md."""
    linked = dict(THREE_LINK)
    statement = re.compile(r"^(?:import|export|\})[^\n;]*?\bfrom\s*'([^']+)'", re.M)
    for name, deps in THREE_LINK:
        text = (ASSETS / "three" / name).read_text()
        assert set(statement.findall(text)) == set(deps), name
        order = list(linked)
        assert all(order.index(dep) < order.index(name) for dep in deps.values())  # linked before use
    table = (ASSETS / "three" / "VENDORED.md").read_text()
    for name in linked:
        digest = hashlib.sha256((ASSETS / "three" / name).read_bytes()).hexdigest()
        assert f"`{name}`" in table and digest in table, name
    assert "MIT License" in (ASSETS / "three" / "LICENSE").read_text()
    assert "</script" not in (ASSETS / "gallery.js").read_text()


def test_page_data_rows_links_and_embedded_models(run_dir):
    index = Path(write_gallery(str(run_dir)))
    assert index == run_dir / GALLERY_NAME
    data = _page_data(index)
    cards = {c["id"]: c for c in data["rows"]}
    assert list(cards) == ["clean", "flagged", "old", "broken"]
    assert cards["clean"]["flags"] == [] and cards["clean"]["qc"]["silhouette_iou"] > 0.95
    assert cards["flagged"]["flags"] == ["low_silhouette_iou"]
    meta = json.loads((run_dir / "objects" / "old" / "meta.json").read_text())
    assert cards["old"]["qc"]["silhouette_iou"] == meta["qc"]["values"]["silhouette_iou"]  # from meta.json
    assert cards["broken"]["error"] == f"StageError: {EVIL}" and cards["broken"]["glb"] is None
    assert (
        cards["clean"]["preview"] == "objects/clean/preview.png"
        and cards["clean"]["glb"] == "objects/clean/mesh.glb"
    )
    assert cards["clean"]["input"] == (run_dir.parent / "inputs" / "clean.png").as_uri()
    assert cards["clean"]["model"] == "gallery/models/clean.js"
    payload = (run_dir / "gallery" / "models" / "clean.js").read_text()
    glb = (run_dir / "objects" / "clean" / "mesh.glb").read_bytes()
    assert payload.split('"')[-2] == base64.b64encode(glb).decode()
    assert "</script><script>" not in index.read_text()  # the message cannot close the data element
    # a rebuild leaves up-to-date models alone and drops models of rows that are gone
    before = (run_dir / "gallery" / "models" / "clean.js").stat().st_mtime_ns
    (run_dir / "gallery" / "models" / "gone.js").write_text("x")
    write_gallery(str(run_dir))
    assert (run_dir / "gallery" / "models" / "clean.js").stat().st_mtime_ns == before
    assert not (run_dir / "gallery" / "models" / "gone.js").exists()


def test_cli_and_bad_folders(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--no-embed", "--title", "demo <run>"]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / GALLERY_NAME) in out and (run_dir / GALLERY_NAME).as_uri() in out
    assert _page_data(run_dir / GALLERY_NAME)["rows"][0]["model"] is None
    assert "<title>demo &lt;run&gt;</title>" in (run_dir / GALLERY_NAME).read_text()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "not a batch run folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="link_expiry_s"):
        GalleryConfig(link_expiry_s=30 * 24 * 3600)


def test_unfinished_run_is_read_from_markers(run_dir, tmp_path):
    partial = tmp_path / "partial"
    (partial / "objects" / "clean").mkdir(parents=True)
    for f in (run_dir / "objects" / "clean").iterdir():
        (partial / "objects" / "clean" / f.name).write_bytes(f.read_bytes())
    folder = partial / "objects" / "clean"  # outputs recorded where the run first wrote them
    row = result_row("clean", "ok", output_uri=str(folder), outputs={"glb": "/elsewhere/mesh.glb"})
    (partial / "objects" / "clean" / "result.json").write_text(json.dumps(row, default=str))
    data = _page_data(Path(write_gallery(str(partial))))
    assert [c["id"] for c in data["rows"]] == ["clean"] and "no results.parquet" in data["notice"]
    assert data["rows"][0]["glb"] == "objects/clean/mesh.glb"


def test_results_tables_of_any_vintage(tmp_path, capsys):
    """Only ``id`` and ``status`` are required; a file that is not a results table is a clear error."""
    run = tmp_path / "minimal"
    run.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "status": ["ok", "failed"]}), run / "results.parquet")
    cards = _page_data(Path(write_gallery(str(run))))["rows"]
    assert [(c["id"], c["status"], c["glb"], c["flags"]) for c in cards] == [
        ("a", "ok", None, []),
        ("b", "failed", None, []),
    ]
    pq.write_table(pa.table({"name": ["a"]}), run / "results.parquet")
    assert main([str(run)]) == 2 and "not a results table (no column id, status)" in capsys.readouterr().err
    (run / "results.parquet").write_bytes(b"not parquet")
    assert main([str(run)]) == 2 and "not a readable Parquet file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- browser
def _non_blank(png: str) -> float:
    """Fraction of the viewer's pixels that are not its background colour."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float((np.abs(img - np.asarray(BACKGROUND)).max(-1) > 12).mean())


CARDS = "document.querySelectorAll('#cards .card').length"
IDS = "Array.from(document.querySelectorAll('#cards .card')).map(c => c.dataset.id)"
PREVIEWS_LOADED = (
    "Array.from(document.querySelectorAll('img.preview')).every(i => i.complete && i.naturalWidth > 0)"
)


def _browse(url: str, out: Path) -> dict:
    steps = [
        {"wait": f"window.crmGallery && {CARDS} > 0"},
        {"eval": CARDS, "as": "all"},
        {"wait": PREVIEWS_LOADED},
        {"eval": "document.querySelectorAll('img.preview').length", "as": "previews"},
        {"eval": "document.querySelectorAll('img.input').length", "as": "inputs"},
        {
            "eval": "Array.from(document.querySelectorAll('img.input')).filter(i => i.naturalWidth).length",
            "as": "inputs_loaded",
        },
        {"click": ".filters button[data-filter=flagged]"},
        {"eval": IDS, "as": "flagged"},
        {"click": ".filters button[data-filter=failed]"},
        {"eval": IDS, "as": "failed"},
        {"eval": "document.querySelector('#cards .error').textContent", "as": "error_text"},
        {"eval": "document.querySelectorAll('#cards b').length + (window.__pwned || 0)", "as": "injected"},
        {"click": ".filters button[data-filter=all]"},
        {"click": ".card[data-id=clean] .thumbs"},
        {"wait": "window.crmGallery.viewer.state !== 'loading'"},
        {"eval": "JSON.stringify(window.crmGallery.viewer)", "as": "viewer"},
        {"screenshot": "viewer.png", "selector": "#viewer-canvas"},
    ]
    return run_page(url, steps, out, viewport=(1280, 1400))


def _check(res: dict) -> None:
    got = res["results"]
    assert got["all"] == 4 and got["previews"] == 3 and got["inputs"] == 3 and got["inputs_loaded"] == 3
    assert got["flagged"] == ["flagged"] and got["failed"] == ["broken"]
    assert got["error_text"] == f"StageError: {EVIL}" and got["injected"] == 0
    viewer = json.loads(got["viewer"])
    assert viewer["state"] == "ready", viewer
    assert viewer["triangles"] == 320 and viewer["id"] == "clean"
    assert _non_blank(got["viewer.png"]) > 0.05
    assert res["errors"] == []


@pytest.mark.e2e
def test_gallery_in_browser_from_file(run_dir, tmp_path):
    require_browser()
    index = write_gallery(str(run_dir))
    _check(_browse(gallery_link(index), tmp_path))


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; yields fsspec storage options."""
    with moto_s3() as opts:
        yield opts


@pytest.mark.e2e
@pytest.mark.services
@pytest.mark.timeout(300)
def test_gallery_on_s3_through_presigned_links(run_dir, s3, tmp_path):
    require_browser()
    fs, _ = storage.get_fs("s3://gallery-test", s3)
    fs.mkdir("gallery-test")
    fs.put(str(run_dir / "objects") + "/", "gallery-test/run/objects", recursive=True)
    fs.put(str(run_dir.parent / "inputs") + "/", "gallery-test/inputs", recursive=True)
    # the results as a run on S3 records them: S3 URIs
    table = pq.read_table(run_dir / "results.parquet").to_pylist()
    local = str(run_dir)
    for r in table:
        r["image_uri"] = r["image_uri"] and r["image_uri"].replace(str(run_dir.parent), "s3://gallery-test")
        r["outputs"] = [(k, v.replace(local, "s3://gallery-test/run")) for k, v in r["outputs"] or []]
    with fs.open("gallery-test/run/results.parquet", "wb") as fh:
        pq.write_table(_results_table(table), fh)
    index = write_gallery("s3://gallery-test/run", s3, GalleryConfig(link_expiry_s=3600))
    assert index == "s3://gallery-test/run/index.html"
    assert fs.info("gallery-test/run/index.html")["ContentType"] == "text/html"
    assert not fs.exists("gallery-test/run/gallery/models")  # fetched over http: nothing to embed
    url = gallery_link(index, s3, 3600)
    assert url.startswith(s3["endpoint_url"]) and ("Signature=" in url or "X-Amz-Signature=" in url)
    _check(_browse(url, tmp_path))
