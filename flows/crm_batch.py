"""The Prefect flow ``crm-batch``: a Parquet manifest of images in, meshes + a results manifest out.

Steps:

1. ``validate-manifest``: every shard of the manifest (one Parquet file, or a folder or glob of them)
   is read in record batches and checked; whole-manifest problems (duplicate ids across shards
   included) fail the flow before any work.
2. The run takes the output folder's lease (``flows.io.lease``): a second run on an output that a
   live run holds refuses with the holder's run id; a stale lease (its run died) is taken over.
3. ``run-shard``, mapped over the shards and run one after the other: resume (rows whose outputs are
   complete are kept, ``flows.io.resume``), the Ray job (``flows.ray_job.driver``), the shard's results
   file. A shard whose results file shows every row ok for the same manifest file, options and
   weights is kept whole without reading its rows' markers.
4. ``finish-run``: the shards' results joined into ``<output_uri>/results.parquet`` (atomic), then the
   run's summary (with the rows the quality checks flagged), then the gallery ``<output_uri>/index.html``
   (``flows.gallery``).
5. ``publish-artifacts``: summary, failures, the review list of flagged rows, previews, the gallery link,
   progress.

Quality checks (``pipeline.qc``) run in finalize; every results row carries their ``qc_*`` columns. Rows
are flagged against the run's thresholds (``qc``) and ``qc_policy`` says what a flagged row becomes:
listed for review (``"review"``, the default), failed (``"fail"``) or nothing (``"ignore"``), see
``flows.qc_results``.

A failed row never fails the flow; a failure rate above ``max_failure_rate`` does (after the results
and artifacts are written). Infrastructure errors (storage unreachable, Ray cluster lost or
unreachable, no actor alive, actors dying) are retried at task level; a retry resumes from the
objects already done.

Output layout::

    <output_uri>/results.parquet            one row per manifest row (flows.io.manifest.RESULT_SCHEMA)
    <output_uri>/shards/<shard>.parquet     the results of one manifest shard (resume per shard)
    <output_uri>/objects/<id>/...           mesh.glb, mesh.obj/.mtl/.png, views.png, preview.png, meta.json
    <output_uri>/objects/<id>/result.json   completion marker (written last): the row's result
    <output_uri>/index.html                 the gallery: one card per row, filters, a 3-D viewer
    <output_uri>/lease.json                 while a run holds the folder
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from ray.exceptions import RaySystemError

from flows.gallery import gallery_link, write_gallery
from flows.io import storage
from flows.io.lease import LeaseLostError, OutputLease
from flows.io.manifest import (
    READ_BATCH_ROWS,
    InputManifest,
    ManifestRow,
    ResultsWriter,
    merge_results,
    read_manifest_shards,
    read_results_metadata,
)
from flows.io.resume import OBJECTS_DIR, ResumeCheck
from flows.qc_results import QC_FAILED, QCPolicy, apply_qc_policy, reflag, review_rows
from flows.ray_job.backends import CRMBackend, identity_json
from flows.ray_job.driver import BatchConfig, BatchStats, InfrastructureError, run_batch
from flows.ray_job.fake_backends import NoOpBackend
from flows.ray_job.session import LazyRaySession
from pipeline.inputs.ids import default_ids
from pipeline.outputs.atomic import remove_stale_temps
from pipeline.qc import QCConfig

__all__ = [
    "crm_batch",
    "FailureRateExceeded",
    "RESULTS_NAME",
    "SHARDS_DIR",
    "ShardPlan",
    "make_backend",
    "plan_shards",
]

RESULTS_NAME = "results.parquet"
SHARDS_DIR = "shards"
LEASE_TTL_S = 120.0
MAX_FAILURES_SHOWN = 200
MAX_PREVIEWS_KEPT = 16
MAX_REVIEW_SHOWN = 200
BACKENDS = ("crm", "noop")


class FailureRateExceeded(RuntimeError):
    """More rows failed than ``max_failure_rate`` allows (the results manifest is still written)."""


def _is_infrastructure_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    if isinstance(exc, LeaseLostError):
        return False  # another run owns the folder now: retrying would fight it
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


def make_backend(
    backend: str, weights: str, options: dict[str, Any] | None, qc: dict[str, Any] | None = None
) -> Any:
    """The pipeline backend for a run: ``"crm"`` (the model) or ``"noop"`` (orchestration dry run, no
    quality checks)."""
    if backend == "crm":
        return CRMBackend(weights=weights, options=options, qc=qc)
    if backend == "noop":
        opts = options or {}
        # a dry run may simulate the model's cost: seconds per object on the generator / CPU stage
        return NoOpBackend(
            seed=int(opts.get("seed", 0)),
            sleep_s=float(opts.get("sleep_s", 0.0)),
            finalize_sleep_s=float(opts.get("finalize_sleep_s", 0.0)),
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@dataclass
class ShardPlan:
    """One manifest shard of a run.

    Attributes:
        name: folder-safe name (the shard file's stem, made unique).
        manifest: the validated shard.
        results_uri: ``<output_uri>/shards/<name>.parquet``.
        limit: rows of this shard to take (None: all), from the flow's ``limit``.
    """

    name: str
    manifest: InputManifest
    results_uri: str
    limit: int | None = None

    @property
    def rows(self) -> int:
        return self.manifest.num_rows if self.limit is None else min(self.limit, self.manifest.num_rows)


def plan_shards(manifests: list[InputManifest], output_uri: str, limit: int | None = None) -> list[ShardPlan]:
    """One :class:`ShardPlan` per manifest shard; ``limit`` takes the first rows over the shards in order
    (shards left with no row are dropped)."""
    names = default_ids([m.uri or f"manifest-{i}" for i, m in enumerate(manifests)])
    plans = []
    left = limit
    for name, manifest in zip(names, manifests):
        if left is not None and left <= 0:
            break
        uri = storage.join_uri(output_uri, SHARDS_DIR, f"{name}.parquet")
        plans.append(ShardPlan(name, manifest, uri, None if left is None else min(left, manifest.num_rows)))
        if left is not None:
            left -= manifest.num_rows
    return plans


class _Progress:
    """The run's progress artifact (rows finished over all shards), updated at most every 2 s."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self._last = 0.0
        self._lock = threading.Lock()
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="crm-batch-progress", description="rows finished (%)"
        )

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < 2.0 and self.done < self.total:
                return
            self._last = now
        update_progress_artifact(self.artifact_id, 100.0 * self.done / max(self.total, 1))
        get_run_logger().info("progress: %d/%d rows", self.done, self.total)


