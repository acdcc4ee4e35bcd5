"""Turntable previews of textured / vertex-coloured meshes with the project's rasterizer.

Views orbit the object's up axis starting at its front (frame-aware: CCM front +Y / up +Z, glTF front +Z /
up +Y, reference front -Z / up +Y), perspective camera, headlight Lambert shading, transparent background.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.mesh.frames import UP_FRONT
from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.outputs.atomic import atomic_write_bytes
from pipeline.raster import Rasterizer, get_rasterizer, look_at, perspective, to_clip


def turntable_cameras(
    center,
    radius: float,
    frame: str,
    n_views: int,
    size: int,
    elevation_deg: float,
    fov_deg: float = 30.0,
    azimuth_offset_deg: float = 0.0,
):
    """(n, 4, 4) clip-from-world matrices and (n, 3) eye positions of a camera ring around ``center``.

    View 0 looks at the object's front; azimuth grows counter-clockwise seen from above.
    """
    up, front = (np.asarray(a) for a in UP_FRONT[frame])
    side = np.cross(up, front)
    dist = radius / math.sin(math.radians(fov_deg) / 2) * 1.05
    el = math.radians(elevation_deg)
    mats, eyes = [], []
    for k in range(n_views):
        a = 2 * math.pi * k / n_views + math.radians(azimuth_offset_deg)
        d = math.cos(el) * (math.cos(a) * front + math.sin(a) * side) + math.sin(el) * up
        eye = np.asarray(center) + d * dist
        cam_up = up if abs(math.sin(el)) < 0.999 else front
        near, far = max(dist - 1.5 * radius, 1e-3), dist + 1.5 * radius
        mats.append(perspective(fov_deg, size, size, near, far) @ look_at(eye, center, cam_up))
        eyes.append(eye)
    return torch.stack(mats), np.stack(eyes)


def render_views(
    mesh: TexturedMesh | VertexColorMesh, mvp, eyes, size: int, rasterizer: Rasterizer | None = None
):
    """Render ``mesh`` with (B, 4, 4) ``mvp`` matrices; returns (B, size, size, 4) uint8 RGBA."""
    rast = rasterizer or get_rasterizer("auto")
    dev = rast.device
    verts = torch.as_tensor(mesh.vertices, device=dev)
    faces = torch.as_tensor(mesh.faces, device=dev)
    clip = to_clip(verts, torch.as_tensor(mvp, device=dev))
    out = rast.rasterize(clip, faces, (size, size))
    cov = out.triangle_id >= 0
    if isinstance(mesh, TexturedMesh):
        uv = rast.interpolate(torch.as_tensor(mesh.uvs, device=dev), out, faces)  # (B, H, W, 2)
        tex = torch.as_tensor(mesh.texture, device=dev).permute(2, 0, 1)[None].float() / 255.0
        tex = tex.expand(uv.shape[0], -1, -1, -1)
        col = F.grid_sample(tex, uv * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)
        col = col.permute(0, 2, 3, 1)
    else:
        col = rast.interpolate(torch.as_tensor(mesh.colors, device=dev), out, faces)
    # Headlight Lambert shading with face normals (two-sided).
    tri = verts[faces]
    fn = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    fn = fn / fn.norm(dim=1, keepdim=True).clamp(min=1e-12)
    n = fn[out.triangle_id.clamp(min=0)]  # (B, H, W, 3)
    pos = rast.interpolate(verts, out, faces)
    eye = torch.as_tensor(np.asarray(eyes), dtype=torch.float32, device=dev)[:, None, None, :]
    view = eye - pos
    view = view / view.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    shade = 0.35 + 0.65 * (n * view).sum(-1).abs()
    rgb = (col * shade[..., None]).clamp(0, 1) * cov[..., None]
    rgba = torch.cat([rgb, cov[..., None].float()], dim=-1)
    return (rgba * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def render_turntable(
    mesh: TexturedMesh | VertexColorMesh,
    n_views: int = 8,
    size: int = 256,
    elevation_deg: float = 20.0,
    rasterizer: Rasterizer | None = None,
    fov_deg: float = 30.0,
) -> np.ndarray:
    """Render ``n_views`` views on a ring around the mesh (view 0 = front).

    Returns:
        (n_views, size, size, 4) uint8 RGBA, transparent background.
    """
    if not isinstance(mesh, TexturedMesh | VertexColorMesh):
        raise TypeError(f"expected TexturedMesh or VertexColorMesh, got {type(mesh).__name__}")
    if n_views < 1 or size < 8:
        raise ValueError(f"need n_views >= 1 and size >= 8, got {n_views}, {size}")
    v = mesh.vertices.astype(np.float64)
    center = (v.min(0) + v.max(0)) / 2
    radius = float(np.linalg.norm(v - center, axis=1).max())
    if not radius > 0:
        raise ValueError("cannot frame a mesh with zero extent")
    mvp, eyes = turntable_cameras(center, radius, mesh.frame, n_views, size, elevation_deg, fov_deg)
    return render_views(mesh, mvp, eyes, size, rasterizer)


def contact_sheet(images, cols: int = 4, pad: int = 0) -> np.ndarray:
    """Tile (n, H, W, C) images into one (rows*H, cols*W, C) image, row-major, empty cells zero."""
    imgs = np.asarray(images)
    if imgs.ndim != 4:
        raise ValueError(f"images must be (n, H, W, C), got {imgs.shape}")
    n, h, w, c = imgs.shape
    cols = max(1, min(int(cols), n))
    rows = math.ceil(n / cols)
    sheet = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=imgs.dtype)
    for k in range(n):
        r, q = divmod(k, cols)
        sheet[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = imgs[k]
    return sheet


def save_preview_png(
    mesh: TexturedMesh | VertexColorMesh,
    path,
    n_views: int = 8,
    size: int = 256,
    cols: int = 4,
    elevation_deg: float = 20.0,
    rasterizer: Rasterizer | None = None,
) -> np.ndarray:
    """Render a turntable and write it as an RGBA PNG contact sheet (atomically). Returns the sheet."""

    sheet = contact_sheet(render_turntable(mesh, n_views, size, elevation_deg, rasterizer), cols)
    buf = io.BytesIO()
    Image.fromarray(sheet, mode="RGBA").save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())
    return sheet
