"""A self-contained colour field: triplane + RGB MLP, queried at arbitrary 3D points.

The texture baker needs the colour at millions of surface points after the mesh is extracted; a
`TriplaneColorField` carries exactly what that needs (the (C, R, 3R) triplane and a copy of the RGB
head), is picklable and can be moved between devices with `.to(device)`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .heads import PointMlp
from .triplane import sample_points, split_planes


def check_points(points, what: str = "points") -> torch.Tensor:
    """Validate (N, 3) finite float points; numpy arrays are converted (float32)."""
    if isinstance(points, np.ndarray):
        points = torch.from_numpy(np.ascontiguousarray(points))
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(points).__name__}")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{what} must have shape (N, 3), got {tuple(points.shape)}")
    if not torch.is_floating_point(points):
        raise TypeError(f"{what} must be floating point, got {points.dtype}")
    if not bool(torch.isfinite(points).all()):
        bad = int((~torch.isfinite(points)).any(dim=1).sum())
        raise ValueError(f"{what} contains NaN or infinite coordinates in {bad} row(s)")
    return points


def colors_to_unit(raw: torch.Tensor | np.ndarray):
    """Raw colours (about [-1, 1]) -> [0, 1]: clip(raw * 0.5 + 0.5, 0, 1) (vertex-colour mapping)."""
    if isinstance(raw, np.ndarray):
        return np.clip(raw * 0.5 + 0.5, 0.0, 1.0)
    return (raw * 0.5 + 0.5).clamp(0.0, 1.0)


def colors_to_texture255(raw: torch.Tensor | np.ndarray):
    """Raw colours -> [0, 255] floats: clip((raw + 1) * 127.5, 0, 255) (texture-baker mapping)."""
    if isinstance(raw, np.ndarray):
        return np.clip((raw + 1.0) * 127.5, 0.0, 255.0)
    return ((raw + 1.0) * 127.5).clamp(0.0, 255.0)


class TriplaneColorField(nn.Module):
    """Raw RGB colour at arbitrary points, from one triplane and the RGB head.

    Attributes:
        triplane: (C, R, 3R) float32 buffer (rolled-out xy | yz | zx planes).
        rgb_mlp: `PointMlp` (C -> H -> H -> 3), a copy independent of the source model.
        chunk: points per MLP chunk.
    """

    def __init__(self, triplane: torch.Tensor, rgb_mlp: PointMlp, chunk: int = 32768):
        super().__init__()
        tri = triplane.detach()
        if tri.ndim == 4:
            tri = tri[0]
        split_planes(tri)  # validates the shape
        self.register_buffer("triplane", tri.to(torch.float32).clone())
        self.rgb_mlp = copy.deepcopy(rgb_mlp).requires_grad_(False)
        self.chunk = int(chunk)

    @property
    def device(self) -> torch.device:
        return self.triplane.device

    def forward(self, points) -> torch.Tensor:
        """(N, 3) points (numpy or tensor) -> (N, 3) float32 raw colours on the field's device."""
        pts = check_points(points)
        with torch.inference_mode():
            planes = split_planes(self.triplane)
            out = pts.new_empty((pts.shape[0], 3), dtype=torch.float32, device=self.device)
            for start in range(0, pts.shape[0], self.chunk):
                feats = sample_points(planes, pts[start : start + self.chunk])
                out[start : start + self.chunk] = self.rgb_mlp(feats)
        return out
