"""Where the predicted meshes of an evaluation run come from (``--pred``).

Two layouts, local or on any fsspec storage (``s3://``, ``gs://``, ...):

* **a mesh folder** (local only): ``DIR/<name>.glb|.gltf|.obj|.ply`` or ``DIR/<name>/`` holding one
  mesh (see :func:`evaluation.mesh_loading.find_prediction`);
* **a batch output folder** (what the ``crm-batch`` job writes): ``<run>/results.parquet`` with one row
  per input (``id``, ``status``, ``error_class``, ``error_message``, ``outputs``) and
  ``<run>/objects/<id>/`` holding ``mesh.glb`` (+ ``mesh.obj``/``.mtl``/``.png``, ``meta.json``,
  ``result.json``). ``--pred`` may name the folder or its ``results.parquet``. Rows with status ``ok``
  whose ``id`` is a ground-truth object name are scored (GLB preferred); every other row is listed in
  :attr:`Predictions.skipped` with the reason. Meshes of a remote run are downloaded to a temporary
  folder that lives as long as the :class:`Predictions` object (use it as a context manager).

The parquet file is read with pyarrow and the files with fsspec directly (nothing from the batch job's
own code), so this works on any copy of a run folder, wherever it was moved.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq

from .mesh_loading import MESH_SUFFIXES, find_prediction, list_predictions

__all__ = ["BATCH_RESULTS", "Predictions", "open_predictions", "is_remote"]

BATCH_RESULTS = "results.parquet"
_MESSAGE_CHARS = 300


@dataclass
class Predictions:
    """The predictions found for one evaluation run.

    Attributes:
        source: ``--pred`` as given.
        kind: ``"folder"`` (mesh folder) or ``"batch"`` (batch output folder).
        paths: object name -> local mesh file, for every object to score, in ground-truth order.
        only_pred: predictions without a ground-truth object (mesh folders; batch rows go to ``skipped``).
        only_gt: ground-truth objects (after ``--objects``) without a prediction to score.
        skipped: batch rows not scored: ``{"id", "status", "reason"}`` in table order.
        rows: number of rows in the batch results table (0 for a mesh folder).
    """

    source: str
    kind: str
    paths: dict[str, Path] = field(default_factory=dict)
    only_pred: list[str] = field(default_factory=list)
    only_gt: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rows: int = 0
    _tmp: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        """Remove downloaded files (a no-op for local predictions)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Predictions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_remote(uri: str) -> bool:
    """True for ``protocol://...`` URIs other than ``file://`` / ``local://``."""
    return "://" in uri and uri.split("://", 1)[0].lower() not in ("file", "local")


def _local(uri: str) -> Path:
    return Path(uri.split("://", 1)[1]) if "://" in uri else Path(uri)


def open_predictions(
    pred: str | Path,
    gt_names: list[str],
    objects: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Predictions:
    """Resolve ``--pred`` against the ground-truth object names.

    Args:
        pred: a mesh folder, a batch output folder (local path or URI), or its ``results.parquet``.
        gt_names: ground-truth object names (already restricted to ``objects``).
        objects: the ``--objects`` subset, or None for all.
        storage_options: fsspec options for a remote run (e.g. ``{"endpoint_url": ...}``).

    Raises:
        FileNotFoundError: ``pred`` does not exist, or a remote ``pred`` has no ``results.parquet``.
    """
    pred = str(pred)
    if is_remote(pred):
        fs, path = fsspec.core.url_to_fs(pred, **(storage_options or {}))
        path = path.rstrip("/")
        results = path if path.endswith(".parquet") else posixpath.join(path, BATCH_RESULTS)
        if not fs.isfile(results):
            raise FileNotFoundError(
                f"{pred}: no {BATCH_RESULTS} there; a remote --pred must be a batch output folder "
                f"(results.parquet + objects/<id>/) or its {BATCH_RESULTS}"
            )
        return _from_batch(pred, fs, results, gt_names, objects, remote=True)
    p = _local(pred)
    if p.is_file() and p.suffix == ".parquet":
        return _from_batch(
            pred, fsspec.filesystem("file"), str(p.absolute()), gt_names, objects, remote=False
        )
    if not p.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred}")
    if (p / BATCH_RESULTS).is_file():
        results = str((p / BATCH_RESULTS).absolute())
        return _from_batch(pred, fsspec.filesystem("file"), results, gt_names, objects, remote=False)
    return _from_folder(pred, p, gt_names, objects)


