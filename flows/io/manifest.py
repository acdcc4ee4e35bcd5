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

A manifest may be split into shards: a folder of Parquet files or a glob (``s3://b/m/*.parquet``),
see :func:`manifest_shards`; ids must be unique across all of them. Files are read in record batches
(:data:`READ_BATCH_ROWS` rows), so memory does not grow with the number of rows, except for the id
column (Arrow, ~20 bytes a row) held during validation for the uniqueness check.

Results manifest (one row per input row)
----------------------------------------
See :data:`RESULT_SCHEMA`: ``id``, ``image_uri``, ``status`` (``"ok"``/``"failed"``),
``error_class``, ``error_message``, ``output_uri`` (the object's folder), ``outputs`` (file name ->
URI), ``preview_uri``, ``timings`` (stage -> seconds), ``weights_identity`` (JSON), ``options_hash``,
``seed``, ``attempts``, ``worker``, ``resumed`` (true when an earlier run's complete output was
kept), ``finished_at`` (UTC), then the quality checks' ``qc_*`` columns (``flows.qc_results``; empty for
failed rows and for files written before they existed). :class:`ResultsWriter` streams rows into row
groups; :func:`merge_results` joins the results of several shards into one file.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.io import storage
from flows.io.release_memory import release_free_memory
from flows.qc_results import QC_RESULT_FIELDS
from pipeline.inputs.ids import MAX_ID_LENGTH, is_safe_id

__all__ = [
    "ManifestError",
    "INPUT_SCHEMA",
    "RESULT_SCHEMA",
    "ManifestRow",
    "InputManifest",
    "id_problem",
    "manifest_shards",
    "read_manifest_shards",
    "make_input_table",
    "validate_input_table",
    "read_input_manifest",
    "write_input_manifest",
    "identity_json",
    "result_row",
    "results_table",
    "ResultsWriter",
    "write_results",
    "read_results",
    "read_results_metadata",
    "merge_results",
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
        *QC_RESULT_FIELDS,
    ]
)
#: Columns every results file has (the ``qc_*`` columns came later and are filled with nulls when absent).
REQUIRED_RESULT_COLUMNS = [n for n in RESULT_SCHEMA.names if not n.startswith("qc_")]

