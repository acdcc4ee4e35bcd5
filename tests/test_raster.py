"""Rasterizer tests: analytic cases for the PyTorch backend, nvdiffrast parity where it imports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.raster import (
    TorchRasterizer,
    get_rasterizer,
    look_at,
    nvdiffrast_available,
    orthographic,
    perspective,
    perspective_from_opencv,
    to_clip,
)


def clip_space_reference(clip: np.ndarray, faces: np.ndarray, h: int, w: int):
    """Independent float64 reference for arbitrary clip coordinates (any sign of w): per pixel centre (x, y)
    and triangle, solve for the barycentrics b of the triangle point C = sum b_i C_i that projects there
    (C.x - x C.w = 0, C.y - y C.w = 0, sum b = 1); it is drawn when all b >= 0, C.w > 0 and
    -C.w <= C.z <= C.w. ``ambiguous`` marks pixels within 1e-6 of an edge, of the near / far plane or
    of another depth."""
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    x = ((2 * jj + 1) / w - 1).ravel()
    y = ((2 * ii + 1) / h - 1).ravel()
    tid = -np.ones(h * w, dtype=np.int64)
    depth = np.full(h * w, np.inf)
    bary = np.zeros((h * w, 3))
    ambiguous = np.zeros(h * w, dtype=bool)
    for t, f in enumerate(faces):
        c = clip[f].astype(np.float64)  # (3, 4)
        a = np.stack(
            [c[:, 0] - x[:, None] * c[:, 3], c[:, 1] - y[:, None] * c[:, 3], np.ones((x.size, 3))], 1
        )  # (P, 3 equations, 3 unknowns)
        if abs(np.linalg.det(c[:, [0, 1, 3]])) < 1e-9:
            continue  # degenerate: the plane through the eye, nothing drawn
        b = np.linalg.solve(a, np.tile([0.0, 0.0, 1.0], (x.size, 1))[..., None])[..., 0]
        cw, cz = b @ c[:, 3], b @ c[:, 2]
        z = cz / cw
        inside = (b.min(1) >= 0) & (cw > 0) & (z >= -1) & (z <= 1)
        close = (np.abs(b).min(1) < 1e-6) | (np.abs(np.abs(z) - 1) < 1e-6)
        close &= (b.min(1) > -1e-6) & (cw > 0) & (np.abs(z) < 1 + 1e-6)
        ambiguous |= close | (inside & (np.abs(z - depth) < 1e-6))
        win = inside & (z < depth)
        tid[win], depth[win], bary[win] = t, z[win], b[win]
    depth[tid < 0] = 0
    return tid.reshape(h, w), bary.reshape(h, w, 3), depth.reshape(h, w), ambiguous.reshape(h, w)


def test_single_triangle_coverage_and_barycentrics():
    # Non-square image, perspective w, vertex positions chosen away from pixel centres.
    clip = np.array([[-0.83, -0.71, 0.1, 1.0], [1.37, -0.52, 0.4, 1.5], [-0.21, 1.13, -0.3, 1.2]], np.float32)
    faces = np.array([[0, 1, 2]])
    h, w = 23, 37
    out = TorchRasterizer().rasterize(torch.tensor(clip), torch.tensor(faces), (h, w))
    tid, bary, depth, amb = clip_space_reference(clip, faces, h, w)
    assert not amb.any()
    assert out.triangle_id.shape == (1, h, w) and out.bary.shape == (1, h, w, 3)
    np.testing.assert_array_equal(out.triangle_id[0].numpy(), tid)
    assert 150 < (tid >= 0).sum() < h * w  # partial coverage
    np.testing.assert_allclose(out.bary[0].numpy(), bary, atol=2e-5)
    np.testing.assert_allclose(out.depth[0].numpy(), depth, atol=2e-5)
    # barycentrics reproduce the pixel centre in NDC (affine in screen space for w = 1 -> check sums)
    cov = tid >= 0
    np.testing.assert_allclose(out.bary[0].numpy()[cov].sum(-1), 1.0, atol=1e-5)


def test_coverage_area_matches_analytic_triangle():
    # Right triangle with legs of 0.9 NDC units -> area 0.405 NDC^2 = 0.405/4 * H*W pixels.
    h = w = 200
    clip = torch.tensor([[-0.6011, -0.6013, 0, 1], [0.2989, -0.6013, 0, 1], [-0.6011, 0.2987, 0, 1.0]])
    out = TorchRasterizer().rasterize(clip, torch.tensor([[0, 1, 2]]), (h, w))
    n = int((out.triangle_id >= 0).sum())
    expected = 0.405 / 4 * h * w
    assert abs(n - expected) < 0.02 * expected


def test_depth_ordering_of_overlapping_triangles():
    near = [[-0.8, -0.8, -0.5, 1], [0.8, -0.8, -0.5, 1], [0.0, 0.8, -0.5, 1]]
    far = [[-0.9, -0.9, 0.5, 1], [0.9, -0.9, 0.5, 1], [0.0, 0.9, 0.5, 1]]
    r = TorchRasterizer()
    for order in ([near, far], [far, near]):
        clip = torch.tensor(order[0] + order[1], dtype=torch.float32)
        out = r.rasterize(clip, torch.tensor([[0, 1, 2], [3, 4, 5]]), (32, 32))
        near_id = 0 if order[0] is near else 1
        centre = out.triangle_id[0, 16, 16].item()
        assert centre == near_id
        assert out.depth[0, 16, 16].item() == pytest.approx(-0.5, abs=1e-6)
        ids = set(out.triangle_id.unique().tolist())
        assert ids == {-1, 0, 1}  # far triangle visible only around the near one
    # Equal depth: lower triangle index wins (nvdiffrast rule).
    clip = torch.tensor(near + near, dtype=torch.float32)
    out = r.rasterize(clip, torch.tensor([[3, 4, 5], [0, 1, 2]]), (32, 32))
    assert set(out.triangle_id.unique().tolist()) == {-1, 0}
    # Crossing triangles: the visible one changes across the image.
    a = [[-1, -0.5, -0.8, 1], [1, -0.5, 0.8, 1], [0, 0.9, 0.0, 1]]
    b = [[-1, -0.4, 0.8, 1], [1, -0.4, -0.8, 1], [0, 0.8, 0.0, 1]]
    out = r.rasterize(
        torch.tensor(a + b, dtype=torch.float32), torch.tensor([[0, 1, 2], [3, 4, 5]]), (16, 16)
    )
    row = out.triangle_id[0, 6]
    assert row[2].item() == 0 and row[13].item() == 1


def _cube():
    import trimesh

    m = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


@pytest.mark.parametrize("angle_deg", [0.0, 30.0])
def test_cube_silhouette_area_orthographic(angle_deg):
    verts, faces = _cube()
    a = math.radians(angle_deg)
    rot = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    verts = verts @ rot.T
    eye = np.array([0.0, 0.0, 3.0])
    mvp = orthographic(1.0, 1.0, near=0.5, far=6.0, w2c=look_at(eye, [0, 0, 0], [0, 1, 0]))
    h = w = 256
    out = TorchRasterizer().rasterize(to_clip(verts, mvp), faces, (h, w))
    px_area = (2.0 / w) * (2.0 / h)
    area = float((out.triangle_id >= 0).sum()) * px_area
    expected = 1.0 * (abs(math.cos(a)) + abs(math.sin(a)))
    assert abs(area - expected) < 0.02 * expected
    # Visible depth: nearest face; the front face (+Z side) is at camera distance 2.5 at the centre.
    d = out.depth[0, h // 2, w // 2].item()
    assert d == pytest.approx(2 * (2.5 - 0.5) / 5.5 - 1, abs=0.05 if angle_deg else 1e-5)


def test_perspective_from_opencv_matches_pinhole_projection():
    k = np.array([[120.0, 0.0, 47.3], [0.0, 110.0, 31.9], [0.0, 0.0, 1.0]])
    w2c = look_at([0.3, -0.2, -2.5], [0, 0, 0], [0, -1, 0])  # OpenCV camera, y down
    width, height = 96, 64
    mvp = perspective_from_opencv(k, w2c, width, height, near=0.5, far=6.0)
    # A tilted quad; interpolated world positions must project back to their pixel centres.
    quad = torch.tensor([[-1.5, -1.0, 0.4], [1.5, -1.0, -0.3], [1.5, 1.0, -0.6], [-1.5, 1.0, 0.2]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    r = TorchRasterizer()
    out = r.rasterize(to_clip(quad, mvp), faces, (height, width))
    pos = r.interpolate(quad, out, faces)[0].double().numpy()
    cov = out.triangle_id[0].numpy() >= 0
    assert cov.sum() > 0.3 * width * height
    cam = (w2c.double().numpy()[:3, :3] @ pos[cov].T).T + w2c.double().numpy()[:3, 3]
    uv = (k @ cam.T).T
    uv = uv[:, :2] / uv[:, 2:3]
    ii, jj = np.nonzero(cov)
    np.testing.assert_allclose(uv[:, 0], jj, atol=2e-3)
    np.testing.assert_allclose(uv[:, 1], ii, atol=2e-3)


def test_interpolate_is_differentiable_wrt_attributes():
    r = TorchRasterizer()
    clip = torch.tensor([[-0.9, -0.9, 0, 1], [0.9, -0.9, 0, 1], [0.0, 0.9, 0, 1], [0.9, 0.9, 0.5, 1]])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    out = r.rasterize(clip, faces, (16, 16))
    attr = torch.randn(4, 2, requires_grad=True)
    img = r.interpolate(attr, out, faces)
    assert img.shape == (1, 16, 16, 2)
    weights = torch.randn(1, 16, 16, 2)
    (img * weights).sum().backward()
    # d loss / d attr[v, c] = sum over pixels of bary weight of v times weights[..., c]
    tid = out.triangle_id[0]
    valid = tid >= 0
    vidx = faces[tid[valid]].reshape(-1)  # (P*3,)
    contrib = (out.bary[0][valid][:, :, None] * weights[0][valid][:, None, :]).reshape(-1, 2)
    expected = torch.zeros(4, 2).index_add_(0, vidx, contrib)
    assert valid.sum() > 100
    torch.testing.assert_close(attr.grad, expected, atol=1e-5, rtol=1e-5)
    # per-view attributes
    img_b = r.interpolate(attr.detach()[None].expand(1, -1, -1), out, faces)
    torch.testing.assert_close(img_b, img.detach())


def test_tiling_and_chunking_do_not_change_results():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(60, 4, generator=g) * 2.4 - 1.2
    v[:, 2] = torch.rand(60, generator=g) * 1.8 - 0.9
    v[:, 3] = 1.0 + torch.rand(60, generator=g) * 0.3
    faces = torch.randint(0, 60, (80, 3), generator=g)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    a = TorchRasterizer().rasterize(v, faces, (70, 90))
    b = TorchRasterizer(chunk_pixels=500, tile=8).rasterize(v, faces, (70, 90))
    tid, bary, _, _ = clip_space_reference(v.numpy(), faces.numpy(), 70, 90)
    for out in (a, b):
        agree = (out.triangle_id[0].numpy() == tid).mean()
        assert agree > 0.999  # only exact ties on shared edges may differ
    torch.testing.assert_close(a.triangle_id, b.triangle_id)
    torch.testing.assert_close(a.bary, b.bary)
    torch.testing.assert_close(a.depth, b.depth)
    m = (a.triangle_id[0].numpy() == tid) & (tid >= 0)
    np.testing.assert_allclose(a.bary[0].numpy()[m], bary[m], atol=1e-4)


def test_batch_of_views_equals_single_views():
    verts, faces = _cube()
    mats = torch.stack(
        [
            orthographic(1.0, near=0.5, far=6.0, w2c=look_at(e, [0, 0, 0], [0, 1, 0]))
            for e in ([0, 0.5, 3.0], [2.0, 1.0, 2.0], [-3.0, 0.2, 0.1])
        ]
    )
    r = TorchRasterizer()
    batch = r.rasterize(to_clip(verts, mats), faces, (40, 48))
    assert batch.triangle_id.shape == (3, 40, 48)
    for i in range(3):
        single = r.rasterize(to_clip(verts, mats[i]), faces, (40, 48))
        torch.testing.assert_close(batch.triangle_id[i], single.triangle_id[0])
        torch.testing.assert_close(batch.bary[i], single.bary[0])


def test_triangles_behind_camera_and_outside_depth_range_are_not_drawn():
    r = TorchRasterizer()
    clip = torch.tensor(
        [[-1, -1, 0, -1.0], [1, -1, 0, -1], [0, 1, 0, -1], [-1, -1, 2, 1], [1, -1, 2, 1], [0, 1, 2, 1]]
    )
    out = r.rasterize(clip, torch.tensor([[0, 1, 2], [3, 4, 5]]), (8, 8))
    assert (out.triangle_id == -1).all()


def ray_cast_reference(verts, faces, mvp, h: int, w: int):
    """Independent float64 reference for a camera: per pixel, the segment between the unprojected near and far
    points (NDC z = -1 and z = 1, i.e. exactly the -1 <= z/w <= 1 part of the pixel's ray) is intersected with
    every triangle in world space (Moller-Trumbore). Returns ids, barycentrics, NDC depth and an ``ambiguous``
    mask of pixels whose centre is within 1e-6 (barycentric) of an edge or whose hit is within 1e-6 of the
    near / far plane or of another triangle's depth."""
    m = np.asarray(mvp, dtype=np.float64)
    minv = np.linalg.inv(m)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    x = (2 * jj + 1) / w - 1
    y = (2 * ii + 1) / h - 1

    def unproject(z):
        p = np.stack([x, y, np.full_like(x, z), np.ones_like(x)], -1) @ minv.T
        return p[..., :3] / p[..., 3:]

    orig, end = unproject(-1.0), unproject(1.0)
    d = end - orig  # segment parameter s in [0, 1] <-> NDC depth in [-1, 1]
    tid = -np.ones((h, w), dtype=np.int64)
    depth = np.full((h, w), np.inf)
    bary = np.zeros((h, w, 3))
    ambiguous = np.zeros((h, w), dtype=bool)
    v = np.asarray(verts, dtype=np.float64)
    for t, (a, b, c) in enumerate(np.asarray(faces)):
        e1, e2 = v[b] - v[a], v[c] - v[a]
        pv = np.cross(d, e2)
        det = pv @ e1
        with np.errstate(divide="ignore", invalid="ignore"):
            tv = orig - v[a]
            u = (tv * pv).sum(-1) / det
            qv = np.cross(tv, e1)
            vv = (d * qv).sum(-1) / det
            s = (qv @ e2) / det
        hit = orig + s[..., None] * d
        hom = np.concatenate([hit, np.ones_like(s)[..., None]], -1) @ m.T
        z = hom[..., 2] / hom[..., 3]
        bs = np.stack([1 - u - vv, u, vv], -1)
        inside = (bs.min(-1) >= 0) & (s >= 0) & (s <= 1)
        near_edge = (np.abs(bs).min(-1) < 1e-6) | (np.abs(s) < 1e-6) | (np.abs(s - 1) < 1e-6)
        near_edge &= (bs.min(-1) > -1e-6) & (s > -1e-6) & (s < 1 + 1e-6)
        ambiguous |= near_edge | (inside & (np.abs(z - depth) < 1e-6))
        win = inside & (z < depth)
        tid[win] = t
        depth[win] = z[win]
        bary[win] = bs[win]
    depth[tid < 0] = 0
    return tid, bary, depth, ambiguous


def _check_against_ray_cast(verts, faces, mvp, h, w, min_covered):
    clip = to_clip(torch.as_tensor(verts, dtype=torch.float32), mvp)
    out = TorchRasterizer(chunk_pixels=4096, tile=16).rasterize(clip, torch.as_tensor(faces), (h, w))
    tid, bary, depth, amb = ray_cast_reference(verts, faces, mvp, h, w)
    got = out.triangle_id[0].numpy()
    clear = ~amb
    assert (tid[clear] >= 0).sum() >= min_covered
    np.testing.assert_array_equal(got[clear], tid[clear])
    m = clear & (tid >= 0)
    np.testing.assert_allclose(out.bary[0].numpy()[m], bary[m], atol=1e-4)
    np.testing.assert_allclose(out.depth[0].numpy()[m], depth[m], atol=1e-4)
    assert amb.mean() < 0.01
    return out, tid, amb


def test_triangles_crossing_the_camera_plane_match_ray_casting():
    # Ground-plane quad from behind the camera (w < 0 there) to beyond the far plane, plus a wall triangle
    # with one vertex behind the camera; nvdiffrast draws the part with -1 <= z/w <= 1 of each.
    verts = np.array(
        [
            [-20, 1.0, -10],
            [20, 1, -10],
            [20, 1, 30],
            [-20, 1, 30],
            [-1.5, -2, -3],
            [2.5, -1, 6],
            [-2, 0.8, 5],
        ],
        dtype=np.float32,
    )
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    h, w = 48, 64
    mvp = perspective(60.0, w, h, near=0.3, far=25.0) @ look_at([0.3, -0.2, 0.0], [0.1, 0.6, 5.0], [0, -1, 0])
    clip = to_clip(torch.tensor(verts), mvp)[0]
    assert (clip[:, 3] < 0).sum() >= 3  # vertices behind the camera
    out, tid, amb = _check_against_ray_cast(verts, faces, mvp, h, w, min_covered=0.5 * h * w)
    assert {0, 1, 2} <= set(np.unique(tid[~amb]).tolist())
    assert (tid[~amb] == -1).any()  # the sky above the horizon / beyond the far plane stays empty


def test_triangle_entirely_behind_the_camera_draws_nothing():
    h, w = 32, 40
    mvp = perspective(70.0, w, h, near=0.5, far=10.0)  # camera at the origin looking along +z
    # Behind the eye (w < 0; naive division by w would put it on screen), and between eye and near plane.
    verts = np.array(
        [
            [-1, -0.8, -2.0],
            [1, -0.8, -2],
            [0, 1, -2],
            [-3, -3, 0.2],
            [3, -3, 0.2],
            [0, 3, 0.2],
            [-1, -1, -1],
            [1, 0, 0.4],
        ],
        dtype=np.float32,
    )
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 5]])
    clip = to_clip(torch.tensor(verts), mvp)
    nd = clip[0, :3, :2] / clip[0, :3, 3:]
    assert (nd.abs() < 1).all()  # the w < 0 triangle "projects" onto the image
    out = TorchRasterizer().rasterize(clip, faces, (h, w))
    assert (out.triangle_id == -1).all()
    assert (out.bary == 0).all() and (out.depth == 0).all()


