"""The generator actor pool's rules (flows.ray_job.actor_pool) without a cluster: who is charged for
a death, when a dead actor's rows are nobody's fault, the crash-loop limit, and which actor gets a
call. Stand-in handles replace Ray actors; the end-to-end behaviour is in test_flows and test_cluster."""

from __future__ import annotations

import pytest

from flows.ray_job.actor_pool import ActorPool, ActorState, Call, charged_call
from flows.ray_job.session import InfrastructureError


class _Method:
    def __init__(self, name: str):
        self.name = name
        self.calls = 0

    def options(self, **kwargs):
        return self

    def remote(self, *args):
        self.calls += 1
        if self.name == "generate":
            return [object() for _ in range(len(args[0]) + 1)]  # status + one result per row
        return object()


class _Handle:
    def __init__(self):
        self.info = _Method("info")
        self.generate = _Method("generate")


class _ActorClass:
    def remote(self, backend_ref, label):
        return _Handle()


def _pool(size: int = 2, max_inflight: int = 2, max_restarts: int = 3) -> ActorPool:
    pool = ActorPool(_ActorClass(), object(), size, max_inflight, max_restarts)
    pool.start()
    for actor in pool.slots:
        actor.state = ActorState.READY  # as if each had answered its probe
    return pool


def _call(pool: ActorPool, slot: int, rows: list[str]) -> Call:
    actor = pool.slots[slot]
    return pool.submit(actor, rows, (rows, [0] * len(rows), [{}] * len(rows)), exclusive=False)


def test_charged_call_rule():
    a, b = object(), object()
    assert charged_call([a], node_lost=False) is a
    assert charged_call([a, b], node_lost=False) is None  # which one killed it is unknown
    assert charged_call([a], node_lost=True) is None  # a lost node is no row's fault
    assert charged_call([], node_lost=False) is None


def test_worker_death_with_one_unfinished_call_charges_it_and_replaces_the_actor():
    pool = _pool()
    call = _call(pool, 0, ["r1", "r2"])
    pool.take(call.status_ref)
    death = pool._died(pool.slots[0], RuntimeError("worker process died"), [call])
    assert death.charged is call and not death.node_lost and death.calls == [call]
    assert pool.worker_deaths == 1 and pool.unattributed_deaths == 0 and pool.node_losses == 0
    fresh = pool.slots[0]
    assert fresh is not death.actor and fresh.state is ActorState.STARTING and fresh.label == "gen0.3"
    assert death.actor.state is ActorState.DEAD


def test_ambiguous_worker_death_charges_nobody():
    pool = _pool()
    first, second = _call(pool, 1, ["a"]), _call(pool, 1, ["b"])
    for c in (first, second):
        pool.take(c.status_ref)
    death = pool._died(pool.slots[1], RuntimeError("worker process died"), [first, second])
    assert death.charged is None and pool.unattributed_deaths == 1 and pool.worker_deaths == 1


def test_node_loss_charges_nobody_and_does_not_count_as_a_crash():
    pool = _pool(max_restarts=0)
    call = _call(pool, 0, ["a"])
    pool.take(call.status_ref)
    exc = RuntimeError("The actor died because its node has died. Node Id: abc")
    death = pool._died(pool.slots[0], exc, [call])  # max_restarts=0: a crash would raise here
    assert death.node_lost and death.charged is None
    assert pool.node_losses == 1 and pool.worker_deaths == 0


def test_crash_loop_ends_in_infrastructure_error():
    pool = _pool(size=1, max_restarts=2)
    for _ in range(2):
        pool._died(pool.slots[0], RuntimeError("segfault"), [])
    with pytest.raises(
        InfrastructureError, match=r"3 generator worker deaths \(limit 2\); last: RuntimeError: segfault"
    ):
        pool._died(pool.slots[0], RuntimeError("segfault"), [])


def test_pick_prefers_the_least_busy_ready_actor_and_idles_for_exclusive_calls():
    pool = _pool(size=3, max_inflight=2)
    pool.slots[2].state = ActorState.STARTING  # waiting for resources: never picked
    _call(pool, 0, ["a"])
    assert pool.pick(exclusive=False) is pool.slots[1]
    _call(pool, 1, ["b"])
    _call(pool, 1, ["c"])
    assert pool.pick(exclusive=False) is pool.slots[0]  # slot 1 is full
    assert pool.pick(exclusive=True) is None  # no idle ready actor
    _call(pool, 0, ["d"])
    assert pool.pick(exclusive=False) is None
    suspect = pool.slots[2]
    suspect.state = ActorState.READY
    assert pool.pick(exclusive=True) is suspect
    pool.submit(suspect, ["s"], (["s"], [0], [{}]), exclusive=True)
    assert pool.pick(exclusive=False) is None  # an actor running a suspect takes nothing else
