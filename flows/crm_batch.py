"""The Prefect flow ``crm-batch``: a Parquet manifest of images in, meshes + a results manifest out.

Steps: validate the manifest (whole-manifest problems fail the flow before any work), skip rows
whose outputs are complete from an earlier run (resume), run the Ray job (``flows.ray_job.driver``),
write ``<output_uri>/results.parquet`` atomically, publish artifacts (summary, failures, previews,
progress). A failed row never fails the flow; a failure rate above ``max_failure_rate`` does (after
the results and artifacts are written). Infrastructure errors (storage unreachable, Ray cluster
lost, all actors dying) are retried at task level; a retry resumes from the objects already done.

Output layout::

    <output_uri>/results.parquet            one row per manifest row (flows.io.manifest.RESULT_SCHEMA)
    <output_uri>/objects/<id>/...           mesh.glb, mesh.obj/.mtl/.png, views.png, preview.png, meta.json
    <output_uri>/objects/<id>/result.json   completion marker (written last): the row's result
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from ray.exceptions import RaySystemError

from flows.io import storage
from flows.io.manifest import InputManifest, ManifestRow, ResultsWriter, read_input_manifest
from flows.ray_job.backends import CRMBackend, identity_json
from flows.ray_job.driver import BatchConfig, BatchStats, InfrastructureError, ray_session, run_batch
from flows.ray_job.fake_backends import NoOpBackend
from flows.ray_job.workers import MARKER_NAME

__all__ = ["crm_batch", "FailureRateExceeded", "RESULTS_NAME", "make_backend", "plan_resume"]

RESULTS_NAME = "results.parquet"
BACKENDS = ("crm", "noop")


class FailureRateExceeded(RuntimeError):
    """More rows failed than ``max_failure_rate`` allows (the results manifest is still written)."""


def _is_infrastructure_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    if isinstance(exc, (InfrastructureError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return True
    return isinstance(exc, RaySystemError)


def _retry_on_infrastructure(task_obj: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001
        return _is_infrastructure_error(exc)
    return False


def make_backend(backend: str, weights: str, options: dict[str, Any] | None) -> Any:
    """The pipeline backend for a run: ``"crm"`` (the model) or ``"noop"`` (orchestration dry run)."""
    if backend == "crm":
        return CRMBackend(weights=weights, options=options)
    if backend == "noop":
        opts = options or {}
        # a dry run may simulate the model's cost: seconds per object on the generator / CPU stage
        return NoOpBackend(
            seed=int(opts.get("seed", 0)),
            sleep_s=float(opts.get("sleep_s", 0.0)),
            finalize_sleep_s=float(opts.get("finalize_sleep_s", 0.0)),
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def plan_resume(
    manifest: InputManifest,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    run_info: dict[str, str],
    default_seed: int,
    limit: int | None = None,
) -> tuple[list[ManifestRow], list[dict[str, Any]]]:
    """Split the manifest into rows to run and finished rows kept from earlier runs.

    A row is finished when ``objects/<id>/result.json`` exists with status ok and the same image
    URI, seed, options hash and weights identity as this run.
    """
    objects = storage.join_uri(output_uri, "objects")
    markers = [u for u in storage.list_files(objects, storage_options) if u.endswith("/" + MARKER_NAME)]
    previous: dict[str, dict[str, Any]] = {}
    for data in storage.read_many(markers, storage_options).values():
        try:
            row = json.loads(data)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            previous[row["id"]] = row
    todo: list[ManifestRow] = []
    kept: list[dict[str, Any]] = []
    for i, row in enumerate(manifest.rows()):
        if limit is not None and i >= limit:
            break
        prev = previous.get(row.id) if row.problem is None else None
        seed = row.seed if row.seed is not None else default_seed
        if (
            prev is not None
            and prev.get("status") == "ok"
            and prev.get("image_uri") == row.image_uri
            and prev.get("seed") == seed
            and prev.get("options_hash") == run_info["options_hash"]
            and prev.get("weights_identity") == run_info["weights_identity"]
        ):
            prev = dict(prev)
            prev["resumed"] = True
            kept.append(prev)
        else:
            todo.append(row)
    return todo, kept


@task(name="validate-manifest", retries=2, retry_delay_seconds=3, retry_condition_fn=_retry_on_infrastructure,
      cache_policy=NO_CACHE)  # fmt: skip
def validate_manifest(manifest_uri: str, storage_options: dict[str, Any] | None) -> InputManifest:
    """Read and validate the input manifest (raises ``ManifestError`` naming the problem)."""
    manifest = read_input_manifest(manifest_uri, storage_options)
    logger = get_run_logger()
    logger.info("manifest %s: %d rows, %d invalid rows", manifest_uri, len(manifest), len(manifest.problems))
    return manifest


@task(name="run-ray-job", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_infrastructure,
      cache_policy=NO_CACHE)  # fmt: skip
def run_ray_job(
    manifest: InputManifest,
    backend: Any,
    config: BatchConfig,
    ray_address: str | None,
    resume: bool,
    limit: int | None,
) -> dict[str, Any]:
    """Resume planning + the Ray job + the results manifest (atomic); returns the run summary."""
    logger = get_run_logger()
    so = config.storage_options
    run_info = {
        "weights_identity": identity_json(backend.weights_identity()),
        "options_hash": backend.options_hash(),
    }
    if resume:
        todo, kept = plan_resume(
            manifest, config.output_uri, so, run_info, int(backend.default_seed()), limit
        )
    else:
        todo = [r for i, r in enumerate(manifest.rows()) if limit is None or i < limit]
        kept = []
    total = len(todo) + len(kept)
    logger.info("%d rows: %d already complete (resume), %d to run", total, len(kept), len(todo))
    results_uri = storage.join_uri(config.output_uri, RESULTS_NAME)
    writer = ResultsWriter(results_uri, so)
    progress_id = create_progress_artifact(
        progress=100.0 * len(kept) / max(total, 1), key="crm-batch-progress", description="rows finished (%)"
    )
    last = [time.monotonic()]
    failures: list[dict[str, Any]] = []
    previews: list[dict[str, Any]] = []

    def on_result(row: dict[str, Any]) -> None:
        writer.write(row)
        if row["status"] != "ok" and len(failures) < 200:
            failures.append(row)
        elif row["status"] == "ok" and row.get("preview_uri") and len(previews) < 16:
            previews.append(row)
        now = time.monotonic()
        if now - last[0] > 2.0 or writer.count == total:
            last[0] = now
            update_progress_artifact(progress_id, 100.0 * writer.count / max(total, 1))
            logger.info("progress: %d/%d rows", writer.count, total)

    try:
        for row in kept:
            on_result(row)
        stats = BatchStats()
        if todo:
            with ray_session(ray_address):
                stats = run_batch(todo, backend, config, on_result, total=len(todo))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    update_progress_artifact(progress_id, 100.0)
    counts = writer.status_counts
    return {
        "results_uri": results_uri,
        "output_uri": config.output_uri,
        "rows": writer.count,
        "ok": counts.get("ok", 0),
        "failed": counts.get("failed", 0),
        "resumed": len(kept),
        "generated": stats.ok,
        "actor_deaths": stats.actor_deaths,
        "retried_rows": stats.retried_rows,
        "job_seconds": round(stats.seconds, 3),
        "workers": stats.workers,
        "failures": failures,
        "previews": previews,
    }


def _viewable(uri: str, storage_options: dict[str, Any] | None) -> str:
    """An address a browser can open: a presigned URL on object stores when possible."""
    if storage.is_local(uri):
        return storage.local_path(uri).absolute().as_uri()
    try:
        fs, path = storage.get_fs(uri, storage_options)
        return fs.sign(path, expiration=7 * 24 * 3600)
    except Exception:  # noqa: BLE001 - not every filesystem can sign
        return uri


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(summary: dict[str, Any], storage_options: dict[str, Any] | None, previews: int) -> None:
    """Summary table, failures table and a few previews as Prefect artifacts."""
    rate = summary["failed"] / max(summary["rows"], 1)
    create_table_artifact(
        key="crm-batch-summary",
        table=[
            {"metric": "rows", "value": summary["rows"]},
            {"metric": "ok", "value": summary["ok"]},
            {"metric": "failed", "value": summary["failed"]},
            {"metric": "failure rate", "value": f"{rate:.1%}"},
            {"metric": "kept from earlier runs", "value": summary["resumed"]},
            {"metric": "generated now", "value": summary["generated"]},
            {"metric": "actor deaths", "value": summary["actor_deaths"]},
            {"metric": "job seconds", "value": summary["job_seconds"]},
            {"metric": "results manifest", "value": summary["results_uri"]},
        ],
        description="crm-batch run summary",
    )
    if summary["failures"]:
        create_table_artifact(
            key="crm-batch-failures",
            table=[
                {
                    "id": r["id"],
                    "error_class": r["error_class"],
                    "error_message": (r["error_message"] or "")[:300],
                    "attempts": r["attempts"],
                    "image_uri": r["image_uri"],
                }
                for r in summary["failures"]
            ],
            description=f"failed rows (first {len(summary['failures'])})",
        )
    shown = summary["previews"][:previews]
    if shown:
        lines = ["| id | preview |", "|---|---|"]
        for r in shown:
            url = _viewable(r["preview_uri"], storage_options)
            lines.append(f"| {r['id']} | ![{r['id']}]({url}) |")
        create_markdown_artifact(
            key="crm-batch-previews", markdown="\n".join(lines), description="a few previews of this run"
        )


@flow(name="crm-batch", log_prints=True)
def crm_batch(
    manifest_uri: str,
    output_uri: str,
    weights: str = "auto",
    options: dict[str, Any] | None = None,
    ray_address: str | None = None,
    batch_size: int | None = None,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    max_attempts: int = 3,
    max_failure_rate: float = 0.1,
    resume: bool = True,
    limit: int | None = None,
    timeout_s: float | None = None,
    storage_options: dict[str, Any] | None = None,
    previews: int = 4,
    backend: str = "crm",
) -> dict[str, Any]:
    """Generate meshes for every row of a Parquet manifest.

    Args:
        manifest_uri: input manifest (``s3://``, ``gs://``, ``file://`` or a path), see ``flows.io.manifest``.
        output_uri: run folder (``objects/<id>/`` + ``results.parquet``).
        weights: ``"auto"`` (local/cached official weights), a folder, or ``"tiny-random"`` (tests).
        options: ``pipeline.options.PipelineOptions`` fields (seed, steps_stage1, texture_size, ...).
        ray_address: existing Ray cluster (``"auto"``, ``"ray://head:10001"``); None starts a local one.
        batch_size: K objects per generator call (None: ``options.batch_size``).
        num_actors: generator actors (None: one per GPU, 1 without GPUs).
        num_gpus_per_actor: GPUs per actor (None: 1 when the cluster has GPUs).
        max_attempts: attempts of a row whose worker dies before it is marked failed.
        max_failure_rate: the flow fails when more than this fraction of rows failed (0..1).
        resume: keep complete outputs of earlier runs with the same options and weights.
        limit: only the first N rows of the manifest.
        timeout_s: fail (and retry) the Ray job when it takes longer.
        storage_options: fsspec options (e.g. ``{"endpoint_url": ...}``); keep secrets in the environment.
        previews: previews shown in the artifacts.
        backend: ``"crm"`` (the model) or ``"noop"`` (dry run of storage and cluster, no model; its
            options may set ``sleep_s`` / ``finalize_sleep_s``, simulated seconds per object).

    Returns: summary dict (``results_uri``, ``rows``, ``ok``, ``failed``, ``resumed``, ``generated``...).
    """
    if not 0.0 <= max_failure_rate <= 1.0:
        raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate}")
    logger = get_run_logger()
    pipe_backend = make_backend(backend, weights, options)
    identity = pipe_backend.weights_identity()  # missing weights fail here, before any work
    logger.info("weights: %s", identity_json(identity))
    manifest = validate_manifest(manifest_uri, storage_options)
    k = batch_size or int((options or {}).get("batch_size", 1)) or 1
    config = BatchConfig(
        output_uri=output_uri,
        storage_options=storage_options,
        batch_size=k,
        num_actors=num_actors,
        num_gpus_per_actor=num_gpus_per_actor,
        max_attempts=max_attempts,
        timeout_s=timeout_s,
    )
    summary = run_ray_job(manifest, pipe_backend, config, ray_address, resume, limit)
    publish_artifacts(summary, storage_options, previews)
    rate = summary["failed"] / max(summary["rows"], 1)
    logger.info(
        "done: %d rows, %d ok, %d failed (%.1f%%), %d kept from earlier runs; results: %s",
        summary["rows"], summary["ok"], summary["failed"], 100 * rate, summary["resumed"],
        summary["results_uri"],
    )  # fmt: skip
    if rate > max_failure_rate:
        raise FailureRateExceeded(
            f"{summary['failed']} of {summary['rows']} rows failed ({rate:.1%} > max_failure_rate "
            f"{max_failure_rate:.1%}); see {summary['results_uri']}"
        )
    out = {k2: v for k2, v in summary.items() if k2 not in ("failures", "previews")}
    out["failure_rate"] = rate
    return out
