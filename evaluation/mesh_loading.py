"""Loading prediction and ground-truth meshes for evaluation, and the frames they live in.

A loaded mesh is an :class:`EvalMesh`: positions, faces and optionally UVs + texture or vertex colours.
Frames (all right-handed; the evaluation frame is the GSO ground truth's **Z-up** frame in which the
camera of render 000 sits on **+X**):

=============  ===========================================  ============================================
frame          meaning                                      map to the GT frame ``(X, Y, Z)``
=============  ===========================================  ============================================
``gt``         already in the GT frame                      ``(x, y, z)``
``ccm``        CRM's canonical frame: Z up, front on +Y     ``(y, -x, z)``
``reference``  CRM reference export: ``(x, z, -y)`` of CCM  ``(-z, -x, y)``
               (Y up, the input view faces -Z)
``gltf``       glTF convention: Y up, front faces +Z,       ``(z, x, y)``
               i.e. ``(-x, z, y)`` of CCM
=============  ===========================================  ============================================

The "front" of a prediction is the side the input image was taken from; for GSO-30 the input is
render 000, so the front maps to +X. Our exporter records its frame in the GLB JSON chunk
(``asset.extras.crm_export.frame``, or ``asset.extras.crm_frame``) and in an OBJ header comment;
:func:`read_glb_frame` / :func:`read_obj_frame` read it without trimesh.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.mesh.frames import FRAMES as PIPELINE_FRAMES
from pipeline.mesh.frames import rotation

__all__ = [
    "FRAMES",
    "EvalMesh",
    "MeshLoadError",
    "frame_to_gt",
    "read_glb_frame",
    "read_obj_frame",
    "list_predictions",
    "load_mesh",
    "find_prediction",
    "MESH_SUFFIXES",
    "bounding_box",
    "fit_box",
    "normalize_unit",
    "rotation_z",
]


class MeshLoadError(ValueError):
    """A mesh file could not be read or holds no usable geometry (the message names the problem)."""


# The GSO ground truth is Z-up with the input view's camera on +X; the CCM frame is Z-up with it on +Y.
GT_FROM_CCM = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])
# Rotation matrices M with ``p_gt = M @ p_frame``: the GT frame plus every frame of pipeline.mesh.frames.
FRAMES: dict[str, np.ndarray] = {
    "gt": np.eye(3),
    **{name: GT_FROM_CCM @ rotation(name, "ccm") for name in PIPELINE_FRAMES},
}


def frame_to_gt(frame: str) -> np.ndarray:
    """``(3, 3)`` rotation taking points of ``frame`` to the GT frame (``p_gt = M @ p``)."""
    if frame not in FRAMES:
        raise ValueError(f"unknown frame {frame!r}; expected one of {sorted(FRAMES)}")
    return FRAMES[frame].copy()


def rotation_z(deg: float) -> np.ndarray:
    """``(3, 3)`` right-handed rotation about +Z by ``deg`` degrees."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class EvalMesh:
    """A triangle mesh with optional appearance.

    Attributes:
        vertices: ``(V, 3)`` float64.
        faces: ``(F, 3)`` int64.
        uv: ``(V, 2)`` float32 texture coordinates (glTF convention: v = 0 at the image top) or None.
        texture: ``(H, W, 3)`` float32 in [0, 1] or None.
        vertex_colors: ``(V, 3)`` float32 in [0, 1] or None.
        frame: the frame recorded in the file (``asset.extras.crm_frame`` of a GLB) or None.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    vertex_colors: np.ndarray | None = None
    frame: str | None = None

    def transformed(self, matrix: np.ndarray, translation: np.ndarray | None = None) -> EvalMesh:
        """Copy with ``v' = v @ matrix.T + translation``."""
        v = self.vertices @ np.asarray(matrix, dtype=np.float64).T
        if translation is not None:
            v = v + np.asarray(translation, dtype=np.float64)
        return EvalMesh(v, self.faces, self.uv, self.texture, self.vertex_colors, self.frame)


def _frame_from_extras(extras) -> str | None:
    if not isinstance(extras, dict):
        return None
    frame = extras.get("crm_frame")
    if frame is None and isinstance(extras.get("crm_export"), dict):
        frame = extras["crm_export"].get("frame")
    return frame if isinstance(frame, str) else None


def read_glb_frame(path: str | Path) -> str | None:
    """The frame recorded in a binary glTF's JSON chunk, or None (also for a file that is no GLB).

    Reads ``asset.extras.crm_frame`` or ``asset.extras.crm_export.frame`` (what ``pipeline.outputs.export``
    writes) from the JSON chunk (:func:`pipeline.outputs.export.read_glb_json`), without trimesh.
    """
    from pipeline.outputs.export import read_glb_json

    try:
        doc = read_glb_json(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError):  # bad header / chunk, invalid JSON (a ValueError too)
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("asset"), dict):
        return None
    return _frame_from_extras(doc["asset"].get("extras"))