@dataclass(frozen=True)
class QCRun:
    """The run's quality-check settings: thresholds (``config``) and what flagged rows become (``policy``)."""

    config: QCConfig
    policy: QCPolicy

    def key(self) -> str:
        """What a shard's results depend on (stored with them: a changed policy or threshold recomputes the
        shard's rows from their markers)."""
        return json.dumps({"policy": self.policy.action, "flags": self.policy.flags,
                           "thresholds": self.config.thresholds()}, sort_keys=True)  # fmt: skip

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row flagged against this run's thresholds (rows kept from earlier runs too), then as the
        policy leaves it."""
        if row.get("status") == "ok":
            row = reflag(row, self.config)
        return apply_qc_policy(row, self.policy)[0]


class _ShardSummary:
    """Counts of one shard's results and a bounded sample of its failures and previews."""

    def __init__(self) -> None:
        self.failures: list[dict[str, Any]] = []
        self.previews: list[dict[str, Any]] = []
        self.kept = 0

    def add(self, row: dict[str, Any]) -> None:
        if row.get("resumed"):
            self.kept += 1
        if row["status"] != "ok":
            if len(self.failures) < MAX_FAILURES_SHOWN:
                self.failures.append(row)
        elif row.get("preview_uri") and len(self.previews) < MAX_PREVIEWS_KEPT:
            self.previews.append(row)


