"""Who may write an output folder: a lease object that one run holds, renews, and releases.

``<output_uri>/lease.json`` (any fsspec storage)::

    {"run_id": "...", "holder": "host:pid", "token": "<random>", "acquired_at": <epoch s>,
     "renewed_at": <epoch s>, "expires_at": <epoch s>, "ttl_s": 120.0}

* **acquire**: a lease held by another run that has not expired refuses the new run
  (:class:`LeaseHeldError`, naming the run, its holder and when it expires); a missing or expired
  (stale) lease is taken over; the same ``run_id`` (a retried flow run) takes its own lease back.
* **renew**: while the run runs, a background thread pushes ``expires_at`` forward every
  ``ttl_s / 3``. A holder that finds the lease taken over (it could not renew in time and another run
  took it as stale) marks itself lost; :meth:`OutputLease.check` then raises :class:`LeaseLostError`.
* **release**: the lease object is deleted if it is still ours.

Object stores have no compare-and-swap that every S3-compatible server offers, so acquiring is
write, wait ``settle_s``, read back: of two runs that both saw no live lease, the one whose write
landed last holds it, and the other reads back a foreign token and refuses. This holds whenever a
competitor's read-to-write gap (one request) is shorter than ``settle_s`` (1 s by default). Expiry
uses the UTC clocks of the machines involved (NTP-synchronised clocks assumed).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from flows.io import storage

__all__ = ["LEASE_NAME", "LeaseHeldError", "LeaseInfo", "LeaseLostError", "OutputLease", "read_lease"]

LEASE_NAME = "lease.json"


class LeaseHeldError(RuntimeError):
    """Another live run holds the output folder."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over by another run (it was not renewed in time)."""


@dataclass(frozen=True)
class LeaseInfo:
    """The content of a lease object (times are UTC epoch seconds)."""

    run_id: str
    holder: str
    token: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float

    def describe(self, now: float) -> str:
        until = datetime.fromtimestamp(self.expires_at, timezone.utc).isoformat(timespec="seconds")
        left = self.expires_at - now
        when = f"expires in {left:.0f} s ({until})" if left > 0 else f"expired {-left:.0f} s ago ({until})"
        return f"run {self.run_id!r} (holder {self.holder}), {when}"


def read_lease(output_uri: str, storage_options: dict[str, Any] | None = None) -> LeaseInfo | None:
    """The lease of an output folder, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(storage.read_bytes(storage.join_uri(output_uri, LEASE_NAME), storage_options))
        return LeaseInfo(**{k: data[k] for k in LeaseInfo.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a corrupt lease vouches for nobody


class OutputLease:
    """The lease of one run on one output folder; a context manager that acquires, renews in the
    background, and releases::

        with OutputLease("s3://b/run", run_id=flow_run_id) as lease:
            ...  # call lease.check() now and then: raises LeaseLostError if another run took over

    Args:
        output_uri: the output folder; the lease is ``<output_uri>/lease.json``.
        run_id: this run (a Prefect flow run id); the same id re-acquires its own lease.
        storage_options: fsspec options of the output storage.
        ttl_s: seconds a lease stays valid without renewal (a crashed run blocks the folder this long).
        settle_s: wait between writing the lease and reading it back (see the module docstring).
        clock: UTC epoch seconds (tests pass a fake clock).
    """

    def __init__(
        self,
        output_uri: str,
        run_id: str,
        storage_options: dict[str, Any] | None = None,
        ttl_s: float = 120.0,
        settle_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.output_uri = output_uri
        self.uri = storage.join_uri(output_uri, LEASE_NAME)
        self.run_id = run_id
        self.storage_options = storage_options
        self.ttl_s = ttl_s
        self.settle_s = settle_s
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.acquired_at: float | None = None
        self.taken_over: LeaseInfo | None = None
        self._lost: LeaseInfo | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / renew / release
    def acquire(self) -> LeaseInfo:
        """Take the lease (see the module docstring); returns what was written. Raises
        :class:`LeaseHeldError` when another live run holds it."""
        now = self.clock()
        current = read_lease(self.output_uri, self.storage_options)
        if current is not None and current.run_id != self.run_id and current.expires_at > now:
            raise LeaseHeldError(self._held_message(current, now))
        if current is not None and current.run_id != self.run_id:
            self.taken_over = current  # stale: its run stopped renewing it
        mine = self._write(now, acquired_at=now)
        if self.settle_s:
            time.sleep(self.settle_s)
        back = read_lease(self.output_uri, self.storage_options)
        if back is None or back.token != self.token:
            if back is not None:
                raise LeaseHeldError(self._held_message(back, self.clock()))
            raise LeaseHeldError(
                f"{self.output_uri}: the lease written by this run disappeared (a competing run?)"
            )
        self.acquired_at = now
        return mine

    def renew(self) -> None:
        """Push the expiry forward, or mark the lease lost when another run holds it now."""
        current = read_lease(self.output_uri, self.storage_options)
        if current is not None and current.token != self.token:
            self._lost = current
            return
        self._write(self.clock(), acquired_at=self.acquired_at)

    def release(self) -> None:
        """Delete the lease object if it is still ours."""
        current = read_lease(self.output_uri, self.storage_options)
        if current is not None and current.token == self.token:
            storage.remove(self.uri, self.storage_options)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when another run took the lease over."""
        if self._lost is not None:
            raise LeaseLostError(
                f"{self.output_uri}: this run ({self.run_id!r}) lost its lease to "
                f"{self._lost.describe(self.clock())}; it could not renew within {self.ttl_s:.0f} s"
            )

    @property
    def lost(self) -> bool:
        return self._lost is not None

    # ------------------------------------------------------------------ background renewal
    def start_renewing(self) -> None:
        """Renew every ``ttl_s / 3`` seconds in a daemon thread until :meth:`stop_renewing`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="crm-lease", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.ttl_s, 10.0))
            self._thread = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with contextlib.suppress(Exception):  # a transient storage error: try again next period
                self.renew()
            if self._lost is not None:
                return

    def __enter__(self) -> OutputLease:
        self.acquire()
        self.start_renewing()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop_renewing()
        with contextlib.suppress(Exception):  # an expired lease is as good as released
            self.release()

    # ------------------------------------------------------------------ helpers
    def _write(self, now: float, acquired_at: float | None) -> LeaseInfo:
        info = LeaseInfo(
            run_id=self.run_id,
            holder=self.holder,
            token=self.token,
            acquired_at=acquired_at if acquired_at is not None else now,
            renewed_at=now,
            expires_at=now + self.ttl_s,
            ttl_s=self.ttl_s,
        )
        storage.write_bytes_atomic(
            self.uri, json.dumps(asdict(info), sort_keys=True).encode(), self.storage_options
        )
        return info

    def _held_message(self, current: LeaseInfo, now: float) -> str:
        return (
            f"{self.output_uri} is in use by another run: {current.describe(now)}. Wait for it to finish, "
            f"or write to another output_uri; a run that died leaves its lease behind, and it is taken "
            f"over once expired (lease: {self.uri})"
        )
