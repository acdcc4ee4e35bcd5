"""Camera matrices producing clip space for :mod:`pipeline.raster` (nvdiffrast pixel conventions).

Camera convention used throughout: OpenCV, i.e. camera x to the right, y down, z forward (into the scene).
With the rasterizer's convention (row 0 <-> NDC y = -1) this makes image row 0 the top of the picture, so no
flip is needed. All matrices are float32 ``torch`` tensors; ``clip = P @ [x, y, z, 1]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _as4x4(m) -> Tensor:
    m = torch.as_tensor(np.asarray(m, dtype=np.float64) if not isinstance(m, Tensor) else m).double()
    if m.shape == (3, 4):
        m = torch.cat([m, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=m.dtype)], dim=0)
    if m.shape != (4, 4):
        raise ValueError(f"expected a (3, 4) or (4, 4) matrix, got {tuple(m.shape)}")
    return m


def _depth_rows(near: float, far: float) -> tuple[float, float]:
    if not (0 < near < far):
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    a = (far + near) / (far - near)
    b = 2.0 * far * near / (near - far)
    return a, b


def perspective_from_opencv(K, w2c, width: int, height: int, near: float = 0.1, far: float = 10.0) -> Tensor:
    """Full clip-from-world matrix for a pinhole camera given in OpenCV conventions.

    Args:
        K: (3, 3) intrinsics; pixel coordinates with integer values at pixel centres (OpenCV).
        w2c: (3, 4) or (4, 4) world-to-camera extrinsics (camera x right, y down, z forward).
        width, height: image size in pixels (the rasterizer resolution is ``(height, width)``).
        near, far: depth range mapped to NDC z in [-1, 1] (nearer = smaller).

    Returns:
        (4, 4) float32 tensor; rasterizing with it puts the OpenCV pixel (u, v) at image (row v, col u),
        row 0 at the top.
    """
    K = torch.as_tensor(np.asarray(K, dtype=np.float64) if not isinstance(K, Tensor) else K).double()
    if K.shape != (3, 3):
        raise ValueError(f"K must be (3, 3), got {tuple(K.shape)}")
    fx, s, cx = float(K[0, 0]), float(K[0, 1]), float(K[0, 2])
    fy, cy = float(K[1, 1]), float(K[1, 2])
    a, b = _depth_rows(near, far)
    proj = torch.tensor(
        [
            [2 * fx / width, 2 * s / width, (2 * cx + 1) / width - 1, 0.0],
            [0.0, 2 * fy / height, (2 * cy + 1) / height - 1, 0.0],
            [0.0, 0.0, a, b],
            [0.0, 0.0, 1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    return (proj @ _as4x4(w2c)).float()


def perspective(fov_y_deg: float, width: int, height: int, near: float = 0.1, far: float = 10.0) -> Tensor:
    """Clip-from-camera matrix (OpenCV camera) of a centred pinhole with vertical field of view ``fov_y_deg``.

    Compose with :func:`look_at`: ``perspective(...) @ look_at(eye, target, up)``.
    """
    fy = 0.5 * height / math.tan(math.radians(fov_y_deg) * 0.5)
    K = np.array([[fy, 0, (width - 1) / 2], [0, fy, (height - 1) / 2], [0, 0, 1]], dtype=np.float64)
    return perspective_from_opencv(K, np.eye(4), width, height, near, far)


def orthographic(
    half_width: float, half_height: float | None = None, near: float = 0.1, far: float = 10.0, w2c=None
) -> Tensor:
    """Clip-from-camera (or clip-from-world when ``w2c`` is given) orthographic matrix, OpenCV camera.

    Camera-space x in [-half_width, half_width] maps to NDC x in [-1, 1] (left to right), y in
    [-half_height, half_height] to NDC y (top to bottom), z in [near, far] to NDC z in [-1, 1]; w = 1.
    """
    hh = half_width if half_height is None else half_height
    if half_width <= 0 or hh <= 0:
        raise ValueError("orthographic half extents must be positive")
    if not near < far:
        raise ValueError(f"need near < far, got near={near}, far={far}")
    proj = torch.tensor(
        [
            [1.0 / half_width, 0, 0, 0],
            [0, 1.0 / hh, 0, 0],
            [0, 0, 2.0 / (far - near), -(far + near) / (far - near)],
            [0, 0, 0, 1.0],
        ],
        dtype=torch.float64,
    )
    if w2c is not None:
        proj = proj @ _as4x4(w2c)
    return proj.float()


def look_at(eye, target, up) -> Tensor:
    """World-to-camera (4, 4) matrix, OpenCV camera: z toward ``target``, y pointing opposite to ``up``."""
    eye = np.asarray(eye, dtype=np.float64).reshape(3)
    target = np.asarray(target, dtype=np.float64).reshape(3)
    up = np.asarray(up, dtype=np.float64).reshape(3)
    z = target - eye
    if np.linalg.norm(z) < 1e-12:
        raise ValueError("look_at: eye and target coincide")
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("look_at: up is parallel to the viewing direction")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    rot = np.stack([x, y, z], axis=0)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = -rot @ eye
    return torch.as_tensor(m, dtype=torch.float32)


def to_clip(vertices, mvp) -> Tensor:
    """Transform (V, 3) positions by (4, 4) or (B, 4, 4) matrices to (B, V, 4) clip coordinates."""
    v = torch.as_tensor(vertices, dtype=torch.float32)
    m = torch.as_tensor(mvp, dtype=torch.float32).to(v.device)
    if v.dim() != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be (V, 3), got {tuple(v.shape)}")
    if m.dim() == 2:
        m = m[None]
    if m.shape[-2:] != (4, 4):
        raise ValueError(f"mvp must be (4, 4) or (B, 4, 4), got {tuple(m.shape)}")
    vh = torch.cat([v, torch.ones_like(v[:, :1])], dim=1)
    return torch.einsum("bij,vj->bvi", m, vh)
