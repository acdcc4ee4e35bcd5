"""The output lease (flows.io.lease) on local disk and on the S3 test server: a live lease refuses a
second run, a stale one is taken over, the holder renews it, notices a take-over, and releases it."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from flows.io import storage
from flows.io.lease import LEASE_NAME, LeaseHeldError, LeaseLostError, OutputLease, read_lease

BUCKET = "crm-lease"


@pytest.fixture(scope="module")
def s3_options():
    pytest.importorskip("moto")
    from flows_testutil import moto_s3

    with moto_s3(BUCKET) as opts:
        yield opts


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(output URI, storage options) on local disk or on the S3 test server."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    opts = request.getfixturevalue("s3_options")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/run", opts


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_live_lease_refuses_a_second_run(output):
    uri, so = output
    clock = Clock()
    first = OutputLease(uri, "run-A", so, ttl_s=60, settle_s=0, clock=clock)
    first.acquire()
    clock.t += 59  # still live
    with pytest.raises(
        LeaseHeldError, match=r"in use by another run: run 'run-A' \(holder .+\), expires in 1 s"
    ):
        OutputLease(uri, "run-B", so, ttl_s=60, settle_s=0, clock=clock).acquire()
    assert read_lease(uri, so).run_id == "run-A"
    # the same run (a retried flow run) takes its own lease back
    again = OutputLease(uri, "run-A", so, ttl_s=60, settle_s=0, clock=clock)
    again.acquire()
    assert again.taken_over is None and read_lease(uri, so).token == again.token


def test_stale_lease_is_taken_over_and_its_holder_notices(output):
    uri, so = output
    clock = Clock()
    old = OutputLease(uri, "run-A", so, ttl_s=60, settle_s=0, clock=clock)
    old.acquire()
    clock.t += 61  # run-A stopped renewing: stale
    new = OutputLease(uri, "run-B", so, ttl_s=60, settle_s=0, clock=clock)
    new.acquire()
    assert new.taken_over is not None and new.taken_over.run_id == "run-A"
    assert read_lease(uri, so).run_id == "run-B"
    old.renew()  # the old holder comes back: it must not take the lease back
    assert old.lost and read_lease(uri, so).run_id == "run-B"
    with pytest.raises(LeaseLostError, match="lost its lease to run 'run-B'"):
        old.check()
    old.release()  # not ours any more: left in place
    assert read_lease(uri, so).run_id == "run-B"
    new.release()
    assert read_lease(uri, so) is None


def test_renewal_moves_expiry_and_context_releases(output):
    uri, so = output
    clock = Clock()
    with OutputLease(uri, "run-A", so, ttl_s=30, settle_s=0, clock=clock) as lease:
        first = read_lease(uri, so)
        assert first.expires_at == clock.t + 30
        clock.t += 20
        lease.renew()
        again = read_lease(uri, so)
        assert again.expires_at == clock.t + 30 and again.acquired_at == first.acquired_at
        lease.check()
    assert read_lease(uri, so) is None
    assert not storage.exists(storage.join_uri(uri, LEASE_NAME), so)


def test_background_renewal_keeps_the_lease_alive(tmp_path):
    uri = str(tmp_path / "run")
    with OutputLease(uri, "run-A", ttl_s=0.6, settle_s=0) as lease:
        first = read_lease(uri).expires_at
        threading.Event().wait(0.9)  # more than one renewal period (ttl / 3)
        assert read_lease(uri).expires_at > first
        lease.check()


def test_corrupt_lease_vouches_for_nobody(tmp_path):
    uri = str(tmp_path / "run")
    storage.write_bytes_atomic(storage.join_uri(uri, LEASE_NAME), b"{not json")
    lease = OutputLease(uri, "run-B", ttl_s=60, settle_s=0)
    lease.acquire()
    assert json.loads(storage.read_bytes(storage.join_uri(uri, LEASE_NAME)))["run_id"] == "run-B"


def test_concurrent_acquires_have_one_winner(tmp_path):
    uri = str(tmp_path / "run")
    barrier = threading.Barrier(6)
    outcome: dict[str, str] = {}

    def contend(name: str) -> None:
        lease = OutputLease(uri, name, ttl_s=60, settle_s=0.5)
        barrier.wait()
        try:
            lease.acquire()
            outcome[name] = "won"
        except LeaseHeldError:
            outcome[name] = "refused"

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [n for n, o in outcome.items() if o == "won"]
    assert len(outcome) == 6 and len(winners) == 1, outcome
    assert read_lease(uri).run_id == winners[0]
