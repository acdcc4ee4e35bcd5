"""The regular FlexiCubes voxel grid (vertices and cube corner indices)."""

from __future__ import annotations

import torch

from .tables import CORNER_OFFSETS

__all__ = ["construct_grid", "cube_corners"]


def _axis_coords(res: int, scale: float, device, dtype: torch.dtype) -> torch.Tensor:
    """(res+1,) coordinates along one axis: (f(i) - 0.5) * scale, f(i) = i/res snapped to 5 decimals.

    The snapping (round half to even of ``i/res * 1e5``, then ``/ 1e5``) reproduces the reference grid,
    which de-duplicates rounded coordinates. In float32 every step is rounded in float32, which makes the
    result bit-identical to the reference; other dtypes do the same steps in their own precision.
    """
    i = torch.arange(res + 1, device=device, dtype=dtype)
    f = torch.round(i / res * 1e5) / 1e5
    return (f - 0.5) * scale


def cube_corners(cube_idx: torch.Tensor, res: int) -> torch.Tensor:
    """(n, 8) int64 vertex indices of the corners of the cubes ``cube_idx`` (n,) of a ``res``³ grid."""
    n1 = res + 1
    a, b, c = cube_idx // (res * res), (cube_idx // res) % res, cube_idx % res
    base = (a * n1 + b) * n1 + c
    offsets = torch.tensor([(dx * n1 + dy) * n1 + dz for dx, dy, dz in CORNER_OFFSETS], dtype=torch.int64)
    return base[:, None] + offsets.to(base.device)[None, :]


def construct_grid(
    res: int, scale: float = 2.0, device=None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices and cubes of a ``res``³ grid.

    Returns:
        verts: (V, 3) ``dtype`` in [-scale/2, scale/2]³, V = (res+1)³; vertex (i, j, k) has index
            ``(i*(res+1) + j)*(res+1) + k`` (x slowest).
        cubes: (res³, 8) int64; cube (a, b, c) has index ``(a*res + b)*res + c`` and its corner n is
            vertex (a+dx, b+dy, c+dz) with (dx, dy, dz) = (n & 1, (n >> 1) & 1, (n >> 2) & 1).
    """
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise ValueError(f"res must be a positive int, got {res!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if not (isinstance(scale, (int, float)) and float(scale) > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    c = _axis_coords(res, float(scale), device, dtype)
    verts = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), dim=-1).reshape(-1, 3)

    cubes = cube_corners(torch.arange(res**3, device=device, dtype=torch.int64), res)
    return verts, cubes
