"""The Ray job of a batch run: stream manifest rows through fetch -> generate (actors) -> finalize.

Why not Ray Data ``map_batches``: a Ray Data job fails as a whole when an actor task runs out of
retries, and it cannot report "this row failed after 3 attempts" while the others go on. This
driver loop keeps per-row state instead, with the same streaming/backpressure properties:

* **bounded windows**: at most ``prefetch`` images fetched ahead, ``max_inflight_per_actor`` batches
  queued per actor (so the GPU never waits for the driver), and at most ``max_pending_finalize``
  finalize tasks; generation pauses when the CPU stage falls behind (backpressure), so memory is
  bounded whatever the manifest size;
* **batches of K** (``batch_size``) on the generator; a batch whose ``generate`` raises is split and
  its rows retried one by one, so one bad row cannot fail its neighbours;
* **actor death**: the dead actor is replaced (at most ``max_actor_restarts`` times in a run), its
  rows go back to the queue and run on any actor; a row that was on ``max_attempts`` dying actors
  ends as failed (``WorkerDiedError``). Finalize tasks are retried by Ray on worker crashes.

Results are handed to ``on_result`` as they complete (streaming; the caller writes them).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flows.io.manifest import ManifestRow, result_row

__all__ = [
    "BatchConfig",
    "BatchStats",
    "InfrastructureError",
    "ray_session",
    "start_local_ray",
    "run_batch",
    "default_actor_resources",
]


class InfrastructureError(RuntimeError):
    """The cluster cannot run the job (no actor could be kept alive, timeout): worth a retry."""


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
        max_attempts: attempts per row against dying actors before it is marked failed.
        max_actor_restarts: actor replacements allowed in one run before the job gives up
            (``InfrastructureError``).
        max_inflight_per_actor: batches queued on one actor (2: one running, one ready).
        max_pending_finalize: finalize tasks in flight before generation pauses (None: the larger of
            2 batches per actor and 4 x CPUs).
        prefetch: images fetched ahead of the generator (None: 2 x K x actors x in-flight).
        finalize_max_retries: Ray retries of a finalize task whose worker process crashed.
        timeout_s: give up (``InfrastructureError``) when the job runs longer than this.
    """

    output_uri: str
    storage_options: dict[str, Any] | None = None
    batch_size: int = 4
    num_actors: int | None = None
    num_gpus_per_actor: float | None = None
    actor_num_cpus: float | None = None
    task_num_cpus: float = 0.25
    max_attempts: int = 3
    max_actor_restarts: int = 8
    max_inflight_per_actor: int = 2
    max_pending_finalize: int | None = None
    prefetch: int | None = None
    finalize_max_retries: int = 2
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")


