"""The quality report as flat ``qc_*`` columns of a results row (plain Python; Parquet types live in flows).

Columns: ``qc_<value>`` for every value of ``pipeline.qc.schema.QC_VALUES`` (float or int, None when not
computed), ``qc_flags`` (list of flag names) and ``qc_notes`` (value name -> why it is empty). A failed
object, or one whose checks were switched off, has every value None and no flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.qc.schema import QC_VALUES

__all__ = ["QC_COLUMNS", "qc_columns"]

#: Column name -> type ("float", "int", "list[str]", "map[str,str]").
QC_COLUMNS: dict[str, str] = {
    **{f"qc_{name}": kind for name, (kind, _) in QC_VALUES.items()},
    "qc_flags": "list[str]",
    "qc_notes": "map[str,str]",
}


def qc_columns(qc: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """Flat ``qc_*`` columns of a quality report.

    Args:
        qc: the report (``ObjectResult.qc``, ``meta.json["qc"]``), an object with a ``qc`` attribute
            (an ``ObjectResult``), or None.

    Returns:
        Every column of :data:`QC_COLUMNS`, in that order.
    """
    if qc is not None and not isinstance(qc, Mapping):
        qc = getattr(qc, "qc", None)
    qc = qc or {}
    values = qc.get("values") or {}
    out: dict[str, Any] = {}
    for name, (kind, _) in QC_VALUES.items():
        v = values.get(name)
        out[f"qc_{name}"] = None if v is None else (int(v) if kind == "int" else float(v))
    out["qc_flags"] = [str(f) for f in qc.get("flags") or []]
    out["qc_notes"] = {str(k): str(v) for k, v in (qc.get("notes") or {}).items()}
    return out
