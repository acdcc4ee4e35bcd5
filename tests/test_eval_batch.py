"""A batch output folder as ``--pred``: ``results.parquet`` + ``objects/<id>/`` written the way the
``crm-batch`` job writes them, read from a local folder and from S3 (moto server on 127.0.0.1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flows_testutil import moto_s3
from test_eval_frames import assert_at_floor, make_gt_root, rows, sampling_floor

from evaluation.gso import load_gt_mesh, main
from evaluation.mesh_loading import FRAMES
from evaluation.predictions import open_predictions
from flows.io import storage
from flows.io.manifest import result_row, write_results
from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.outputs import export

FAST = ["--no-images", "--quiet", "--no-plots", "--samples", "4000", "--iou-resolution", "30"]
ANGLES = {"l_a": 225.0, "l_b": 0.0, "l_c": 112.5, "l_d": 90.0, "l_e": 270.0}
OLD = "s3://elsewhere/old-run/objects"  # where the run was first written: paths are taken relative to it
BUCKET = "crm-eval-test"


def _ccm(gt):
    return (gt.vertices @ FRAMES["ccm"]).astype(np.float32)  # p_gt = M_ccm p_ccm


def _meta(folder: Path, obj_id: str) -> None:
    (folder / "meta.json").write_text(json.dumps({"id": obj_id}))


def _build_run(run: Path, gts: dict) -> None:
    """A run folder as the batch job leaves it, with every kind of row the evaluation must handle."""
    objs = run / "objects"
    result_rows = []

    def ok(obj_id, files):
        outputs = {k: f"{OLD}/{obj_id}/{name}" for k, name in files.items()}
        row = result_row(obj_id, "ok", output_uri=f"{OLD}/{obj_id}", outputs=outputs, attempts=1)
        (objs / obj_id / "result.json").write_text(json.dumps(row, default=str))
        result_rows.append(row)

    # l_a: GLB (glTF frame, recorded in the file) + vertex-colour OBJ, as the pipeline writes them
    d = objs / "l_a"
    d.mkdir(parents=True)
    gt = gts["l_a"]
    mesh = VertexColorMesh(_ccm(gt), gt.faces, np.full((len(gt.vertices), 3), 0.5, np.float32), frame="ccm")
    export.export_glb(mesh, d / "mesh.glb", export.ExportConfig())
    export.export_obj(mesh, d / "mesh.obj", export.ExportConfig())
    _meta(d, "l_a")
    ok("l_a", {"glb": "mesh.glb", "obj": "mesh.obj", "meta": "meta.json"})
    # l_e: textured OBJ only (mesh.obj + mesh.mtl + mesh.png)
    d = objs / "l_e"
    d.mkdir(parents=True)
    gt = gts["l_e"]
    uv = np.random.default_rng(0).random((len(gt.vertices), 2)).astype(np.float32)
    tex = np.full((8, 8, 3), 200, np.uint8)
    export.export_obj(TexturedMesh(_ccm(gt), gt.faces, uv, tex, frame="ccm"), d / "mesh.obj")
    ok("l_e", {"obj": "mesh.obj", "mtl": "mesh.mtl", "texture": "mesh.png"})
    # l_b: status ok, but its folder holds no mesh
    (objs / "l_b").mkdir()
    _meta(objs / "l_b", "l_b")
    ok("l_b", {"meta": "meta.json"})
    # l_c: failed row
    result_rows.append(
        result_row("l_c", "failed", error_class="StageError", error_message="stage 2 diverged", attempts=2)
    )
    # a row with no ground truth, and a second row for l_a
    d = objs / "mug_07"
    d.mkdir()
    export.export_glb(mesh, d / "mesh.glb", export.ExportConfig())
    ok("mug_07", {"glb": "mesh.glb"})
    result_rows.append(result_row("l_a", "failed", error_class="Timeout", error_message="x", attempts=1))
    write_results(result_rows, str(run / "results.parquet"))


EXPECTED_SKIPS = {
    "l_b": "no mesh file",
    "l_c": "status failed: StageError: stage 2 diverged",
    "mug_07": "no ground-truth object with this id",
    "l_a": "duplicate id",
}


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    gt_root = root / "gt"
    make_gt_root(gt_root, ANGLES)
    gts = {n: load_gt_mesh(gt_root, n, a) for n, a in ANGLES.items()}
    run = root / "run"
    _build_run(run, gts)
    floors = {n: sampling_floor(gts[n]) for n in ("l_a", "l_e")}
    return gt_root, run, floors


def _skipped(out: Path) -> dict[str, str]:
    with open(out / "skipped_rows.csv") as fh:
        got = list(csv.DictReader(fh))
    assert len(got) == len(EXPECTED_SKIPS)
    return {r["id"]: r["reason"] for r in got}


def _check_scored(out: Path, floors: dict) -> dict:
    got = rows(out)
    assert sorted(got) == ["l_a", "l_e", "mean"]
    for n in ("l_a", "l_e"):
        assert got[n]["frame"] == "gltf"  # read from the GLB / the OBJ header
        assert_at_floor(got[n], floors[n], n)
    skipped = _skipped(out)
    for obj_id, reason in EXPECTED_SKIPS.items():
        assert reason in skipped[obj_id], (obj_id, skipped[obj_id])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["prediction_kind"] == "batch" and meta["batch_rows"] == 6
    assert meta["objects_only_in_ground_truth"] == ["l_b", "l_c", "l_d"]
    md = (out / "metrics.md").read_text()
    assert "6 rows in results.parquet, 2 scored, 4 not scored" in md and "stage 2 diverged" in md
    return got


def test_local_batch_folder_scores_ok_rows_and_reports_the_rest(batch_run, tmp_path, capsys):
    gt_root, run, floors = batch_run
    out = tmp_path / "out"
    assert main(["--pred", str(run), "--gt", str(gt_root), "--out", str(out), *FAST]) == 0
    _check_scored(out, floors)
    printed = capsys.readouterr().out
    assert "6 rows, 4 not scored" in printed and "no ground-truth object with this id" in printed
    # the results file itself as --pred, with --objects: l_e is then skipped for that reason
    out2 = tmp_path / "out2"
    args = ["--pred", str(run / "results.parquet"), "--gt", str(gt_root), "--out", str(out2), *FAST]
    assert main([*args, "--objects", "l_a,l_b"]) == 0
    assert sorted(rows(out2)) == ["l_a", "mean"]
    with open(out2 / "skipped_rows.csv") as fh:
        reasons = {r["id"]: r["reason"] for r in csv.DictReader(fh)}
    assert reasons["l_e"] == "not in --objects" and "no mesh file" in reasons["l_b"]


def test_unfinished_run_without_results_table_is_explained(batch_run, tmp_path, capsys):
    gt_root, run, _ = batch_run
    partial = tmp_path / "partial"
    (partial / "objects").mkdir(parents=True)
    (partial / "objects" / "l_a").symlink_to(run / "objects" / "l_a")
    assert main(["--pred", str(partial), "--gt", str(gt_root), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "no results.parquet" in capsys.readouterr().err
    out = tmp_path / "out2"
    assert main(["--pred", str(partial / "objects"), "--gt", str(gt_root), "--out", str(out), *FAST]) == 0
    assert sorted(rows(out)) == ["l_a", "mean"]


def test_batch_picks_glb_and_keeps_obj_companions(batch_run):
    gt_root, run, _ = batch_run
    with open_predictions(run, sorted(ANGLES)) as preds:
        assert preds.kind == "batch" and preds.rows == 6
        assert preds.paths == {"l_a": run / "objects/l_a/mesh.glb", "l_e": run / "objects/l_e/mesh.obj"}
        assert preds.only_gt == ["l_b", "l_c", "l_d"] and preds.only_pred == []


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with the test bucket; yields fsspec storage options."""
    with moto_s3(BUCKET) as opts:
        yield opts


