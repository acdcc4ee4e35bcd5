"""Ray side of a batch run: the resident generator actor (GPU part) and the CPU tasks.

* :func:`prepare_images` (CPU task): fetch a group of input images from any fsspec URI (concurrently),
  decode and preprocess them (background handling, recentre, square), so the GPU actor receives
  model-ready images; one object-store entry per image.
* :class:`GeneratorActor` (one per GPU, or fractional CPUs on CPU-only clusters): loads the models
  once in ``__init__`` and keeps them resident; ``generate`` runs the GPU part on K objects and
  returns K+1 values (a small status dict, then one object per row) so every generated object is
  its own object-store entry that flows straight to a finalize task, never through the driver.
* :func:`finalize_objects` (CPU task): for each object of a group, :func:`finalize_object`: clean,
  unwrap, bake, export straight into ``<output>/objects/<id>/`` (``flows.io.storage.StorageDestination``:
  one rename locally, one PUT per file on object stores), then write ``result.json`` (the completion
  marker) last.

A group is one row by default (``BatchConfig.rows_per_task``): the CPU work of a batch spreads over as
many cores as there are rows. Larger groups pay Ray's per-task cost once per group, for pipelines whose
per-row CPU work is small.

Application errors are returned as data (``{"ok": False, "error_class": ..., ...}``), so the driver can
tell a bad row from a dead worker (which surfaces as a Ray error when the result is fetched).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from flows.io import storage
from flows.io.manifest import result_row
from flows.io.resume import MARKER_NAME
from flows.qc_results import qc_row_columns
from pipeline.inputs.source import load_source

__all__ = [
    "GeneratorActor",
    "prepare_image",
    "prepare_images",
    "finalize_object",
    "finalize_objects",
    "error_info",
    "worker_label",
    "MARKER_NAME",
]

MAX_MESSAGE = 2000
FETCH_THREADS = 8  # concurrent image reads inside one fetch task (object stores answer in ~50-200 ms)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="crm-fetch")
        return _pool


def worker_label(label: str) -> str:
    """``<label>@<host>:<pid>/node-<first 12 hex digits of the Ray node id>`` (the ``worker`` column):
    names the process and the Ray node, which tell apart nodes that share a host name."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return f"{label}@{socket.gethostname()}:{os.getpid()}/node-{node[:12]}"


def error_info(exc: BaseException) -> dict[str, Any]:
    """``{"ok": False, "error_class", "error_message"}`` for an exception (message truncated)."""
    msg = str(exc) or repr(exc)
    if len(msg) > MAX_MESSAGE:
        msg = msg[:MAX_MESSAGE] + " ..."
    return {"ok": False, "error_class": type(exc).__name__, "error_message": msg}


def prepare_image(
    uri: str, storage_options: dict[str, Any] | None, backend: Any
) -> tuple[dict[str, Any], Any]:
    """Fetch, decode and preprocess one image: ``(status, model-ready PIL image | None)``; a Ray task
    with 2 returns. ``status["input_info"]`` describes the input (URI, sha256, size, mode) for
    ``meta.json``; ``status["timings"]`` holds ``fetch`` and ``preprocess`` seconds."""
    t0 = time.perf_counter()
    try:
        image, info = load_source(
            storage.read_bytes(uri, storage_options), uri.rstrip("/").rsplit("/", 1)[-1]
        )
        t1 = time.perf_counter()
        image = backend.preprocess(image)
    except Exception as exc:  # noqa: BLE001 - reported per row
        return error_info(exc), None
    info["uri"] = uri
    timings = {"fetch": t1 - t0, "preprocess": time.perf_counter() - t1}
    return {"ok": True, "seconds": time.perf_counter() - t0, "timings": timings, "input_info": info}, image