def _from_folder(source: str, folder: Path, gt_names: list[str], objects: list[str] | None) -> Predictions:
    names = list_predictions(folder)
    if not names and (folder / "objects").is_dir():
        raise FileNotFoundError(
            f"{source} holds objects/ but no {BATCH_RESULTS} (an unfinished batch run?); to score the "
            f"object folders it has, pass --pred {folder / 'objects'}"
        )
    if objects:
        names = [n for n in names if n in objects]
    out = Predictions(source, "folder")
    for n in gt_names:
        if n in names:
            out.paths[n] = find_prediction(folder, n)
        else:
            out.only_gt.append(n)
    out.only_pred = [n for n in names if n not in gt_names]
    return out


def _rows(fs, results: str) -> list[dict]:
    with fs.open(results, "rb") as fh:
        table = pq.read_table(fh)
    missing = [c for c in ("id", "status") if c not in table.column_names]
    if missing:
        raise ValueError(f"{results}: not a batch results table (no column {', '.join(missing)})")
    return table.to_pylist()


def _message(row: dict) -> str:
    parts = [str(row[k]) for k in ("error_class", "error_message") if row.get(k)]
    msg = ": ".join(parts) or "no error message"
    return msg if len(msg) <= _MESSAGE_CHARS else msg[: _MESSAGE_CHARS - 3] + "..."


def _listed_outputs(row: dict) -> set[str]:
    """Relative paths (inside ``objects/<id>/``) of the files a row names in ``outputs``."""
    outputs = row.get("outputs") or {}
    items = outputs.items() if isinstance(outputs, dict) else outputs  # pyarrow maps: [(key, value)]
    marker = f"/objects/{row['id']}/"
    rel = set()
    for _, uri in items:
        if not uri:
            continue
        uri = str(uri).replace("\\", "/")
        rel.add(uri.split(marker, 1)[1] if marker in uri else posixpath.basename(uri))
    return rel


def _pick_mesh(files: list[str], listed: set[str]) -> str | None:
    """The mesh to score among an object's files: GLB first, then files the row lists, then by name."""
    meshes = [f for f in files if posixpath.splitext(f)[1].lower() in MESH_SUFFIXES]
    if not meshes:
        return None
    return min(
        meshes, key=lambda f: (MESH_SUFFIXES.index(posixpath.splitext(f)[1].lower()), f not in listed, f)
    )


def _from_batch(
    source: str, fs, results: str, gt_names: list[str], objects: list[str] | None, remote: bool
) -> Predictions:
    root = posixpath.dirname(results)
    objects_dir = posixpath.join(root, "objects")
    rows = _rows(fs, results)
    files: dict[str, list[str]] = {}
    if fs.isdir(objects_dir):
        prefix = objects_dir.rstrip("/") + "/"
        for f in fs.find(objects_dir):
            rel = f[len(prefix) :] if f.startswith(prefix) else None
            if rel and "/" in rel:
                obj_id, name = rel.split("/", 1)
                files.setdefault(obj_id, []).append(name)
    out = Predictions(source, "batch", rows=len(rows))
    chosen: dict[str, str] = {}
    gt_set = set(gt_names)
    for row in rows:
        obj_id, status = row.get("id"), str(row.get("status"))

        def skip(reason: str, obj_id=obj_id, status=status) -> None:
            out.skipped.append({"id": obj_id, "status": status, "reason": reason})

        if not obj_id:
            skip("row without an id")
        elif obj_id in chosen:
            skip("duplicate id: an earlier row with this id is scored")
        elif status != "ok":
            skip(f"status {status}: {_message(row)}")
        elif objects and obj_id not in objects:
            skip("not in --objects")
        elif obj_id not in gt_set:
            skip("no ground-truth object with this id")
        else:
            mesh = _pick_mesh(files.get(obj_id, []), _listed_outputs(row))
            if mesh is None:
                skip(f"status ok but no mesh file ({', '.join(MESH_SUFFIXES)}) under objects/{obj_id}/")
            else:
                chosen[obj_id] = mesh
    if remote and chosen:
        out._tmp = tempfile.TemporaryDirectory(prefix="crm-eval-pred-")
        local_root = Path(out._tmp.name)
        src, dst = [], []
        for obj_id, mesh in chosen.items():
            # GLB and PLY are self-contained; OBJ / glTF refer to material, texture and buffer files
            single = posixpath.splitext(mesh)[1].lower() in (".glb", ".ply")
            for name in [mesh] if single else files[obj_id]:
                src.append(posixpath.join(objects_dir, obj_id, name))
                dst.append(str(local_root / obj_id / name))
        for d in dst:
            Path(d).parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get(src, dst)
        except Exception:
            out.close()
            raise
        base = local_root
    else:
        base = Path(objects_dir)
    for n in gt_names:
        if n in chosen:
            out.paths[n] = base / n / chosen[n]
        else:
            out.only_gt.append(n)
    return out
