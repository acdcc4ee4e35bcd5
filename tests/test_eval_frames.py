"""One consistent frame: a prediction equal to the GT scores at the sampling floor for every angle of the
GSO-30 rotation table, in every prediction frame, aligned or not (docs/evaluation.md, "Frames").

The ground truth is synthetic (an L-shaped prism with unequal arms: no rotational symmetry), one object
per distinct angle of ``gt_rotate_angle_deg.json``, so the whole matrix runs in seconds. The real
objects with non-axis angles (shoe 225, sorter 112.5 degrees) are checked on the GSO sample.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import trimesh
from reference_files import GSO_DIR, require

from evaluation.geometry_metrics import chamfer_distance, sample_surface
from evaluation.gso import load_gt_mesh, main
from evaluation.mesh_loading import FRAMES, read_glb_frame, rotation_z
from pipeline.mesh.types import VertexColorMesh
from pipeline.outputs import export

SAMPLES = 4000
# 30 nodes per axis: no grid plane coincides with an axis-parallel face of the L (faces at +-0.5, +-0.3,
# +-0.185, -0.15, -0.05 in the unit frame; nodes at -1 + i / 15), so float rounding cannot flip whole
# layers of nodes that lie exactly on a face.
IOU_RES = 30
FAST = ["--no-images", "--quiet", "--no-plots", "--samples", str(SAMPLES), "--iou-resolution", str(IOU_RES)]
AXIS_ANGLES = {0.0, 90.0, 180.0, 270.0, -90.0}


def l_prism() -> tuple[np.ndarray, np.ndarray]:
    """Closed, outward-oriented L-shaped prism: arms 1.0 (x) and 0.6 (y), widths 0.25 / 0.35, height 0.37."""
    a, b, t1, t2, h = 1.0, 0.6, 0.25, 0.35, 0.37
    ring = np.array([[0, 0], [a, 0], [a, t1], [t2, t1], [t2, b], [0, b]], dtype=np.float64)  # CCW
    v = np.concatenate([np.c_[ring, np.zeros(6)], np.c_[ring, np.full(6, h)]])
    cap = [(3, 4, 5), (3, 5, 0), (3, 0, 1), (3, 1, 2)]  # fan from the reflex corner
    f = [tuple(6 + i for i in t) for t in cap] + [(k, j, i) for i, j, k in cap]
    for i in range(6):
        j = (i + 1) % 6
        f += [(i, j, 6 + j), (i, 6 + j, 6 + i)]
    return v, np.asarray(f, dtype=np.int64)


def write_obj(path, v, f) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(v, f, process=False).export(path)


def make_gt_root(root, angles: dict[str, float]) -> None:
    """A GT folder (layout of docs/evaluation.md, meshes only) with one L prism per object name.

    The raw meshes are in "metres" and off-centre, as GSO meshes are, so the GT normalisation matters.
    """
    v, f = l_prism()
    for name in angles:
        write_obj(root / "objects" / name / "model.obj", v * 0.13 + [0.31, -0.22, 0.05], f)
    (root / "gt_rotate_angle_deg.json").write_text(json.dumps(angles))


def rows(out) -> dict[str, dict]:
    with open(out / "metrics.csv") as fh:
        return {r["object"]: r for r in csv.DictReader(fh)}


def sampling_floor(mesh, samples: int = SAMPLES) -> float:
    """Chamfer distance of a mesh against a resampling of itself (another seed)."""
    a = sample_surface(mesh.vertices, mesh.faces, samples, seed=0)
    b = sample_surface(mesh.vertices, mesh.faces, samples, seed=1)
    return float(chamfer_distance(a, b))


def assert_at_floor(row: dict, floor: float, what: str) -> None:
    assert row["status"] == "ok", f"{what}: {row['reason']}"
    cd, f2 = float(row["chamfer"]), float(row["fscore@0.02"])
    iou_p, iou_w = float(row["iou_parity"]), float(row["iou_winding"])
    assert cd <= 2 * floor, f"{what}: chamfer {cd:.5f} > 2 x floor {floor:.5f}"
    assert f2 >= 0.99, f"{what}: F@0.02 {f2:.4f}"
    assert iou_p >= 0.98 and iou_w >= 0.98, f"{what}: IoU parity {iou_p:.4f}, winding {iou_w:.4f}"


@pytest.fixture(scope="module")
def table_gt(tmp_path_factory):
    """GT folder with one object per distinct angle of the GSO-30 table; (root, {name: angle}, floors)."""
    table = json.loads(require(GSO_DIR / "gt_rotate_angle_deg.json").read_text())
    distinct = sorted({float(a) for a in table.values()})
    assert len(distinct) >= 6 and {225.0, 112.5} <= set(distinct)
    angles = {f"l_{i}": a for i, a in enumerate(distinct)}
    root = tmp_path_factory.mktemp("gt")
    make_gt_root(root, angles)
    gts = {n: load_gt_mesh(root, n, a) for n, a in angles.items()}
    return root, angles, gts, {n: sampling_floor(m) for n, m in gts.items()}


def _write_predictions(folder, gts: dict, variant: str) -> None:
    """Each GT (evaluation frame) as its own prediction, expressed in ``variant``'s frame."""
    for name, gt in gts.items():
        if variant == "glb":  # written by our exporter (default: glTF frame, normalised) from CCM
            v_ccm = gt.vertices @ FRAMES["ccm"]  # p_gt = M_ccm p_ccm
            colours = np.full((len(v_ccm), 3), 0.6, np.float32)
            mesh = VertexColorMesh(v_ccm.astype(np.float32), gt.faces, colours, frame="ccm")
            path = folder / name / "mesh.glb"
            path.parent.mkdir(parents=True, exist_ok=True)
            export.export_glb(mesh, path, export.ExportConfig())
            assert read_glb_frame(path) == "gltf"
        else:  # p_gt = M p_frame  ->  rows: v_frame = v_gt @ M; any scale and offset
            v = (gt.vertices @ FRAMES[variant]) * 2.7 + [0.4, -1.1, 0.3]
            write_obj(folder / f"{name}.obj", v, gt.faces)


