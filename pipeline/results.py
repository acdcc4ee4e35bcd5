"""What the pipeline hands over: the GPU part's `GeneratedObject`, one input's `ObjectResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GeneratedObject", "ObjectResult", "PipelineError"]


class PipelineError(RuntimeError):
    """A stage produced an unusable result (e.g. an empty mesh); the message names the stage."""


@dataclass
class GeneratedObject:
    """Result of the GPU part for one image; everything the CPU part needs (picklable).

    Attributes:
        id: object id (names the output folder).
        seed: the seed this object was generated with.
        views_strip: (R, 6R, 3) uint8 stage-1 views, order 001..005, 000.
        ccm_strip: (R, 6R, 3) uint8 stage-2 CCMs, same order, channels (X, Y, Z).
        vertices: (V, 3) float32 mesh vertices in the CCM frame (Z up, front on +Y).
        faces: (F, 3) int64 faces with the RAW FlexiCubes winding (normals point inward).
        color_field: `TriplaneColorField` on the CPU: (N, 3) points -> (N, 3) raw RGB (~[-1, 1]).
        timings: seconds per stage (load, preprocess, stage1, stage2, reconstruct).
        weights_identity: `ResolvedWeights.identity` of the models used.
        input_info: name, sha256, size and mode of the input image.
        device: device/dtype the stages ran with.
        input_rgba: (S, S, 4) uint8 preprocessed input for the quality checks
            (``pipeline.qc.qc_input_image``: colours and mask in the front view's framing), or None.
    """

    id: str
    seed: int
    views_strip: np.ndarray
    ccm_strip: np.ndarray
    vertices: np.ndarray
    faces: np.ndarray
    color_field: Any
    timings: dict[str, float] = field(default_factory=dict)
    weights_identity: dict[str, Any] = field(default_factory=dict)
    input_info: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    input_rgba: np.ndarray | None = None


@dataclass
class ObjectResult:
    """Outcome for one input.

    Attributes:
        id: object id.
        status: ``"ok"`` or ``"failed"``.
        error_class: exception class name when failed (e.g. ``ImageInputError``), else None.
        error_message: one-line reason when failed, else None.
        outputs: kind (glb, obj, mtl, texture, views, preview, meta) -> file name relative to `location`;
            empty on failure.
        location: where the object's folder was published (a local path or a URI); None on failure.
        timings: seconds per stage.
        mesh: face and vertex counts of the exported mesh (empty on failure).
        source: the input (path or ``<bytes>``), for reports.
        qc: the quality report (``pipeline.qc.run_quality_checks``; also ``meta.json["qc"]``): values,
            flags, notes; empty on failure. ``pipeline.qc.qc_columns`` flattens it into results columns.
    """

    id: str
    status: str
    error_class: str | None = None
    error_message: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    location: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    qc: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def path(self, kind: str) -> str:
        """Full path / URI of one output (``location/outputs[kind]``)."""
        if self.location is None or kind not in self.outputs:
            raise KeyError(f"{self.id}: no {kind!r} output")
        return f"{self.location.rstrip('/')}/{self.outputs[kind]}"

    @classmethod
    def failure(cls, obj_id: str, exc: BaseException, *, timings=None, source=None) -> ObjectResult:
        """A failed result whose message is the first line of the exception."""
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return cls(obj_id, "failed", type(exc).__name__, msg, timings=dict(timings or {}), source=source)
