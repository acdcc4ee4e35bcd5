"""`python -m evaluation.gso` on a subset of the real GSO sample: self-evaluation, rotated copy, frames
recorded by our exporter, and bad inputs (each reported as a failed object while the rest are scored)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trimesh
from test_eval_images import tiny_clip_dir

from evaluation.alignment import rotation_yaw_pitch
from evaluation.gso import EvalConfig, load_gt_mesh, load_image_models, main
from evaluation.image_metrics import load_rgba
from evaluation.mesh_loading import FRAMES, read_glb_frame
from evaluation.rendering import load_cameras, render_views
from pipeline.mesh.types import VertexColorMesh
from pipeline.outputs import export


def _gt_root(src, tmp_path, names, drop_render=None):
    """A GT folder with symlinks into the GSO sample ``src`` (``drop_render``: object without 005.png)."""
    root = tmp_path / "gt"
    (root / "objects").mkdir(parents=True)
    (root / "cameras").mkdir()
    (root / "cameras" / "cameras_16_elev30.json").symlink_to(src / "cameras" / "cameras_16_elev30.json")
    (root / "gt_rotate_angle_deg.json").symlink_to(src / "gt_rotate_angle_deg.json")
    for n in names:
        d = root / "objects" / n
        (d / "renders").mkdir(parents=True)
        (d / "model.obj").symlink_to(src / "objects" / n / "model.obj")
        for i in range(16):
            if n == drop_render and i == 5:
                continue
            (d / "renders" / f"{i:03d}.png").symlink_to(src / "objects" / n / "renders" / f"{i:03d}.png")
    return root


def _write_obj(path, v, f):
    trimesh.Trimesh(v, f, process=False).export(path)


def _rows(out):
    with open(out / "metrics.csv") as fh:
        return {r["object"]: r for r in csv.DictReader(fh)}


def test_cli_self_prediction_and_bad_inputs(gso_dir, tmp_path):
    gt = _gt_root(gso_dir, tmp_path, ["oil", "cream", "sorter", "teapot", "bell"], drop_render="cream")
    pred = tmp_path / "pred"
    pred.mkdir()
    src = gso_dir / "objects"
    angle = json.loads((gso_dir / "gt_rotate_angle_deg.json").read_text())["oil"]
    oil = load_gt_mesh(gso_dir, "oil", angle)
    _write_obj(
        pred / "oil.obj", oil.vertices, oil.faces
    )  # GT (in the evaluation frame) as its own prediction
    (pred / "cream").mkdir()
    shutil.copy(src / "cream" / "model.obj", pred / "cream" / "mesh.obj")  # fine mesh, missing GT render
    (pred / "sorter.obj").write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")  # NaN vertices
    (pred / "teapot.glb").write_bytes(b"")  # empty file
    (pred / "bell.obj").write_text("this is not a mesh\n")  # unreadable: no geometry
    (pred / "extra_object.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")  # no ground truth
    clip, _ = tiny_clip_dir(tmp_path)  # random weights
    out = tmp_path / "out"
    rc = main(
        [
            *("--pred", str(pred), "--gt", str(gt), "--out", str(out)),
            *("--frame", "gt", "--align", "none", "--samples", "20000", "--supersample", "1", "--quiet"),
            *("--no-lpips", "--clip-model", str(clip)),
        ]
    )
    assert rc == 1  # some objects failed
    rows = _rows(out)
    oil = rows["oil"]
    assert oil["status"] == "ok", oil["reason"]
    assert float(oil["iou_parity"]) == 1.0 and float(oil["iou_winding"]) == 1.0
    assert float(oil["fscore"]) == 1.0 and float(oil["fscore@0.01"]) == 1.0
    assert float(oil["chamfer"]) < 1e-3  # identical samples (same seed) -> 0
    assert 0 < float(oil["ssim"]) <= 1 and np.isfinite(float(oil["psnr"]))
    assert oil["lpips"] == "" and 0 < float(oil["clip"]) <= 100.0 + 1e-3  # LPIPS: see test_eval_images
    assert rows["cream"]["status"] == "failed" and "005.png" in rows["cream"]["reason"]
    assert rows["cream"]["iou_winding"] != ""  # geometry was still scored
    assert rows["sorter"]["status"] == "failed" and "non-finite" in rows["sorter"]["reason"]
    assert rows["teapot"]["status"] == "failed" and "empty" in rows["teapot"]["reason"]
    assert rows["bell"]["status"] == "failed" and "prediction" in rows["bell"]["reason"]
    assert rows["mean"]["status"] == "1 ok"
    assert float(rows["mean"]["iou_parity"]) == 1.0

    doc = json.loads((out / "metrics.json").read_text())
    meta = doc["metadata"]
    assert meta["objects_only_in_predictions"] == ["extra_object"]
    assert meta["samples_per_mesh"] == 20000 and meta["seeds"]["sampling"] == 0
    assert "torch" in meta["packages"] and meta["protocol"]["align"]["method"] == "none"
    md = (out / "metrics.md").read_text()
    assert "| oil | ok |" in md and "extra_object" in md
    for name in ("renders_grid.png", "chamfer.png", "iou_winding.png", "clip.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_cli_recovers_rotated_copy_and_keeps_identity(gso_dir, tmp_path):
    gt = _gt_root(gso_dir, tmp_path, ["oil", "cream"])
    pred = tmp_path / "pred"
    pred.mkdir()
    root = gso_dir
    angles = json.loads((root / "gt_rotate_angle_deg.json").read_text())
    oil = load_gt_mesh(root, "oil", angles["oil"])
    rot = rotation_yaw_pitch(100.0, 15.0)
    _write_obj(pred / "oil.obj", oil.vertices @ rot.T, oil.faces)  # rotated, in the GT frame
    cream = load_gt_mesh(root, "cream", angles["cream"])
    _write_obj(pred / "cream.obj", cream.vertices, cream.faces)
    out = tmp_path / "out"
    args = [
        "--pred",
        str(pred),
        "--gt",
        str(gt),
        "--out",
        str(out),
        "--frame",
        "gt",
        "--no-images",
        "--quiet",
    ]
    rc = main([*args, "--jobs", "2"])  # process pool over the two objects
    assert rc == 0
    rows = _rows(out)
    assert float(rows["oil"]["iou_winding"]) > 0.95
    assert float(rows["oil"]["fscore@0.01"]) > 0.95
    assert float(rows["oil"]["chamfer"]) < 0.005
    assert float(rows["cream"]["iou_parity"]) == 1.0
    doc = json.loads((out / "metrics.json").read_text())
    al = {o["object"]: o["alignment"] for o in doc["objects"]}
    m = np.array(al["oil"]["matrix"])[:3, :3]
    err = np.degrees(np.arccos(np.clip((np.trace(m @ rot) - 1) / 2, -1, 1)))
    assert err < 2.0  # recovered the inverse rotation
    assert al["cream"]["rotation_angle_deg"] == 0.0


@pytest.mark.parametrize("frame", ["gltf", "reference"])
def test_cli_reads_frame_recorded_by_exporter(gso_dir, tmp_path, frame):
    gt = _gt_root(gso_dir, tmp_path, ["cream"])
    root = gso_dir
    angle = json.loads((root / "gt_rotate_angle_deg.json").read_text())["cream"]
    cream = load_gt_mesh(root, "cream", angle)
    v_ccm = cream.vertices @ FRAMES["ccm"]  # inverse of the CCM -> GT rotation
    mesh = VertexColorMesh(
        v_ccm.astype(np.float32), cream.faces, np.full((len(v_ccm), 3), 0.5, np.float32), frame="ccm"
    )
    pred = tmp_path / "pred" / "cream"
    pred.mkdir(parents=True)
    cfg = export.ExportConfig(frame=frame)
    export.export_glb(mesh, pred / "mesh.glb", cfg)
    export.export_obj(mesh, pred / "mesh.obj", cfg)
    assert read_glb_frame(pred / "mesh.glb") == frame
    out = tmp_path / "out"
    rc = main(
        [
            "--pred",
            str(tmp_path / "pred"),
            "--gt",
            str(gt),
            "--out",
            str(out),
            "--align",
            "none",
            "--no-images",
        ]
        + ["--quiet", "--samples", "20000", "--iou-methods", "parity"]
    )
    assert rc == 0
    row = _rows(out)["cream"]
    assert row["frame"] == frame
    assert float(row["iou_parity"]) > 0.98 and float(row["fscore@0.01"]) > 0.98


def test_gt_mesh_silhouette_matches_gt_renders(gso_dir):
    """Frames + cameras + rasterizer: the normalised, rotated GT mesh covers the GT alpha masks."""
    root = gso_dir
    angle = json.loads((root / "gt_rotate_angle_deg.json").read_text())["oil"]
    mesh = load_gt_mesh(root, "oil", angle)
    cams = load_cameras(root / "cameras" / "cameras_16_elev30.json")
    cams.w2c = cams.w2c[[0, 5, 10]]
    _, cover = render_views(mesh, cams, supersample=1)
    for k, i in enumerate((0, 5, 10)):
        alpha = load_rgba(root / "objects" / "oil" / "renders" / f"{i:03d}.png")[..., 3]
        a, b = cover[k] > 0.5, alpha > 0.5
        assert (a & b).sum() / (a | b).sum() > 0.97


def test_missing_weights_leave_columns_empty_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    models = load_image_models(EvalConfig(clip_model=str(tmp_path / "no-clip")))
    assert models.lpips is None and models.clip is None
    assert "download.pytorch.org" in models.notes["lpips"]
    assert "huggingface" in models.notes["clip"].lower()


def test_cli_help_and_bad_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "evaluation.gso", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for opt in ("--pred", "--gt", "--out", "--frame", "--align", "--jobs", "--lpips-vgg", "--clip-model"):
        assert opt in out
    assert main(["--pred", str(tmp_path / "missing"), "--gt", str(tmp_path), "--quiet"]) == 2


def test_ground_truth_comes_from_gt_or_env_only(gso_dir, tmp_path, monkeypatch, capsys):
    """No default into any shared folder: without --gt and $CRM_GSO_DIR the error names both."""
    monkeypatch.delenv("CRM_GSO_DIR", raising=False)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "cream").mkdir()
    (pred / "cream" / "mesh.obj").symlink_to(gso_dir / "objects" / "cream" / "model.obj")
    args = ["--pred", str(pred), "--out", str(tmp_path / "out"), "--quiet", "--no-images"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--gt" in err and "$CRM_GSO_DIR" in err
    monkeypatch.setenv("CRM_GSO_DIR", str(_gt_root(gso_dir, tmp_path, ["cream"])))
    assert main([*args, "--samples", "5000", "--iou-methods", "parity", "--default-frame", "gt"]) == 0
    assert _rows(tmp_path / "out")["cream"]["status"] == "ok"
