"""Mesh cleaning after FlexiCubes extraction (SPEC §9.1), with pymeshlab.

Reproduces the post-processing CRM ran through `kiui.mesh_utils.clean_mesh(verts, faces, repair=False,
remesh=False)`: remove unreferenced vertices, merge close vertices, remove duplicate and zero-area
faces and (optionally) remove small floating components. The floater thresholds are explicit: kiui's
defaults changed between releases (<= 0.2.10, contemporary with CRM's release: v_pct=1, min_f=64,
min_d=20; >= 0.2.14: min_f=0, min_d=0). `CleaningConfig()` uses the release-era values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CleaningConfig:
    """Mesh cleaning settings.

    Attributes:
        v_pct: merge vertices closer than this many PERCENT of the bounding-box diagonal (0 = off).
        min_d: remove connected components whose diameter is below this PERCENT of the bbox diagonal
            (0 = off). Release-era default 20.
        min_f: remove connected components with fewer than this many faces (0 = off). Release-era 64.
        repair: also remove T-vertices and repair non-manifold edges/vertices (CRM: off).
        remesh: isotropic explicit remeshing, 3 iterations (CRM: off).
        remesh_size: remeshing target edge length, PERCENT of the bbox diagonal.
    """

    v_pct: float = 1.0
    min_f: int = 64
    min_d: float = 20.0
    repair: bool = False
    remesh: bool = False
    remesh_size: float = 0.005

    @classmethod
    def kiui_new_defaults(cls) -> CleaningConfig:
        """The settings of kiui >= 0.2.14 (no floater removal)."""
        return cls(v_pct=1.0, min_f=0, min_d=0.0)


def _check(verts, faces) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(verts)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"verts must have shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {f.shape}")
    if not np.issubdtype(v.dtype, np.floating):
        raise TypeError(f"verts must be floating point, got {v.dtype}")
    if not np.issubdtype(f.dtype, np.integer):
        raise TypeError(f"faces must be integer, got {f.dtype}")
    if not np.isfinite(v).all():
        raise ValueError("verts contains NaN or infinite coordinates")
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise ValueError(f"faces index vertices outside [0, {v.shape[0]})")
    return v.astype(np.float64), f.astype(np.int32)


def clean_mesh(verts, faces, cfg: CleaningConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clean a triangle mesh.

    Args:
        verts: (V, 3) float vertex positions.
        faces: (F, 3) int vertex indices (winding is kept as given).
        cfg: `CleaningConfig` (default: CRM release-era floater removal).

    Returns:
        (verts (V', 3) float32, faces (F', 3) int64). An empty input (no faces) returns empty arrays.
    """
    import pymeshlab as pml

    cfg = cfg or CleaningConfig()
    v, f = _check(verts, faces)
    if f.shape[0] == 0 or v.shape[0] == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    ms = pml.MeshSet()
    ms.add_mesh(pml.Mesh(vertex_matrix=v, face_matrix=f), "mesh")
    ms.meshing_remove_unreferenced_vertices()
    if cfg.v_pct > 0:
        ms.meshing_merge_close_vertices(threshold=pml.PercentageValue(cfg.v_pct))
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_null_faces()
    if cfg.min_d > 0:
        ms.meshing_remove_connected_component_by_diameter(mincomponentdiag=pml.PercentageValue(cfg.min_d))
    if cfg.min_f > 0:
        ms.meshing_remove_connected_component_by_face_number(mincomponentsize=int(cfg.min_f))
    if cfg.repair:
        ms.meshing_remove_t_vertices(method=0, threshold=40, repeat=True)
        ms.meshing_repair_non_manifold_edges(method=0)
        ms.meshing_repair_non_manifold_vertices(vertdispratio=0)
    if cfg.remesh:
        ms.meshing_isotropic_explicit_remeshing(iterations=3, targetlen=pml.PercentageValue(cfg.remesh_size))
    m = ms.current_mesh()
    out_v = np.asarray(m.vertex_matrix(), dtype=np.float32)
    out_f = np.asarray(m.face_matrix(), dtype=np.int64)
    return out_v, out_f
