"""Per-object scores of a GSO evaluation and the metric columns of its reports.

Shared by the protocol (:mod:`evaluation.gso`) and the report writer (:mod:`evaluation.report`), so that
neither imports the other's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["GEOMETRY_COLUMNS", "IMAGE_COLUMNS", "METRIC_COLUMNS", "ObjectScores", "fail"]

GEOMETRY_COLUMNS = ["chamfer", "fscore", "iou_parity", "iou_winding"]
IMAGE_COLUMNS = ["psnr", "ssim", "lpips", "clip"]
METRIC_COLUMNS = GEOMETRY_COLUMNS + IMAGE_COLUMNS


@dataclass
class ObjectScores:
    """Outcome for one object: metric values (None = not computed), status, reason, alignment."""

    name: str
    status: str = "ok"
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    fscores: dict = field(default_factory=dict)
    frame: str = ""
    alignment: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    renders: np.ndarray | None = None  # (16, H, W, 3) prediction renders on white
    gt_views: np.ndarray | None = None  # (16, H, W, 3) GT renders on white

    def row(self) -> dict:
        out = {"object": self.name, "status": self.status}
        for c in METRIC_COLUMNS:
            out[c] = self.metrics.get(c)
        for t, v in sorted(self.fscores.items()):
            out[f"fscore@{t:g}"] = v
        out["frame"] = self.frame
        out["reason"] = self.reason
        return out


def fail(res: ObjectScores, stage: str, exc: BaseException | str) -> ObjectScores:
    """Mark ``res`` failed at ``stage`` (the reason names the stage and the error); returns ``res``."""
    res.status = "failed"
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    res.reason = f"{stage}: {msg}" if not res.reason else f"{res.reason}; {stage}: {msg}"
    return res
