"""Quality checks on synthetic cases with known answers: a sphere against disc masks (centred, smaller,
shifted), constant colours (PSNR), meshes in pieces, with holes, fins, flat sheets; UV coverage; the
input image the checks receive; the flags and the results columns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.qc import QC_COLUMNS, QCConfig, qc_columns, qc_flags, qc_input_image, run_quality_checks
from pipeline.qc.image_metrics import PSNR_CAP_DB, erode, masked_psnr, silhouette_iou
from pipeline.qc.input_image import split_input
from pipeline.qc.mesh_health import (
    bbox_aspect,
    component_area_shares,
    component_labels,
    edge_counts,
    texture_coverage,
    weld,
)
from pipeline.raster import TorchRasterizer
from pipeline.samples import sample_images

S = 256
GREY = 127
NO_CLIP = QCConfig(clip_model=None)


@pytest.fixture(scope="module")
def rast():
    return TorchRasterizer("cpu")


def sphere(radius=0.5, center=(0.0, 0.0, 0.0), colour=0.8, subdivisions=4) -> VertexColorMesh:
    s = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v = np.asarray(s.vertices, np.float32) + np.asarray(center, np.float32)
    return VertexColorMesh(v, np.asarray(s.faces), np.full((len(v), 3), colour, np.float32))


def disc_input(radius=0.5, cu=0.0, cv=0.0, colour=204, size=S) -> np.ndarray:
    """Preprocessed input: a disc of NDC `radius` centred at (u, v) = (cu, cv) over grey."""
    yy, xx = np.mgrid[0:size, 0:size]
    u, v = (2 * xx + 1) / size - 1, (2 * yy + 1) / size - 1
    img = np.full((size, size, 3), GREY, np.uint8)
    img[(u - cu) ** 2 + (v - cv) ** 2 <= radius**2] = colour
    return img


def lens_iou(r: float, d: float) -> float:
    """IoU of two discs of radius r whose centres are d apart."""
    inter = 2 * r * r * math.acos(d / (2 * r)) - 0.5 * d * math.sqrt(4 * r * r - d * d)
    return inter / (2 * math.pi * r * r - inter)


def check(mesh, img, rast, config=NO_CLIP):
    return run_quality_checks(mesh, qc_input_image(img), config, rast)


# ----------------------------------------------------------------------------------- input agreement
def test_sphere_against_disc_masks(rast):
    """Radius 0.5 sphere, front view: a disc of radius 0.5; a 0.4 disc gives IoU (0.4/0.5)^2 and a flag."""
    rep = check(sphere(), disc_input(0.5), rast)
    assert rep["values"]["silhouette_iou"] > 0.99 and rep["flags"] == []
    rep = check(sphere(), disc_input(0.4), rast)
    assert rep["values"]["silhouette_iou"] == pytest.approx(0.64, abs=0.01)
    assert rep["flags"] == ["low_silhouette_iou"]
    rep = check(sphere(), disc_input(0.4), rast, QCConfig(clip_model=None, min_silhouette_iou=0.6))
    assert rep["flags"] == []  # the threshold is configurable


def test_shifted_shape_and_view_orientation(rast):
    """Front view: CCM +X appears on the image's left (u = -X), +Z at the top (v = -Z)."""
    moved = sphere(center=(0.25, 0.0, 0.0))
    assert check(moved, disc_input(0.5, cu=-0.25), rast)["values"]["silhouette_iou"] > 0.99
    wrong = check(moved, disc_input(0.5, cu=0.25), rast)["values"]["silhouette_iou"]
    assert wrong == pytest.approx(lens_iou(0.5, 0.5), abs=0.01)
    up = sphere(center=(0.0, 0.3, 0.2))  # Y is depth: no effect on the front view
    assert check(up, disc_input(0.5, cv=-0.2), rast)["values"]["silhouette_iou"] > 0.99
    assert check(sphere(), disc_input(0.5, cv=0.25), rast)["values"]["silhouette_iou"] == pytest.approx(
        lens_iou(0.5, 0.25), abs=0.01
    )


