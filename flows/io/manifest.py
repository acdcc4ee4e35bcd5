"""Parquet manifests for batch runs: input schema, results schema, validation, read/write via fsspec.

Input manifest (one row per object to generate)
-----------------------------------------------
=============  ===========  ========  =====================================================
column         type         required  meaning
=============  ===========  ========  =====================================================
``id``         string       yes       unique object id; names the output folder, so it must be
                                      a safe path component (``[A-Za-z0-9][A-Za-z0-9._-]*``,
                                      at most 128 characters)
``image_uri``  string       yes       input image: ``s3://``/``gs://``/``file://`` URI, absolute
                                      path, or a path relative to the manifest's folder
``seed``       int (any)    no        per-row seed override (null: the run's ``options.seed``)
=============  ===========  ========  =====================================================

Other columns are allowed and ignored. Whole-manifest problems (missing column, wrong type,
duplicate ids, no rows) raise :class:`ManifestError` before any work starts. Row problems (unsafe
id, empty ``image_uri``) do not stop the run: the row is reported as a failed result with
``error_class="InvalidRow"``, unless ``strict=True``.

Results manifest (one row per input row)
----------------------------------------
See :data:`RESULT_SCHEMA`: ``id``, ``image_uri``, ``status`` (``"ok"``/``"failed"``),
``error_class``, ``error_message``, ``output_uri`` (the object's folder), ``outputs`` (file name ->
URI), ``preview_uri``, ``timings`` (stage -> seconds), ``weights_identity`` (JSON), ``options_hash``,
``seed``, ``attempts``, ``worker``, ``resumed`` (true when an earlier run's complete output was
kept), ``finished_at`` (UTC).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flows.io import storage
from pipeline.inputs.ids import is_safe_id

__all__ = [
    "ManifestError",
    "INPUT_SCHEMA",
    "RESULT_SCHEMA",
    "ManifestRow",
    "InputManifest",
    "id_problem",
    "make_input_table",
    "validate_input_table",
    "read_input_manifest",
    "write_input_manifest",
    "result_row",
    "results_table",
    "ResultsWriter",
    "write_results",
    "read_results",
]


INPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=True),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_class", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("output_uri", pa.string()),
        pa.field("outputs", pa.map_(pa.string(), pa.string())),
        pa.field("preview_uri", pa.string()),
        pa.field("timings", pa.map_(pa.string(), pa.float64())),
        pa.field("weights_identity", pa.string()),
        pa.field("options_hash", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("worker", pa.string()),
        pa.field("resumed", pa.bool_(), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)

STATUSES = ("ok", "failed")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (the message names the problem and the file)."""


def id_problem(obj_id: Any) -> str | None:
    """Why ``obj_id`` cannot name an output folder, or None when it is safe."""
    if obj_id is None:
        return "id is null"
    if not isinstance(obj_id, str):
        return f"id must be a string, got {type(obj_id).__name__}"
    if obj_id in ("", ".", ".."):
        return f"id {obj_id!r} is not a usable path component"
    if not is_safe_id(obj_id):
        return (
            f"id {obj_id!r} is unsafe as a path component "
            "(allowed: letters, digits, '.', '_', '-'; first a letter or digit; at most 128 characters)"
        )
    return None


@dataclass(frozen=True)
class ManifestRow:
    """One validated input row.

    Attributes:
        index: 0-based row number in the manifest.
        id: object id (may be unsafe when ``problem`` is set).
        image_uri: the image reference resolved against the manifest's folder.
        seed: per-row seed or None.
        problem: why the row cannot run (it then ends as a failed result), or None.
    """

    index: int
    id: str
    image_uri: str
    seed: int | None = None
    problem: str | None = None


@dataclass
class InputManifest:
    """A validated input manifest.

    Attributes:
        uri: where it was read from ("" when built in memory).
        table: the ``id``/``image_uri``/``seed`` columns, cast to :data:`INPUT_SCHEMA`.
        problems: {row index: reason} for rows that will be reported as failed.
    """

    uri: str
    table: pa.Table
    problems: dict[int, str] = field(default_factory=dict)
    base_uri: str | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def rows(self, chunk: int = 4096) -> Iterator[ManifestRow]:
        """Rows in manifest order, converted lazily ``chunk`` at a time."""
        for start in range(0, self.table.num_rows, chunk):
            part = self.table.slice(start, chunk).to_pydict()
            for k, (i, u, s) in enumerate(zip(part["id"], part["image_uri"], part["seed"])):
                idx = start + k
                problem = self.problems.get(idx)
                uri = storage.resolve_uri(u, self.base_uri) if u else (u or "")
                yield ManifestRow(index=idx, id=i, image_uri=uri, seed=s, problem=problem)


