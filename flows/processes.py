"""Processes we start and must stop: signals into exceptions, bounded stops, no orphan left behind.

* :func:`stop_process` stops one child's process group: SIGINT, then SIGTERM, then SIGKILL, each
  with a bounded wait.
* :class:`ProcessScope` is what ``make demo`` runs inside: SIGTERM/SIGHUP become
  :class:`Terminated` (so ``finally`` blocks run), the process becomes a child subreaper on Linux
  (descendants whose parent died are re-parented to us instead of to init), and on exit every
  descendant still alive is terminated, then killed, and reaped.
* :func:`terminate_descendants` is the last step of both: everything below this process, bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterable

__all__ = ["ProcessScope", "Terminated", "become_subreaper", "stop_process", "terminate_descendants"]

_PR_SET_CHILD_SUBREAPER = 36


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM/SIGHUP arrives (exit status 128 + signal number)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def stop_process(proc: subprocess.Popen | None, name: str, grace_s: float = 20.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group of `proc` (started with
    ``start_new_session=True``), waiting at most `grace_s`, 10 s and 5 s."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    print(f"warning: could not stop {name} (pid {proc.pid})", file=sys.stderr)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def terminate_descendants(grace_s: float = 10.0, exclude: Iterable[int] = ()) -> list[int]:
    """SIGTERM every process below this one, SIGKILL those alive after `grace_s`; reap them.

    Returns the pids that had to be signalled (empty when everything had already stopped).
    """
    import psutil

    skip = set(exclude)
    procs = [p for p in _descendants() if p.pid not in skip]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)
    return [p.pid for p in procs]


def become_subreaper() -> bool:
    """Linux: descendants whose parent dies are re-parented to this process (so they can be found and
    stopped) instead of to init. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class ProcessScope:
    """Run a block that starts processes; on any exit (normal, error, Ctrl-C, SIGTERM) nothing is left.

    Usage::

        with ProcessScope() as scope:
            server = scope.start([...], log_path)   # own session, stopped in reverse order on exit
            ...
    """

    def __init__(self, grace_s: float = 20.0):
        self.grace_s = grace_s
        self._procs: list[tuple[subprocess.Popen, str]] = []
        self._old_handlers: dict[int, object] = {}

    def start(self, cmd: list[str], log_path, name: str, **popen_kwargs) -> subprocess.Popen:
        """``Popen(cmd)`` in its own session, output to `log_path`; stopped when the scope ends."""
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **popen_kwargs
            )
        self._procs.append((proc, name))
        return proc

    def __enter__(self) -> ProcessScope:
        become_subreaper()

        def on_signal(signum, _frame):
            raise Terminated(signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_signal)
        return self

    def __exit__(self, *exc) -> None:
        # A second signal while stopping must not cut the clean-up short.
        for sig in self._old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            for proc, name in reversed(self._procs):
                stop_process(proc, name, self.grace_s)
            terminate_descendants()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