def test_color_psnr_of_constant_colours(rast):
    """Render 0.8 grey vs input 0.7: PSNR = -10 log10(0.1^2) = 20 dB (inside both masks)."""
    colour = 178  # uint8 input colour
    rep = check(sphere(colour=0.8), disc_input(0.5, colour=colour), rast)
    expected = -10 * math.log10((0.8 - colour / 255) ** 2)
    assert rep["values"]["color_psnr"] == pytest.approx(expected, abs=0.01)
    assert rep["flags"] == []
    rep = check(sphere(colour=0.1), disc_input(0.5, colour=230), rast)
    assert rep["values"]["color_psnr"] < 12 and rep["flags"] == ["low_color_psnr"]


def test_opaque_input_and_missing_input_leave_values_empty_with_reasons(rast):
    full = np.full((S, S, 3), 200, np.uint8)  # no background: an opaque photo
    rep = check(sphere(), full, rast)
    assert rep["values"]["silhouette_iou"] is None and rep["values"]["color_psnr"] is None
    assert "no usable mask" in rep["notes"]["silhouette_iou"] and rep["flags"] == []
    rep = run_quality_checks(sphere(), None, NO_CLIP, rast)
    assert rep["values"]["silhouette_iou"] is None
    assert (
        "no input image" in rep["notes"]["color_psnr"] and "no input image" in rep["notes"]["clip_similarity"]
    )
    assert rep["values"]["faces"] == 5120  # mesh health still measured


def test_broken_check_is_a_flag_not_an_exception(rast):
    rep = run_quality_checks(sphere(), np.zeros((4, 6, 3), np.uint8), NO_CLIP, rast)  # bad input image
    assert rep["flags"] == ["qc_error"] and "renders" in rep["notes"]
    assert rep["values"]["components"] == 1
    assert run_quality_checks(sphere(), None, QCConfig(enabled=False), rast)["enabled"] is False


# --------------------------------------------------------------------------------------- mesh health
def test_mesh_in_pieces(rast):
    """Spheres of radius 0.5 and 0.25 (same tessellation): 2 components, the big one 0.8 of the area."""
    a, b = sphere(0.5, (-0.3, 0, 0)), sphere(0.25, (0.6, 0, 0))
    v = np.concatenate([a.vertices, b.vertices])
    f = np.concatenate([a.faces, b.faces + len(a.vertices)])
    mesh = VertexColorMesh(v, f, np.full((len(v), 3), 0.5, np.float32))
    np.testing.assert_allclose(component_area_shares(v, f), [0.8, 0.2], atol=1e-9)
    labels = component_labels(f, len(v))
    assert labels[0] == 0 and set(labels[len(a.faces) :]) == {1}
    rep = run_quality_checks(mesh, None, NO_CLIP, rast)
    assert rep["values"]["components"] == 2 and rep["values"]["largest_component_share"] == 0.8
    assert rep["flags"] == ["fragmented"]
    lenient = QCConfig(clip_model=None, min_largest_component_share=0.75)
    assert run_quality_checks(mesh, None, lenient, rast)["flags"] == []
    assert "fragmented" in run_quality_checks(mesh, None, QCConfig(max_components=1), rast)["flags"]


def test_uv_seams_are_welded_before_topology():
    """A cube split into 6 separate quads (as at UV seams) is one closed component once welded."""
    box = trimesh.creation.box()
    tri = np.asarray(box.vertices, np.float32)[np.asarray(box.faces)]
    split_v, split_f = tri.reshape(-1, 3), np.arange(36).reshape(-1, 3)  # every face on its own
    assert len(component_area_shares(split_v, split_f)) == 12
    v, f = weld(split_v, split_f)
    assert len(v) == 8 and len(component_area_shares(v, f)) == 1
    assert edge_counts(f) == edge_counts(np.asarray(box.faces))
    counts = edge_counts(f)
    assert (counts.edges, counts.boundary, counts.nonmanifold) == (18, 0, 0)