def make_input_table(
    ids: list[str], image_uris: list[str], seeds: list[int | None] | None = None
) -> pa.Table:
    """Build an input manifest table (columns per :data:`INPUT_SCHEMA`)."""
    if len(ids) != len(image_uris) or (seeds is not None and len(seeds) != len(ids)):
        raise ManifestError(
            f"column lengths differ: ids={len(ids)}, image_uris={len(image_uris)}, "
            f"seeds={len(seeds) if seeds is not None else '-'}"
        )
    return pa.table(
        {"id": ids, "image_uri": image_uris, "seed": seeds if seeds is not None else [None] * len(ids)},
        schema=INPUT_SCHEMA,
    )


def _cast_column(table: pa.Table, name: str, target: pa.DataType, where: str) -> pa.Array:
    col = table.column(name)
    t = col.type
    ok = (
        (pa.types.is_string(target) and (pa.types.is_string(t) or pa.types.is_large_string(t)))
        or (pa.types.is_integer(target) and (pa.types.is_integer(t) or pa.types.is_null(t)))
        or (pa.types.is_string(target) and pa.types.is_null(t))
    )
    if pa.types.is_dictionary(t) and pa.types.is_string(target):
        ok = pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    if not ok:
        raise ManifestError(f"{where}: column {name!r} must be {target}, got {t}")
    try:
        return col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ManifestError(f"{where}: column {name!r} cannot be read as {target}: {exc}") from exc