def prepare_images(uris: list[str], storage_options: dict[str, Any] | None, backend: Any) -> tuple:
    """:func:`prepare_image` for a group of URIs, read concurrently; a Ray task with ``1 + len(uris)``
    returns: the list of statuses, then one model-ready image (or None) per URI."""
    if len(uris) == 1:
        status, image = prepare_image(uris[0], storage_options, backend)
        return ([status], image)
    done = list(_fetch_pool().map(lambda u: prepare_image(u, storage_options, backend), uris))
    return ([status for status, _ in done], *[image for _, image in done])


class GeneratorActor:
    """Holds one loaded pipeline; ``generate`` runs its GPU part on a batch of K objects.

    Args:
        backend: picklable backend (``flows.ray_job.backends.CRMBackend`` or a fake) with ``load()``.
        label: name used in the ``worker`` column of the results.
    """

    def __init__(self, backend: Any, label: str):
        t0 = time.perf_counter()
        self.backend = backend
        self.generator = backend.load()
        self.load_seconds = time.perf_counter() - t0
        self.worker = worker_label(label)
        self.node_id = ray.get_runtime_context().get_node_id()

    def info(self) -> dict[str, Any]:
        """Where the actor runs (``worker`` label, Ray ``node_id``, GPU ids) and how long loading took;
        the driver's readiness probe (an actor answers once its models are loaded)."""

        return {
            "worker": self.worker,
            "node_id": self.node_id,
            "load_s": self.load_seconds,
            "gpu_ids": ray.get_gpu_ids(),
        }

    def generate(self, ids: list[str], seeds: list[int], infos: list[dict], *images: Any) -> tuple:
        """K+1 returns: status dict, then K generated objects (None each when the batch failed)."""
        t0 = time.perf_counter()
        k = len(ids)
        try:
            objs = list(
                self.generator.generate(
                    list(images), list(ids), list(seeds), input_infos=list(infos), preprocessed=True
                )
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


def finalize_object(
    item: dict[str, Any],
    backend: Any,
    obj: Any,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    run_info: dict[str, str],
) -> dict[str, Any]:
    """CPU part for one object, written straight to its destination; returns its results row (see
    ``flows.io.manifest``).

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

    def failed(error_class: str, message: str) -> dict[str, Any]:
        return result_row(
            item["id"], "failed", error_class=error_class, error_message=message, timings=timings, **common
        )

    destination = storage.StorageDestination(
        storage.join_uri(output_uri, "objects"), storage_options, marker=MARKER_NAME
    )
    t0 = time.perf_counter()
    try:
        res = backend.finalize(obj, destination)
    except Exception as exc:  # noqa: BLE001 - reported per row
        info = error_info(exc)
        return failed(info["error_class"], info["error_message"])
    timings.update({k: float(v) for k, v in (res.timings or {}).items()})
    timings["finalize"] = time.perf_counter() - t0
    if not res.ok:
        return failed(res.error_class or "FinalizeError", res.error_message or "finalize reported a failure")
    dest = res.location or destination.location(item["id"])
    outputs = {kind: storage.join_uri(dest, name) for kind, name in res.outputs.items()}
    preview = outputs.get("preview")
    row = result_row(
        item["id"], "ok", output_uri=dest, outputs=outputs, preview_uri=preview, timings=timings, **common
    )
    row.update(qc_row_columns(res))
    try:  # the completion marker, last: its presence means the folder is complete
        marker = json.dumps(row, sort_keys=True, default=str).encode()
        storage.write_bytes_atomic(storage.join_uri(dest, MARKER_NAME), marker, storage_options)
    except Exception as exc:  # noqa: BLE001 - reported per row
        info = error_info(exc)
        return failed(info["error_class"], f"writing {MARKER_NAME} to {dest} failed: {info['error_message']}")
    return row


def finalize_objects(
    items: list[dict[str, Any]],
    backend: Any,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    run_info: dict[str, str],
    *objs: Any,
) -> list[dict[str, Any]]:
    """:func:`finalize_object` for a group of objects (one Ray task); returns their results rows in
    order. Each object fails or succeeds on its own."""
    return [
        finalize_object(item, backend, obj, output_uri, storage_options, run_info)
        for item, obj in zip(items, objs, strict=True)
    ]
