"""Serve the ``crm-batch`` deployment: ``python -m flows.serve [--cron "0 3 * * *"] [--param k=v ...]``.

Registers the deployment ``crm-batch/crm-batch`` on the Prefect server named by ``PREFECT_API_URL``
and runs its flow runs in this process's children until interrupted (``flow.serve``: no work pool
needed). Trigger a run with::

    prefect deployment run crm-batch/crm-batch \\
        --param manifest_uri=s3://bucket/manifest.parquet --param output_uri=s3://bucket/run1

``--param`` values are JSON when they parse as JSON (numbers, booleans, objects), strings otherwise;
they become the deployment's default parameters (e.g. the manifest of a scheduled run).
For work pools (Kubernetes, Docker, process workers) use ``prefect.yaml`` and ``prefect deploy``.

Stopping: SIGINT or SIGTERM starts Prefect's graceful shutdown (in-flight flow runs are cancelled);
whatever is still running ``--stop-timeout`` seconds later (a stuck flow run, its Ray processes) is
terminated, then killed, and the process exits with status 143 (SIGTERM) or 130 (SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
from typing import Any

from prefect.deployments.runner import EntrypointType
from prefect.runner import Runner

from flows.processes import become_subreaper, terminate_descendants

DEPLOYMENT_NAME = "crm-batch"
STOP_TIMEOUT_S = 30.0


class BoundedStopRunner(Runner):
    """A Prefect ``Runner`` whose shutdown on SIGTERM/SIGINT is bounded in time.

    Prefect's own handler asks the runner to stop and waits for its flow runs to be cancelled, which
    never ends when a flow run does not react. Here the first signal also arms a deadline; at the
    deadline every descendant process is terminated (``flows.processes``) and the process exits.
    """

    def __init__(self, *args: Any, stop_timeout_s: float = STOP_TIMEOUT_S, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stop_timeout_s = stop_timeout_s
        self._deadline: threading.Timer | None = None

    def _arm_deadline(self, signum: int) -> None:
        if self._deadline is not None:
            return

        def force_exit() -> None:
            terminate_descendants(grace_s=5.0)
            os._exit(128 + signum)

        self._deadline = threading.Timer(self.stop_timeout_s, force_exit)
        self._deadline.daemon = True
        self._deadline.start()

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        self._arm_deadline(signal.SIGTERM)
        super().handle_sigterm(*args, **kwargs)

    def handle_sigint(self, *args: Any) -> None:
        self._arm_deadline(signal.SIGINT)
        raise KeyboardInterrupt

    async def start(self, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handle_sigint)
        await super().start(*args, **kwargs)


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (default: crm-batch)")
    parser.add_argument(
        "--cron", default=None, help='optional schedule, e.g. "0 3 * * *" (UTC unless --timezone)'
    )
    parser.add_argument("--timezone", default=None, help="time zone of --cron (e.g. Europe/Berlin)")
    parser.add_argument(
        "--param", action="append", default=[], help="default parameter KEY=VALUE (repeatable)"
    )
    parser.add_argument("--limit", type=int, default=None, help="max concurrent flow runs of this server")
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        help="seconds a SIGTERM/SIGINT waits for a graceful stop before child processes are killed",
    )
    args = parser.parse_args(argv)

    from flows.crm_batch import crm_batch

    params = parse_params(args.param)
    schedules = None
    if args.cron:
        from prefect.schedules import Cron

        schedules = [Cron(args.cron, timezone=args.timezone)]
    runner = BoundedStopRunner(name=args.name, limit=args.limit, stop_timeout_s=args.stop_timeout)
    runner.add_flow(
        crm_batch,
        name=args.name,
        schedules=schedules,
        parameters=params or None,
        description="CRM batch generation: Parquet manifest of images -> textured meshes + results manifest",
        tags=["crm", "batch"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    print(
        f"serving deployment {crm_batch.name}/{args.name}; trigger it with\n"
        f"  prefect deployment run {crm_batch.name}/{args.name} --param manifest_uri=... "
        "--param output_uri=...",
        flush=True,
    )
    become_subreaper()  # a killed flow run's Ray processes stay ours to stop
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        return 130
    finally:
        terminate_descendants(grace_s=10.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