@dataclass
class BatchStats:
    """Counts of one run (``ok + failed == rows``)."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    actor_deaths: int = 0
    retried_rows: int = 0
    split_batches: int = 0
    generate_calls: int = 0
    seconds: float = 0.0
    workers: list[str] = field(default_factory=list)


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


_OPTIONAL_DEPS = "ray.dashboard.optional_deps"


@contextlib.contextmanager
def _minimal_node_agent() -> Iterator[None]:
    """Start the node's dashboard agent in minimal mode (no metrics/job-API modules).

    Ray decides this by importing ``ray.dashboard.optional_deps`` while it builds the agent's command
    line; hiding the module for the duration of ``ray.init`` selects minimal mode. On small, busy
    machines the full agent can take longer to start than the raylet waits for it (15 s), which
    aborts the raylet.
    """
    saved = sys.modules.get(_OPTIONAL_DEPS, _OPTIONAL_DEPS)
    sys.modules[_OPTIONAL_DEPS] = None  # type: ignore[assignment]  # makes the import fail
    try:
        yield
    finally:
        if saved is _OPTIONAL_DEPS:
            sys.modules.pop(_OPTIONAL_DEPS, None)
        else:
            sys.modules[_OPTIONAL_DEPS] = saved


@contextlib.contextmanager
def _fixed_agent_ports() -> Iterator[None]:
    """Give the node's agents fixed free ports, so the raylet does not wait for their port files.

    With port 0 (Ray's default) the raylet blocks up to 15 s per agent port file and aborts when
    an agent starts slower than that (a busy small machine). With explicit ports it starts at once
    and the agents come up in their own time. Falls back to Ray's behaviour if its internals moved.
    """
    import socket

    try:
        from ray._private import parameter, ray_constants, services

        orig_init = parameter.RayParams.__init__
        orig_start = services.start_ray_process
        raylet = ray_constants.PROCESS_TYPE_RAYLET
    except (ImportError, AttributeError):  # pragma: no cover - other Ray versions
        yield
        return
    ports: dict[str, int] = {}
    for name in (
        "metrics_agent_port",
        "metrics_export_port",
        "runtime_env_agent_port",
        "dashboard_agent_listen_port",
    ):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]

    def params_init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        for name, port in ports.items():
            if not kwargs.get(name):
                setattr(self, name, port)

    def start_process(command, process_type, *args, **kwargs):
        if process_type == raylet:
            command = [*command, f"--dashboard_agent_listen_port={ports['dashboard_agent_listen_port']}"]
        return orig_start(command, process_type, *args, **kwargs)

    parameter.RayParams.__init__ = params_init
    services.start_ray_process = start_process
    try:
        yield
    finally:
        parameter.RayParams.__init__ = orig_init
        services.start_ray_process = orig_start


def start_local_ray(num_cpus: int | None = None, minimal: bool = True, attempts: int = 3) -> None:
    """Start a local Ray node bound to 127.0.0.1, without dashboard.

    ``minimal`` (default) starts the node agent in minimal mode with fixed ports, which keeps the
    start reliable on small busy machines (see :func:`_fixed_agent_ports`). A start that still times
    out is retried; the processes of a failed start are stopped.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            with contextlib.ExitStack() as stack:
                if minimal:
                    stack.enter_context(_minimal_node_agent())
                    stack.enter_context(_fixed_agent_ports())
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    ignore_reinit_error=True,
                    log_to_driver=False,
                    _node_ip_address="127.0.0.1",  # a local node never listens beyond loopback
                )
            return
        except Exception as exc:  # Ray raises a bare Exception when its processes start too slowly
            with contextlib.suppress(Exception):
                ray.shutdown()
            _stop_children(_child_pids() - before)  # a failed start leaves its GCS/dashboard processes behind
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise InfrastructureError(f"could not start a local Ray node: {exc}") from exc


