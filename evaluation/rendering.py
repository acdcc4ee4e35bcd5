"""Unlit renders of an evaluation mesh at the GSO cameras, composited on white.

Uses the project's rasterizer (:mod:`pipeline.raster`). Colour comes from the UV texture (bilinear
sampling of interpolated UVs, glTF convention: v = 0 at the image top), else vertex colours, else a
uniform grey. Supersampling (render at ``s`` times the size and average ``s x s`` blocks) antialiases
the silhouette like the ground-truth path-traced renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.raster import get_rasterizer
from pipeline.raster.cameras import perspective_from_opencv, to_clip

from .mesh_loading import EvalMesh

__all__ = ["Cameras", "load_cameras", "orbit_cameras", "sample_texture", "render_views"]


@dataclass
class Cameras:
    """Pinhole cameras in OpenCV convention.

    Attributes:
        K: ``(3, 3)`` intrinsics (pixel centres at integer coordinates, see ``half_pixel``).
        w2c: ``(N, 3, 4)`` world-to-camera extrinsics.
        width, height: image size in pixels.
    """

    K: np.ndarray
    w2c: np.ndarray
    width: int
    height: int


def load_cameras(path: str | Path, half_pixel: bool = True) -> Cameras:
    """Read ``cameras_16_elev30.json`` (``K``, ``w2c_3x4``, ``image_size``).

    Args:
        half_pixel: the GSO renders come from Blender, whose principal point ``W/2`` is measured from
            the image edge; in the integer-pixel-centre convention of the rasterizer's camera helper
            that is ``W/2 - 0.5``, so 0.5 is subtracted from ``cx`` and ``cy``.
    """
    data = json.loads(Path(path).read_text())
    K = np.asarray(data["K"], dtype=np.float64)
    if half_pixel:
        K = K.copy()
        K[0, 2] -= 0.5
        K[1, 2] -= 0.5
    w2c = np.asarray(data["w2c_3x4"], dtype=np.float64)
    w, h = (int(x) for x in data.get("image_size", [256, 256]))
    return Cameras(K, w2c, w, h)


def orbit_cameras(
    views: int = 16,
    elevation_deg: float = 30.0,
    distance: float = 1.5,
    focal: float = 280.0,
    size: int = 256,
    half_pixel: bool = True,
) -> Cameras:
    """Cameras on a circle around the origin looking at it, world Z up: the GSO-30 render cameras.

    View ``k`` sits at azimuth ``k * 360 / views`` degrees (from +X towards +Y) and elevation
    ``elevation_deg`` at ``distance``; OpenCV axes (x right, y down, z forward), intrinsics
    ``[[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]]`` with ``half_pixel`` as in
    :func:`load_cameras`. With the defaults this is ``cameras/cameras_16_elev30.json`` of the GSO
    folder (used when a ground-truth folder has no such file).
    """
    e = np.deg2rad(elevation_deg)
    w2c = []
    for k in range(views):
        a = 2 * np.pi * k / views
        centre = distance * np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
        z = -centre / np.linalg.norm(centre)
        x = np.cross(z, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        r = np.stack([x, np.cross(z, x), z])
        w2c.append(np.concatenate([r, (-r @ centre)[:, None]], axis=1))
    c = size / 2 - (0.5 if half_pixel else 0.0)
    K = np.array([[focal, 0.0, c], [0.0, focal, c], [0.0, 0.0, 1.0]])
    return Cameras(K, np.stack(w2c), size, size)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear texture lookup with repeat wrapping.

    Args:
        texture: ``(Ht, Wt, C)`` float.
        uv: ``(..., 2)`` in glTF convention (u right, v down; texel centres at ``(i + 0.5) / size``).

    Returns:
        ``(..., C)``.
    """
    ht, wt, _ = texture.shape
    x = torch.remainder(uv[..., 0], 1.0) * wt - 0.5
    y = torch.remainder(uv[..., 1], 1.0) * ht - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0 = x0.long()
    y0 = y0.long()
    x1, y1 = (x0 + 1) % wt, (y0 + 1) % ht
    x0, y0 = x0 % wt, y0 % ht
    t00, t01 = texture[y0, x0], texture[y0, x1]
    t10, t11 = texture[y1, x0], texture[y1, x1]
    return (t00 * (1 - fx) + t01 * fx) * (1 - fy) + (t10 * (1 - fx) + t11 * fx) * fy


def render_views(
    mesh: EvalMesh,
    cams: Cameras,
    rasterizer=None,
    supersample: int = 2,
    batch: int = 4,
    near: float = 0.1,
    far: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``mesh`` (GT frame) at every camera, unlit, composited on white.

    Args:
        mesh: positions in the GT world frame; appearance from ``texture``/``uv`` or ``vertex_colors``.
        cams: :class:`Cameras` with ``N`` views.
        rasterizer: a :mod:`pipeline.raster` rasterizer (default: ``get_rasterizer("auto")``).
        supersample: render at this factor and box-filter down.
        batch: views per rasterizer call.

    Returns:
        ``(N, H, W, 3)`` float32 RGB on white in [0, 1] and ``(N, H, W)`` float32 coverage.
    """
    r = rasterizer or get_rasterizer("auto")
    s = max(1, int(supersample))
    W, H = cams.width * s, cams.height * s
    Ks = cams.K.copy()
    Ks[:2, :2] *= s
    Ks[:2, 2] = (cams.K[:2, 2] + 0.5) * s - 0.5  # same continuous principal point at the new size
    mvps = torch.stack([perspective_from_opencv(Ks, w2c, W, H, near, far) for w2c in cams.w2c])
    faces = torch.as_tensor(mesh.faces, dtype=torch.int64)
    verts = torch.as_tensor(mesh.vertices, dtype=torch.float32)
    dev = getattr(r, "device", torch.device("cpu"))
    tex = torch.as_tensor(mesh.texture, dtype=torch.float32, device=dev) if mesh.texture is not None else None
    if tex is not None and mesh.uv is not None:
        attr = torch.as_tensor(mesh.uv, dtype=torch.float32)
        mode = "uv"
    elif mesh.vertex_colors is not None:
        attr = torch.as_tensor(mesh.vertex_colors, dtype=torch.float32)
        mode = "color"
    else:
        attr = torch.full((len(verts), 3), 0.7)
        mode = "color"
    rgbs, alphas = [], []
    with torch.no_grad():
        for b0 in range(0, len(mvps), batch):
            clip = to_clip(verts, mvps[b0 : b0 + batch]).to(dev)
            rast = r.rasterize(clip, faces.to(dev), (H, W))
            mask = (rast.triangle_id >= 0).float()
            vals = r.interpolate(attr.to(dev), rast, faces.to(dev))
            col = sample_texture(tex, vals) if mode == "uv" else vals
            col = col.clamp(0, 1) * mask[..., None]
            if s > 1:
                col = F.avg_pool2d(col.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
                mask = F.avg_pool2d(mask[:, None], s)[:, 0]
            rgbs.append((col + (1 - mask[..., None])).cpu())
            alphas.append(mask.cpu())
    return torch.cat(rgbs).numpy().astype(np.float32), torch.cat(alphas).numpy().astype(np.float32)