def test_holes_and_fins():
    s = trimesh.creation.icosphere(subdivisions=2)
    f = np.asarray(s.faces)
    assert edge_counts(f[1:]).boundary == 3  # one face removed: its three edges border one face
    a, b = f[0, 0], f[0, 1]
    fin = np.concatenate([f, [[a, b, len(s.vertices)]]])  # a third face on the edge (a, b)
    counts = edge_counts(fin)
    assert counts.nonmanifold == 1 and counts.boundary == 2


def test_open_and_non_manifold_flags(rast):
    s = trimesh.creation.icosphere(subdivisions=3)
    v = np.asarray(s.vertices, np.float32)
    f = np.asarray(s.faces)
    open_mesh = VertexColorMesh(v, f[40:], np.full((len(v), 3), 0.5, np.float32))
    rep = run_quality_checks(open_mesh, None, NO_CLIP, rast)
    assert rep["values"]["boundary_edges"] > 0 and rep["flags"] == ["open_surface"]
    edges = [(0, 1), (0, 2), (1, 2)]
    rows = [f[k, list(e)] for k in range(0, 50, 10) for e in edges[:1]]  # 5 edges of 5 far-apart faces
    v2 = np.concatenate([v, np.full((5, 3), 2.0)]).astype(np.float32)
    fins = np.concatenate([f, [[a, b, len(v) + i] for i, (a, b) in enumerate(rows)]])
    fin_mesh = VertexColorMesh(v2, fins, np.full((len(v2), 3), 0.5, np.float32))
    rep = run_quality_checks(fin_mesh, None, NO_CLIP, rast)
    assert rep["values"]["nonmanifold_edges"] == 5 and "non_manifold" in rep["flags"]