def test_triangle_cut_by_the_near_plane_draws_only_its_far_side():
    h, w = 40, 56
    mvp = perspective(75.0, w, h, near=1.0, far=10.0)
    # Triangle 0: all vertices in front of the eye, one closer than the near plane (0 < w < near).
    # Triangle 1: one vertex behind the eye (w < 0).
    verts = np.array(
        [
            [-0.15, -0.1, 0.3],
            [2.0, -0.3, 3.0],
            [-0.6, 1.5, 2.5],
            [1.0, 1.0, -1.5],
            [-2.0, 0.5, 4.0],
            [0.5, -1.5, 4.0],
        ],
        dtype=np.float32,
    )
    for faces in (np.array([[0, 1, 2]]), np.array([[3, 4, 5]])):
        out, tid, amb = _check_against_ray_cast(verts, faces, mvp, h, w, min_covered=50)
        assert (out.depth[0][out.triangle_id[0] >= 0] >= -1).all()
    # Triangle 0 projects (all w > 0) onto pixels whose hit is in front of the near plane: those stay empty.
    clip = to_clip(torch.tensor(verts[:3]), mvp)[0].double().numpy()
    nd = clip[:, :2] / clip[:, 3:]
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    px, py = (2 * jj + 1) / w - 1, (2 * ii + 1) / h - 1
    (x0, y0), (x1, y1), (x2, y2) = nd
    det = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    b1 = ((px - x0) * (y2 - y0) - (py - y0) * (x2 - x0)) / det
    b2 = ((x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)) / det
    projected = (b1 > 1e-3) & (b2 > 1e-3) & (1 - b1 - b2 > 1e-3)
    drawn = TorchRasterizer().rasterize(torch.tensor(clip, dtype=torch.float32), [[0, 1, 2]], (h, w))
    clipped = projected & (drawn.triangle_id[0].numpy() < 0)
    assert clipped.sum() > 20 and (projected & ~clipped).sum() > 20