def validate_input_table(
    table: pa.Table, *, uri: str = "", base_uri: str | None = None, strict: bool = False
) -> InputManifest:
    """Check an input table; raise :class:`ManifestError` for whole-manifest problems.

    Args:
        table: the manifest (extra columns are ignored).
        uri: where it came from (only used in messages).
        base_uri: folder that relative ``image_uri`` values are resolved against.
        strict: also raise for row problems (unsafe ids, empty image URIs).
    """
    where = uri or "manifest"
    missing = [c for c in ("id", "image_uri") if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{where}: missing required column(s) {missing}; found columns {table.column_names}"
        )
    if table.num_rows == 0:
        raise ManifestError(f"{where}: the manifest is empty (0 rows)")
    ids = _cast_column(table, "id", pa.string(), where)
    image_uris = _cast_column(table, "image_uri", pa.string(), where)
    if "seed" in table.column_names:
        seeds = _cast_column(table, "seed", pa.int64(), where)
    else:
        seeds = pa.chunked_array([pa.nulls(table.num_rows, pa.int64())])
    out = pa.Table.from_arrays([ids, image_uris, seeds], names=["id", "image_uri", "seed"])

    id_list = ids.to_pylist()
    seen: dict[str, int] = {}
    dups: dict[str, list[int]] = {}
    for i, v in enumerate(id_list):
        if v is None:
            continue
        if v in seen:
            dups.setdefault(v, [seen[v]]).append(i)
        else:
            seen[v] = i
    if dups:
        shown = ", ".join(f"{k!r} (rows {v})" for k, v in list(dups.items())[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ManifestError(f"{where}: duplicate ids: {shown}{more}; ids must be unique")

    problems: dict[int, str] = {}
    for i, v in enumerate(id_list):
        p = id_problem(v)
        if p is not None:
            problems[i] = p
    for i, u in enumerate(image_uris.to_pylist()):
        if (u is None or not u.strip()) and i not in problems:
            problems[i] = "image_uri is empty"
    if strict and problems:
        shown = "; ".join(f"row {i}: {p}" for i, p in list(problems.items())[:5])
        raise ManifestError(f"{where}: {len(problems)} invalid row(s): {shown}")
    return InputManifest(uri=uri, table=out, problems=problems, base_uri=base_uri)


def _read_table(uri: str, storage_options: dict[str, Any] | None, columns: list[str] | None) -> pa.Table:
    fs, path = storage.get_fs(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    try:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            cols = [c for c in columns if c in names] if columns is not None else None
            return pf.read(columns=cols)
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise ManifestError(f"manifest not found: {uri}") from exc
        if isinstance(exc, pa.ArrowInvalid):
            raise ManifestError(f"{uri}: not a readable Parquet file: {exc}") from exc
        raise


def read_input_manifest(
    uri: str, storage_options: dict[str, Any] | None = None, *, strict: bool = False
) -> InputManifest:
    """Read and validate an input manifest from any fsspec URI.

    Relative ``image_uri`` values are resolved against the manifest's folder.
    """
    table = _read_table(uri, storage_options, ["id", "image_uri", "seed"])
    return validate_input_table(table, uri=uri, base_uri=storage.parent_uri(uri), strict=strict)


def _write_table(table: pa.Table, uri: str, storage_options: dict[str, Any] | None) -> str:
    fd, tmp = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        storage.put_file_atomic(tmp, uri, storage_options)
    finally:
        os.unlink(tmp)
    return uri


def write_input_manifest(table: pa.Table, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Validate (strictly) and write an input manifest atomically to ``uri``."""
    validate_input_table(table, uri=uri, strict=True)
    return _write_table(table, uri, storage_options)


def result_row(
    id: str,
    status: str,
    *,
    image_uri: str | None = None,
    error_class: str | None = None,
    error_message: str | None = None,
    output_uri: str | None = None,
    outputs: dict[str, str] | None = None,
    preview_uri: str | None = None,
    timings: dict[str, float] | None = None,
    weights_identity: str | None = None,
    options_hash: str | None = None,
    seed: int | None = None,
    attempts: int = 0,
    worker: str | None = None,
    resumed: bool = False,
    finished_at: datetime | None = None,
) -> dict[str, Any]:
    """One results row as a dict (keys per :data:`RESULT_SCHEMA`); checks ``status``."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return {
        "id": id,
        "image_uri": image_uri,
        "status": status,
        "error_class": error_class,
        "error_message": error_message,
        "output_uri": output_uri,
        "outputs": dict(outputs or {}),
        "preview_uri": preview_uri,
        "timings": {k: float(v) for k, v in (timings or {}).items()},
        "weights_identity": weights_identity,
        "options_hash": options_hash,
        "seed": seed,
        "attempts": int(attempts),
        "worker": worker,
        "resumed": bool(resumed),
        "finished_at": finished_at or datetime.now(timezone.utc),
    }


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    r = dict(row)
    for key in ("outputs", "timings"):
        v = r.get(key)
        if isinstance(v, dict):
            r[key] = list(v.items())
        elif v is None:
            r[key] = []
    if isinstance(r.get("finished_at"), str):
        r["finished_at"] = datetime.fromisoformat(r["finished_at"])
    r.setdefault("resumed", False)
    r.setdefault("attempts", 0)
    return {name: r.get(name) for name in RESULT_SCHEMA.names}


def results_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """A results table (:data:`RESULT_SCHEMA`) from result dicts (see :func:`result_row`)."""
    return pa.Table.from_pylist([_normalise(r) for r in rows], schema=RESULT_SCHEMA)


class ResultsWriter:
    """Stream result rows into a local Parquet file, then publish it atomically to ``uri``.

    Memory stays bounded by ``flush_every`` rows however long the run is::

        with ResultsWriter("s3://bucket/run/results.parquet") as w:
            w.write(row_dict)
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, flush_every: int = 256):
        self.uri = uri
        self.storage_options = storage_options
        self.flush_every = flush_every
        fd, self._tmp = tempfile.mkstemp(suffix=".parquet", prefix="results-")
        os.close(fd)
        self._writer = pq.ParquetWriter(self._tmp, RESULT_SCHEMA)
        self._buf: list[dict[str, Any]] = []
        self.count = 0
        self.status_counts: dict[str, int] = {}

    def write(self, row: dict[str, Any]) -> None:
        self._buf.append(row)
        self.count += 1
        self.status_counts[row["status"]] = self.status_counts.get(row["status"], 0) + 1
        if len(self._buf) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._writer.write_table(results_table(self._buf))
            self._buf = []

    def close(self) -> str:
        """Write the remaining rows and publish the file atomically; returns the URI."""
        try:
            self.flush()
            self._writer.close()
            storage.put_file_atomic(self._tmp, self.uri, self.storage_options)
        finally:
            self.abort()
        return self.uri

    def abort(self) -> None:
        """Drop the local file without publishing."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_results(
    rows: Iterable[dict[str, Any]], uri: str, storage_options: dict[str, Any] | None = None
) -> str:
    """Write result rows to ``uri`` atomically."""
    with ResultsWriter(uri, storage_options) as w:
        for r in rows:
            w.write(r)
    return uri


def read_results(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a results manifest; raises :class:`ManifestError` when columns are missing."""
    table = _read_table(uri, storage_options, None)
    missing = [n for n in RESULT_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ManifestError(f"{uri}: not a results manifest, missing column(s) {missing}")
    return table
