"""`QCConfig`: what the per-object quality checks compute and the thresholds that raise their flags.

Every threshold is a heuristic, tuned to separate clearly broken objects from plausible ones, not to
rank good ones; each one can be changed per run (the values used are recorded in ``meta.json``). The
flags and what they mean: ``docs/qc.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_QC_CLIP", "QCConfig"]

#: CLIP used for the input-vs-render similarity: ViT-B/32 is small (~600 MB) and cheap on a CPU.
DEFAULT_QC_CLIP = "openai/clip-vit-base-patch32"


@dataclass(frozen=True)
class QCConfig:
    """Options and thresholds of :func:`pipeline.qc.checks.run_quality_checks`.

    Attributes:
        enabled: run the checks at all (False: ``meta.json`` records ``{"enabled": false}``, no columns).
        resolution: side in pixels of the input-view render and of the input image it is compared with.
        mask_threshold: input alpha (0..1) from which a pixel counts as foreground.
        min_background_fraction: when less than this fraction of the input is background, the input
            had no usable mask (an opaque photo, ``background="none"``): silhouette IoU and colour PSNR
            are left empty with that reason.
        clip_model: CLIP for the input-vs-render similarity: a Hugging Face repo id (resolved like the
            CRM weights: the hub cache, then a download unless ``HF_HUB_OFFLINE=1`` or
            ``clip_allow_download`` is False) or a local folder with a transformers ``CLIPModel``
            (``config.json`` + ``model.safetensors``); None skips the similarity.
        clip_allow_download: let :attr:`clip_model` be downloaded into the hub cache when missing.
        clip_views: dataset view indices (0 front, 1 left, 3 back, 4 right; ``crm_models.views``) of
            the renders compared with the input; the similarity is their mean.
        min_silhouette_iou: flag ``low_silhouette_iou`` below this IoU of input mask vs front render.
        min_color_psnr: flag ``low_color_psnr`` below this masked colour PSNR (dB) of input vs render.
        min_largest_component_share: flag ``fragmented`` when the largest connected component holds
            less than this share of the surface area.
        max_components: flag ``fragmented`` when the mesh has more connected components than this.
        max_boundary_edge_fraction: flag ``open_surface`` when more than this fraction of the edges
            border a single face (holes, cracks).
        max_nonmanifold_edge_fraction: flag ``non_manifold`` when more than this fraction of the
            edges are shared by three or more faces.
        min_faces: flag ``degenerate`` below this many faces.
        max_bbox_aspect: flag ``degenerate`` when the longest side of the bounding box is more than
            this many times its shortest (a sheet or a needle).
        min_texture_coverage: flag ``low_texture_coverage`` when the UV charts cover less than this
            fraction of the texture's area (most of the texture is padding).
        min_clip_similarity: flag ``low_clip_similarity`` below this CLIP similarity (100 x cosine).
    """

    enabled: bool = True
    resolution: int = 256
    mask_threshold: float = 0.5
    min_background_fraction: float = 0.02
    clip_model: str | None = DEFAULT_QC_CLIP
    clip_allow_download: bool = True
    clip_views: tuple[int, ...] = (0, 1, 3, 4)
    min_silhouette_iou: float = 0.7
    min_color_psnr: float = 12.0
    min_largest_component_share: float = 0.9
    max_components: int = 16
    max_boundary_edge_fraction: float = 0.01
    max_nonmanifold_edge_fraction: float = 0.001
    min_faces: int = 200
    max_bbox_aspect: float = 25.0
    min_texture_coverage: float = 0.2
    min_clip_similarity: float = 70.0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"invalid QC option {name}={getattr(self, name)!r}: expected {allowed}")

        if not isinstance(self.resolution, int) or not 16 <= self.resolution <= 2048:
            raise bad("resolution", "an integer in [16, 2048]")
        for name in (
            "mask_threshold",
            "min_background_fraction",
            "min_silhouette_iou",
            "min_largest_component_share",
            "max_boundary_edge_fraction",
            "max_nonmanifold_edge_fraction",
            "min_texture_coverage",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                raise bad(name, "a number in [0, 1]")
        for name in ("min_color_psnr", "max_bbox_aspect", "min_clip_similarity"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise bad(name, "a number")
        for name in ("max_components", "min_faces"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "a non-negative integer")
        views = tuple(self.clip_views)
        if not views or any(not isinstance(v, int) or not 0 <= v <= 5 for v in views):
            raise bad("clip_views", "a non-empty tuple of view indices in 0..5")
        object.__setattr__(self, "clip_views", views)
        if self.clip_model is not None and not str(self.clip_model).strip():
            raise bad("clip_model", "None, a Hugging Face repo id or a local folder")

    def thresholds(self) -> dict[str, Any]:
        """The flag thresholds (``min_*`` / ``max_*`` fields), as recorded in ``meta.json``."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.startswith(("min_", "max_")) and f.name != "min_background_fraction"
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able."""
        d = dataclasses.asdict(self)
        d["clip_views"] = list(self.clip_views)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QCConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown QC option(s): {', '.join(unknown)}")
        data = dict(data)
        if "clip_views" in data:
            data["clip_views"] = tuple(data["clip_views"])
        return cls(**data)
