"""Mesh containers passed between texturing, export and preview.

The ``frame`` field names one of ``pipeline.mesh.frames.FRAMES`` (``"ccm"``, where baking works;
``"gltf"`` / ``"reference"`` after export).

Winding: faces are counter-clockwise seen from outside (outward normals by the right-hand rule) in every
container. The reconstruction model's raw FlexiCubes faces are inward-wound and must be reversed
(``faces[:, ::-1]``) before they are put into one of these containers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.mesh.frames import check_frame


def validate_mesh_arrays(vertices, faces, *, name: str = "mesh", allow_empty: bool = False):
    """Return ``(vertices float32 (V,3), faces int64 (F,3))`` after checking them.

    Raises ``ValueError`` naming the problem: wrong shapes, non-finite vertices, no faces, indices out of
    range.
    """
    v = np.asarray(vertices)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"{name}: vertices must have shape (V, 3), got {v.shape}")
    if f.size == 0 and not allow_empty:
        raise ValueError(f"{name}: mesh has no faces")
    f = f.reshape(-1, 3) if f.size == 0 else f
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{name}: faces must have shape (F, 3), got {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"{name}: faces must be integers, got dtype {f.dtype}")
    if not np.issubdtype(v.dtype, np.floating):
        v = v.astype(np.float32)
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} vertices are not finite (NaN/inf)")
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(
            f"{name}: face indices out of range [0, {len(v)}): min {int(f.min())}, max {int(f.max())}"
        )
    return np.ascontiguousarray(v, dtype=np.float32), np.ascontiguousarray(f, dtype=np.int64)


@dataclass
class TexturedMesh:
    """A UV-textured triangle mesh.

    Attributes:
        vertices: (V, 3) float32 positions, split at UV seams (one position per UV vertex).
        faces: (F, 3) int64 vertex indices, outward (counter-clockwise) winding.
        uvs: (V, 2) float32 texture coordinates in the glTF convention: (0, 0) is the top-left corner of
            ``texture`` (u to the right, v downward), texel (row i, col j) centred at ((j+0.5)/W, (i+0.5)/H).
        texture: (H, W, 3) uint8 RGB base colour image, row 0 at the top.
        frame: one of ``"ccm"``, ``"gltf"``, ``"reference"`` (see module docstring).
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray
    frame: str = "ccm"

    def __post_init__(self) -> None:
        check_frame(self.frame)
        self.vertices, self.faces = validate_mesh_arrays(self.vertices, self.faces, name="TexturedMesh")
        uv = np.asarray(self.uvs, dtype=np.float32)
        if uv.shape != (len(self.vertices), 2):
            raise ValueError(f"TexturedMesh: uvs must have shape ({len(self.vertices)}, 2), got {uv.shape}")
        if not np.isfinite(uv).all():
            raise ValueError("TexturedMesh: uvs are not finite")
        self.uvs = np.ascontiguousarray(uv)
        tex = np.asarray(self.texture)
        if (
            tex.ndim != 3
            or tex.shape[2] != 3
            or tex.dtype != np.uint8
            or tex.shape[0] < 1
            or tex.shape[1] < 1
        ):
            raise ValueError(f"TexturedMesh: texture must be (H, W, 3) uint8, got {tex.shape} {tex.dtype}")
        self.texture = np.ascontiguousarray(tex)


@dataclass
class VertexColorMesh:
    """A triangle mesh with one RGB colour per vertex (fast export mode, no texture).

    Attributes:
        vertices: (V, 3) float32 positions.
        faces: (F, 3) int64, outward (counter-clockwise) winding.
        colors: (V, 3) float32 linear-in-file RGB in [0, 1].
        frame: one of ``"ccm"``, ``"gltf"``, ``"reference"``.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    frame: str = "ccm"

    def __post_init__(self) -> None:
        check_frame(self.frame)
        self.vertices, self.faces = validate_mesh_arrays(self.vertices, self.faces, name="VertexColorMesh")
        c = np.asarray(self.colors, dtype=np.float32)
        if c.shape != (len(self.vertices), 3):
            raise ValueError(
                f"VertexColorMesh: colors must have shape ({len(self.vertices)}, 3), got {c.shape}"
            )
        if not np.isfinite(c).all():
            raise ValueError("VertexColorMesh: colors are not finite")
        self.colors = np.ascontiguousarray(np.clip(c, 0.0, 1.0))