def _run_info(backend: Any) -> dict[str, str]:
    return {
        "weights_identity": identity_json(backend.weights_identity()),
        "options_hash": backend.options_hash(),
    }


def _shard_metadata(
    shard: ShardPlan, run_info: dict[str, str], qc: QCRun, storage_options: dict[str, Any] | None
) -> dict[str, str]:
    """What a shard's results were computed from (stored in its results file)."""
    return {
        "crm.qc": qc.key(),
        "crm.manifest_uri": shard.manifest.uri,
        "crm.manifest_key": storage.content_key(shard.manifest.uri, storage_options),
        "crm.limit": "" if shard.limit is None else str(shard.limit),
        "crm.options_hash": run_info["options_hash"],
        "crm.weights_identity": run_info["weights_identity"],
    }


def _reusable_shard(
    shard: ShardPlan, metadata: dict[str, str], storage_options: dict[str, Any] | None
) -> bool:
    """True when the shard's results file is complete: every row ok, computed from the same manifest
    file (size and ETag/mtime), limit, options, weights and quality-check settings."""
    if not storage.exists(shard.results_uri, storage_options):
        return False
    try:
        stored = read_results_metadata(shard.results_uri, storage_options)
    except Exception:  # noqa: BLE001 - unreadable: compute the shard again
        return False
    same = all(stored.get(k) == v for k, v in metadata.items())
    return same and stored.get("crm.failed") == "0" and stored.get("crm.rows") == str(shard.rows)


def _remove_stale_temps(output_uri: str) -> int:
    """Delete half-written object folders left by killed finalize tasks (local outputs; object stores
    stage in local scratch folders). Only safe while this run holds the output's lease."""
    if not storage.is_local(output_uri):
        return 0
    return len(remove_stale_temps(storage.local_path(storage.join_uri(output_uri, OBJECTS_DIR))))


def _rows_to_run(shard: ShardPlan, check: ResumeCheck | None, keep: Any) -> Iterator[ManifestRow]:
    """The shard's rows that must run, one record batch at a time; rows kept from earlier runs go to
    ``keep`` as they are found."""
    taken = 0
    for batch in shard.manifest.row_batches():
        if shard.limit is not None:
            batch = batch[: max(shard.limit - taken, 0)]
            if not batch:
                return
        taken += len(batch)
        todo, kept = check.split(batch) if check is not None else (batch, [])
        for row in kept:
            keep(row)
        yield from todo


@task(name="validate-manifest", retries=2, retry_delay_seconds=3, retry_condition_fn=_retry_on_infrastructure,
      cache_policy=NO_CACHE)  # fmt: skip
def validate_manifest(manifest_uri: str, storage_options: dict[str, Any] | None) -> list[InputManifest]:
    """Read and validate every shard of the input manifest (raises ``ManifestError`` naming the problem)."""
    manifests = read_manifest_shards(manifest_uri, storage_options)
    logger = get_run_logger()
    rows = sum(m.num_rows for m in manifests)
    invalid = sum(len(m.problems) for m in manifests)
    logger.info(
        "manifest %s: %d shard(s), %d rows, %d invalid rows", manifest_uri, len(manifests), rows, invalid
    )
    return manifests


@task(name="run-shard", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_on_infrastructure,
      cache_policy=NO_CACHE)  # fmt: skip
