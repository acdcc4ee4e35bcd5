"""Unlit renders of a finished mesh: its base colour as the camera sees it, and its coverage mask.

The quality checks compare these with the input image, which carries the object's colours as
photographed; shading would only add a difference the mesh is not responsible for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.raster import Rasterizer, to_clip

__all__ = ["render_unlit"]


def render_unlit(
    mesh: TexturedMesh | VertexColorMesh, mvp: Tensor, size: int, rasterizer: Rasterizer
) -> tuple[Tensor, Tensor]:
    """Render the mesh's base colour from B cameras.

    Args:
        mesh: textured (bilinear texture lookup, clamp to edge) or vertex-coloured mesh; its vertices
            must be in the frame `mvp` expects.
        mvp: (B, 4, 4) or (4, 4) clip-from-world matrices (``pipeline.raster`` conventions).
        size: output side S in pixels.
        rasterizer: any ``pipeline.raster.Rasterizer``; outputs live on its device.

    Returns:
        ``(rgb, mask)``: (B, S, S, 3) float32 colours in [0, 1] (0 where empty) and (B, S, S) bool
        coverage.
    """
    if not isinstance(mesh, TexturedMesh | VertexColorMesh):
        raise TypeError(f"expected TexturedMesh or VertexColorMesh, got {type(mesh).__name__}")
    dev = rasterizer.device
    verts = torch.as_tensor(mesh.vertices, dtype=torch.float32, device=dev)
    faces = torch.as_tensor(mesh.faces, device=dev)
    out = rasterizer.rasterize(to_clip(verts, torch.as_tensor(mvp, device=dev)), faces, (size, size))
    mask = out.mask
    if isinstance(mesh, TexturedMesh):
        uv = rasterizer.interpolate(torch.as_tensor(mesh.uvs, device=dev), out, faces)  # (B, S, S, 2)
        tex = torch.as_tensor(np.asarray(mesh.texture), device=dev).permute(2, 0, 1)[None].float() / 255.0
        tex = tex.expand(uv.shape[0], -1, -1, -1)
        rgb = F.grid_sample(tex, uv * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)
        rgb = rgb.permute(0, 2, 3, 1)
    else:
        rgb = rasterizer.interpolate(torch.as_tensor(mesh.colors, device=dev), out, faces)
    rgb = rgb.clamp(0.0, 1.0) * mask[..., None]
    return rgb, mask
