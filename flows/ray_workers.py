"""Ray side of a batch run: the resident generator actor (GPU part) and the CPU tasks.

* :func:`prepare_image` (CPU task): fetch one input image from any fsspec URI and decode it.
* :class:`GeneratorActor` (one per GPU, or fractional CPUs on CPU-only clusters): loads the models
  once in ``__init__`` and keeps them resident; ``generate`` runs the GPU part on K objects and
  returns K+1 values (a small status dict, then one object per row) so every generated object is
  its own object-store entry that flows straight to a finalize task, never through the driver.
* :func:`finalize_object` (CPU task): clean, unwrap, bake, export into a local temporary folder,
  upload it to ``<output>/objects/<id>/`` and write ``result.json`` last (the completion marker).

Application errors are returned as data (``{"ok": False, "error_class": ..., ...}``), so the driver can
tell a bad row from a dead worker (which surfaces as a Ray error when the result is fetched).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any

from pipeline import storage
from pipeline.manifest import result_row

__all__ = ["GeneratorActor", "prepare_image", "finalize_object", "error_info", "MARKER_NAME"]

MARKER_NAME = "result.json"
MAX_MESSAGE = 2000


def error_info(exc: BaseException) -> dict[str, Any]:
    """``{"ok": False, "error_class", "error_message"}`` for an exception (message truncated)."""
    msg = str(exc) or repr(exc)
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE] + " ..."
    return {"ok": False, "error_class": type(exc).__name__, "error_message": msg}


def _load_image(data: bytes):
    from pipeline.image_io import load_image

    return load_image(data)


def prepare_image(uri: str, storage_options: dict[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """Fetch and decode one image: ``(status, PIL RGBA image | None)``; run as a Ray task (2 returns).

    ``status["input_info"]`` describes the input (URI, sha256, size, mode) for ``meta.json``.
    """
    t0 = time.perf_counter()
    try:
        data = storage.read_bytes(uri, storage_options)
        image = _load_image(data)
    except Exception as exc:  # noqa: BLE001 - reported per row
        return error_info(exc), None
    info = {
        "name": uri.rstrip("/").rsplit("/", 1)[-1],
        "uri": uri,
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": image.width,
        "height": image.height,
        "mode": image.mode,
    }
    return {"ok": True, "seconds": time.perf_counter() - t0, "input_info": info}, image


class GeneratorActor:
    """Holds one loaded pipeline; ``generate`` runs its GPU part on a batch of K objects.

    Args:
        backend: picklable backend (``flows.backends.CRMBackend`` or a fake) with ``load()``.
        label: name used in the ``worker`` column of the results.
    """

    def __init__(self, backend: Any, label: str):
        t0 = time.perf_counter()
        self.backend = backend
        self.generator = backend.load()
        self.load_seconds = time.perf_counter() - t0
        self.worker = f"{label}@{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict[str, Any]:
        """Where the actor runs and how long loading took."""
        import ray

        return {"worker": self.worker, "load_s": self.load_seconds, "gpu_ids": ray.get_gpu_ids()}

    def generate(self, ids: list[str], seeds: list[int], infos: list[dict], *images: Any) -> tuple:
        """K+1 returns: status dict, then K generated objects (None each when the batch failed)."""
        t0 = time.perf_counter()
        k = len(ids)
        try:
            objs = list(
                self.generator.generate(list(images), list(ids), list(seeds), input_infos=list(infos))
            )
            if len(objs) != k:
                raise RuntimeError(f"generate returned {len(objs)} objects for {k} inputs")
        except Exception as exc:  # noqa: BLE001 - the driver isolates the failing row
            status = error_info(exc)
            status["worker"] = self.worker
            status["traceback"] = traceback.format_exc(limit=20)
            return (status, *([None] * k))
        status = {"ok": True, "seconds": time.perf_counter() - t0, "worker": self.worker}
        return (status, *objs)


def _relative_output(path: str, folder: str) -> str:
    if os.path.isabs(path):
        return os.path.relpath(path, folder).replace(os.sep, "/")
    return path.replace(os.sep, "/")


def finalize_object(
    item: dict[str, Any],
    backend: Any,
    obj: Any,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    run_info: dict[str, str],
) -> dict[str, Any]:
    """CPU part for one object + upload; returns its results row (see ``pipeline.manifest``).

    Args:
        item: ``id``, ``image_uri``, ``seed``, ``attempts``, ``worker``, ``timings`` of the row so far.
        obj: the generated object from :meth:`GeneratorActor.generate`.
        output_uri: run output folder; the object goes to ``<output_uri>/objects/<id>/``.
        run_info: ``weights_identity`` (JSON text) and ``options_hash``.
    """
    common = {
        "image_uri": item["image_uri"],
        "seed": item["seed"],
        "attempts": item["attempts"],
        "worker": item.get("worker"),
        "weights_identity": run_info["weights_identity"],
        "options_hash": run_info["options_hash"],
    }
    timings = dict(item.get("timings") or {})
    tmp = tempfile.mkdtemp(prefix="crm-finalize-")
    try:
        t0 = time.perf_counter()
        try:
            res = backend.finalize(obj, tmp)
        except Exception as exc:  # noqa: BLE001 - reported per row
            info = error_info(exc)
            return result_row(
                item["id"], "failed", error_class=info["error_class"], error_message=info["error_message"],
                timings=timings, **common,
            )  # fmt: skip
        timings.update({k: float(v) for k, v in (getattr(res, "timings", None) or {}).items()})
        timings.setdefault("finalize", time.perf_counter() - t0)
        if res.status != "ok":
            return result_row(
                item["id"], "failed", error_class=res.error_class or "FinalizeError",
                error_message=res.error_message or "finalize reported a failure", timings=timings, **common,
            )  # fmt: skip
        folder = os.path.join(tmp, item["id"])
        os.makedirs(folder, exist_ok=True)  # a backend may report success without files
        dest = storage.join_uri(output_uri, "objects", item["id"])
        outputs = {
            kind: storage.join_uri(dest, _relative_output(p, folder))
            for kind, p in (res.outputs or {}).items()
        }
        preview = outputs.get("preview") or next(
            (u for u in outputs.values() if u.endswith("/preview.png")), None
        )
        t1 = time.perf_counter()
        row = result_row(
            item["id"], "ok", output_uri=dest, outputs=outputs, preview_uri=preview, timings=timings, **common
        )
        try:
            marker_row = dict(row)
            marker_row["timings"] = {**timings, "upload": 0.0}
            marker = json.dumps(marker_row, sort_keys=True, default=str).encode()
            storage.put_dir(folder, dest, storage_options, marker=(MARKER_NAME, marker))
        except Exception as exc:  # noqa: BLE001 - reported per row
            info = error_info(exc)
            return result_row(
                item["id"], "failed", error_class=info["error_class"],
                error_message=f"upload to {dest} failed: {info['error_message']}", timings=timings, **common,
            )  # fmt: skip
        row["timings"]["upload"] = time.perf_counter() - t1
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
