"""The generator actors of one batch job: their states, their calls, and what a death means.

An actor is ``STARTING`` from its creation until it answers its readiness probe (``info()``: it is
placed on a node and has loaded its models), then ``READY`` (it accepts ``generate`` calls), then
``DEAD``. Only ``READY`` actors get work, so an actor that waits for resources that are not there
(its node was lost and no GPU is left) holds no rows; it is placed whenever resources return
(autoscaling) and joins in then.

A dead actor is replaced at once in its slot. What its death means for the rows it held:

* **it was lost**: its node died (the node is no longer alive, or Ray says so), or the connection to
  it broke (``ActorUnavailableError``: Ray cannot tell whether its calls ran; this is how a node loss
  first shows, before the cluster has declared the node dead). No row is to blame; every row of its
  unfinished calls runs again elsewhere, uncharged;
* **its worker process died** (OOM kill, segfault, a crashing row): when exactly one of its calls
  was unfinished, that call's rows were running when it died and each is charged one attempt.
  When several were unfinished, the driver cannot tell which call killed it: Ray reports a call
  that finished just before the crash as failed too when its reply was lost with the process. None
  is charged; their rows become *suspects*, each retried alone on an idle actor (``exclusive``:
  nothing else queued on it), where a death is unambiguous.

Deaths of worker processes are limited per run (``max_restarts``: a crash loop ends in
:class:`InfrastructureError`); losses are not, the cluster decides how many nodes it has.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.ray_job.session import InfrastructureError

__all__ = ["ActorState", "PooledActor", "Call", "Death", "ActorPool", "charged_call"]

_DEATH_SETTLE_S = 10.0  # how long the other calls of a dead actor get to report how they ended


class ActorState(enum.Enum):
    STARTING = "starting"  # created; waiting for resources or loading its models
    READY = "ready"  # answered its probe: accepts generate calls
    DEAD = "dead"


@dataclass(eq=False)
class PooledActor:
    """One generator actor of the pool.

    Attributes:
        slot: its place in the pool (a replacement takes the slot of the actor it replaces).
        generation: creation number in this run (1, 2, ...), part of its label ``gen<slot>.<generation>``.
        handle: the Ray actor handle.
        probe: ``info()`` reference while ``STARTING``.
        node_id: Ray node it runs on (known once ``READY``).
        worker: its label in the results' ``worker`` column (known once ``READY``).
        calls: in-flight calls, in submission order.
        exclusive: it runs a suspect's call and takes no other work until that call ends.
    """

    slot: int
    generation: int
    handle: Any
    probe: Any
    state: ActorState = ActorState.STARTING
    node_id: str | None = None
    worker: str | None = None
    created_at: float = field(default_factory=time.monotonic)
    calls: dict[Any, Call] = field(default_factory=dict)
    exclusive: bool = False

    @property
    def label(self) -> str:
        return f"gen{self.slot}.{self.generation}"


@dataclass(eq=False)
class Call:
    """One ``generate`` call: ``rows`` (the driver's, opaque here) and one result reference per row."""

    seq: int
    actor: PooledActor
    status_ref: Any
    rows: list[Any]
    objects: list[Any]


@dataclass
class Death:
    """What an actor death means for its rows (see the module docstring).

    Attributes:
        actor: the dead actor.
        calls: its calls that did not finish, oldest first (their rows must run again).
        charged: the call whose rows are charged one attempt, or None.
        node_lost: the actor was lost with its node or became unreachable (no row is to blame).
        error: the exception that reported the death.
    """

    actor: PooledActor
    calls: list[Call]
    charged: Call | None
    node_lost: bool
    error: BaseException


def charged_call(unfinished: list[Call], node_lost: bool) -> Call | None:
    """The call whose rows a death is charged to: the only unfinished call of an actor whose worker
    process died; None when its node died or several calls were unfinished (see the module docstring)."""
    return unfinished[0] if not node_lost and len(unfinished) == 1 else None


class ActorPool:
    """``size`` generator actors kept alive for one run.

    Args:
        actor_cls: ``ray.remote(GeneratorActor).options(...)`` (resources per actor).
        backend_ref: object reference of the backend the actors load.
        size: actors to keep (one per slot).
        max_inflight: calls queued on one actor (one running, the rest ready to start).
        max_restarts: worker-process deaths allowed in the run before :class:`InfrastructureError`.
    """

    def __init__(self, actor_cls: Any, backend_ref: Any, size: int, max_inflight: int, max_restarts: int):
        self.actor_cls = actor_cls
        self.backend_ref = backend_ref
        self.size = size
        self.max_inflight = max_inflight
        self.max_restarts = max_restarts
        self.slots: list[PooledActor] = []
        self.generations = 0
        self.seq = 0
        self.worker_deaths = 0
        self.node_losses = 0
        self.unattributed_deaths = 0
        self.workers: list[str] = []
        self._probes: dict[Any, PooledActor] = {}
        self._calls: dict[Any, Call] = {}

    # ------------------------------------------------------------------ actors
    def start(self) -> None:
        """Create the actors (once; a run with nothing to generate creates none)."""
        if not self.slots:
            self.slots = [self._create(i) for i in range(self.size)]

    def _create(self, slot: int) -> PooledActor:
        self.generations += 1
        handle = self.actor_cls.remote(self.backend_ref, f"gen{slot}.{self.generations}")
        actor = PooledActor(slot=slot, generation=self.generations, handle=handle, probe=handle.info.remote())
        self._probes[actor.probe] = actor
        return actor

    def on_probe(self, ref: Any) -> Death | None:
        """A readiness probe answered: the actor is ``READY``, or it died while starting."""
        import ray
        from ray.exceptions import RayActorError, RayError

        actor = self._probes.pop(ref)
        actor.probe = None
        if actor.state is ActorState.DEAD:
            return None
        try:
            info = ray.get(ref)
        except (RayActorError, RayError) as exc:
            return self._died(actor, exc, [])
        actor.state = ActorState.READY
        actor.node_id = info.get("node_id")
        actor.worker = info.get("worker")
        if actor.worker and actor.worker not in self.workers:
            self.workers.append(actor.worker)
        return None

    @property
    def ready(self) -> list[PooledActor]:
        return [a for a in self.slots if a.state is ActorState.READY]

    @property
    def starting(self) -> list[PooledActor]:
        return [a for a in self.slots if a.state is ActorState.STARTING]

    def pick(self, exclusive: bool) -> PooledActor | None:
        """The ``READY`` actor with the fewest calls that can take one more (an idle one for an
        exclusive call), or None."""
        best: PooledActor | None = None
        for actor in self.slots:
            if actor.state is not ActorState.READY or actor.exclusive:
                continue
            n = len(actor.calls)
            if (exclusive and n) or n >= self.max_inflight:
                continue
            if best is None or n < len(best.calls):
                best = actor
        return best

    # ------------------------------------------------------------------ calls
    def submit(self, actor: PooledActor, rows: list[Any], args: Sequence[Any], exclusive: bool) -> Call:
        """``actor.generate(*args)`` with one result per row plus the status; returns the call."""
        refs = actor.handle.generate.options(num_returns=len(rows) + 1).remote(*args)
        self.seq += 1
        call = Call(seq=self.seq, actor=actor, status_ref=refs[0], rows=rows, objects=list(refs[1:]))
        actor.calls[refs[0]] = call
        actor.exclusive = exclusive
        self._calls[refs[0]] = call
        return call

    def take(self, ref: Any) -> Call:
        """Remove a call whose status reference resolved (finished or failed)."""
        call = self._calls.pop(ref)
        call.actor.calls.pop(ref, None)
        if not call.actor.calls:
            call.actor.exclusive = False
        return call

    def waitables(self) -> list[Any]:
        """References the driver waits on: probes and call statuses."""
        return [*self._probes, *self._calls]

    def is_probe(self, ref: Any) -> bool:
        return ref in self._probes

    def is_call(self, ref: Any) -> bool:
        return ref in self._calls

    # ------------------------------------------------------------------ deaths
    def lost(self, call: Call, exc: BaseException) -> Death:
        """The call ``call`` (already taken) failed because its actor is gone: settle what its death
        means (see the module docstring), replace the actor, and return the rows' fate."""
        actor = call.actor
        if actor.state is ActorState.DEAD:  # its death was settled when its first call reported it
            return Death(actor, [call], None, False, exc)
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        others = list(actor.calls.values())
        unfinished = [call]
        if _node_lost(actor, exc):
            # nobody is charged: every call still in flight runs again (a result that was on its way
            # is dropped with its call; the row's outputs are then written once more, identically)
            unfinished += [self.take(other.status_ref) for other in others]
            return self._died(actor, exc, sorted(unfinished, key=lambda c: c.seq), node_lost=True)
        if others:
            # the actor's other calls resolve quickly once its process is dead; a finished call's
            # result may still be in transit, so a zero timeout would count it as unfinished
            ray.wait([c.status_ref for c in others], num_returns=len(others), timeout=_DEATH_SETTLE_S)
            for other in others:
                try:
                    ray.get(other.status_ref, timeout=_DEATH_SETTLE_S)
                    continue  # it finished before the death: the driver handles its result in turn
                except (RayActorError, GetTimeoutError):
                    unfinished.append(self.take(other.status_ref))
                except RayError:
                    continue  # some other failure of that call: handled in turn
        unfinished.sort(key=lambda c: c.seq)
        return self._died(actor, exc, unfinished)

    def _died(
        self, actor: PooledActor, exc: BaseException, unfinished: list[Call], node_lost: bool | None = None
    ) -> Death:
        actor.state = ActorState.DEAD
        node_lost = _node_lost(actor, exc) if node_lost is None else node_lost
        charged = charged_call(unfinished, node_lost)
        if node_lost:
            self.node_losses += 1
        else:
            self.worker_deaths += 1
            self.unattributed_deaths += len(unfinished) > 1
        _kill(actor)
        if self.worker_deaths > self.max_restarts:
            raise InfrastructureError(
                f"{self.worker_deaths} generator worker deaths (limit {self.max_restarts}); "
                f"last: {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc
        self.slots[actor.slot] = self._create(actor.slot)
        return Death(actor, unfinished, charged, node_lost, exc)

    def shutdown(self) -> None:
        """Kill every actor of the pool (live, starting or waiting for resources)."""
        for actor in self.slots:
            _kill(actor)
        self._probes.clear()
        self._calls.clear()


def _kill(actor: PooledActor) -> None:
    """Kill the actor (no restart); nothing without a Ray session (Ray would start one to do it)."""
    import ray

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.kill(actor.handle, no_restart=True)


def _node_alive(actor: PooledActor) -> bool:
    import ray

    if not ray.is_initialized():
        return True
    try:
        return any(n.get("NodeID") == actor.node_id and n.get("Alive") for n in ray.nodes())
    except Exception:  # noqa: BLE001 - the GCS is unreachable: treat the node as alive (charge normally)
        return True


def _node_lost(actor: PooledActor, exc: BaseException) -> bool:
    """True when the actor was lost rather than crashed: unreachable, its node died (Ray says so), or
    its node is no longer alive."""
    from ray.exceptions import ActorUnavailableError

    if isinstance(exc, ActorUnavailableError) or "its node has died" in str(exc):
        return True
    return actor.node_id is not None and not _node_alive(actor)
