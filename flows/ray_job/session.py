"""Where the Ray job runs: a fresh local node, or an existing cluster reached within a bounded time.

* :func:`start_local_ray` always starts a new single-node Ray bound to 127.0.0.1
  (``ray.init(address="local")``): Ray's bootstrap file (``ray_current_cluster`` in its temp folder),
  left behind by any earlier cluster on the machine, is never followed. Without ``"local"``,
  ``ray.init()`` attaches to the cluster that file names and waits forever once that cluster is gone.
* :func:`connect_ray` joins an existing cluster (``"auto"``, ``"host:port"``, ``"ray://host:10001"``)
  after checking that a gRPC server answers at the address Ray will dial (Ray replaces a loopback
  host by the machine's address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), so a dead address
  fails with :class:`InfrastructureError` within ``timeout_s`` instead of Ray's endless GCS reconnects.
* :func:`ray_session` picks one of the two (or the session already open) for the flow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator

__all__ = [
    "InfrastructureError",
    "CONNECT_TIMEOUT_S",
    "LazyRaySession",
    "bootstrap_address",
    "connect_ray",
    "ray_session",
    "resolve_address",
    "start_local_ray",
]

CONNECT_TIMEOUT_S = 30.0
_OPTIONAL_DEPS = "ray.dashboard.optional_deps"


class InfrastructureError(RuntimeError):
    """The cluster cannot run the job (unreachable, no actor could be kept alive, timeout): worth a retry."""


def _ray_temp_dir() -> str:
    """Ray's temp folder as Ray computes it (``$RAY_TMPDIR``, ``$TMPDIR`` or /tmp, plus ``/ray``)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray")


def bootstrap_address() -> tuple[str | None, str]:
    """The address in Ray's bootstrap file (``ray_current_cluster``) and the file's path."""
    path = os.path.join(_ray_temp_dir(), "ray_current_cluster")
    try:
        with open(path) as fh:
            return (fh.read().strip() or None), path
    except OSError:
        return None, path


def resolve_address(address: str) -> tuple[str, str]:
    """``(host:port to probe, where it came from)`` for a Ray address.

    ``"auto"`` follows ``$RAY_ADDRESS``, then the bootstrap file, as ``ray.init`` does; ``ray://``
    addresses are probed at their Ray Client port.
    """
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            return resolve_address(env)[0], "$RAY_ADDRESS"
        found, path = bootstrap_address()
        if not found:
            raise InfrastructureError(
                f"ray_address='auto' found no cluster: $RAY_ADDRESS is unset and {path} does not exist. "
                "Start one (`ray start --head`) or pass its address (host:6379 or ray://host:10001)."
            )
        return found, path
    target = address.split("://", 1)[1] if "://" in address else address
    return target.split("/", 1)[0], "ray_address"


def _dialled_address(target: str) -> str:
    """The GCS address ``ray.init`` dials for ``target``: Ray replaces a loopback host by this machine's
    address unless clusters are loopback-only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``)."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise InfrastructureError(f"Ray address {target!r} is not host:port")
    try:
        from ray._private.services import resolve_ip_for_localhost

        host = resolve_ip_for_localhost(host.strip("[]"))
    except (ImportError, AttributeError):  # pragma: no cover - other Ray versions: dial as given
        pass
    return f"{host}:{port}"


def _wait_for_grpc(target: str, source: str, timeout_s: float) -> None:
    """Return once a gRPC server answers at ``target`` (an HTTP/2 handshake, which a closed port or
    another kind of server never completes); raise :class:`InfrastructureError` after ``timeout_s``."""
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return
    except grpc.FutureTimeoutError:
        pass
    finally:
        channel.close()
    hint = (
        f" {source} names a cluster that is gone (left behind when it stopped without cleaning up); "
        "delete the file, start a cluster, or pass an address."
        if source.endswith("ray_current_cluster")
        else " Is the cluster running, and is the address reachable from here?"
    )
    raise InfrastructureError(
        f"no Ray cluster answers at {target} (from {source}) within {timeout_s:.0f} s.{hint}"
    )


def connect_ray(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Connect this process to the existing cluster at ``address``, failing within ``timeout_s``
    (:class:`InfrastructureError`) when nothing answers there.

    With token authentication (Ray's default), set ``RAY_AUTH_MODE=token`` and the cluster's token
    (docs/batch.md).
    """
    import ray

    target, source = resolve_address(address)
    client = address.startswith("ray://")
    _wait_for_grpc(target if client else _dialled_address(target), source, timeout_s)
    init_address = address if client else target
    try:
        ray.init(address=init_address, ignore_reinit_error=True, log_to_driver=False)
    except (ConnectionError, TimeoutError) as exc:
        raise InfrastructureError(f"cannot join the Ray cluster at {init_address}: {exc}") from exc


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
    """Start a new local Ray node bound to 127.0.0.1, without dashboard, whatever the machine's Ray
    bootstrap file says (``address="local"``).

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
                    address="local",  # a new node, never the cluster of a stale bootstrap file
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
def ray_session(
    address: str | None = None, num_cpus: int | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S
) -> Iterator[None]:
    """Use the running Ray session, join the cluster at ``address`` (:func:`connect_ray`), or start a
    new local node (:func:`start_local_ray`); a session opened here is closed at the end.

    ``address`` is ``"auto"`` (the cluster of this machine: ``$RAY_ADDRESS`` or Ray's bootstrap
    file), ``"host:6379"`` (the head's GCS) or ``"ray://host:10001"`` (Ray Client).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        connect_ray(address, connect_timeout_s)
    else:
        start_local_ray(num_cpus=num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


class LazyRaySession:
    """A :func:`ray_session` opened on first :meth:`ensure` and closed by :meth:`close`, shared by the
    tasks of one flow run (a run with nothing to generate starts no Ray; shards share one session).

    Args:
        address: as for :func:`ray_session` (None: a new local node).
        connect_timeout_s: bound on joining an existing cluster.
    """

    def __init__(self, address: str | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._stack: contextlib.ExitStack | None = None

    def ensure(self) -> None:
        """Open the session unless it is open."""
        if self._stack is None:
            stack = contextlib.ExitStack()
            stack.enter_context(ray_session(self.address, connect_timeout_s=self.connect_timeout_s))
            self._stack = stack

    def close(self) -> None:
        """Close the session if this object opened it (a retry then opens a fresh one)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
