"""Mesh health: connectivity, edge manifoldness, proportions and texture use of a finished mesh.

Pure numpy / scipy functions on ``(V, 3)`` vertices and ``(F, 3)`` faces. Exported meshes are split at
UV seams (one vertex per UV corner), which would cut them into their UV charts; :func:`weld` merges
vertices at identical positions first, so topology is measured on the surface, not on the atlas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "EdgeCounts",
    "bbox_aspect",
    "component_labels",
    "component_area_shares",
    "edge_counts",
    "face_areas",
    "texture_coverage",
    "weld",
]


def weld(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices with identical positions.

    Args:
        vertices: (V, 3) float positions.
        faces: (F, 3) integer indices.

    Returns:
        ``(vertices (V', 3), faces (F, 3) int64)`` with V' <= V distinct positions; faces keep their
        order and winding.
    """
    v = np.ascontiguousarray(vertices)
    uniq, inverse = np.unique(v, axis=0, return_inverse=True)
    return uniq, inverse.reshape(-1)[np.asarray(faces, dtype=np.int64)]


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) float64 triangle areas."""
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


@dataclass(frozen=True)
class EdgeCounts:
    """Undirected edges of a triangle mesh by the number of faces that share them.

    Attributes:
        edges: distinct edges.
        boundary: edges of exactly one face (holes, cracks, open borders).
        nonmanifold: edges of three or more faces.
    """

    edges: int
    boundary: int
    nonmanifold: int


def edge_counts(faces: np.ndarray) -> EdgeCounts:
    """Classify the undirected edges of (F, 3) faces (use welded faces; degenerate faces count as given)."""
    f = np.asarray(faces, dtype=np.int64)
    if f.size == 0:
        return EdgeCounts(0, 0, 0)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    return EdgeCounts(int(len(counts)), int((counts == 1).sum()), int((counts > 2).sum()))


def component_labels(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """Connected component of each face (faces sharing a vertex are connected).

    Args:
        faces: (F, 3) integer indices (welded, or components split at UV seams).
        num_vertices: V.

    Returns:
        (F,) int64 labels 0..C-1, numbered in order of first appearance among the faces.
    """
    f = np.asarray(faces, dtype=np.int64)
    if f.size == 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.concatenate([f[:, 0], f[:, 1]])
    cols = np.concatenate([f[:, 1], f[:, 2]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(num_vertices, num_vertices))
    _, vertex_label = connected_components(graph, directed=False)
    raw = vertex_label[f[:, 0]]
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # relabel by first appearance
    return order[inverse].astype(np.int64)


def component_area_shares(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Share of the total surface area held by each connected component, largest first.

    Args:
        vertices: (V, 3) positions; faces: (F, 3) indices (welded).

    Returns:
        (C,) float64 shares summing to 1 (all equal when the mesh has no area).
    """
    labels = component_labels(faces, len(vertices))
    if labels.size == 0:
        return np.zeros(0)
    area = np.bincount(labels, weights=face_areas(vertices, faces))
    total = area.sum()
    shares = area / total if total > 0 else np.full(len(area), 1.0 / len(area))
    return np.sort(shares)[::-1]


def bbox_aspect(vertices: np.ndarray) -> float:
    """Longest over shortest side of the axis-aligned bounding box (>= 1).

    A flat or needle-like mesh has a shortest side of (almost) zero; it is clamped to 1e-6 of the
    longest, so the value stays finite (at most 1e6).
    """
    v = np.asarray(vertices, dtype=np.float64)
    ext = v.max(axis=0) - v.min(axis=0)
    longest = float(ext.max())
    if longest <= 0:
        return 1e6
    return float(longest / max(float(ext.min()), 1e-6 * longest))


def texture_coverage(uvs: np.ndarray, faces: np.ndarray) -> float:
    """Fraction of the texture's area covered by the UV charts: the summed area of the UV triangles.

    The unwrapper's charts do not overlap, so this is the share of texels the bake colours (rasterizing
    the layout at 1024^2 gives the same value to 1e-3, at a thousand times the cost); overlapping UVs
    would be counted twice, hence the clamp to 1.

    Args:
        uvs: (V, 2) texture coordinates in [0, 1] (either vertical convention).
        faces: (F, 3) indices into `uvs`.

    Returns:
        Covered fraction in [0, 1].
    """
    t = np.asarray(uvs, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # (F, 3, 2)
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area = 0.5 * np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]).sum()
    return float(min(area, 1.0))