def test_random_clip_space_triangles_with_any_w_match_reference():
    g = torch.Generator().manual_seed(5)
    v = torch.rand(60, 4, generator=g) * 2.4 - 1.2
    v[:, 2] = torch.rand(60, generator=g) * 2.6 - 1.3  # some beyond the near / far planes
    v[:, 3] = torch.rand(60, generator=g) * 1.8 - 0.4  # about a fifth at w <= 0
    faces = torch.randint(0, 60, (70, 3), generator=g)
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    h, w = 45, 60
    out = TorchRasterizer(chunk_pixels=3000, tile=8).rasterize(v, faces, (h, w))
    tid, bary, depth, amb = clip_space_reference(v.numpy(), faces.numpy(), h, w)
    crossing = (v[faces][..., 3] <= 0).any(1) & (v[faces][..., 3] > 0).any(1)
    assert np.isin(tid, torch.nonzero(crossing).squeeze(1).numpy()).sum() > 200  # crossing triangles drawn
    clear = ~amb
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(out.triangle_id[0].numpy()[clear], tid[clear])
    m = clear & (tid >= 0)
    np.testing.assert_allclose(out.bary[0].numpy()[m], bary[m], atol=1e-4)
    np.testing.assert_allclose(out.depth[0].numpy()[m], depth[m], atol=1e-5)


