"""The Ray job of a batch run: every manifest row through fetch -> generate -> finalize, exactly once.

:class:`BatchDriver` follows each row through named states; each transition is one method, so the
class reads as the data path of one row::

    WAITING ─_start_fetches─▶ FETCHING ─_on_fetched─▶ READY ─_dispatch─▶ GENERATING
            ─_on_generated─▶ FINALIZING ─_on_finalized─▶ DONE  (its results row goes to ``on_result``)

and the ways back:

* a batch whose ``generate`` raised is split: its rows go back to READY to run alone, so one bad row
  cannot fail its neighbours (``_on_generated``);
* a row whose actor died goes back to READY (``_on_actor_lost``): charged one attempt when the
  death was its own, failed (``WorkerDiedError``) after ``max_attempts``; the actor pool
  (``flows.ray_job.actor_pool``) decides who is charged and replaces the actor;
* a row whose objects were lost with a node goes back to WAITING and is fetched again
  (``_on_objects_lost``); losses (objects or actor) are never charged, but a row lost more than
  ``max_attempts`` times ends failed.

Windows bound the rows in each state (``prefetch`` fetched ahead, ``max_inflight_per_actor`` calls
per actor, ``max_pending_finalize`` rows finalizing), so memory does not grow with the manifest.
Only ``READY`` actors get work: the job goes on with the actors it has while lost ones wait for
resources, and fails (``InfrastructureError``) only when no actor has been alive for
``actor_wait_s`` while rows wait.

Why not Ray Data ``map_batches``: measured side by side in docs/batch.md ("Scale").
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flows.io.manifest import ManifestRow, identity_json, result_row
from flows.io.release_memory import release_free_memory
from flows.ray_job.actor_pool import ActorPool, Call
from flows.ray_job.session import InfrastructureError

log = logging.getLogger(__name__)

__all__ = [
    "BatchConfig",
    "BatchDriver",
    "BatchStats",
    "InfrastructureError",
    "RowState",
    "default_actor_resources",
    "run_batch",
]


@dataclass
class BatchConfig:
    """How the Ray job runs.

    Attributes:
        output_uri: run folder; objects go to ``<output_uri>/objects/<id>/``.
        storage_options: fsspec options for the input images and the outputs (non-secret ones,
            e.g. ``endpoint_url``; credentials come from the workers' environment).
        batch_size: K, objects per ``generate`` call on an actor.
        num_actors: generator actors (None: one per GPU in the cluster, or 1 without GPUs).
        num_gpus_per_actor: GPUs per actor (None: 1 when the cluster has GPUs, else 0).
        actor_num_cpus: CPUs reserved per actor (None: 1 with GPUs, 0.5 on CPU-only clusters, so a
            2-core machine still has room for the fetch/finalize tasks).
        task_num_cpus: CPUs reserved per fetch/finalize task (fractional: tasks are mostly I/O or
            single-threaded).
        rows_per_task: rows one fetch or finalize task handles. 1 (default) spreads the CPU work of a
            batch over as many cores as it has rows (the real pipeline: seconds per object); raise it
            (e.g. to ``batch_size``) when per-row work is small next to Ray's per-task cost.
        max_attempts: attempts per row against dying actors (and re-runs after lost objects) before
            it is marked failed.
        max_actor_restarts: generator worker-process deaths allowed in one run before the job gives up
            (``InfrastructureError``); actors lost with their node do not count.
        max_inflight_per_actor: calls queued on one actor (2: one running, one ready).
        max_pending_finalize: rows finalizing before generation pauses (None: the larger of 2 batches
            per actor and 4 x CPUs).
        prefetch: rows fetched ahead of the generator (None: K x actors x in-flight, one more full
            queue per actor; at least 2 x K).
        finalize_max_retries: Ray retries of a fetch/finalize task whose worker process crashed.
        actor_wait_s: how long rows may wait with no generator actor alive (all lost, or still
            waiting for resources or loading their models) before ``InfrastructureError``.
        timeout_s: give up (``InfrastructureError``) when the job runs longer than this.
        heap_trim_s: seconds between returns of the driver's freed memory to the system
            (``flows.io.release_memory``: Arrow's pool and glibc's arenas keep it resident). None: never.
    """

    output_uri: str
    storage_options: dict[str, Any] | None = None
    batch_size: int = 4
    num_actors: int | None = None
    num_gpus_per_actor: float | None = None
    actor_num_cpus: float | None = None
    task_num_cpus: float = 0.25
    rows_per_task: int = 1
    max_attempts: int = 3
    max_actor_restarts: int = 8
    max_inflight_per_actor: int = 2
    max_pending_finalize: int | None = None
    prefetch: int | None = None
    finalize_max_retries: int = 2
    actor_wait_s: float = 1800.0
    timeout_s: float | None = None
    heap_trim_s: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_attempts", "rows_per_task", "max_inflight_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.actor_wait_s <= 0:
            raise ValueError(f"actor_wait_s must be > 0, got {self.actor_wait_s}")
        if self.heap_trim_s is not None and self.heap_trim_s < 0:
            raise ValueError(f"heap_trim_s must be >= 0 or None, got {self.heap_trim_s}")


@dataclass
class BatchStats:
    """Counts of one run (``ok + failed == rows``).

    Attributes:
        actor_deaths: generator worker processes that died (crash, OOM kill).
        node_losses: generator actors lost with their node (or unreachable).
        unattributed_deaths: worker deaths with several calls unfinished (no row charged; their rows
            were retried alone).
        retried_rows: rows sent to an actor again after their actor died.
        refetched_rows: rows fetched again because their objects were lost with a node.
        workers: labels of the actors that became ready (``gen<slot>.<n>@host:pid/node-...``).
    """

    rows: int = 0
    ok: int = 0
    failed: int = 0
    actor_deaths: int = 0
    node_losses: int = 0
    unattributed_deaths: int = 0
    retried_rows: int = 0
    refetched_rows: int = 0
    split_batches: int = 0
    generate_calls: int = 0
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)


class RowState(enum.Enum):
    WAITING = "waiting"  # read from the manifest (or sent back to be fetched again)
    FETCHING = "fetching"  # its image is being read, decoded and preprocessed (CPU task)
    READY = "ready"  # its image is in the object store, waiting for an actor
    GENERATING = "generating"  # in a generate call on an actor (GPU)
    FINALIZING = "finalizing"  # its generated object is being cleaned, baked, exported (CPU task)
    DONE = "done"  # its results row was handed to on_result


@dataclass(eq=False)
class _Row:
    """One manifest row on its way through the job.

    Attributes:
        attempts: generate attempts charged to it (a completed one, or a death that was its own).
        losses: times it went back because its objects or its actor were lost with a node.
        image: object reference of its preprocessed image (FETCHING, READY, GENERATING).
        isolate: run it in a batch of its own (its batch raised).
        suspect: its actor died with several calls unfinished: run it alone on an idle actor.
    """

    row: ManifestRow
    seed: int
    state: RowState = RowState.WAITING
    attempts: int = 0
    losses: int = 0
    image: Any = None
    input_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    isolate: bool = False
    suspect: bool = False

    @property
    def id(self) -> str:
        return self.row.id if self.row.id is not None else f"<row {self.row.index}>"


def default_actor_resources(config: BatchConfig, cluster: dict[str, float]) -> tuple[int, float, float]:
    """(num_actors, num_gpus, num_cpus) per actor for this cluster's resources."""
    gpus = float(cluster.get("GPU", 0.0))
    num_gpus = (
        config.num_gpus_per_actor if config.num_gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    )
    if config.num_actors is not None:
        n = config.num_actors
    elif num_gpus > 0:
        n = max(1, int(gpus // num_gpus))
    else:
        n = 1
    cpus = config.actor_num_cpus if config.actor_num_cpus is not None else (1.0 if num_gpus > 0 else 0.5)
    return n, num_gpus, cpus


class BatchDriver:
    """Runs manifest rows through the pipeline on the current Ray session (``flows.ray_job.session``).

    Args:
        rows: manifest rows to do, consumed lazily (rows with ``problem`` set end failed without work).
        backend: ``flows.ray_job.backends.CRMBackend`` or a fake with the same interface.
        config: windows, actors and retry limits.
        on_result: called in the driver with each finished results row (dict, see
            ``flows.io.manifest.result_row``), in completion order; exactly once per row.
    """

    def __init__(
        self,
        rows: Iterable[ManifestRow],
        backend: Any,
        config: BatchConfig,
        on_result: Callable[[dict[str, Any]], None],
    ):
        import ray

        from flows.ray_job.workers import GeneratorActor, finalize_objects, prepare_images

        self.config = config
        self.on_result = on_result
        self.stats = BatchStats()
        self.run_info = {
            "weights_identity": identity_json(backend.weights_identity()),
            "options_hash": backend.options_hash(),
        }
        self.default_seed = int(backend.default_seed())
        self._source: Iterator[ManifestRow] = iter(rows)
        self._exhausted = False

        cluster = ray.cluster_resources()
        n_actors, num_gpus, actor_cpus = default_actor_resources(config, cluster)
        k = config.batch_size
        self.max_finalizing = config.max_pending_finalize or max(
            2 * k * n_actors, int(4 * float(cluster.get("CPU", 1.0)))
        )
        self.prefetch = config.prefetch or max(2 * k, k * n_actors * config.max_inflight_per_actor)
        self._backend_ref = ray.put(backend)
        self._task_options = {"num_cpus": config.task_num_cpus, "max_retries": config.finalize_max_retries}
        self._prepare = ray.remote(prepare_images)
        self._finalize = ray.remote(finalize_objects).options(**self._task_options)
        actor_cls = ray.remote(GeneratorActor).options(
            num_cpus=actor_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0
        )
        self.pool = ActorPool(
            actor_cls, self._backend_ref, n_actors, config.max_inflight_per_actor, config.max_actor_restarts
        )

        self._refetch: collections.deque[_Row] = collections.deque()  # WAITING again after a loss
        self._fetching: dict[Any, list[_Row]] = {}  # fetch task status ref -> its rows
        self._ready: collections.deque[_Row] = collections.deque()
        self._finalizing: dict[Any, list[_Row]] = {}  # finalize task ref -> its rows
        self._n_fetching = 0
        self._n_finalizing = 0
        self._active = 0  # rows admitted and not DONE
        self._no_actor_since: float | None = None

    # ------------------------------------------------------------------ the loop
    def run(self) -> BatchStats:
        """Run every row to DONE; returns the run's counts."""
        import ray
        from ray.exceptions import GetTimeoutError

        started = time.monotonic()
        next_trim = started
        try:
            while not (self._exhausted and self._active == 0):
                self._start_fetches()
                self._dispatch()
                self._check_progress(started)
                if self.config.heap_trim_s is not None and time.monotonic() >= next_trim:
                    release_free_memory()  # tens of ms at most: keeps the driver's RSS flat over a run
                    next_trim = time.monotonic() + self.config.heap_trim_s
                for ref in self._wait(ray):
                    if ref in self._fetching:
                        self._on_fetched(ref)
                    elif self.pool.is_call(ref):
                        self._on_generated(ref)
                    elif ref in self._finalizing:
                        self._on_finalized(ref)
                    elif self.pool.is_probe(ref):
                        self._after_death(self.pool.on_probe(ref))
        except GetTimeoutError as exc:
            raise InfrastructureError(f"Ray call timed out: {exc}") from exc
        finally:
            self.pool.shutdown()
            self._collect_pool_stats()
        self.stats.seconds = time.monotonic() - started
        return self.stats

    def _wait(self, ray: Any) -> list[Any]:
        """References that resolved (waits up to 1 s for the first)."""
        pending = [*self._fetching, *self.pool.waitables(), *self._finalizing]
        if not pending:
            return []
        first, _ = ray.wait(pending, num_returns=1, timeout=1.0, fetch_local=False)
        if not first:
            return []
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
        return done or first

    def _check_progress(self, started: float) -> None:
        """Raise :class:`InfrastructureError` on the run's timeout, or when rows have waited
        ``actor_wait_s`` with no generator actor alive."""
        now = time.monotonic()
        if self.config.timeout_s is not None and now - started > self.config.timeout_s:
            raise InfrastructureError(f"batch job exceeded its timeout of {self.config.timeout_s} s")
        if not self._ready or not self.pool.slots or self.pool.ready:
            self._no_actor_since = None
            return
        if self._no_actor_since is None:
            self._no_actor_since = now
        elif now - self._no_actor_since > self.config.actor_wait_s:
            import ray

            raise InfrastructureError(
                f"no generator actor alive for {self.config.actor_wait_s:.0f} s while {len(self._ready)} "
                f"rows wait: {len(self.pool.starting)} actor(s) waiting for resources or loading; "
                f"cluster resources {ray.cluster_resources()}, available {ray.available_resources()}"
            )

    # ------------------------------------------------------------------ WAITING -> FETCHING
    def _start_fetches(self) -> None:
        """Admit rows (lost ones first, then the manifest's) and start one fetch task per group."""
        group_size = self.config.rows_per_task
        while self._n_fetching + len(self._ready) < self.prefetch:
            group: list[_Row] = []
            while len(group) < group_size:
                row = self._next_row()
                if row is None:
                    break
                group.append(row)
            if not group:
                return
            uris = [r.row.image_uri for r in group]
            refs = self._prepare.options(num_returns=1 + len(group), **self._task_options).remote(
                uris, self.config.storage_options, self._backend_ref
            )
            for r, image_ref in zip(group, refs[1:]):
                r.state = RowState.FETCHING
                r.image = image_ref
            self._fetching[refs[0]] = group
            self._n_fetching += len(group)

    def _next_row(self) -> _Row | None:
        """The next row to fetch, or None; an invalid manifest row ends at once (failed)."""
        if self._refetch:
            return self._refetch.popleft()
        while not self._exhausted:
            try:
                row = next(self._source)
            except StopIteration:
                self._exhausted = True
                return None
            r = _Row(row=row, seed=int(row.seed) if row.seed is not None else self.default_seed)
            self._active += 1
            if row.problem is None:
                return r
            self._fail(r, "InvalidRow", row.problem)
        return None

    # ------------------------------------------------------------------ FETCHING -> READY
    def _on_fetched(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        group = self._fetching.pop(ref)
        self._n_fetching -= len(group)
        try:
            statuses = ray.get(ref)
        except RayError as exc:  # the fetch task's worker crashed beyond its retries
            statuses = [{"ok": False, "error_class": type(exc).__name__, "error_message": str(exc)[:500]}]
            statuses *= len(group)
        for r, status in zip(group, statuses):
            if not status["ok"]:
                r.attempts = max(r.attempts, 1)
                message = f"cannot read image {r.row.image_uri}: {status['error_message']}"
                self._fail(r, status["error_class"], message)
                continue
            r.timings.update(status.get("timings") or {"fetch": status["seconds"]})
            r.input_info = status.get("input_info") or {}
            r.state = RowState.READY
            self._ready.append(r)

    # ------------------------------------------------------------------ READY -> GENERATING
    def _dispatch(self) -> None:
        """Send batches of READY rows to READY actors while windows allow."""
        if self._ready:
            self.pool.start()
        k = self.config.batch_size
        while self._ready:
            if self._n_finalizing and self._n_finalizing + k > self.max_finalizing:
                return  # backpressure: the CPU stage is behind
            head = self._ready[0]
            alone = head.isolate or head.suspect
            input_done = self._exhausted and not self._fetching and not self._refetch
            if not alone and len(self._ready) < k and not input_done:
                return  # wait for a full batch while images are still coming
            actor = self.pool.pick(exclusive=head.suspect)
            if actor is None:
                return
            batch = [self._ready.popleft()] if alone else self._take_batch(k)
            for r in batch:
                r.state = RowState.GENERATING
            args = (
                [r.row.id for r in batch],
                [r.seed for r in batch],
                [r.input_info for r in batch],
                *[r.image for r in batch],
            )
            self.pool.submit(actor, batch, args, exclusive=head.suspect)
            self.stats.generate_calls += 1

    def _take_batch(self, k: int) -> list[_Row]:
        batch: list[_Row] = []
        while self._ready and len(batch) < k and not (self._ready[0].isolate or self._ready[0].suspect):
            batch.append(self._ready.popleft())
        return batch

    # ------------------------------------------------------------------ GENERATING -> FINALIZING
    def _on_generated(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayActorError, RayError

        call = self.pool.take(ref)
        try:
            status = ray.get(ref)
        except RayActorError as exc:
            self._on_actor_lost(call, exc)
            return
        except RayError as exc:  # an input object was lost with its node and could not be rebuilt
            self._on_objects_lost(call.rows, exc)
            return
        if not status["ok"]:
            self._on_batch_error(call, status)
            return
        per_row = status["seconds"] / len(call.rows)
        for r in call.rows:
            r.attempts += 1
            r.timings["generate"] = per_row
            r.image = None
        self._start_finalize(call, status["worker"])

    def _on_batch_error(self, call: Call, status: dict[str, Any]) -> None:
        """``generate`` raised: split a batch (its rows run alone), fail a row that ran alone."""
        if len(call.rows) > 1:
            self.stats.split_batches += 1
            for r in reversed(call.rows):
                r.isolate = True
                r.state = RowState.READY
                self._ready.appendleft(r)
            return
        r = call.rows[0]
        r.attempts += 1
        self._fail(r, status["error_class"], status["error_message"], status.get("worker"))

    def _start_finalize(self, call: Call, worker: str) -> None:
        n = self.config.rows_per_task
        for start in range(0, len(call.rows), n):
            rows = call.rows[start : start + n]
            items = [
                {
                    "id": r.row.id,
                    "image_uri": r.row.image_uri,
                    "seed": r.seed,
                    "attempts": r.attempts,
                    "worker": worker,
                    "timings": r.timings,
                }  # fmt: skip
                for r in rows
            ]
            ref = self._finalize.remote(
                items,
                self._backend_ref,
                self.config.output_uri,
                self.config.storage_options,
                self.run_info,
                *call.objects[start : start + n],
            )
            for r in rows:
                r.state = RowState.FINALIZING
            self._finalizing[ref] = rows
            self._n_finalizing += len(rows)

    # ------------------------------------------------------------------ GENERATING -> READY (actor died)
    def _on_actor_lost(self, call: Call, exc: BaseException) -> None:
        self._after_death(self.pool.lost(call, exc))

    def _after_death(self, death: Any) -> None:
        """Rows of a dead actor's unfinished calls go back to READY (oldest first), charged when the
        death was theirs; a row charged ``max_attempts`` times ends failed."""
        if death is None:
            return
        ambiguous = death.charged is None and not death.node_lost and len(death.calls) > 1
        cause = "was lost (node died or unreachable)" if death.node_lost else "lost its worker process"
        n_rows = sum(len(c.rows) for c in death.calls)
        log.warning(
            "generator actor %s (%s) %s; %d row(s) go back to the queue%s: %s",
            death.actor.label, death.actor.worker or "never ready", cause, n_rows,
            " (charged one attempt)" if death.charged else "", str(death.error).splitlines()[0][:300],
        )  # fmt: skip
        for call in reversed(death.calls):
            for r in reversed(call.rows):
                if call is death.charged:
                    r.attempts += 1
                if death.node_lost:
                    r.losses += 1
                if r.losses > self.config.max_attempts:
                    self._fail(
                        r, "WorkerLostError", f"its generator actor was lost {r.losses} times: {death.error}"
                    )
                    continue
                if r.attempts >= self.config.max_attempts:
                    self._fail(
                        r, "WorkerDiedError",
                        f"the generator worker died {r.attempts} times while processing this row "
                        f"(last: {type(death.error).__name__}: {str(death.error)[:300]})",
                    )  # fmt: skip
                    continue
                r.suspect = r.suspect or ambiguous or call is death.charged
                r.state = RowState.READY
                self.stats.retried_rows += 1
                self._ready.appendleft(r)

    # ------------------------------------------------------------------ back to WAITING (objects lost)
    def _on_objects_lost(self, rows: list[_Row], exc: BaseException) -> None:
        """Objects of these rows were lost with a node: fetch and generate them again."""
        for r in rows:
            r.losses += 1
            r.image = None
            if r.losses > self.config.max_attempts:
                self._fail(r, type(exc).__name__, f"objects lost {r.losses} times: {str(exc)[:300]}")
                continue
            r.state = RowState.WAITING
            self.stats.refetched_rows += 1
            self._refetch.append(r)

    # ------------------------------------------------------------------ FINALIZING -> DONE
    def _on_finalized(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        rows = self._finalizing.pop(ref)
        self._n_finalizing -= len(rows)
        try:
            results = ray.get(ref)
        except RayError as exc:
            if _objects_lost(exc):  # the generated objects were on a lost node
                self._on_objects_lost(rows, exc)
                return
            for r in rows:
                self._fail(r, type(exc).__name__, f"finalize task failed: {str(exc)[:500]}")
            return
        for r, result in zip(rows, results):
            self._finish(r, result)

    def _fail(self, r: _Row, error_class: str, message: str, worker: str | None = None) -> None:
        self._finish(
            r,
            result_row(
                r.id,
                "failed",
                image_uri=r.row.image_uri,
                error_class=error_class,
                error_message=message,
                seed=r.seed,
                attempts=r.attempts,
                worker=worker,
                timings=r.timings,
                **self.run_info,
            ),  # fmt: skip
        )

    def _finish(self, r: _Row, result: dict[str, Any]) -> None:
        """DONE: the row's one results row goes to ``on_result``."""
        if r.state is RowState.DONE:
            raise RuntimeError(f"row {r.id} finished twice")  # the invariant every transition keeps
        r.state = RowState.DONE
        r.image = None
        self._active -= 1
        self.stats.rows += 1
        if result["status"] == "ok":
            self.stats.ok += 1
        else:
            self.stats.failed += 1
        self.on_result(result)

    def _collect_pool_stats(self) -> None:
        self.stats.actor_deaths = self.pool.worker_deaths
        self.stats.node_losses = self.pool.node_losses
        self.stats.unattributed_deaths = self.pool.unattributed_deaths
        self.stats.workers = list(self.pool.workers)


def _objects_lost(exc: BaseException) -> bool:
    """True when a task failed because objects it needed were lost (with their node)."""
    from ray.exceptions import ObjectLostError

    return isinstance(exc, ObjectLostError) or isinstance(getattr(exc, "cause", None), ObjectLostError)


def run_batch(
    rows: Iterable[ManifestRow],
    backend: Any,
    config: BatchConfig,
    on_result: Callable[[dict[str, Any]], None],
    *,
    total: int | None = None,
) -> BatchStats:
    """Run every row through the pipeline on the current Ray session: ``BatchDriver(...).run()``.

    ``total`` (the number of rows, when known) is accepted for callers that report progress.
    """
    del total
    return BatchDriver(rows, backend, config, on_result).run()
