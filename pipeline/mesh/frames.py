"""Coordinate frames, defined once: the reconstruction's canonical frame and the export frames.

* ``"ccm"``: the reconstruction model's canonical frame (right-handed, +Z up, the input view's camera
  on +Y, object inside [-1, 1]^3). Meshes are built, cleaned and baked here.
* ``"gltf"``: +Y up, the object's front (CCM +Y) facing +Z, where glTF viewers put their camera:
  ``(x, y, z) -> (-x, z, y)``.
* ``"reference"``: the official CRM OBJ/GLB convention, +Y up, front facing -Z: ``(x, y, z) -> (x, z, -y)``.

Every rotation is proper (det +1), so outward winding is kept. A picture: ``docs/export_frames.md``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FRAMES", "EXPORT_FRAMES", "FROM_CCM", "UP_FRONT", "AXES", "check_frame", "rotation"]

FRAMES = ("ccm", "gltf", "reference")
EXPORT_FRAMES = ("gltf", "reference")

# R with ``p_frame = R @ p_ccm``.
FROM_CCM: dict[str, np.ndarray] = {
    "ccm": np.eye(3),
    "gltf": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    "reference": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
}
# (up, front) unit vectors of each frame, in that frame.
UP_FRONT: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "ccm": ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    "gltf": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    "reference": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
# The same as axis names, recorded in exported files.
AXES: dict[str, dict[str, str]] = {
    "ccm": {"up": "+Z", "front": "+Y"},
    "gltf": {"up": "+Y", "front": "+Z"},
    "reference": {"up": "+Y", "front": "-Z"},
}


def check_frame(frame: str, allowed: tuple[str, ...] = FRAMES) -> str:
    """`frame` if it is one of `allowed`, else ``ValueError`` naming them."""
    if frame not in allowed:
        raise ValueError(f"unknown frame {frame!r}; expected one of {', '.join(allowed)}")
    return frame


def rotation(src: str, dst: str) -> np.ndarray:
    """``(3, 3)`` R with ``p_dst = R @ p_src``."""
    return FROM_CCM[check_frame(dst)] @ FROM_CCM[check_frame(src)].T
