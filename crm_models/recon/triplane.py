"""Triplane split and sampling (SPEC §6).

The rolled-out triplane (C, R, 3R) holds planes xy | yz | zx along the width. A point (x, y, z) reads
xy at (x, y), yz at (y, z) and zx at (z, x) (first coordinate = width), with bilinear interpolation,
align_corners=True and border padding; the three C-dim samples are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_planes(triplane: torch.Tensor) -> torch.Tensor:
    """(C, R, 3R) or (1, C, R, 3R) rolled-out triplane -> (3, C, R, R) planes [xy, yz, zx]."""
    shape = tuple(triplane.shape)
    if triplane.ndim == 4 and shape[0] == 1:
        triplane = triplane[0]
    if triplane.ndim != 3 or triplane.shape[2] != 3 * triplane.shape[1]:
        raise ValueError(f"triplane has shape {shape}, expected (C, R, 3R) or (1, C, R, 3R)")
    r = triplane.shape[1]
    return torch.stack([triplane[:, :, i * r : (i + 1) * r] for i in range(3)], dim=0)


def _sample(planes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """planes (3, C, R, R), grid (3, P, 2) -> (3, P, C) samples."""
    out = F.grid_sample(planes, grid.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, :, 0, :].permute(0, 2, 1)


def sample_points(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Summed triplane features at arbitrary points.

    Args:
        planes: (3, C, R, R) from `split_planes`.
        points: (P, 3) coordinates in the canonical frame (the grid spans [-1, 1]).

    Returns:
        (P, C) float32 features = xy(x, y) + yz(y, z) + zx(z, x).
    """
    pts = points.to(device=planes.device, dtype=torch.float32)
    grid = torch.stack([pts[:, [0, 1]], pts[:, [1, 2]], pts[:, [2, 0]]], dim=0)  # (3, P, 2)
    s = _sample(planes, grid)
    return s[0] + s[1] + s[2]


def sample_lattice(planes: torch.Tensor, axis_values: torch.Tensor) -> torch.Tensor:
    """Summed features at every point of a regular lattice axis_values^3, x slowest.

    Each plane only depends on two coordinates, so it is sampled once per (a, b) pair (n^2 samples
    instead of n^3) and the three planes are broadcast-summed. Every sample is computed by the same
    `grid_sample` call as in `sample_points`, so results equal per-point sampling.

    Args:
        planes: (3, C, R, R).
        axis_values: (n,) lattice coordinates along each axis.

    Returns:
        (n, n, n, C) features indexed [i, j, k] for point (axis[i], axis[j], axis[k]).
    """
    a = axis_values.to(device=planes.device, dtype=torch.float32)
    n = a.shape[0]
    first = a.view(n, 1).expand(n, n).reshape(-1)
    second = a.view(1, n).expand(n, n).reshape(-1)
    pair = torch.stack([first, second], dim=-1)  # (n*n, 2), (u, v) with u slowest
    s = _sample(planes, pair.unsqueeze(0).expand(3, -1, -1).contiguous())  # (3, n*n, C)
    c = planes.shape[1]
    xy = s[0].view(n, n, c)  # [i, j] = xy(x_i, y_j)
    yz = s[1].view(n, n, c)  # [j, k] = yz(y_j, z_k)
    zx = s[2].view(n, n, c)  # [k, i] = zx(z_k, x_i)
    return xy[:, :, None, :] + yz[None, :, :, :] + zx.permute(1, 0, 2)[:, None, :, :]