def test_reduced_precision_matmul_setting_does_not_change_results():
    # The backend evaluates its affine functions with a float32 GEMM only where that is exact; with a
    # reduced-precision setting it switches to the elementwise form, which must give the same raster.
    g = torch.Generator().manual_seed(3)
    v = torch.rand(80, 4, generator=g) * 2.4 - 1.2
    v[:, 2] = torch.rand(80, generator=g) * 2.4 - 1.2  # some vertices beyond near / far
    v[:, 3] = torch.rand(80, generator=g) * 1.6 - 0.3  # some at w <= 0
    faces = torch.randint(0, 80, (120, 3), generator=g)
    ref = TorchRasterizer(tile=16).rasterize(v, faces, (50, 70))
    assert (ref.triangle_id >= 0).sum() > 500
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        out = TorchRasterizer(tile=16).rasterize(v, faces, (50, 70))
    finally:
        torch.set_float32_matmul_precision(before)
    same = out.triangle_id == ref.triangle_id
    assert same.float().mean() > 0.999
    m = same & (ref.triangle_id >= 0)
    torch.testing.assert_close(out.bary[m], ref.bary[m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.depth[m], ref.depth[m], atol=1e-6, rtol=0)


def test_bad_inputs_raise_clear_errors():
    r = TorchRasterizer()
    good = torch.tensor([[-1, -1, 0, 1.0], [1, -1, 0, 1], [0, 1, 0, 1]])
    with pytest.raises(ValueError, match="non-finite"):
        r.rasterize(
            torch.tensor([[float("nan"), 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1.0]]), [[0, 1, 2]], (4, 4)
        )
    with pytest.raises(ValueError, match="out of range"):
        r.rasterize(good, torch.tensor([[0, 1, 3]]), (4, 4))
    with pytest.raises(ValueError, match="shape"):
        r.rasterize(good[:, :3], torch.tensor([[0, 1, 2]]), (4, 4))
    with pytest.raises(ValueError, match="resolution"):
        r.rasterize(good, torch.tensor([[0, 1, 2]]), (0, 4))
    empty = r.rasterize(good, torch.zeros((0, 3), dtype=torch.int64), (4, 5))
    assert empty.triangle_id.shape == (1, 4, 5) and (empty.triangle_id == -1).all()
    with pytest.raises(ValueError, match="backend"):
        get_rasterizer("opengl")


def test_get_rasterizer_auto_falls_back_to_torch_on_cpu():
    r = get_rasterizer("auto", device="cpu")
    assert r.name == "torch" and r.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not nvdiffrast_available(), reason="nvdiffrast.torch does not import or no CUDA device")