def test_degenerate_sheet_and_box_aspect(rast):
    assert bbox_aspect(np.array([[0, 0, 0], [1, 2, 4]], np.float32)) == 4.0
    sheet = VertexColorMesh(
        np.array([[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], np.float32),
        np.array([[0, 1, 2], [0, 2, 3]]),
        np.full((4, 3), 0.5, np.float32),
    )
    rep = run_quality_checks(sheet, None, NO_CLIP, rast)
    assert rep["values"]["bbox_aspect"] == 1e6 and rep["values"]["faces"] == 2
    assert rep["flags"] == ["open_surface", "degenerate"]


def test_texture_coverage_of_a_known_layout(rast):
    uv = np.array([[0, 0], [0.5, 0], [0.5, 1], [0, 1]], np.float32)  # the left half of the texture
    f = np.array([[0, 1, 2], [0, 2, 3]])
    assert texture_coverage(uv, f) == pytest.approx(0.5)
    quad = TexturedMesh(
        np.array([[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], np.float32),
        f,
        uv * np.float32(0.5),  # a quarter of the left half: 1/8
        np.zeros((8, 8, 3), np.uint8),
    )
    rep = run_quality_checks(quad, None, NO_CLIP, rast)
    assert rep["values"]["texture_coverage"] == 0.125 and "low_texture_coverage" in rep["flags"]


# --------------------------------------------------------------------------------------- image metrics
def test_image_metric_functions():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # rows 0-1 vs rows 1-2: IoU 1/3
    np.testing.assert_allclose(silhouette_iou(a, b).numpy(), [1 / 3, 1.0])  # two empty masks agree
    x = torch.zeros(1, 4, 4, 3)
    y = torch.full((1, 4, 4, 3), 0.1)
    m = torch.ones(1, 4, 4, dtype=torch.bool)
    assert masked_psnr(x, y, m).item() == pytest.approx(20.0, abs=1e-4)
    assert masked_psnr(x, x, m).item() == PSNR_CAP_DB
    assert math.isnan(masked_psnr(x, y, ~m).item())
    y[0, 0, 0] = 1.0  # outside the mask: no effect
    m[0, 0, 0] = False
    assert masked_psnr(x, y, m).item() == pytest.approx(20.0, abs=1e-4)
    sq = torch.zeros(1, 7, 7, dtype=torch.bool)
    sq[0, 1:6, 1:6] = True
    assert erode(sq, 1).sum() == 9 and erode(sq, 2).sum() == 1
    assert not erode(torch.ones(1, 3, 3, dtype=torch.bool), 1)[0, 0, 0]  # outside counts as empty


# ----------------------------------------------------------------------------------------- input image
def test_input_image_mask_and_resampling():
    img = np.full((512, 512, 3), GREY, np.uint8)
    img[128:384, 100:301] = (10, 200, 30)  # 256 x 201 block: odd width -> one half-covered column
    rgba = qc_input_image(img, size=256)
    assert rgba.shape == (256, 256, 4)
    assert (rgba[64:192, 50:150, 3] == 255).all() and rgba[0, 0, 3] == 0
    assert rgba[100, 150, 3] == 128 and tuple(rgba[100, 60, :3]) == (10, 200, 30)
    rgb, alpha = split_input(rgba, 128)
    assert rgb.shape == (128, 128, 3) and alpha[50, 50] == pytest.approx(1.0)
    wide = Image.fromarray(img[:256])  # 512 x 256: centred on a grey square as the preprocessing would
    padded = qc_input_image(wide, size=256)
    assert padded[:128, :, 3].max() == 0 and padded[128:192, 50:150, 3].min() == 255


def test_input_mask_matches_the_samples_alpha():
    """On the bundled samples the recovered mask agrees with the images' own alpha (IoU >= 0.995)."""
    from pipeline.inputs.preprocess import PreprocessConfig, preprocess_image

    for path in sample_images():
        im = Image.open(path)
        rgba = qc_input_image(preprocess_image(im, PreprocessConfig(background_mode="alpha")), size=im.width)
        true = np.asarray(im.getchannel("A")) >= 128
        est = rgba[..., 3] >= 128
        assert (true & est).sum() / (true | est).sum() >= 0.995, path.name


# ------------------------------------------------------------------------------------ config and columns
def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="min_silhouette_iou"):
        QCConfig(min_silhouette_iou=1.5)
    with pytest.raises(ValueError, match="clip_views"):
        QCConfig(clip_views=(0, 7))
    with pytest.raises(ValueError, match="unknown QC option"):
        QCConfig.from_dict({"min_iou": 0.5})
    cfg = QCConfig(clip_views=(0, 3), max_components=3)
    assert QCConfig.from_dict(cfg.to_dict()) == cfg
    assert "min_background_fraction" not in cfg.thresholds() and cfg.thresholds()["max_components"] == 3


def test_flags_ignore_missing_values():
    cfg = QCConfig()
    assert qc_flags({}, cfg) == [] and qc_flags({"silhouette_iou": None, "clip_similarity": None}, cfg) == []
    got = qc_flags({"clip_similarity": 50.0, "silhouette_iou": 0.1, "faces": 10, "edges": 0}, cfg)
    assert got == ["low_silhouette_iou", "degenerate", "low_clip_similarity"]


def test_columns_flatten_a_report(rast):
    rep = check(sphere(), disc_input(0.4), rast)
    cols = qc_columns(rep)
    assert list(cols) == list(QC_COLUMNS)
    assert cols["qc_silhouette_iou"] == rep["values"]["silhouette_iou"] and cols["qc_faces"] == 5120
    assert isinstance(cols["qc_components"], int) and cols["qc_flags"] == ["low_silhouette_iou"]
    assert cols["qc_notes"]["clip_similarity"].startswith("disabled")
    empty = qc_columns(None)
    assert all(v is None for k, v in empty.items() if k not in ("qc_flags", "qc_notes"))
    assert empty["qc_flags"] == [] and empty["qc_notes"] == {}
