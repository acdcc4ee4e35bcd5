"""Per-object quality checks: how well a finished mesh matches its input, and how healthy it is.

>>> from pipeline.qc import QCConfig, run_quality_checks
>>> report = run_quality_checks(mesh, obj.input_rgba, QCConfig(), rasterizer)
>>> report["values"]["silhouette_iou"], report["flags"]

``finalize`` runs them on every object and records the report in ``meta.json`` (``"qc"``) and in
``ObjectResult.qc``; ``qc_columns`` flattens it into the ``qc_*`` columns of a results row. What each
value and flag means: ``docs/qc.md``.

The checks themselves (``run_quality_checks``, ``disabled_report``) need torch and are imported on first
use, so readers of reports (the gallery, the flow) import this package without it.
"""

from __future__ import annotations

from typing import Any

from .columns import QC_COLUMNS, qc_columns
from .config import DEFAULT_QC_CLIP, QCConfig
from .flags import FLAGS, qc_flags
from .input_image import QC_INPUT_SIZE, qc_input_image
from .schema import QC_SCHEMA, QC_VALUES

__all__ = [
    "DEFAULT_QC_CLIP",
    "FLAGS",
    "QCConfig",
    "QC_COLUMNS",
    "QC_INPUT_SIZE",
    "QC_SCHEMA",
    "QC_VALUES",
    "disabled_report",
    "qc_columns",
    "qc_flags",
    "qc_input_image",
    "run_quality_checks",
]

_LAZY = ("run_quality_checks", "disabled_report")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import checks

        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
