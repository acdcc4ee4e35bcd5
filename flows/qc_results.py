"""Quality checks in a batch run: the ``qc_*`` results columns, what flagged rows become, the review list.

``finalize`` measures every object (``pipeline.qc``) and reports it in ``ObjectResult.qc``. Here:

* :data:`QC_RESULT_FIELDS`: the Parquet fields that extend ``flows.io.manifest.RESULT_SCHEMA``;
* :func:`qc_row_columns`: those columns of one row, from its ``ObjectResult`` (all empty for failed rows);
* :func:`reflag`: a row's flags again from its ``qc_*`` values and the run's thresholds (rows kept from
  an earlier run were flagged with the thresholds of that run);
* :class:`QCPolicy` / :func:`apply_qc_policy`: a flagged row stays ``ok`` and goes to the review list
  (``"review"``, the default), is failed (``"fail"``: status ``failed``, error class
  ``QualityCheckFailed``, its files kept for inspection), or nothing happens (``"ignore"``);
* :func:`review_rows`: the flagged rows as a table for a Prefect artifact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.qc import FLAGS, QC_COLUMNS, QCConfig, qc_columns, qc_flags

__all__ = [
    "QC_ACTIONS",
    "QC_FAILED",
    "QC_RESULT_FIELDS",
    "QCPolicy",
    "apply_qc_policy",
    "qc_decision",
    "qc_row_columns",
    "reflag",
    "review_rows",
]

_ARROW_TYPES = {
    "float": pa.float64(),
    "int": pa.int64(),
    "list[str]": pa.list_(pa.string()),
    "map[str,str]": pa.map_(pa.string(), pa.string()),
}
#: The ``qc_*`` fields appended to the results schema (see ``pipeline.qc.columns``).
QC_RESULT_FIELDS: list[pa.Field] = [pa.field(name, _ARROW_TYPES[kind]) for name, kind in QC_COLUMNS.items()]
QC_ACTIONS = ("review", "fail", "ignore")
#: ``error_class`` of a row failed by the policy.
QC_FAILED = "QualityCheckFailed"


def qc_row_columns(result: Any | None) -> dict[str, Any]:
    """The ``qc_*`` columns of one results row.

    Args:
        result: the row's ``ObjectResult`` (or its ``qc`` report, or None); a failed result has none.

    Returns:
        Every field of :data:`QC_RESULT_FIELDS` (values None, ``qc_flags`` [] and ``qc_notes`` {} when
        there is no report).
    """
    if result is not None and not isinstance(result, Mapping) and not getattr(result, "ok", True):
        result = None
    return qc_columns(result)


#: Flags that do not come from a threshold (kept as they are by :func:`reflag`).
_NOT_THRESHOLD_FLAGS = ("qc_error",)


def reflag(row: dict[str, Any], config: QCConfig) -> dict[str, Any]:
    """The row with ``qc_flags`` computed again from its ``qc_*`` values against `config`'s thresholds.

    Rows without any measured value (failed rows, checks switched off) are returned unchanged; flags
    that do not come from a threshold (``qc_error``) are kept.
    """
    values = {name[3:]: row.get(name) for name in QC_COLUMNS if name not in ("qc_flags", "qc_notes")}
    if all(v is None for v in values.values()):
        return row
    kept = [f for f in (row.get("qc_flags") or []) if f in _NOT_THRESHOLD_FLAGS]
    flags = qc_flags(values, config)
    return {**row, "qc_flags": [f for f in FLAGS if f in flags or f in kept]}


@dataclass(frozen=True)
class QCPolicy:
    """What a batch run does with rows whose quality checks raised flags.

    Attributes:
        action: ``"review"`` (the row stays ``ok`` and is listed for review), ``"fail"`` (the row is
            marked failed with ``error_class="QualityCheckFailed"``; its outputs stay where they are, and
            it counts towards ``max_failure_rate``) or ``"ignore"``.
        flags: only these flags trigger the action (None: any flag; names in ``pipeline.qc.FLAGS``).
    """

    action: str = "review"
    flags: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.action not in QC_ACTIONS:
            raise ValueError(f"QC action must be one of {QC_ACTIONS}, got {self.action!r}")
        if self.flags is not None:
            unknown = sorted(set(self.flags) - set(FLAGS))
            if unknown:
                raise ValueError(f"unknown QC flag(s) {unknown}; known: {', '.join(FLAGS)}")
            object.__setattr__(self, "flags", tuple(self.flags))

    @classmethod
    def parse(cls, value: str | QCPolicy | None) -> QCPolicy:
        """``"review"``, ``"fail"``, ``"ignore"`` or ``"fail:fragmented,degenerate"`` (action:flags)."""
        if isinstance(value, QCPolicy):
            return value
        if value is None or not str(value).strip():
            return cls()
        action, _, flags = str(value).partition(":")
        names = tuple(f.strip() for f in flags.split(",") if f.strip()) or None
        return cls(action.strip(), names)


def _triggering(row: Mapping[str, Any], policy: QCPolicy) -> list[str]:
    flags = list(row.get("qc_flags") or [])
    return flags if policy.flags is None else [f for f in flags if f in policy.flags]


def qc_decision(row: Mapping[str, Any], policy: QCPolicy | str | None = None) -> str:
    """``"pass"``, ``"review"`` or ``"fail"`` for one results row (only ``ok`` rows can be flagged)."""
    policy = QCPolicy.parse(policy)
    if row.get("status") != "ok" or policy.action == "ignore" or not _triggering(row, policy):
        return "pass"
    return policy.action


def apply_qc_policy(row: dict[str, Any], policy: QCPolicy | str | None = None) -> tuple[dict[str, Any], str]:
    """The row as the policy leaves it, and the decision (see :func:`qc_decision`).

    A ``"fail"`` decision returns a copy with ``status="failed"``, ``error_class="QualityCheckFailed"`` and
    a message naming the flags; outputs, ``output_uri`` and the ``qc_*`` columns are kept, so the
    gallery still shows what was rejected. Other decisions return the row unchanged.
    """
    policy = QCPolicy.parse(policy)
    decision = qc_decision(row, policy)
    if decision != "fail":
        return row, decision
    out = dict(row)
    out.update(
        status="failed",
        error_class=QC_FAILED,
        error_message="quality checks flagged: " + ", ".join(_triggering(row, policy)),
    )
    return out, decision


def review_rows(rows: Iterable[Mapping[str, Any]], limit: int = 200) -> list[dict[str, Any]]:
    """Flagged rows (status ok, at least one flag) as table rows for an artifact: id, flags and the
    values behind the usual flags, first `limit` rows."""
    out = []
    for row in rows:
        if row.get("status") != "ok" or not row.get("qc_flags"):
            continue
        out.append(
            {
                "id": row["id"],
                "flags": ", ".join(row["qc_flags"]),
                "silhouette_iou": row.get("qc_silhouette_iou"),
                "color_psnr": row.get("qc_color_psnr"),
                "components": row.get("qc_components"),
                "faces": row.get("qc_faces"),
                "clip_similarity": row.get("qc_clip_similarity"),
                "preview_uri": row.get("preview_uri"),
            }
        )
        if len(out) >= limit:
            break
    return out