def run_shard(
    shard: ShardPlan,
    backend: Any,
    config: BatchConfig,
    session: LazyRaySession,
    resume: bool,
    lease: OutputLease,
    progress: _Progress,
    qc: QCRun,
) -> dict[str, Any]:
    """Resume + the Ray job + the shard's results file (atomic); returns the shard's summary."""
    logger = get_run_logger()
    so = config.storage_options
    run_info = _run_info(backend)
    metadata = _shard_metadata(shard, run_info, qc, so)
    base = {
        "shard": shard.name,
        "results_uri": shard.results_uri,
        "workers": [],
        "failures": [],
        "previews": [],
    }
    if resume and _reusable_shard(shard, metadata, so):
        logger.info("shard %s: all %d rows complete in %s; kept", shard.name, shard.rows, shard.results_uri)
        progress.add(shard.rows)
        n = shard.rows
        return {**base, "rows": n, "ok": n, "failed": 0, "resumed": n, "reused": True, "generated": 0,
                "actor_deaths": 0, "node_losses": 0, "retried_rows": 0, "job_seconds": 0.0}  # fmt: skip

    writer = ResultsWriter(shard.results_uri, so, metadata=metadata)
    summary = _ShardSummary()

    def on_result(row: dict[str, Any]) -> None:
        lease.check()
        row = qc.apply(row)
        writer.write(row)
        summary.add(row)
        progress.add()

    check = ResumeCheck(config.output_uri, so, run_info, int(backend.default_seed())) if resume else None
    stats = BatchStats()
    try:
        rows = _rows_to_run(shard, check, on_result)
        first = next(rows, None)
        if first is not None:
            session.ensure()
            stats = run_batch(itertools.chain([first], rows), backend, config, on_result)
        counts = writer.status_counts
        writer.close({"crm.rows": str(writer.count), "crm.failed": str(counts.get("failed", 0))})
    except InfrastructureError:
        writer.abort()
        session.close()  # a retry opens a fresh session
        raise
    except BaseException:
        writer.abort()
        raise
    logger.info("shard %s: %d rows, %d kept from earlier runs, %d generated", shard.name, writer.count,
                summary.kept, stats.ok)  # fmt: skip
    return {
        **base,
        "rows": writer.count,
        "ok": counts.get("ok", 0),
        "failed": counts.get("failed", 0),
        "resumed": summary.kept,
        "reused": False,
        "generated": stats.ok,
        "actor_deaths": stats.actor_deaths,
        "node_losses": stats.node_losses,
        "retried_rows": stats.retried_rows,
        "job_seconds": round(stats.seconds, 3),
        "workers": stats.workers,
        "failures": summary.failures,
        "previews": summary.previews,
    }


@task(name="finish-run", retries=2, retry_delay_seconds=3, retry_condition_fn=_retry_on_infrastructure,
      cache_policy=NO_CACHE)  # fmt: skip
def finish_run(
    shards: list[dict[str, Any]], output_uri: str, storage_options: dict[str, Any] | None
) -> dict[str, Any]:
    """Join the shards' results into ``<output_uri>/results.parquet`` (atomic); the run's summary."""
    results_uri = storage.join_uri(output_uri, RESULTS_NAME)
    counts = merge_results(
        [s["results_uri"] for s in shards],
        results_uri,
        storage_options,
        resumed=[s["results_uri"] for s in shards if s["reused"]],
    )
    summary: dict[str, Any] = {
        "results_uri": results_uri,
        "output_uri": output_uri,
        "rows": sum(counts.values()),
        "ok": counts.get("ok", 0),
        "failed": counts.get("failed", 0),
        "shards": len(shards),
        "shards_reused": sum(s["reused"] for s in shards),
    }
    for key in ("resumed", "generated", "actor_deaths", "node_losses", "retried_rows", "job_seconds"):
        summary[key] = sum(s[key] for s in shards)
    summary["job_seconds"] = round(summary["job_seconds"], 3)
    summary["workers"] = sorted({w for s in shards for w in s["workers"]})
    summary["failures"] = [r for s in shards for r in s["failures"]][:MAX_FAILURES_SHOWN]
    summary["previews"] = [r for s in shards for r in s["previews"]][:MAX_PREVIEWS_KEPT]
    summary.update(_qc_outcome(results_uri, storage_options))
    return summary


_QC_SCAN_COLUMNS = ["id", "status", "error_class", "preview_uri", "qc_flags", "qc_silhouette_iou",
                    "qc_color_psnr", "qc_components", "qc_faces", "qc_clip_similarity"]  # fmt: skip


