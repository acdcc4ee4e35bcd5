"""UV unwrap + texture baking tests: analytic colour fields, seam padding, degenerate meshes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from reference_files import fixtures_having

from pipeline.texturing.bake import (
    BakeConfig,
    bake_texture,
    fill_texture,
    raw_to_texture_values,
    sample_texture,
)
from pipeline.texturing.unwrap import UnwrapConfig, unwrap


def field(p: torch.Tensor) -> torch.Tensor:
    """Smooth analytic raw colour in [0.05, 0.85] (texture values ~134..236: far from the background)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    return torch.stack([0.45 + 0.4 * torch.sin(2.0 * x), 0.45 + 0.4 * torch.cos(1.5 * y), 0.45 + 0.4 * z], 1)


def expected_texture_values(p: np.ndarray) -> np.ndarray:
    return raw_to_texture_values(field(torch.as_tensor(p, dtype=torch.float32))).numpy()


def random_surface_samples(mesh, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    areas = np.linalg.norm(
        np.cross(*(mesh.vertices[mesh.faces[:, k]] - mesh.vertices[mesh.faces[:, 0]] for k in (1, 2))), axis=1
    )
    fi = rng.choice(len(mesh.faces), size=n, p=areas / areas.sum())
    b = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    p = (mesh.vertices[mesh.faces[fi]] * b[..., None]).sum(1)
    uv = (mesh.uvs[mesh.faces[fi]] * b[..., None]).sum(1)
    return p, uv


def signed_volume(v, f):
    t = v[f]
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)


@pytest.fixture(scope="module")
def sphere_bake():
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    return bake_texture(m.vertices, m.faces, field, BakeConfig(texture_size=256))


@pytest.fixture(scope="module")
def cube_bake():
    m = trimesh.creation.box(extents=(1.2, 1.0, 0.8))
    v, f = trimesh.remesh.subdivide_to_size(m.vertices, m.faces, max_edge=0.2)
    return bake_texture(v, f, field, BakeConfig(texture_size=256))


@pytest.mark.parametrize("name", ["sphere_bake", "cube_bake"])
def test_texture_lookups_match_analytic_field(name, request):
    mesh = request.getfixturevalue(name)
    assert mesh.texture.shape == (256, 256, 3) and mesh.texture.dtype == np.uint8
    assert mesh.frame == "ccm"
    p, uv = random_surface_samples(mesh, 4000)
    got = sample_texture(mesh.texture, uv)
    err = np.abs(got - expected_texture_values(p))
    assert err.mean() < 1.5, err.mean()  # truncation alone costs ~0.5
    # No background texel sampled anywhere: background (1/255 or 0) would cost > 100 here.
    assert np.percentile(err, 99.9) < 12 and err.max() < 40, (np.percentile(err, 99.9), err.max())
    # Every texel was filled by the padding.
    assert mesh.texture.min() > 100


def test_bake_keeps_outward_winding_and_geometry(sphere_bake):
    assert signed_volume(sphere_bake.vertices, sphere_bake.faces) > 0
    r = np.linalg.norm(sphere_bake.vertices, axis=1)
    np.testing.assert_allclose(r, 0.8, atol=1e-5)
    assert sphere_bake.uvs.min() >= 0 and sphere_bake.uvs.max() <= 1


def test_fill_texture_fills_everything_from_covered_values():
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(37, 53, 3, generator=g) * 100 + 50
    covered = torch.zeros(37, 53, dtype=torch.bool)
    covered[5:9, 7:20] = True
    covered[30, 50] = True
    out = fill_texture(vals.clone(), covered, dilation_rings=2)
    torch.testing.assert_close(out[covered], vals[covered])
    assert torch.isfinite(out).all()
    lo, hi = vals[covered].min(0).values, vals[covered].max(0).values
    assert (out >= lo - 1e-3).all() and (out <= hi + 1e-3).all()  # convex combinations of covered texels
    # First ring equals the mean of its covered neighbours.
    torch.testing.assert_close(out[9, 12], vals[8, 11:14].mean(0))
    with pytest.raises(ValueError, match="no covered"):
        fill_texture(vals, torch.zeros(37, 53, dtype=torch.bool))