@pytest.mark.parametrize("align", ["icp", "none"])
@pytest.mark.parametrize("variant", ["gt", "ccm", "reference", "gltf", "glb"])
def test_gt_as_prediction_scores_at_floor_for_every_table_angle(table_gt, tmp_path, variant, align):
    root, angles, gts, floors = table_gt
    pred = tmp_path / "pred"
    _write_predictions(pred, gts, variant)
    frame = "auto" if variant == "glb" else variant
    out = tmp_path / "out"
    rc = main(
        ["--pred", str(pred), "--gt", str(root), "--out", str(out), "--frame", frame, "--align", align, *FAST]
    )
    assert rc == 0
    got = rows(out)
    for name, angle in angles.items():
        assert got[name]["frame"] == ("gltf" if variant == "glb" else variant)
        assert_at_floor(got[name], floors[name], f"{variant}, align {align}, angle {angle:g}")


def test_yaw_of_90_degrees_is_recovered_by_alignment_only(table_gt, tmp_path):
    root, angles, gts, floors = table_gt
    pred = tmp_path / "pred"
    for name, gt in gts.items():  # rotated 90 degrees about +Z around the bounding-box centre
        c = (gt.vertices.max(0) + gt.vertices.min(0)) / 2
        write_obj(pred / f"{name}.obj", (gt.vertices - c) @ rotation_z(90.0).T + c, gt.faces)
    args = ["--pred", str(pred), "--gt", str(root), "--frame", "gt", *FAST]
    assert main([*args, "--out", str(tmp_path / "icp")]) == 0
    assert main([*args, "--out", str(tmp_path / "none"), "--align", "none"]) == 0
    aligned, unaligned = rows(tmp_path / "icp"), rows(tmp_path / "none")
    doc = json.loads((tmp_path / "icp" / "metrics.json").read_text())
    for o in doc["objects"]:
        assert abs(o["alignment"]["rotation_angle_deg"] - 90.0) < 0.5
    for name, angle in angles.items():
        assert_at_floor(aligned[name], floors[name], f"yaw 90, angle {angle:g}")
        r = unaligned[name]
        assert float(r["chamfer"]) > 10 * floors[name] and float(r["iou_winding"]) < 0.8, (angle, r)


def test_unit_fit_differs_only_for_non_axis_angles(table_gt, tmp_path):
    """``--fit unit`` (SyncDreamer's normalisation) equals ``gt-box`` on axis angles, misses the others."""
    root, angles, gts, floors = table_gt
    pred = tmp_path / "pred"
    _write_predictions(pred, gts, "gt")
    args = ["--pred", str(pred), "--gt", str(root), "--frame", "gt", "--align", "none", *FAST]
    assert main([*args, "--out", str(tmp_path / "box")]) == 0
    assert main([*args, "--out", str(tmp_path / "unit"), "--fit", "unit"]) == 0
    box, unit = rows(tmp_path / "box"), rows(tmp_path / "unit")
    for name, angle in angles.items():
        if angle in AXIS_ANGLES:  # the rotated GT box is the unit box: the same numbers (float noise)
            for col in ("chamfer", "fscore@0.01", "fscore@0.02", "iou_parity", "iou_winding"):
                assert float(unit[name][col]) == pytest.approx(float(box[name][col]), abs=1e-9), angle
        else:
            r = unit[name]  # fails every criterion that gt-box meets
            assert float(r["chamfer"]) > 2 * floors[name] and float(r["fscore@0.02"]) < 0.9, (angle, r)
            assert float(r["iou_winding"]) < 0.95, (angle, r)


def test_real_non_axis_objects_score_at_floor(gso_dir, tmp_path):
    """shoe (225 degrees) and sorter (112.5): the raw GSO mesh as its own prediction, in its own pose."""
    table = json.loads((gso_dir / "gt_rotate_angle_deg.json").read_text())
    names = ["shoe", "sorter"]
    assert {table[n] for n in names} == {225.0, 112.5}
    pred = tmp_path / "pred"
    pred.mkdir()
    for n in names:
        (pred / f"{n}.obj").symlink_to(require(gso_dir / "objects" / n / "model.obj"))
    out = tmp_path / "out"
    samples = 20000
    rc = main(
        ["--pred", str(pred), "--gt", str(gso_dir), "--out", str(out), "--objects", ",".join(names)]
        + ["--default-frame", "gt", "--no-images", "--quiet", "--no-plots", "--samples", str(samples)]
    )
    assert rc == 0
    got = rows(out)
    for n in names:
        floor = sampling_floor(load_gt_mesh(gso_dir, n, table[n]), samples)
        assert_at_floor(got[n], floor, n)
    doc = json.loads((out / "metrics.json").read_text())
    turned = {o["object"]: o["alignment"]["rotation_angle_deg"] for o in doc["objects"]}
    assert abs(turned["shoe"] - 135.0) < 0.5 and abs(turned["sorter"] - 112.5) < 0.5
