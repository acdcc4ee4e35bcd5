"""Geometry metrics of the GSO evaluation: analytic cases and published IoU values on real GSO meshes."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import trimesh

from evaluation import geometry_metrics as gm
from evaluation.mesh_loading import load_mesh, normalize_unit, rotation_z


def sphere_points(n: int, r: float, center=(0.0, 0.0, 0.0), seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed).normal(size=(n, 3))
    return g / np.linalg.norm(g, axis=1, keepdims=True) * r + np.asarray(center)


def shifted_sphere_directed(r: float, d: float) -> float:
    """Mean distance from a sphere of radius r to the same sphere shifted by d < r (closed form).

    With s = |p - c'|, p uniform on the sphere, s is distributed with density s / (2 r d) on
    [r - d, r + d] (Archimedes), so E|s - r| = [(F(r+d) - F(r)) - (F(r) - F(r-d))] / (2 r d) with
    F(s) = s^3 / 3 - r s^2 / 2.
    """

    def F(s):
        return s**3 / 3 - r * s**2 / 2

    return ((F(r + d) - F(r)) - (F(r) - F(r - d))) / (2 * r * d)


def test_sphere_against_itself_is_at_sampling_floor():
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    a = gm.sample_surface(mesh.vertices, mesh.faces, 20000, seed=0)
    b = gm.sample_surface(mesh.vertices, mesh.faces, 20000, seed=1)
    same = gm.sample_surface(mesh.vertices, mesh.faces, 20000, seed=0)
    assert np.array_equal(a, same)  # fixed seed -> same points
    assert float(gm.chamfer_distance(a, same)) == 0.0
    cd = float(gm.chamfer_distance(a, b))
    assert 0 < cd < 0.01
    fs = gm.fscore(a, b, (0.01, 0.02))
    assert fs[0.02] > 0.99


def test_samples_are_area_uniform_and_on_surface():
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    p, n = gm.sample_surface(box.vertices, box.faces, 70000, seed=3, return_normals=True)
    # areas: faces normal to x: 2*4=8 (x2), to y: 1*4=4 (x2), to z: 1*2=2 (x2) -> 8:4:2
    ax = np.argmax(np.abs(n), axis=1)
    frac = np.bincount(ax, minlength=3) / len(ax)
    np.testing.assert_allclose(frac, [8 / 14, 4 / 14, 2 / 14], atol=0.01)
    half = np.array([0.5, 1.0, 2.0])
    on_face = np.isclose(np.abs(p[np.arange(len(p)), ax]), half[ax])
    assert on_face.all()


@pytest.mark.parametrize("r2", [0.45, 0.6])
def test_concentric_spheres_closed_form(r2):
    a = sphere_points(30000, 0.5, seed=0)
    b = sphere_points(30000, r2, seed=1)
    cd = float(gm.chamfer_distance(a, b))
    assert abs(cd - abs(r2 - 0.5)) < 2e-3


def test_shifted_spheres_closed_form_batched():
    r = 0.5
    ds = [0.05, 0.2]
    a = np.stack([sphere_points(60000, r, seed=0)] * 2)
    b = np.stack([sphere_points(60000, r, center=(d, 0, 0), seed=1) for d in ds])
    cd = gm.chamfer_distance(a, b)
    assert cd.shape == (2,)
    expected = [shifted_sphere_directed(r, d) for d in ds]  # both directions are equal by symmetry
    np.testing.assert_allclose(cd, expected, atol=2e-3)
    assert cd[1] > cd[0] + 0.03


def test_fscore_thresholds_bracket_the_offset():
    a = sphere_points(20000, 0.5, seed=0)
    b = sphere_points(20000, 0.53, seed=1)
    fs = gm.fscore(a, b, (0.01, 0.02, 0.05))
    assert fs[0.01] < 0.05 and fs[0.02] < 0.05
    assert fs[0.05] > 0.99


def _cube(side: float, shift=(0.0, 0.0, 0.0)):
    m = trimesh.creation.box(extents=(side, side, side))
    return np.asarray(m.vertices) + np.asarray(shift), np.asarray(m.faces)


@pytest.mark.parametrize("method", ["parity", "winding"])
def test_cube_iou_against_shifted_cube(method):
    inside = gm.inside_ray_parity if method == "parity" else gm.inside_winding_number
    occ_a = inside(*_cube(0.9))
    occ_b = inside(*_cube(0.9, (0.3, 0.0, 0.0)))
    # analytic: overlap 0.6 of 0.9 along x -> IoU = 0.6 / 1.2
    assert abs(float(gm.volume_iou(occ_a, occ_b)) - 0.5) < 0.03
    assert float(gm.volume_iou(occ_a, occ_a)) == 1.0
    # node count of a 0.9 cube on a 2/64 grid: about (0.9 / (2/64))^3
    assert abs(occ_a.sum() / (0.9 * 32) ** 3 - 1) < 0.1


def test_volume_iou_batched_and_empty():
    a = np.zeros((2, 4, 4, 4), bool)
    b = np.zeros((2, 4, 4, 4), bool)
    a[0, :2] = True
    b[0, 1:3] = True
    out = gm.volume_iou(a, b)
    np.testing.assert_allclose(out, [1 / 3, 1.0])


def test_winding_number_matches_brute_force_and_handles_holes():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    pts = np.random.default_rng(0).uniform(-0.8, 0.8, size=(300, 3))
    w = gm.winding_number(v, f, pts)
    tri = v[f]
    exact = np.array(
        [
            gm._solid_angles(p[None, None], tri[None, :, 0], tri[None, :, 1], tri[None, :, 2]).sum()
            for p in pts
        ]
    )
    exact = exact / (4 * math.pi)
    np.testing.assert_allclose(w, exact, atol=0.02)
    r = np.linalg.norm(pts, axis=1)
    far_from_surface = np.abs(r - 0.5) > 0.03
    assert np.array_equal((w > 0.5)[far_from_surface], (r < 0.5)[far_from_surface])

    # open box (the +x face removed): parity breaks along x, the winding number stays close
    cv, cf = _cube(0.9)
    cn = np.cross(cv[cf[:, 1]] - cv[cf[:, 0]], cv[cf[:, 2]] - cv[cf[:, 0]])
    centers = cv[cf].mean(1)
    keep = ~((centers[:, 0] > 0.4) & (cn[:, 0] > 0))
    closed = gm.inside_winding_number(cv, cf)
    wn_open = gm.inside_winding_number(cv, cf[keep])
    par_open = gm.inside_ray_parity(cv, cf[keep])
    assert float(gm.volume_iou(wn_open, closed)) > 0.8
    assert float(gm.volume_iou(par_open, closed)) < 0.8


def _gt(root, name: str):
    m = load_mesh(root / "objects" / name / "model.obj")
    angle = json.loads((root / "gt_rotate_angle_deg.json").read_text())[name]
    v, _, _ = normalize_unit(m.vertices)
    return v @ rotation_z(-angle).T, m.faces


def test_parity_iou_reproduces_published_values(gso_dir):
    """Values measured with mesh2sdf (size 64, fix=False, sdf < 0) on the real chicken (data README)."""
    v, f = _gt(gso_dir, "chicken")
    occ = gm.inside_ray_parity(v, f)
    scaled = gm.inside_ray_parity(v * 1.03 + np.array([0.01, 0.0, 0.0]), f)
    rotated = gm.inside_ray_parity(v @ rotation_z(10).T, f)
    sv, sf = _gt(gso_dir, "soap")
    soap = gm.inside_ray_parity(sv, sf)
    assert abs(float(gm.volume_iou(occ, scaled)) - 0.9022) < 5e-4
    assert abs(float(gm.volume_iou(occ, rotated)) - 0.9824) < 5e-4
    assert abs(float(gm.volume_iou(occ, soap)) - 0.0960) < 5e-4


def test_sampling_rejects_empty_and_degenerate_meshes():
    with pytest.raises(ValueError, match="empty"):
        gm.sample_surface(np.zeros((3, 3)), np.zeros((0, 3), int), 10)
    with pytest.raises(ValueError, match="zero"):
        gm.sample_surface(np.zeros((3, 3)), np.array([[0, 1, 2]]), 10)


def test_chamfer_fscore_matches_brute_force_distances():
    a = sphere_points(1500, 0.5, seed=0)
    b = sphere_points(1200, 0.52, center=(0.01, 0, 0), seed=1)
    # reference: the full distance matrix, no KD-tree
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    d_ab, d_ba = d.min(1), d.min(0)
    thresholds = (0.01, 0.02, 0.05)
    cd, fs = gm.chamfer_fscore(a, b, thresholds, workers=-1)
    assert float(cd) == pytest.approx(0.5 * (d_ab.mean() + d_ba.mean()), rel=1e-12)
    assert float(gm.chamfer_distance(a, b)) == pytest.approx(float(cd), rel=1e-12)
    fs_alone = gm.fscore(a, b, thresholds)
    for t in thresholds:
        p, r = (d_ab < t).mean(), (d_ba < t).mean()
        ref = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        assert float(fs[t]) == pytest.approx(ref, abs=1e-12)
        assert float(fs_alone[t]) == pytest.approx(ref, abs=1e-12)
    assert 0 < fs[0.02] < 1  # the thresholds straddle the offset: a non-trivial value
    with pytest.raises(ValueError, match="batch sizes"):
        gm.fscore(np.stack([a, a]), b[None], thresholds)


def _sphere_with_hole(subdivisions: int = 3, radius: float = 0.6):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v, f = np.asarray(m.vertices), np.asarray(m.faces)
    c = v[f].mean(1)
    # two opposite quarters of the +x half removed: one hole whose rim is not planar, so the cap's
    # solid angle (not only the crossing count of mesh + cap) decides nodes near the opening
    return v, f[~((c[:, 0] > 0) & (c[:, 1] * c[:, 2] > 0))]


def _two_spheres_soup():
    a = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    va = np.asarray(a.vertices)
    fa = np.asarray(a.faces)
    v = np.concatenate([va - [0.2, 0, 0], va + [0.2, 0.05, 0]])
    return v, np.concatenate([fa, fa + len(va)])  # self-intersecting: w = 2 where they overlap


def test_boundary_cap_closes_open_meshes_and_ignores_seams():
    v, f = _sphere_with_hole()
    cv, wf, cap = gm.boundary_cap(v, f)
    assert len(cap) > 0 and np.array_equal(cv[wf], v[f])  # welding keeps the triangles

    def closed(tris):  # every directed edge is cancelled by its reverse: no boundary
        uses = Counter(map(tuple, np.concatenate([tris[:, [i, (i + 1) % 3]] for i in range(3)]).tolist()))
        return all(uses[(b, a)] == k for (a, b), k in uses.items())

    assert not closed(wf) and closed(np.concatenate([wf, cap]))
    # a closed sphere with duplicated (UV-seam style) vertices has no boundary after welding
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    sv = np.concatenate([m.vertices, m.vertices])
    sf = np.asarray(m.faces).copy()
    sf[::2] += len(m.vertices)  # half the faces use the copies
    assert len(gm.boundary_cap(sv, sf)[2]) == 0


@pytest.mark.parametrize("case", ["sphere_with_hole", "hole_flipped", "two_spheres_soup"])
def test_fast_winding_matches_exact_on_open_and_soup_meshes(case):
    if case == "two_spheres_soup":
        v, f = _two_spheres_soup()
    else:
        v, f = _sphere_with_hole()
        if case == "hole_flipped":
            f = f[:, ::-1]
    R = 24
    exact = gm.inside_winding_number(v, f, R, method="exact")
    fast = gm.inside_winding_number(v, f, R, method="fast")
    via_cap_tree = gm.inside_winding_number(v, f, R, method="fast", cap_exact_pairs=0)
    if case == "hole_flipped":  # inward faces: w ~ -1 inside, nothing is occupied
        assert not exact.any() and not fast.any()
        return
    assert exact.sum() > 500
    assert float(gm.volume_iou(fast, exact)) >= 0.999
    assert float(gm.volume_iou(via_cap_tree, exact)) >= 0.999
    if case == "sphere_with_hole":
        cv, wf, cap = gm.boundary_cap(v, f)
        capped = gm.inside_winding_number(cv, np.concatenate([wf, cap]), R, method="exact")
        # the cap term matters here: mesh + cap alone (its integer crossing count) is clearly different
        assert float(gm.volume_iou(capped, exact)) < 0.95
        closed = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
        occ_closed = gm.inside_winding_number(closed.vertices, closed.faces, R)
        assert fast.sum() < occ_closed.sum()  # the hole lowers w below 0.5 near the opening
        assert float(gm.volume_iou(fast, occ_closed)) > 0.8
        # parity is confused by the hole, the winding number is not
        assert float(gm.volume_iou(gm.inside_ray_parity(v, f, R), exact)) < 0.99


@pytest.mark.parametrize(("name", "resolution"), [("oil", 32), ("chicken", 20)])
def test_fast_winding_matches_exact_on_gso_meshes(gso_dir, name, resolution):
    v, f = _gt(gso_dir, name)
    exact = gm.inside_winding_number(v, f, resolution, method="exact")
    fast = gm.inside_winding_number(v, f, resolution, method="fast")
    assert exact.sum() > 100
    assert float(gm.volume_iou(fast, exact)) >= 0.999
    # full-resolution grid: the fast decisions equal exact winding numbers at a random node subset
    occ = gm.inside_winding_number(v, f, 64, method="fast")
    grid = gm.grid_points(64)
    box = np.all((grid >= v.min(0)) & (grid <= v.max(0)), axis=-1)
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [rng.choice(np.flatnonzero(box & occ), 400), rng.choice(np.flatnonzero(box & ~occ), 400)]
    )
    w = gm.winding_number(v, f, grid.reshape(-1, 3)[ids], method="exact")
    np.testing.assert_array_equal(w > 0.5, occ.reshape(-1)[ids])


def test_winding_method_is_checked():
    with pytest.raises(ValueError, match="winding method"):
        gm.inside_winding_number(*_cube(0.5), 8, method="approx")
    with pytest.raises(ValueError, match="winding number method"):
        gm.winding_number(*_cube(0.5), np.zeros((1, 3)), method="fast")