STATUSES = ("ok", "failed")
READ_BATCH_ROWS = 65_536
# the id rule of pipeline.inputs.ids, for Arrow's regex engine (RE2: ``$`` is the end of the text)
_SAFE_ID_RE2 = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}$"
_INPUT_COLUMNS = ["id", "image_uri", "seed"]
# the input columns as read: nulls allowed (a null id or image is a row problem, not a read error)
_READ_SCHEMA = pa.schema([pa.field(f.name, f.type) for f in INPUT_SCHEMA])


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
    """A validated input manifest: one Parquet file (read again in record batches for each pass) or a
    table in memory.

    Attributes:
        uri: where it was read from ("" when built in memory).
        num_rows: rows in the manifest.
        problems: {row index: reason} for rows that will be reported as failed.
        base_uri: folder that relative ``image_uri`` values are resolved against.
        storage_options: fsspec options to read ``uri`` again.
        table: the ``id``/``image_uri``/``seed`` columns cast to :data:`INPUT_SCHEMA` (in-memory
            manifests only; file manifests keep no rows in memory).
    """

    uri: str
    num_rows: int
    problems: dict[int, str] = field(default_factory=dict)
    base_uri: str | None = None
    storage_options: dict[str, Any] | None = None
    table: pa.Table | None = None

    def __len__(self) -> int:
        return self.num_rows

    @property
    def ids(self) -> list[str]:
        return [i for batch in self._batches(READ_BATCH_ROWS) for i in batch.column(0).to_pylist()]

    def _batches(self, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The three input columns, cast to :data:`INPUT_SCHEMA`, ``batch_rows`` at a time."""
        if self.table is not None:
            yield from self.table.to_batches(max_chunksize=batch_rows)
            return
        with storage.open_uri(self.uri, "rb", self.storage_options) as fh:
            pf = pq.ParquetFile(fh)
            casts = _input_casts(pf.schema_arrow, self.uri)
            names = [n for n in _INPUT_COLUMNS if n in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=names):
                yield _cast_batch(batch, casts)

    def row_batches(self, batch_rows: int = 4096) -> Iterator[list[ManifestRow]]:
        """Rows in manifest order, one list per record batch of ``batch_rows`` rows."""
        index = 0
        for batch in self._batches(batch_rows):
            part = batch.to_pydict()
            rows = []
            for i, u, s in zip(part["id"], part["image_uri"], part["seed"]):
                uri = storage.resolve_uri(u, self.base_uri) if u else (u or "")
                rows.append(
                    ManifestRow(index=index, id=i, image_uri=uri, seed=s, problem=self.problems.get(index))
                )
                index += 1
            yield rows

    def rows(self, chunk: int = 4096) -> Iterator[ManifestRow]:
        """Rows in manifest order, converted lazily ``chunk`` at a time."""
        for batch in self.row_batches(chunk):
            yield from batch


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


def _compatible(t: pa.DataType, target: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return pa.types.is_string(target) and (
            pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
        )
    if pa.types.is_null(t):
        return True
    if pa.types.is_string(target):
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    return pa.types.is_integer(target) and pa.types.is_integer(t)


def _input_casts(schema: pa.Schema, where: str) -> dict[str, pa.DataType]:
    """Check the manifest's columns against :data:`INPUT_SCHEMA`; the casts to apply per batch."""
    where = where or "manifest"
    missing = [c for c in ("id", "image_uri") if c not in schema.names]
    if missing:
        raise ManifestError(f"{where}: missing required column(s) {missing}; found columns {schema.names}")
    casts = {}
    for target in INPUT_SCHEMA:
        if target.name not in schema.names:
            continue
        t = schema.field(target.name).type
        if not _compatible(t, target.type):
            raise ManifestError(f"{where}: column {target.name!r} must be {target.type}, got {t}")
        casts[target.name] = target.type
    return casts


def _cast_batch(batch: pa.RecordBatch, casts: dict[str, pa.DataType]) -> pa.RecordBatch:
    """``id``, ``image_uri``, ``seed`` (nulls when absent) cast to :data:`INPUT_SCHEMA`."""
    arrays = []
    for target in INPUT_SCHEMA:
        if target.name in casts:
            col = batch.column(batch.schema.get_field_index(target.name))
            try:
                arrays.append(col.cast(target.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ManifestError(f"column {target.name!r} cannot be read as {target.type}: {exc}") from exc
        else:
            arrays.append(pa.nulls(batch.num_rows, target.type))
    return pa.RecordBatch.from_arrays(arrays, schema=_READ_SCHEMA)


def _row_problems(batch: pa.RecordBatch, offset: int, problems: dict[int, str]) -> None:
    """Add the problems of one cast batch (global row indices) to ``problems``; vectorised, so only
    bad rows cost Python work."""
    ids, uris = batch.column(0), batch.column(1)
    safe = pc.fill_null(pc.match_substring_regex(ids, _SAFE_ID_RE2), False)
    for i in pc.indices_nonzero(pc.invert(safe)).to_pylist():
        v = ids[i].as_py()
        problems[offset + i] = id_problem(v) or f"id {v!r} is unsafe as a path component"
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(uris), ""), True)
    for i in pc.indices_nonzero(empty).to_pylist():
        problems.setdefault(offset + i, "image_uri is empty")


def _duplicate_message(ids: pa.ChunkedArray, where: str) -> str | None:
    """The duplicate-ids error message for the ids of a whole manifest (row numbers), or None."""
    valid = pc.drop_null(ids)
    if len(pc.unique(valid)) == len(valid):
        return None
    counts = pc.value_counts(valid)
    dup_values = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    shown = []
    for value in dup_values[:5].to_pylist():
        rows = pc.indices_nonzero(pc.fill_null(pc.equal(ids, value), False)).to_pylist()
        shown.append(f"{value!r} (rows {rows})")
    more = f" and {len(dup_values) - 5} more" if len(dup_values) > 5 else ""
    return f"{where}: duplicate ids: {', '.join(shown)}{more}; ids must be unique"


def _validate_batches(
    batches: Iterable[pa.RecordBatch], where: str
) -> tuple[int, dict[int, str], list[pa.Array]]:
    """Row count, row problems and the id column of a manifest read batch by batch."""
    n = 0
    problems: dict[int, str] = {}
    id_chunks: list[pa.Array] = []
    for batch in batches:
        _row_problems(batch, n, problems)
        id_chunks.append(batch.column(0))
        n += batch.num_rows
    if n == 0:
        raise ManifestError(f"{where}: the manifest is empty (0 rows)")
    return n, problems, id_chunks


def _raise_if_strict(problems: dict[int, str], where: str, strict: bool) -> None:
    if strict and problems:
        shown = "; ".join(f"row {i}: {p}" for i, p in list(problems.items())[:5])
        raise ManifestError(f"{where}: {len(problems)} invalid row(s): {shown}")


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
    casts = _input_casts(table.schema, where)
    cast = pa.Table.from_batches([_cast_batch(b, casts) for b in table.to_batches()], schema=_READ_SCHEMA)
    n, problems, id_chunks = _validate_batches(cast.to_batches(), where)
    message = _duplicate_message(pa.chunked_array(id_chunks, pa.string()), where)
    if message:
        raise ManifestError(message)
    _raise_if_strict(problems, where, strict)
    return InputManifest(uri=uri, num_rows=n, problems=problems, base_uri=base_uri, table=cast)


def _open_parquet_checked(uri: str, storage_options: dict[str, Any] | None) -> None:
    """Raise :class:`ManifestError` when ``uri`` is missing or is not a Parquet file."""
    fs, path = storage.get_fs(uri, storage_options)
    if not fs.exists(path):
        raise ManifestError(f"manifest not found: {uri}")
    try:
        with fs.open(path, "rb") as fh:
            pq.ParquetFile(fh)
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest not found: {uri}") from exc
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{uri}: not a readable Parquet file: {exc}") from exc


def _validate_file(uri: str, storage_options: dict[str, Any] | None) -> tuple[InputManifest, list[pa.Array]]:
    _open_parquet_checked(uri, storage_options)
    manifest = InputManifest(
        uri=uri, num_rows=0, base_uri=storage.parent_uri(uri), storage_options=storage_options
    )
    n, problems, id_chunks = _validate_batches(manifest._batches(READ_BATCH_ROWS), uri)
    manifest.num_rows, manifest.problems = n, problems
    return manifest, id_chunks


def read_input_manifest(
    uri: str, storage_options: dict[str, Any] | None = None, *, strict: bool = False
) -> InputManifest:
    """Read and validate an input manifest (one Parquet file) from any fsspec URI, in record batches.

    Relative ``image_uri`` values are resolved against the manifest's folder.
    """
    manifest, id_chunks = _validate_file(uri, storage_options)
    message = _duplicate_message(pa.chunked_array(id_chunks, pa.string()), uri)
    del id_chunks
    release_free_memory()  # the validation's buffers stay resident in Arrow's pool otherwise
    if message:
        raise ManifestError(message)
    _raise_if_strict(manifest.problems, uri, strict)
    return manifest


_GLOB_CHARS = set("*?[")


def manifest_shards(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The Parquet files of a manifest, in name order: ``uri`` itself when it is a file, every
    ``*.parquet`` directly inside it when it is a folder, or the matches of a glob
    (``s3://b/m/part-*.parquet``). Names starting with ``.`` or ``_`` (temporary files, ``_SUCCESS``,
    ``_metadata``) are skipped. Raises :class:`ManifestError` when nothing matches."""
    fs, path = storage.get_fs(uri, storage_options)
    if _GLOB_CHARS & set(uri):
        fs.invalidate_cache()
        files = [f for f in sorted(fs.glob(path)) if not fs.isdir(f)]
        where = f"no file matches {uri}"
    elif fs.isdir(path):
        files = sorted(f for f in fs.ls(path, detail=False) if f.endswith(".parquet") and not fs.isdir(f))
        where = f"no *.parquet file in the folder {uri}"
    else:
        return [uri]
    files = [f for f in files if not posixpath.basename(f.rstrip("/")).startswith((".", "_"))]
    if not files:
        raise ManifestError(f"manifest not found: {where}")
    return [_as_uri(uri, f) for f in files]


def _as_uri(like: str, path: str) -> str:
    """A path found by fsspec, written with the protocol of ``like``."""
    if storage.is_local(like):
        return path
    return f"{storage.protocol_of(like)}://{path.split('://', 1)[-1]}"


def read_manifest_shards(
    uri: str, storage_options: dict[str, Any] | None = None, *, strict: bool = False
) -> list[InputManifest]:
    """Validate every shard of a manifest (:func:`manifest_shards`); ids must be unique across all
    of them. Row indices (``ManifestRow.index``, ``problems``) count within each shard."""
    manifests: list[InputManifest] = []
    id_chunks: list[pa.Array] = []
    for shard_uri in manifest_shards(uri, storage_options):
        manifest, chunks = _validate_file(shard_uri, storage_options)
        _raise_if_strict(manifest.problems, shard_uri, strict)
        manifests.append(manifest)
        id_chunks.extend(chunks)
    if len(manifests) == 1:
        message = _duplicate_message(pa.chunked_array(id_chunks, pa.string()), manifests[0].uri)
    else:
        where = f"{uri} ({len(manifests)} shards)"
        message = _duplicate_message(pa.chunked_array(id_chunks, pa.string()), where)
        if message:
            message += "; rows are counted over the shards in name order"
    del id_chunks
    release_free_memory()
    if message:
        raise ManifestError(message)
    return manifests


def _read_table(uri: str, storage_options: dict[str, Any] | None, columns: list[str] | None) -> pa.Table:
    _open_parquet_checked(uri, storage_options)
    try:
        with storage.open_uri(uri, "rb", storage_options) as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            cols = [c for c in columns if c in names] if columns is not None else None
            return pf.read(columns=cols)
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{uri}: not a readable Parquet file: {exc}") from exc


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


def identity_json(identity: dict[str, Any]) -> str:
    """Canonical JSON text of a weights identity (sorted keys, compact): the ``weights_identity`` column."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)


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
    for key in ("outputs", "timings", "qc_notes"):
        v = r.get(key)
        if isinstance(v, dict):
            r[key] = list(v.items())
        elif v is None:
            r[key] = []
    if isinstance(r.get("finished_at"), str):
        r["finished_at"] = datetime.fromisoformat(r["finished_at"])
    if r.get("qc_flags") is None:
        r["qc_flags"] = []
    r.setdefault("resumed", False)
    r.setdefault("attempts", 0)
    return {name: r.get(name) for name in RESULT_SCHEMA.names}


def results_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """A results table (:data:`RESULT_SCHEMA`) from result dicts (see :func:`result_row`)."""
    return pa.Table.from_pylist([_normalise(r) for r in rows], schema=RESULT_SCHEMA)


class ResultsWriter:
    """Stream result rows into a local Parquet file (row groups of ``flush_every`` rows), then publish it
    atomically to ``uri``. Memory stays bounded by ``flush_every`` rows however long the run is::

        with ResultsWriter("s3://bucket/run/results.parquet") as w:
            w.write(row_dict)

    ``metadata`` (text keys and values) is stored in the file's schema metadata
    (:func:`read_results_metadata`), e.g. what a shard's rows were computed from.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        flush_every: int = 2048,
        metadata: dict[str, str] | None = None,
    ):
        self.uri = uri
        self.storage_options = storage_options
        self.flush_every = flush_every
        fd, self._tmp = tempfile.mkstemp(suffix=".parquet", prefix="results-")
        os.close(fd)
        schema = RESULT_SCHEMA.with_metadata(metadata) if metadata else RESULT_SCHEMA
        self._writer = pq.ParquetWriter(self._tmp, schema)
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

    def close(self, metadata: dict[str, str] | None = None) -> str:
        """Write the remaining rows (and ``metadata`` known only now, such as counts) and publish the file
        atomically; returns the URI."""
        try:
            self.flush()
            if metadata:
                self._writer.add_key_value_metadata(metadata)
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
    missing = [n for n in REQUIRED_RESULT_COLUMNS if n not in table.column_names]
    if missing:
        raise ManifestError(f"{uri}: not a results manifest, missing column(s) {missing}")
    return table


def read_results_metadata(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """The text metadata a :class:`ResultsWriter` stored in ``uri`` (empty when there is none)."""
    with storage.open_uri(uri, "rb", storage_options) as fh:
        meta = pq.ParquetFile(fh).metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"ARROW:")}


def _conform(batch: pa.RecordBatch) -> pa.Table:
    """A results batch with exactly the columns of :data:`RESULT_SCHEMA` (columns a file written by an
    older version lacks are null), so results of different versions can be joined."""
    columns = []
    for f in RESULT_SCHEMA:
        if f.name in batch.schema.names:
            columns.append(batch.column(batch.schema.get_field_index(f.name)).cast(f.type))
        else:
            columns.append(pa.nulls(batch.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=RESULT_SCHEMA)


def _result_batches(uri: str, storage_options: dict[str, Any] | None) -> Iterator[pa.Table]:
    """A results file as :data:`RESULT_SCHEMA` tables of up to :data:`READ_BATCH_ROWS` rows."""
    with storage.open_uri(uri, "rb", storage_options) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=READ_BATCH_ROWS):
            yield _conform(batch)


def _mark_resumed(table: pa.Table) -> pa.Table:
    i = RESULT_SCHEMA.get_field_index("resumed")
    return table.set_column(i, RESULT_SCHEMA.field(i), pa.array([True] * table.num_rows, pa.bool_()))


def merge_results(
    parts: list[str],
    uri: str,
    storage_options: dict[str, Any] | None = None,
    resumed: Iterable[str] = (),
) -> dict[str, int]:
    """Join results files (one per shard, in order) into one results manifest at ``uri``, atomically,
    one record batch at a time. Rows of the parts named in ``resumed`` get ``resumed = true`` (kept
    from an earlier run). Returns the status counts."""
    resumed = set(resumed)
    counts: dict[str, int] = {}
    fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="results-merged-")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, RESULT_SCHEMA) as writer:
            for part in parts:
                for table in _result_batches(part, storage_options):
                    table = _mark_resumed(table) if part in resumed else table
                    for value, n in zip(*pc.value_counts(table.column("status")).flatten()):
                        counts[value.as_py()] = counts.get(value.as_py(), 0) + n.as_py()
                    writer.write_table(table)
        storage.put_file_atomic(tmp, uri, storage_options)
    finally:
        os.unlink(tmp)
    return counts