def read_obj_frame(path: str | Path) -> str | None:
    """The frame recorded in an OBJ header comment ``# crm_export {json}`` (first 20 lines), or None."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for _, line in zip(range(20), fh):
            if line.startswith("# crm_export "):
                try:
                    return _frame_from_extras({"crm_export": json.loads(line[len("# crm_export ") :])})
                except json.JSONDecodeError:
                    return None
    return None


def _texture_of(material) -> np.ndarray | None:
    img = None
    for attr in ("baseColorTexture", "image"):
        img = getattr(material, attr, None)
        if img is not None:
            break
    if img is None:
        return None
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return arr


def _collect(obj) -> list:
    import trimesh

    if isinstance(obj, trimesh.Scene):
        return [g for g in obj.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]
    if isinstance(obj, trimesh.Trimesh):
        return [obj]
    return []


def load_mesh(path: str | Path) -> EvalMesh:
    """Read a GLB/GLTF/OBJ/PLY mesh (trimesh), keeping UVs + base-colour texture or vertex colours.

    Scenes with several geometries are concatenated (appearance is kept only for a single geometry).

    Raises:
        MeshLoadError: unreadable file, no faces, or non-finite vertices.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise MeshLoadError(f"mesh file not found: {path}")
    if path.stat().st_size == 0:
        raise MeshLoadError(f"mesh file {path.name} is empty (0 bytes)")
    try:
        obj = trimesh.load(str(path), process=False)
    except Exception as exc:  # trimesh raises many types on corrupt input
        raise MeshLoadError(f"cannot read mesh {path.name}: {type(exc).__name__}: {exc}") from exc
    geoms = [g for g in _collect(obj) if len(g.faces)]
    if not geoms:
        raise MeshLoadError(f"mesh {path.name} has no faces")
    suffix = path.suffix.lower()
    frame = read_glb_frame(path) if suffix == ".glb" else read_obj_frame(path) if suffix == ".obj" else None
    if len(geoms) == 1:
        g = geoms[0]
        v = np.asarray(g.vertices, dtype=np.float64)
        f = np.asarray(g.faces, dtype=np.int64)
        uv = tex = vc = None
        visual = g.visual
        if getattr(visual, "kind", None) == "texture" and getattr(visual, "uv", None) is not None:
            tex = _texture_of(visual.material)
            if tex is not None and len(visual.uv) == len(v):
                uv = np.asarray(visual.uv, dtype=np.float32).copy()
                uv[:, 1] = 1.0 - uv[:, 1]  # trimesh gives OpenGL-style v (0 at the bottom)
            else:
                tex = None
        elif getattr(visual, "kind", None) == "vertex":
            vc = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0
        mesh = EvalMesh(v, f, uv, tex, vc, frame)
    else:
        vs, fs, off = [], [], 0
        for g in geoms:
            vs.append(np.asarray(g.vertices, dtype=np.float64))
            fs.append(np.asarray(g.faces, dtype=np.int64) + off)
            off += len(g.vertices)
        mesh = EvalMesh(np.concatenate(vs), np.concatenate(fs), frame=frame)
    if not np.all(np.isfinite(mesh.vertices)):
        raise MeshLoadError(f"mesh {path.name} has non-finite (NaN/inf) vertex coordinates")
    if mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices):
        raise MeshLoadError(f"mesh {path.name} has face indices out of range")
    return mesh


def bounding_box(vertices: np.ndarray) -> tuple[float, np.ndarray]:
    """Longest side and centre ``(3,)`` of the axis-aligned bounding box of ``(V, 3)`` vertices."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(0), v.max(0)
    return float((hi - lo).max()), (hi + lo) / 2


def fit_box(
    vertices: np.ndarray, extent: float = 1.0, centre: np.ndarray | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Scale uniformly to longest bounding-box side ``extent``, then move the box centre to ``centre``.

    Args:
        vertices: ``(V, 3)``.
        extent: target longest side.
        centre: target bounding-box centre ``(3,)`` (default: the origin).

    Returns:
        ``(V, 3)`` fitted vertices, the scale applied, the translation applied after scaling
        (``v' = v * scale + shift``).

    Raises:
        MeshLoadError: the bounding box is degenerate (all vertices at one point).
    """
    v = np.asarray(vertices, dtype=np.float64)
    ext, _ = bounding_box(v)
    if not np.isfinite(ext) or ext <= 0:
        raise MeshLoadError("mesh bounding box is degenerate (zero extent)")
    scale = extent / ext
    v = v * scale
    _, c = bounding_box(v)
    shift = (np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)) - c
    return v + shift, scale, shift


def normalize_unit(vertices: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Scale to longest bounding-box side 1, then centre the bounding box at the origin.

    Args:
        vertices: ``(V, 3)``.

    Returns:
        ``(V, 3)`` normalised vertices, the scale applied, the translation applied after scaling.

    Raises:
        MeshLoadError: the bounding box is degenerate (all vertices at one point).
    """
    return fit_box(vertices, 1.0)


MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")


def find_prediction(pred_dir: str | Path, name: str) -> Path | None:
    """The prediction mesh of object ``name``: ``DIR/<name>.<ext>`` or one mesh in ``DIR/<name>/``.

    GLB is preferred over the other formats in both layouts (the batch pipeline writes
    ``<id>/mesh.glb`` and ``<id>/mesh.obj``).
    """
    pred_dir = Path(pred_dir)
    for ext in MESH_SUFFIXES:
        p = pred_dir / f"{name}{ext}"
        if p.is_file():
            return p
    sub = pred_dir / name
    if sub.is_dir():
        for ext in MESH_SUFFIXES:
            cands = sorted(sub.glob(f"*{ext}"))
            if cands:
                return cands[0]
    return None


def list_predictions(pred_dir: str | Path) -> list[str]:
    """Object names found in a prediction directory (files with a mesh suffix, or sub-folders)."""
    pred_dir = Path(pred_dir)
    names = set()
    for p in pred_dir.iterdir():
        if p.is_file() and p.suffix.lower() in MESH_SUFFIXES:
            names.add(p.stem)
        elif p.is_dir() and find_prediction(pred_dir, p.name) is not None:
            names.add(p.name)
    return sorted(names)
