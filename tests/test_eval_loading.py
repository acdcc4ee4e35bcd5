"""Mesh loading for the GSO evaluation: frames, prediction lookup, textures written by our exporter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.mesh_loading import (
    FRAMES,
    MeshLoadError,
    find_prediction,
    list_predictions,
    load_mesh,
    normalize_unit,
    read_glb_frame,
)
from evaluation.rendering import load_cameras, orbit_cameras, sample_texture
from pipeline.mesh.frames import FROM_CCM
from pipeline.mesh.types import TexturedMesh
from pipeline.outputs import export


def test_frames_are_rotations_consistent_with_the_exporter():
    for m in FRAMES.values():
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(m) == pytest.approx(1.0)
    for name, r in FROM_CCM.items():  # file = R @ ccm  ->  gt = M_file @ R @ ccm = M_ccm @ ccm
        np.testing.assert_allclose(FRAMES[name] @ r, FRAMES["ccm"], atol=1e-12)
    # the input camera (CCM +Y) ends up on +X, up stays up
    np.testing.assert_allclose(FRAMES["ccm"] @ [0, 1, 0], [1, 0, 0])
    np.testing.assert_allclose(FRAMES["ccm"] @ [0, 0, 1], [0, 0, 1])


@pytest.mark.parametrize("ext", ["glb", "obj"])
def test_textured_export_round_trip_keeps_uv_orientation(tmp_path, ext):
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:4, :, 0] = 255  # top half red
    tex[4:, :, 2] = 255  # bottom half blue
    tex[:, :4, 1] = 255  # left half green
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    uv = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]], np.float32)  # glTF: v = 0 at the top
    mesh = TexturedMesh(v, f, uv, tex, frame="ccm")
    path = tmp_path / f"m.{ext}"
    (export.export_glb if ext == "glb" else export.export_obj)(
        mesh, path, export.ExportConfig(frame="reference")
    )
    loaded = load_mesh(path)
    assert loaded.frame == "reference"
    assert loaded.uv is not None and loaded.texture is not None
    got = sample_texture(torch.tensor(loaded.texture), torch.tensor(loaded.uv)).numpy()
    expected = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1]], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_sample_texture_is_bilinear_with_texel_centres():
    tex = torch.tensor([[[0.0], [1.0]], [[2.0], [3.0]]])  # 2x2, one channel
    uv = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]])
    np.testing.assert_allclose(sample_texture(tex, uv)[:, 0].numpy(), [0, 1, 2, 1.5, 0.5])


def test_find_prediction_layouts(tmp_path):
    (tmp_path / "a.obj").write_text("")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mesh.obj").write_text("")
    (tmp_path / "b" / "mesh.glb").write_text("")
    (tmp_path / "c").mkdir()  # no mesh inside
    assert find_prediction(tmp_path, "a") == tmp_path / "a.obj"
    assert find_prediction(tmp_path, "b") == tmp_path / "b" / "mesh.glb"  # GLB preferred
    assert find_prediction(tmp_path, "c") is None
    assert list_predictions(tmp_path) == ["a", "b"]


def test_bad_files_and_degenerate_meshes(tmp_path):
    p = tmp_path / "x.glb"
    p.write_bytes(b"not a glb at all, just bytes")
    assert read_glb_frame(p) is None
    with pytest.raises(MeshLoadError):
        load_mesh(p)
    with pytest.raises(MeshLoadError, match="not found"):
        load_mesh(tmp_path / "missing.obj")
    with pytest.raises(MeshLoadError, match="degenerate"):
        normalize_unit(np.ones((4, 3)))
    v, scale, shift = normalize_unit(np.array([[0, 0, 0], [2, 1, 0], [1, 4, 1.0]]))
    np.testing.assert_allclose(v.max(0) - v.min(0), [0.5, 1.0, 0.25])
    np.testing.assert_allclose(v.max(0) + v.min(0), 0, atol=1e-12)
    assert scale == pytest.approx(0.25)


def test_orbit_cameras_are_the_gso_render_cameras(gso_dir):
    """The computed GSO-30 cameras (used when a GT folder has no cameras/ file) equal the recorded ones."""
    rec = load_cameras(gso_dir / "cameras" / "cameras_16_elev30.json")
    ours = orbit_cameras()
    np.testing.assert_array_equal(ours.K, rec.K)
    np.testing.assert_allclose(ours.w2c, rec.w2c, atol=1e-6)  # the recorded poses are float32
    assert (ours.width, ours.height) == (rec.width, rec.height) == (256, 256)
