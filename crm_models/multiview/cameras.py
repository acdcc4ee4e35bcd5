"""Camera conditioning of the multi-view diffusion stages.

The six orthographic views CRM generates are indexed 0..5 = front, left, bottom, back, right, top.
Each camera is a 4x4 cam2world matrix (OpenGL look-at, then an OpenGL->Blender axis flip),
flattened row-major to 16 float32 values. The matrices are built in float64 with the same
operations as the official code, so the tiny round-off entries (cos 90deg = 6.1e-17) come out
bit-identical; the tests check them against the recorded tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from crm_models.views import VIEW_ORDER

#: (elevation, azimuth) in degrees for view index 0..5: front, left, bottom, back, right, top.
VIEW_ELEVATION_AZIMUTH: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (0.0, -90.0),
    (-90.0, 0.0),
    (0.0, 180.0),
    (0.0, 90.0),
    (90.0, 0.0),
)

_OPENGL_TO_BLENDER = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
    dtype=np.float64,
)


def camera_matrix(view_index: int) -> np.ndarray:
    """Cam2world matrix (4, 4) float64 of view `view_index` (0..5) in the Blender frame."""
    if not 0 <= view_index < len(VIEW_ELEVATION_AZIMUTH):
        raise ValueError(f"view index must be in 0..5, got {view_index}")
    elev, azim = (np.deg2rad(v) for v in VIEW_ELEVATION_AZIMUTH[view_index])
    position = np.array([np.cos(elev) * np.sin(azim), np.sin(elev), np.cos(elev) * np.cos(azim)])
    forward = -position / np.linalg.norm(position)  # looking at the origin
    right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right = right / np.linalg.norm(right)
    new_up = np.cross(right, forward)
    cam2world = np.eye(4)
    cam2world[:3, 0] = right
    cam2world[:3, 1] = new_up
    cam2world[:3, 2] = -forward
    cam2world[:3, 3] = position
    return _OPENGL_TO_BLENDER @ cam2world


def camera_tensor(
    views: Sequence[int] = VIEW_ORDER,
    reference_position: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Camera rows (F, 16) for `views`; with `reference_position`, a zero row is inserted there.

    Stage 1: `camera_tensor(VIEW_ORDER, reference_position=6)` -> (7, 16), the last row zeros
    (the reference frame). Stage 2: `camera_tensor(VIEW_ORDER)` -> (6, 16).
    """
    rows = [camera_matrix(int(v)).astype(np.float32).reshape(16) for v in views]
    if reference_position is not None:
        if not 0 <= reference_position <= len(rows):
            raise ValueError(f"reference_position {reference_position} outside 0..{len(rows)}")
        rows.insert(reference_position, np.zeros(16, dtype=np.float32))
    return torch.from_numpy(np.stack(rows)).to(device=device, dtype=dtype)


def stage_cameras(stage: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The camera tensor the official pipeline uses for `stage` 1 (7, 16) or 2 (6, 16)."""
    if stage == 1:
        return camera_tensor(VIEW_ORDER, reference_position=len(VIEW_ORDER), device=device, dtype=dtype)
    if stage == 2:
        return camera_tensor(VIEW_ORDER, device=device, dtype=dtype)
    raise ValueError(f"stage must be 1 or 2, got {stage}")
