"""Serve the ``crm-batch`` deployment: ``python -m flows.serve [--cron "0 3 * * *"] [--param k=v ...]``.

Registers the deployment ``crm-batch/crm-batch`` on the Prefect server named by ``PREFECT_API_URL``
and runs its flow runs in this process's children until interrupted (``flow.serve``: no work pool
needed). Trigger a run with::

    prefect deployment run crm-batch/crm-batch \\
        --param manifest_uri=s3://bucket/manifest.parquet --param output_uri=s3://bucket/run1

``--param`` values are JSON when they parse as JSON (numbers, booleans, objects), strings otherwise;
they become the deployment's default parameters (e.g. the manifest of a scheduled run).
For work pools (Kubernetes, Docker, process workers) use ``prefect.yaml`` and ``prefect deploy``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

DEPLOYMENT_NAME = "crm-batch"


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


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)

    from flows.crm_batch import crm_batch

    params = parse_params(args.param)
    schedules = None
    if args.cron:
        from prefect.schedules import Cron

        schedules = [Cron(args.cron, timezone=args.timezone)]
    crm_batch.serve(
        name=args.name,
        schedules=schedules,
        parameters=params or None,
        description="CRM batch generation: Parquet manifest of images -> textured meshes + results manifest",
        tags=["crm", "batch"],
        limit=args.limit,
    )


if __name__ == "__main__":
    main()