def _child_pids() -> set[int]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with ray[default]
        return set()
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_children(pids: set[int]) -> None:
    """Terminate (then kill) the given child processes of this process."""
    if not pids:
        return
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray session, connect to ``address``, or start a local one (then stop it).

    A local node binds to 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and runs no
    dashboard. ``address="auto"`` or ``"ray://host:10001"`` connect to an existing cluster (with token
    authentication, set ``RAY_AUTH_MODE=token`` and the cluster's token, see docs/batch.md).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        start_local_ray(num_cpus=num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class _Item:
    row: ManifestRow
    seed: int
    attempts: int = 0
    image_ref: Any = None
    isolate: bool = False
    input_info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Slot:
    index: int
    generation: int
    handle: Any
    inflight: int = 0


def run_batch(
    rows: Iterable[ManifestRow],
    backend: Any,
    config: BatchConfig,
    on_result: Callable[[dict[str, Any]], None],
    *,
    total: int | None = None,
) -> BatchStats:
    """Run every row through the pipeline on the current Ray session (see :func:`ray_session`).

    Args:
        rows: manifest rows to do (rows with ``problem`` set are reported failed without work).
        backend: ``flows.ray_job.backends.CRMBackend`` or a fake with the same interface.
        config: windows, actors and retry limits.
        on_result: called in the driver with each finished results row (dict, see
            ``flows.io.manifest.result_row``), in completion order; exactly once per row.
        total: number of rows, if known (for progress only).
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError

    from flows.ray_job.backends import identity_json
    from flows.ray_job.workers import GeneratorActor, finalize_object, prepare_image

    started = time.monotonic()
    stats = BatchStats()
    run_info = {
        "weights_identity": identity_json(backend.weights_identity()),
        "options_hash": backend.options_hash(),
    }
    default_seed = int(backend.default_seed())
    so = config.storage_options
    k = config.batch_size

    cluster = ray.cluster_resources()
    n_actors, num_gpus, actor_cpus = default_actor_resources(config, cluster)
    cluster_cpus = float(cluster.get("CPU", 1.0))
    max_fin = config.max_pending_finalize or max(2 * k * n_actors, int(4 * cluster_cpus))
    prefetch = config.prefetch or max(2 * k, 2 * k * n_actors * config.max_inflight_per_actor)

    actor_cls = ray.remote(GeneratorActor).options(
        num_cpus=actor_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0
    )
    prepare = ray.remote(prepare_image).options(num_cpus=config.task_num_cpus, num_returns=2, max_retries=2)
    finalize = ray.remote(finalize_object).options(
        num_cpus=config.task_num_cpus, max_retries=config.finalize_max_retries
    )
    backend_ref = ray.put(backend)
    generations = 0

    def new_actor(index: int) -> _Slot:
        nonlocal generations
        generations += 1
        return _Slot(
            index=index,
            generation=generations,
            handle=actor_cls.remote(backend_ref, f"gen{index}.{generations}"),
        )

    slots: list[_Slot] = []  # created on first dispatch: a run with nothing to generate loads no model

    def emit(row: dict[str, Any]) -> None:
        stats.rows += 1
        if row["status"] == "ok":
            stats.ok += 1
        else:
            stats.failed += 1
        if row.get("worker") and row["worker"] not in stats.workers:
            stats.workers.append(row["worker"])
        on_result(row)

    def fail(item: _Item, error_class: str, message: str, worker: str | None = None) -> None:
        emit(
            result_row(
                item.row.id if item.row.id is not None else f"<row {item.row.index}>",
                "failed",
                image_uri=item.row.image_uri,
                error_class=error_class,
                error_message=message,
                seed=item.seed,
                attempts=item.attempts,
                worker=worker,
                timings=item.timings,
                **run_info,
            )  # fmt: skip
        )

    source = iter(rows)
    exhausted = False
    prep_inflight: dict[Any, _Item] = {}
    ready: collections.deque[_Item] = collections.deque()
    # status ref -> (slot, actor generation, submission number, rows, object refs)
    gen_inflight: dict[Any, tuple[_Slot, int, int, list[_Item], list[Any]]] = {}
    executing: dict[int, int] = {}  # dead actor generation -> submission number it was running
    submissions = 0
    fin_inflight: dict[Any, _Item] = {}

    def fill_prefetch() -> None:
        nonlocal exhausted
        while not exhausted and len(prep_inflight) + len(ready) < prefetch:
            try:
                row = next(source)
            except StopIteration:
                exhausted = True
                return
            item = _Item(row=row, seed=int(row.seed) if row.seed is not None else default_seed)
            if row.problem is not None:
                fail(item, "InvalidRow", row.problem)
                continue
            status_ref, image_ref = prepare.remote(row.image_uri, so, backend_ref)
            item.image_ref = image_ref
            prep_inflight[status_ref] = item

    def take_batch() -> list[_Item]:
        if ready and ready[0].isolate:
            return [ready.popleft()]
        batch: list[_Item] = []
        while ready and len(batch) < k and not ready[0].isolate:
            batch.append(ready.popleft())
        return batch

    def dispatch() -> None:
        nonlocal submissions
        if ready and not slots:
            slots.extend(new_actor(i) for i in range(n_actors))
        progress = True
        while progress and ready:
            progress = False
            for slot in sorted(slots, key=lambda s: s.inflight):
                if fin_inflight and len(fin_inflight) + k > max_fin:
                    return  # backpressure: the CPU stage is behind
                if not ready or slot.inflight >= config.max_inflight_per_actor:
                    continue
                input_done = exhausted and not prep_inflight
                if len(ready) < k and not input_done and not ready[0].isolate:
                    return  # wait for a full batch while images are still coming
                batch = take_batch()
                refs = slot.handle.generate.options(num_returns=len(batch) + 1).remote(
                    [it.row.id for it in batch],
                    [it.seed for it in batch],
                    [it.input_info for it in batch],
                    *[it.image_ref for it in batch],
                )
                submissions += 1
                slot.inflight += 1
                stats.generate_calls += 1
                gen_inflight[refs[0]] = (slot, slot.generation, submissions, batch, list(refs[1:]))
                progress = True

    def on_actor_death(
        slot: _Slot, generation: int, seq: int, batch: list[_Item], exc: BaseException
    ) -> None:
        if slots[slot.index].generation == generation:  # first report of this death: replace the actor
            # the actor runs its calls in order: the oldest call that did not finish is the one it died in
            # (calls of a dead actor resolve quickly: wait for them to tell finished from failed ones)
            same = {r: v[2] for r, v in gen_inflight.items() if v[1] == generation}
            if same:
                ray.wait(list(same), num_returns=len(same), timeout=10.0)
            unfinished = [seq]
            for other_ref, other_seq in same.items():
                try:
                    # a finished call's result may still be in transit: a zero timeout would count it
                    # as unfinished and charge the wrong batch
                    ray.get(other_ref, timeout=10.0)
                    continue  # finished before the death; its result is handled in turn
                except (RayActorError, GetTimeoutError):
                    unfinished.append(other_seq)
                except RayError:
                    continue
            executing[generation] = min(unfinished)
            stats.actor_deaths += 1
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
            if stats.actor_deaths > config.max_actor_restarts:
                raise InfrastructureError(
                    f"{stats.actor_deaths} generator actor deaths (limit {config.max_actor_restarts}); "
                    f"last: {type(exc).__name__}: {str(exc)[:500]}"
                ) from exc
            fresh = new_actor(slot.index)
            slots[slot.index] = fresh
        charged = executing.get(generation) == seq  # rows merely queued behind it are not charged
        for it in reversed(batch):
            it.attempts += 1 if charged else 0
            if it.attempts >= config.max_attempts:
                fail(
                    it, "WorkerDiedError",
                    f"the generator worker died {it.attempts} times while processing this row "
                    f"(last: {type(exc).__name__}: {str(exc)[:300]})",
                )  # fmt: skip
            else:
                stats.retried_rows += 1
                ready.appendleft(it)

    def handle_generate(ref: Any) -> None:
        slot, generation, seq, batch, obj_refs = gen_inflight.pop(ref)
        slot.inflight -= 1
        try:
            status = ray.get(ref)
        except RayActorError as exc:
            on_actor_death(slot, generation, seq, batch, exc)
            return
        if not status["ok"]:
            if len(batch) > 1:
                stats.split_batches += 1
                for it in reversed(batch):
                    it.isolate = True
                    ready.appendleft(it)
                return
            it = batch[0]
            it.attempts += 1
            fail(it, status["error_class"], status["error_message"], status.get("worker"))
            return
        per_obj = status["seconds"] / len(batch)
        for it, obj_ref in zip(batch, obj_refs):
            it.attempts += 1
            it.timings["generate"] = per_obj
            item = {
                "id": it.row.id, "image_uri": it.row.image_uri, "seed": it.seed, "attempts": it.attempts,
                "worker": status["worker"], "timings": it.timings,
            }  # fmt: skip
            it.image_ref = None
            fin_inflight[finalize.remote(item, backend_ref, obj_ref, config.output_uri, so, run_info)] = it

    def handle_prepare(ref: Any) -> None:
        it = prep_inflight.pop(ref)
        try:
            status = ray.get(ref)
        except RayError as exc:  # the fetch task's worker crashed beyond its retries
            status = {"ok": False, "error_class": type(exc).__name__, "error_message": str(exc)[:500]}
        if not status["ok"]:
            it.attempts = 1
            it.image_ref = None
            fail(
                it, status["error_class"], f"cannot read image {it.row.image_uri}: {status['error_message']}"
            )
            return
        it.timings.update(status.get("timings") or {"fetch": status["seconds"]})
        it.input_info = status.get("input_info") or {}
        ready.append(it)

    def handle_finalize(ref: Any) -> None:
        it = fin_inflight.pop(ref)
        try:
            row = ray.get(ref)
        except RayError as exc:
            fail(it, type(exc).__name__, f"finalize task failed: {str(exc)[:500]}")
            return
        emit(row)

    try:
        while True:
            fill_prefetch()
            dispatch()
            pending = list(prep_inflight) + list(gen_inflight) + list(fin_inflight)
            if not pending:
                if exhausted and not ready:
                    break
                if ready and not any(s.inflight for s in slots):
                    raise InfrastructureError("rows are ready but no generator actor accepts work")
                continue
            if config.timeout_s is not None and time.monotonic() - started > config.timeout_s:
                raise InfrastructureError(f"batch job exceeded its timeout of {config.timeout_s} s")
            first, _ = ray.wait(pending, num_returns=1, timeout=1.0, fetch_local=False)
            if not first:
                continue
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            done = done or first
            for ref in done:
                if ref in gen_inflight:
                    handle_generate(ref)
                elif ref in fin_inflight:
                    handle_finalize(ref)
                elif ref in prep_inflight:
                    handle_prepare(ref)
    except GetTimeoutError as exc:
        raise InfrastructureError(f"Ray call timed out: {exc}") from exc
    finally:
        for slot in slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
    stats.seconds = time.monotonic() - started
    return stats