def test_nvdiffrast_parity():
    """Self-contained: same RasterOutput from both backends on random triangles and a perspective sphere."""
    import trimesh

    dev = torch.device("cuda")
    nv = get_rasterizer("nvdiffrast", device=dev)
    tr = get_rasterizer("torch", device=dev)
    g = torch.Generator().manual_seed(1)
    v = torch.rand(300, 4, generator=g) * 2.4 - 1.2
    v[:, 2] = torch.rand(300, generator=g) * 1.8 - 0.9
    v[:, 3] = 1.0
    faces = torch.randint(0, 300, (400, 3), generator=g)
    sphere = trimesh.creation.icosphere(4)
    sv = torch.tensor(sphere.vertices, dtype=torch.float32)
    mats = torch.stack(
        [
            perspective_from_opencv(
                [[300, 0, 127.5], [0, 300, 95.5], [0, 0, 1]],
                look_at(e, [0, 0, 0], [0, 0, 1]),
                256,
                192,
                0.5,
                8,
            )
            for e in ([0, 3, 0.5], [2.5, 1.0, 1.0])
        ]
    )
    # Camera-plane crossing: the eye inside the sphere, above a ground quad that reaches from behind the eye
    # to beyond the far plane (hundreds of triangles with vertices at w <= 0, near-plane clipping); the
    # ground shows inside the sphere.
    ground = torch.tensor([[-20, 0.8, -10], [20, 0.8, -10], [20, 0.8, 30], [-20, 0.8, 30]])
    n = sv.shape[0]
    gv = torch.cat([sv, ground])
    gf = torch.cat([torch.tensor(sphere.faces), torch.tensor([[n, n + 1, n + 2], [n, n + 2, n + 3]])])
    inner = perspective(70.0, 256, 192, 0.05, 12.0) @ look_at([0.1, 0.35, -0.45], [0.0, 0.8, 5.0], [0, -1, 0])
    assert (to_clip(gv, inner)[..., 3] <= 0).sum() > 100
    cases = [
        (v.to(dev), faces.to(dev), (97, 131)),
        (to_clip(sv, mats).to(dev), torch.tensor(sphere.faces).to(dev), (192, 256)),
        (to_clip(gv, inner).to(dev), gf.to(dev), (192, 256)),
    ]
    for clip, f, res in cases:
        a = nv.rasterize(clip, f, res)
        b = tr.rasterize(clip, f, res)
        same = a.triangle_id == b.triangle_id
        assert same.float().mean().item() > 0.995
        m = same & (a.triangle_id >= 0)
        torch.testing.assert_close(a.bary[m], b.bary[m], atol=2e-4, rtol=0)
        torch.testing.assert_close(a.depth[m], b.depth[m], atol=2e-5, rtol=0)
        attr = torch.randn(clip.shape[-2], 3, device=dev)
        torch.testing.assert_close(
            nv.interpolate(attr, a, f)[m], tr.interpolate(attr, b, f)[m], atol=1e-3, rtol=0
        )
