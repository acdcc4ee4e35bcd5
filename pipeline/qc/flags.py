"""Named quality flags: which measured values cross which `QCConfig` thresholds.

A flag never changes an object's status by itself; the batch flow decides what flagged objects become
(a review list, or failures: ``flows.qc_results``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.qc.config import QCConfig

__all__ = ["FLAGS", "qc_flags"]

#: Every flag and what raises it (thresholds are `QCConfig` fields).
FLAGS: dict[str, str] = {
    "low_silhouette_iou": "the mesh seen from the input's viewpoint does not cover the input's silhouette "
    "(silhouette_iou < min_silhouette_iou)",
    "low_color_psnr": "the mesh's colours seen from the input's viewpoint differ from the input's "
    "(color_psnr < min_color_psnr)",
    "fragmented": "the mesh falls apart into pieces (largest_component_share < min_largest_component_share, "
    "or components > max_components)",
    "open_surface": "the surface has holes or cracks (boundary_edges / edges > max_boundary_edge_fraction)",
    "non_manifold": "edges shared by three or more faces (nonmanifold_edges / edges > "
    "max_nonmanifold_edge_fraction)",
    "degenerate": "too few faces, or a sheet/needle (faces < min_faces or bbox_aspect > max_bbox_aspect)",
    "low_texture_coverage": "the UV charts use little of the texture "
    "(texture_coverage < min_texture_coverage)",
    "low_clip_similarity": "renders of the mesh do not look like the input to CLIP (clip_similarity < "
    "min_clip_similarity)",
    "qc_error": "the checks themselves failed (the reason is in the notes)",
}


def _below(v: Any, limit: float) -> bool:
    return v is not None and v == v and v < limit


def _above(v: Any, limit: float) -> bool:
    return v is not None and v == v and v > limit


def qc_flags(values: Mapping[str, Any], config: QCConfig) -> list[str]:
    """The flags raised by measured `values` (names as in ``pipeline.qc.schema.QC_VALUES``).

    Missing or None values raise nothing (a check that could not run is explained in the notes, not
    flagged). Returns the flags in :data:`FLAGS` order.
    """
    c = config
    edges = values.get("edges") or 0

    def fraction(name: str):
        v = values.get(name)
        return None if v is None or edges <= 0 else v / edges

    raised = {
        "low_silhouette_iou": _below(values.get("silhouette_iou"), c.min_silhouette_iou),
        "low_color_psnr": _below(values.get("color_psnr"), c.min_color_psnr),
        "fragmented": _below(values.get("largest_component_share"), c.min_largest_component_share)
        or _above(values.get("components"), c.max_components),
        "open_surface": _above(fraction("boundary_edges"), c.max_boundary_edge_fraction),
        "non_manifold": _above(fraction("nonmanifold_edges"), c.max_nonmanifold_edge_fraction),
        "degenerate": _below(values.get("faces"), c.min_faces)
        or _above(values.get("bbox_aspect"), c.max_bbox_aspect),
        "low_texture_coverage": _below(values.get("texture_coverage"), c.min_texture_coverage),
        "low_clip_similarity": _below(values.get("clip_similarity"), c.min_clip_similarity),
    }
    return [name for name in FLAGS if raised.get(name)]
