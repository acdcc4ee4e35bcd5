"""Per-object quality checks: how well a finished mesh matches its input, and how healthy it is.

>>> from pipeline.qc import QCConfig, run_quality_checks
>>> report = run_quality_checks(mesh, obj.input_rgba, QCConfig(), rasterizer)
>>> report["values"]["silhouette_iou"], report["flags"]

``finalize`` runs them on every object and records the report in ``meta.json`` (``"qc"``) and in
``ObjectResult.qc``; ``qc_columns`` flattens it into the ``qc_*`` columns of a results row. What each
value and flag means: ``docs/qc.md``.
"""

from __future__ import annotations

from .checks import QC_SCHEMA, QC_VALUES, disabled_report, run_quality_checks
from .columns import QC_COLUMNS, qc_columns
from .config import DEFAULT_QC_CLIP, QCConfig
from .flags import FLAGS, qc_flags
from .input_image import QC_INPUT_SIZE, qc_input_image

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