def _qc_outcome(results_uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Rows the quality checks flagged (``flagged``: ok rows with flags, the first of them as ``review``)
    and rows the policy failed (``qc_failed``), read from the results manifest one record batch at a time."""
    flagged = qc_failed = 0
    review: list[dict[str, Any]] = []
    with storage.open_uri(results_uri, "rb", storage_options) as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=READ_BATCH_ROWS, columns=_QC_SCAN_COLUMNS):
            rows = batch.to_pylist()
            qc_failed += sum(r["error_class"] == QC_FAILED for r in rows)
            listed = review_rows(rows, limit=len(rows))
            flagged += len(listed)
            review.extend(listed[: MAX_REVIEW_SHOWN - len(review)])
    return {"flagged": flagged, "qc_failed": qc_failed, "review": review}


@task(name="write-gallery", cache_policy=NO_CACHE)
def write_run_gallery(output_uri: str, storage_options: dict[str, Any] | None) -> str | None:
    """``<output_uri>/index.html`` (``flows.gallery``); a gallery that cannot be built is a warning, not a
    failed run (rebuild it with ``python -m flows.gallery``). Returns the page's URI."""
    try:
        return write_gallery(output_uri, storage_options)
    except Exception as exc:  # noqa: BLE001 - the results are written; the page is a convenience
        get_run_logger().warning(
            "gallery of %s not written (%s: %s); rebuild it with: python -m flows.gallery %s",
            output_uri, type(exc).__name__, exc, output_uri,
        )  # fmt: skip
        return None


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
            {"metric": "flagged by quality checks (ok, listed for review)", "value": summary["flagged"]},
            {"metric": "failed by the quality-check policy", "value": summary["qc_failed"]},
            {"metric": "kept from earlier runs", "value": summary["resumed"]},
            {"metric": "generated now", "value": summary["generated"]},
            {"metric": "actor deaths", "value": summary["actor_deaths"]},
            {"metric": "actors lost with their node", "value": summary["node_losses"]},
            {
                "metric": "shards (kept whole from earlier runs)",
                "value": f"{summary['shards']} ({summary['shards_reused']})",
            },
            {"metric": "job seconds", "value": summary["job_seconds"]},
            {"metric": "results manifest", "value": summary["results_uri"]},
            {"metric": "gallery", "value": summary.get("gallery_uri") or "not written"},
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
    if summary["review"]:
        create_table_artifact(
            key="crm-batch-review",
            table=summary["review"],
            description=f"rows flagged by the quality checks (first {len(summary['review'])} of "
            f"{summary['flagged']}); flags are explained in docs/qc.md",
        )
    if summary.get("gallery_uri"):
        link = gallery_link(summary["gallery_uri"], storage_options)
        create_markdown_artifact(
            key="crm-batch-gallery",
            markdown=f"[Gallery of this run: {summary['rows']} rows, filters, 3-D viewer]({link})",
            description="the run's gallery page",
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


@flow(name="crm-batch", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
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
    actor_wait_s: float = 1800.0,
    storage_options: dict[str, Any] | None = None,
    previews: int = 4,
    backend: str = "crm",
    qc_policy: str = "review",
    qc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate meshes for every row of a Parquet manifest (one file, a folder or a glob of shards).

    Args:
        manifest_uri: input manifest (``s3://``, ``gs://``, ``file://`` or a path), see ``flows.io.manifest``;
            a folder or a glob (``s3://b/m/*.parquet``) runs shard by shard.
        output_uri: run folder (``objects/<id>/`` + ``results.parquet``); one run at a time (lease).
        weights: ``"auto"`` (local/cached official weights), a folder, or ``"tiny-random"`` (tests).
        options: ``pipeline.options.PipelineOptions`` fields (seed, steps_stage1, texture_size, ...).
        ray_address: existing Ray cluster (``"auto"``, ``"head:6379"``, ``"ray://head:10001"``); None
            starts a new local one. An address where nothing answers fails within 30 s.
        batch_size: K objects per generator call (None: ``options.batch_size``).
        num_actors: generator actors (None: one per GPU, 1 without GPUs).
        num_gpus_per_actor: GPUs per actor (None: 1 when the cluster has GPUs).
        max_attempts: attempts of a row whose worker dies before it is marked failed.
        max_failure_rate: the flow fails when more than this fraction of rows failed (0..1).
        resume: keep complete outputs of earlier runs with the same options and weights.
        limit: only the first N rows of the manifest.
        timeout_s: fail (and retry) a shard's Ray job when it takes longer.
        actor_wait_s: fail (and retry) when rows have waited this long with no generator actor alive
            (all lost, or waiting for GPUs: raise it for clusters that autoscale slowly).
        storage_options: fsspec options (e.g. ``{"endpoint_url": ...}``); keep secrets in the environment.
        previews: previews shown in the artifacts.
        backend: ``"crm"`` (the model) or ``"noop"`` (dry run of storage and cluster, no model; its
            options may set ``sleep_s`` / ``finalize_sleep_s``, simulated seconds per object).
        qc_policy: what rows flagged by the quality checks become: ``"review"`` (stay ok, listed in the
            ``crm-batch-review`` artifact), ``"fail"`` (status failed, ``QualityCheckFailed``; counts
            towards ``max_failure_rate``), ``"ignore"``; ``"fail:fragmented,degenerate"`` limits the
            action to those flags.
        qc: ``pipeline.qc.QCConfig`` fields: thresholds of the flags, CLIP model, ``enabled``.

    Returns: summary dict (``results_uri``, ``rows``, ``ok``, ``failed``, ``resumed``, ``generated``,
    ``flagged``, ``qc_failed``, ``gallery_uri``...).
    """
    if not 0.0 <= max_failure_rate <= 1.0:
        raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate}")
    logger = get_run_logger()
    qc_run = QCRun(QCConfig.from_dict(dict(qc or {})), QCPolicy.parse(qc_policy))  # bad values fail here
    pipe_backend = make_backend(backend, weights, options, qc)
    identity = pipe_backend.weights_identity()  # missing weights fail here, before any work
    logger.info("weights: %s", identity_json(identity))
    manifests = validate_manifest(manifest_uri, storage_options)
    k = batch_size or int((options or {}).get("batch_size", 1)) or 1
    config = BatchConfig(
        output_uri=output_uri,
        storage_options=storage_options,
        batch_size=k,
        num_actors=num_actors,
        num_gpus_per_actor=num_gpus_per_actor,
        max_attempts=max_attempts,
        actor_wait_s=actor_wait_s,
        timeout_s=timeout_s,
    )
    shards = plan_shards(manifests, output_uri, limit)
    run_id = str(flow_run.get_id() or f"local-{uuid.uuid4().hex}")
    session = LazyRaySession(ray_address)
    with OutputLease(output_uri, run_id, storage_options, ttl_s=LEASE_TTL_S) as lease:
        if lease.taken_over is not None:
            logger.warning(
                "took over a stale lease on %s: %s", output_uri, lease.taken_over.describe(time.time())
            )
        _remove_stale_temps(output_uri)
        progress = _Progress(sum(s.rows for s in shards))
        try:
            futures = run_shard.map(
                shards, unmapped(pipe_backend), unmapped(config), unmapped(session), unmapped(resume),
                unmapped(lease), unmapped(progress), unmapped(qc_run),
            )  # fmt: skip
            wait(futures)  # no shard task may outlive the lease
        finally:
            session.close()
        shard_summaries = [f.result() for f in futures]  # raises the first shard's failure
        lease.check()
        summary = finish_run(shard_summaries, output_uri, storage_options)
        _remove_stale_temps(output_uri)
        summary["gallery_uri"] = write_run_gallery(output_uri, storage_options)
    # the end of a run: artifacts from the summary (add further reports of the results here)
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
    out = {k2: v for k2, v in summary.items() if k2 not in ("failures", "previews", "review")}
    out["failure_rate"] = rate
    return out
