"""The quality report's schema id and its measured values (names, types, meanings), defined once."""

from __future__ import annotations

__all__ = ["QC_SCHEMA", "QC_VALUES"]

QC_SCHEMA = "crm-qc/1"
#: Every measured value: name -> (type, meaning).
QC_VALUES: dict[str, tuple[str, str]] = {
    "silhouette_iou": ("float", "IoU of the input's mask and the mesh's silhouette from the input viewpoint"),
    "color_psnr": ("float", "PSNR (dB) of input vs render colours inside both masks"),
    "clip_similarity": ("float", "CLIP similarity (100 x cosine) of input vs renders, mean over the views"),
    "components": ("int", "connected components of the surface"),
    "largest_component_share": ("float", "share of the surface area in the largest component"),
    "edges": ("int", "distinct undirected edges"),
    "boundary_edges": ("int", "edges of exactly one face"),
    "nonmanifold_edges": ("int", "edges of three or more faces"),
    "faces": ("int", "triangles of the exported mesh"),
    "bbox_aspect": ("float", "longest over shortest side of the bounding box"),
    "texture_coverage": ("float", "fraction of the texture's area covered by the UV charts"),
}
