"""Rasterizer interface shared by the PyTorch and nvdiffrast backends.

Conventions (identical to nvdiffrast so both backends are interchangeable):

* inputs are clip-space positions ``(x, y, z, w)``; pixel (row i, col j) of an ``(H, W)`` image has its
  centre at NDC ``x = (2j + 1)/W - 1``, ``y = (2i + 1)/H - 1`` (row 0 <-> y = -1);
* a pixel is drawn when its centre lies inside the projected triangle and ``-1 <= z/w <= 1``; the smallest
  ``z/w`` wins, ties go to the lower triangle index; no face culling (both windings are drawn);
* barycentrics are perspective-correct weights of the triangle's vertices ``faces[t, 0..2]``;
* empty pixels: ``triangle_id = -1``, ``bary = 0``, ``depth = 0``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RasterOutput:
    """Result of :meth:`Rasterizer.rasterize`.

    Attributes:
        triangle_id: (B, H, W) int64 index into ``faces`` of the visible triangle, -1 where empty.
        bary: (B, H, W, 3) float32 perspective-correct barycentric weights of vertices 0, 1, 2
            (0 where empty).
        depth: (B, H, W) float32 NDC depth ``z/w`` of the visible surface (0 where empty).
    """

    triangle_id: Tensor
    bary: Tensor
    depth: Tensor

    @property
    def mask(self) -> Tensor:
        """(B, H, W) bool coverage."""
        return self.triangle_id >= 0


def prepare_inputs(clip_pos, faces, resolution, device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """Validate and normalise rasterizer inputs.

    Returns ``clip (B, V, 4) float32, faces (F, 3) int64, H, W`` on ``device``. Raises ``ValueError``
    naming the problem (shape, non-finite values, face indices out of range, bad resolution).
    """
    clip = torch.as_tensor(clip_pos)
    if clip.dim() == 2:
        clip = clip[None]
    if clip.dim() != 3 or clip.shape[-1] != 4:
        raise ValueError(f"clip_pos must have shape (B, V, 4) or (V, 4), got {tuple(clip.shape)}")
    clip = clip.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(clip).all():
        raise ValueError("clip_pos contains non-finite values (NaN/inf)")
    f = torch.as_tensor(faces)
    if f.dim() != 2 or f.shape[-1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(f.shape)}")
    if f.dtype.is_floating_point or f.dtype == torch.bool:
        raise ValueError(f"faces must be an integer tensor, got {f.dtype}")
    f = f.to(device=device, dtype=torch.int64)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= clip.shape[1]):
        raise ValueError(
            f"face indices out of range [0, {clip.shape[1]}): min {int(f.min())}, max {int(f.max())}"
        )
    try:
        h, w = (int(r) for r in resolution)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"resolution must be (height, width), got {resolution!r}") from exc
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be positive, got {(h, w)}")
    return clip.contiguous(), f.contiguous(), h, w


def interpolate_attributes(attr: Tensor, rast: RasterOutput, faces) -> Tensor:
    """Barycentric interpolation of per-vertex attributes; differentiable with respect to ``attr``.

    Args:
        attr: (V, C) shared by all views or (B, V, C) per view.
        rast: output of ``rasterize`` for the same ``faces``.
        faces: (F, 3) integer vertex indices.

    Returns:
        (B, H, W, C) tensor, zero at empty pixels.
    """
    tid = rast.triangle_id
    b, h, w = tid.shape
    if attr.dim() not in (2, 3):
        raise ValueError(f"attr must have shape (V, C) or (B, V, C), got {tuple(attr.shape)}")
    f = torch.as_tensor(faces, device=tid.device).long()
    valid = tid >= 0
    idx = f[tid.clamp(min=0)]  # (B, H, W, 3)
    attr = attr.to(tid.device)
    if attr.dim() == 2:
        vals = attr[idx]  # (B, H, W, 3, C)
    else:
        if attr.shape[0] not in (1, b):
            raise ValueError(f"attr batch {attr.shape[0]} does not match raster batch {b}")
        if attr.shape[0] == 1:
            vals = attr[0][idx]
        else:
            bidx = torch.arange(b, device=tid.device).view(b, 1, 1, 1)
            vals = attr[bidx, idx]
    bary = rast.bary.to(vals.dtype)
    out = (vals * bary[..., None]).sum(dim=-2)
    return out * valid[..., None].to(out.dtype)


class Rasterizer(ABC):
    """Triangle rasterizer for a batch of views (see module docstring for conventions)."""

    name: str = "base"

    def __init__(self, device=None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @abstractmethod
    def rasterize(self, clip_pos, faces, resolution: tuple[int, int]) -> RasterOutput:
        """Rasterize triangles.

        Args:
            clip_pos: (B, V, 4) or (V, 4) clip-space positions.
            faces: (F, 3) integer vertex indices (any winding).
            resolution: (H, W) of the output.

        Returns:
            :class:`RasterOutput` with batch size B (1 for (V, 4) input).
        """

    def interpolate(self, attr: Tensor, rast: RasterOutput, faces) -> Tensor:
        """Interpolate (V, C) or (B, V, C) attributes to (B, H, W, C); differentiable w.r.t. ``attr``."""
        return interpolate_attributes(attr, rast, faces)