def test_reference_colour_mapping_matches_fixture():
    for p in fixtures_having("recon", ["mesh_vertex_rgb_raw", "mesh_vertex_rgb255_texture_mapping"]):
        d = np.load(p)
        got = raw_to_texture_values(torch.as_tensor(d["mesh_vertex_rgb_raw"])).numpy()
        np.testing.assert_allclose(got, d["mesh_vertex_rgb255_texture_mapping"], atol=2e-2)


def test_unwrap_decimates_above_face_budget():
    m = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces
    v, f, uv, vmap = unwrap(m.vertices, m.faces, UnwrapConfig(max_faces=1200, texture_size=256))
    assert 1000 <= len(f) <= 1200
    assert v.shape == (len(uv), 3) and vmap.shape == (len(uv),)
    assert signed_volume(v, f) > 0
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=0.05)


def test_degenerate_meshes():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, -1, 0.5]], dtype=np.float32)
    with pytest.raises(ValueError, match="no faces"):
        bake_texture(v, np.zeros((0, 3), dtype=np.int64), field, BakeConfig(texture_size=64))
    bad = v.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        bake_texture(bad, [[0, 1, 2]], field, BakeConfig(texture_size=64))
    with pytest.raises(ValueError, match="out of range"):
        bake_texture(v, [[0, 1, 7]], field, BakeConfig(texture_size=64))
    with pytest.raises(ValueError, match="degenerate"):
        bake_texture(v, [[0, 0, 1]], field, BakeConfig(texture_size=64))
    line = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], dtype=np.float32)
    with pytest.raises(ValueError, match="zero area"):
        bake_texture(line, [[0, 1, 2], [1, 2, 3]], field, BakeConfig(texture_size=64))
    # One face and a non-manifold fan (three faces on one edge) are handled.
    one = bake_texture(v, [[0, 1, 2]], field, BakeConfig(texture_size=64))
    assert len(one.faces) == 1 and one.texture.min() > 100
    fan = bake_texture(v, [[0, 1, 2], [1, 0, 3], [0, 1, 4]], field, BakeConfig(texture_size=64))
    assert len(fan.faces) == 3
    p, uv = random_surface_samples(fan, 500)
    assert np.abs(sample_texture(fan.texture, uv) - expected_texture_values(p)).mean() < 3
    with pytest.raises(ValueError, match="color_fn"):
        bake_texture(v, [[0, 1, 2]], lambda p: p[:, :2], BakeConfig(texture_size=64))


def _mlp_field(seed: int = 0):
    """A small ReLU MLP colour field (the shape of the model's RGB head, narrower): its matmuls are what
    autocast lowers to bfloat16."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(3, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 3),
    )
    return lambda p: torch.tanh(mlp(p))


def test_bake_reports_step_timings_and_bfloat16_query_stays_close():
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    fn = _mlp_field()
    timings: dict[str, float] = {}
    exact = bake_texture(m.vertices, m.faces, fn, BakeConfig(texture_size=128), timings=timings)
    assert {"xatlas", "rasterize", "interpolate", "query", "fill"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    fast = bake_texture(m.vertices, m.faces, fn, BakeConfig(texture_size=128, query_dtype="bfloat16"))
    assert np.array_equal(fast.uvs, exact.uvs)  # same atlas: only the colour query differs
    diff = np.abs(fast.texture.astype(int) - exact.texture.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert diff.max() > 0  # the query really ran in bfloat16
    with pytest.raises(ValueError, match="query_dtype"):
        bake_texture(m.vertices, m.faces, fn, BakeConfig(texture_size=128, query_dtype="float16"))
