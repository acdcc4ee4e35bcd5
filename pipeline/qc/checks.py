"""The per-object quality checks: one finished mesh and its input in, one JSON-able report out.

Three groups of values (names in :data:`QC_VALUES`):

* **input agreement**: the mesh rendered unlit from the input's viewpoint (CRM's front view, view 0:
  orthographic, the preprocessed square input spanning [-1, 1]; ``pipeline.qc.cameras``) against the
  preprocessed input: silhouette IoU of the masks, PSNR of the colours inside both masks (eroded by
  one pixel, so anti-aliased borders and background bleed do not count);
* **mesh health**: connected components and the largest one's share of the area, boundary and
  non-manifold edges (after welding the UV seams), face count, bounding-box aspect, share of the
  texture covered by the UV charts;
* **CLIP similarity** between the input and unlit renders from ``QCConfig.clip_views`` (on the input's
  background colour), when the CLIP model resolves.

A value that cannot be computed is None, with the reason under ``notes`` (keyed by the value's name);
the checks never raise. The report (schema ``crm-qc/1``, written into ``meta.json`` as ``"qc"``)::

    {"schema": "crm-qc/1", "values": {name: number | None}, "flags": [name, ...],
     "notes": {name: reason}, "thresholds": {QCConfig threshold: value},
     "details": {"input_foreground_fraction": float, "clip_model": str, "clip_per_view": {view: float}},
     "seconds": float}
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import numpy as np
import torch

from crm_models.views import VIEW_NAMES
from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.qc.cameras import view_cameras
from pipeline.qc.clip_similarity import clip_image_similarity, get_qc_clip
from pipeline.qc.config import QCConfig
from pipeline.qc.flags import qc_flags
from pipeline.qc.image_metrics import erode, masked_psnr, silhouette_iou
from pipeline.qc.input_image import split_input
from pipeline.qc.mesh_health import (
    bbox_aspect,
    component_area_shares,
    edge_counts,
    texture_coverage,
    weld,
)
from pipeline.qc.render import render_unlit
from pipeline.qc.schema import QC_SCHEMA, QC_VALUES
from pipeline.raster import Rasterizer

__all__ = ["QC_SCHEMA", "QC_VALUES", "disabled_report", "run_quality_checks"]

# Background colour of the preprocessed input (pipeline.inputs.preprocess default), used behind renders.
_BACKGROUND = np.array([127, 127, 127], dtype=np.float32) / 255.0


def _round(v: float, digits: int = 4) -> float | None:
    v = float(v)
    return round(v, digits) if np.isfinite(v) else None


def disabled_report() -> dict[str, Any]:
    """The report of an object whose checks were switched off (``QCConfig.enabled=False``)."""
    return {"schema": QC_SCHEMA, "enabled": False, "values": {}, "flags": [], "notes": {}}


def _mesh_health(mesh, values: dict, notes: dict) -> None:
    verts, faces = weld(mesh.vertices, mesh.faces)
    shares = component_area_shares(verts, faces)
    edges = edge_counts(faces)
    values.update(
        components=int(len(shares)),
        largest_component_share=_round(shares[0]) if len(shares) else None,
        edges=edges.edges,
        boundary_edges=edges.boundary,
        nonmanifold_edges=edges.nonmanifold,
        faces=int(len(mesh.faces)),
        bbox_aspect=_round(bbox_aspect(verts), 3),
    )
    if isinstance(mesh, TexturedMesh):
        values["texture_coverage"] = _round(texture_coverage(mesh.uvs, mesh.faces))
    else:
        notes["texture_coverage"] = "vertex-coloured mesh: no texture"


def _input_agreement(
    rgb_in: torch.Tensor, mask_in: torch.Tensor, rgb: torch.Tensor, mask: torch.Tensor, config: QCConfig,
    values: dict, notes: dict, details: dict,
) -> None:  # fmt: skip
    """Front-view comparison; `rgb_in`/`rgb` (1, S, S, 3), `mask_in`/`mask` (1, S, S)."""
    fg = float(mask_in.float().mean())
    details["input_foreground_fraction"] = _round(fg)
    details["render_foreground_fraction"] = _round(float(mask.float().mean()))
    if 1.0 - fg < config.min_background_fraction:
        why = (
            f"the input has no usable mask ({100 * (1 - fg):.1f}% background < "
            f"min_background_fraction {config.min_background_fraction}): an opaque image"
        )
        notes["silhouette_iou"] = notes["color_psnr"] = why
        return
    values["silhouette_iou"] = _round(silhouette_iou(mask, mask_in)[0])
    both = erode(mask & mask_in, 1)
    if not bool(both.any()):
        notes["color_psnr"] = "the render and the input share no interior pixel"
        return
    values["color_psnr"] = _round(masked_psnr(rgb, rgb_in, both)[0], 3)


def _clip_model(config: QCConfig, device, notes: dict, details: dict):
    """The CLIP model of the checks, or None with the reason in `notes` (nothing is rendered for it then)."""
    if config.clip_model is None:
        notes["clip_similarity"] = "disabled (QCConfig.clip_model is None)"
        return None
    details["clip_model"] = str(config.clip_model)
    allow = config.clip_allow_download
    model, reason = get_qc_clip(str(config.clip_model), allow_download=allow, device=device)
    if model is None:
        notes["clip_similarity"] = f"CLIP weights did not resolve: {reason}"
    return model


def _clip(
    model, rgb_in: np.ndarray, renders: np.ndarray, views: list[int], values: dict, details: dict
) -> None:
    """`rgb_in` (S, S, 3) and `renders` (B, S, S, 3) uint8."""
    sims = clip_image_similarity(model, rgb_in, renders)
    details["clip_per_view"] = {VIEW_NAMES[v]: _round(s, 3) for v, s in zip(views, sims.tolist())}
    values["clip_similarity"] = _round(sims.mean(), 3)


def run_quality_checks(
    mesh: TexturedMesh | VertexColorMesh,
    input_rgba: np.ndarray | None,
    config: QCConfig | None,
    rasterizer: Rasterizer,
) -> dict[str, Any]:
    """Measure one finished mesh against its input; never raises.

    Args:
        mesh: the mesh as exported, in the canonical (CCM) frame (``frame="ccm"``).
        input_rgba: (S, S, 4) uint8 preprocessed input (``pipeline.qc.input_image.qc_input_image``), or
            None when it was not carried (input-agreement and CLIP values are then empty).
        config: thresholds and options (default `QCConfig()`).
        rasterizer: any ``pipeline.raster.Rasterizer`` (the renders run on its device).

    Returns:
        The report described in the module docstring.
    """
    config = config or QCConfig()
    if not config.enabled:
        return disabled_report()
    t0 = time.perf_counter()
    values: dict[str, Any] = dict.fromkeys(QC_VALUES)
    notes: dict[str, str] = {}
    details: dict[str, Any] = {}
    errors: list[str] = []

    def guarded(what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a check that breaks must not lose the object
            errors.append(what)
            notes[what] = f"{type(exc).__name__}: {exc}"
            details.setdefault("tracebacks", {})[what] = traceback.format_exc(limit=8)

    if mesh.frame != "ccm":
        errors.append("mesh")
        notes["mesh"] = f"the checks need the mesh in the canonical frame 'ccm', got {mesh.frame!r}"
    else:
        guarded("mesh_health", _mesh_health, mesh, values, notes)
    if input_rgba is None:
        why = "no input image was carried with the generated object"
        for name in ("silhouette_iou", "color_psnr", "clip_similarity"):
            notes[name] = why
    elif mesh.frame == "ccm":

        def compare() -> None:
            s = config.resolution
            rgb_np, alpha_np = split_input(input_rgba, s)
            dev = rasterizer.device
            rgb_in = torch.from_numpy(rgb_np).to(dev)[None]
            mask_in = torch.from_numpy(alpha_np >= config.mask_threshold).to(dev)[None]
            model = _clip_model(config, dev, notes, details)
            views = [0] + [v for v in config.clip_views if v != 0] if model is not None else [0]
            rgb, mask = render_unlit(mesh, view_cameras(views), s, rasterizer)
            guarded("input_agreement", _input_agreement, rgb_in, mask_in, rgb[:1], mask[:1], config,
                    values, notes, details)  # fmt: skip
            if model is None:
                return
            bg = torch.as_tensor(_BACKGROUND, device=dev)
            on_bg = rgb * mask[..., None] + bg * (~mask[..., None])
            pick = [views.index(v) for v in config.clip_views]
            renders = (on_bg[pick] * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
            rgb_u8 = (rgb_np * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
            views_used = list(config.clip_views)
            guarded("clip_similarity", _clip, model, rgb_u8, renders, views_used, values, details)

        guarded("renders", compare)
    flags = qc_flags(values, config)
    if errors:
        flags.append("qc_error")
    return {
        "schema": QC_SCHEMA,
        "values": values,
        "flags": flags,
        "notes": notes,
        "thresholds": config.thresholds(),
        "details": details,
        "seconds": round(time.perf_counter() - t0, 4),
    }
