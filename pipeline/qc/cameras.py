"""The six orthographic cameras of CRM's generated views, in the reconstruction's canonical (CCM) frame.

CRM's views are orthographic renders covering exactly [-1, 1] across the image (SPEC recon §2.2). With
``u`` the column coordinate and ``v`` the row coordinate, both in [-1, 1] (left to right, top to
bottom), view by view:

====  ======  ============  ======================
view  name    camera on     image-plane relation
====  ======  ============  ======================
0     front   +Y            X = -u, Z = -v
1     left    +X            Y = +u, Z = -v
2     bottom  -Z            X = -u, Y = -v
3     back    -Y            X = +u, Z = -v
4     right   -X            Y = -u, Z = -v
5     top     +Z            X = -u, Y = +v
====  ======  ============  ======================

View 0 is the input's viewpoint, with the framing of the preprocessed input image: the square image
(after background handling and squaring) spans [-1, 1] in both directions. The matrices follow
``pipeline.raster`` conventions (OpenCV camera, pixel centres at ``(2j + 1)/W - 1``), so rasterizing with
them puts the canonical point (X, Y, Z) of the front view at column ``u = -X``, row ``v = -Z``. Checked
against the CCMs of a real training example in ``tests/test_qc_cameras.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crm_models.views import VIEW_NAMES
from pipeline.raster import look_at, orthographic

__all__ = ["CAMERA_DISTANCE", "view_camera", "view_cameras"]

#: Camera distance from the origin; the object lies in [-1, 1]^3, so depth spans [2, 4] (near 1, far 5).
CAMERA_DISTANCE = 3.0
# (eye direction, up vector) of each view, CCM frame.
_EYE_UP: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # 0 front
    ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),  # 1 left
    ((0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),  # 2 bottom
    ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),  # 3 back
    ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),  # 4 right
    ((0.0, 0.0, 1.0), (0.0, -1.0, 0.0)),  # 5 top
)


def view_camera(view_index: int) -> Tensor:
    """Clip-from-world matrix of one generated view.

    Args:
        view_index: dataset view index 0..5 (0 front = the input's viewpoint; names in
            ``crm_models.views.VIEW_NAMES``).

    Returns:
        (4, 4) float32 orthographic matrix: CCM-frame points in [-1, 1]^3 map to NDC x, y in [-1, 1]
        as in the table of the module docstring, NDC z in (-1, 1) growing away from the camera.
    """
    if not isinstance(view_index, int) or not 0 <= view_index < len(VIEW_NAMES):
        raise ValueError(f"view index must be an integer in 0..5, got {view_index!r}")
    direction, up = _EYE_UP[view_index]
    eye = tuple(CAMERA_DISTANCE * c for c in direction)
    w2c = look_at(eye, (0.0, 0.0, 0.0), up)
    return orthographic(1.0, 1.0, near=CAMERA_DISTANCE - 2.0, far=CAMERA_DISTANCE + 2.0, w2c=w2c)


def view_cameras(view_indices) -> Tensor:
    """(B, 4, 4) stack of :func:`view_camera` for B view indices."""
    return torch.stack([view_camera(int(v)) for v in view_indices])