@pytest.mark.timeout(180)
def test_batch_run_on_s3(batch_run, s3, tmp_path):
    gt_root, run, floors = batch_run
    fs, _ = storage.get_fs(f"s3://{BUCKET}", s3)
    fs.put(str(run) + "/", f"{BUCKET}/runs/r1", recursive=True)
    uri = f"s3://{BUCKET}/runs/r1"
    opts = json.dumps(s3)
    out = tmp_path / "out"
    assert (
        main(["--pred", uri, "--storage-options", opts, "--gt", str(gt_root), "--out", str(out), *FAST]) == 0
    )
    remote = _check_scored(out, floors)
    local = tmp_path / "local"
    assert main(["--pred", str(run), "--gt", str(gt_root), "--out", str(local), *FAST]) == 0
    for n in ("l_a", "l_e"):
        assert remote[n]["chamfer"] == rows(local)[n]["chamfer"]
    # only what is scored is downloaded: the GLB alone, an OBJ with its material and texture
    with open_predictions(uri, sorted(ANGLES), storage_options=s3) as preds:
        tmp = preds.paths["l_a"].parents[1]
        assert sorted(p.name for p in (tmp / "l_a").iterdir()) == ["mesh.glb"]
        assert {p.name for p in (tmp / "l_e").iterdir()} >= {"mesh.obj", "mesh.mtl", "mesh.png"}
        assert [s["id"] for s in preds.skipped] == ["l_b", "l_c", "mug_07", "l_a"]
    assert not tmp.exists()  # downloads removed on close
    # a remote folder without results.parquet is a clear error
    rc = main(["--pred", f"s3://{BUCKET}/runs/none", "--storage-options", opts, "--gt", str(gt_root), *FAST])
    assert rc == 2
