"""The main job end to end (``make demo``): Prefect server + served deployment + one batch run.

``python -m flows.demo --weights auto|tiny-random|DIR [--offline] [--limit N] [--out out/demo]``

1. resolves the weights like the pipeline does (local folder, Hugging Face cache, else a download
   into the cache); when they cannot be had it prints the three ways out and exits with status 2;
2. writes the manifest of the bundled sample images (``pipeline.samples``) to ``<out>/manifest.parquet``;
3. starts a Prefect server on 127.0.0.1 (SQLite in ``<repo>/.prefect-home``) and serves the
   ``crm-batch`` deployment (``python -m flows.serve``);
4. triggers ``crm-batch/crm-batch`` on the manifest, waits, prints where the results are;
5. stops every process it started, on success, errors, Ctrl-C and SIGTERM alike
   (``flows.processes.ProcessScope``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

from flows.processes import ProcessScope
from pipeline.weights.tiny_configs import SMOKE_OPTIONS

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float, proc, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered; see {log}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


def _wait_deployment(name: str, timeout_s: float, proc, log: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the serve process exited with {proc.returncode}; see {log}")
            with contextlib.suppress(ObjectNotFound):
                client.read_deployment_by_name(name)
                return
            time.sleep(1.0)
    raise TimeoutError(f"deployment {name} was not registered within {timeout_s:.0f} s; see {log}")


def check_weights(weights: str, offline: bool = False) -> dict | None:
    """The weights identity (downloading them into the HF cache when allowed), or None after printing
    why they are missing and the ways out."""
    from pipeline.weights import WeightsError, resolve_weights

    try:
        return dict(resolve_weights(weights, allow_download=not offline).identity)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def prefect_env(port: int, home: Path) -> dict[str, str]:
    """Environment of the server, the serve process and this one: one local Prefect API."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        }
    )
    return env


def print_results(out: Path) -> None:
    import pyarrow.parquet as pq

    results = out / "run" / "results.parquet"
    names = set(pq.read_schema(results).names)
    columns = ["id", "status", "error_class", "output_uri"] + (["qc_flags"] if "qc_flags" in names else [])
    table = pq.read_table(results, columns=columns).to_pylist()
    ok = sum(r["status"] == "ok" for r in table)
    flagged = sum(bool(r.get("qc_flags")) for r in table if r["status"] == "ok")
    print(f"\n{ok}/{len(table)} objects ok ({flagged} flagged by the quality checks).")
    print(f"Results manifest: {results}")
    for r in sorted(table, key=lambda r: r["id"]):
        where = r["output_uri"] if r["status"] == "ok" else r["error_class"]
        flags = f"  flags: {', '.join(r['qc_flags'])}" if r.get("qc_flags") else ""
        print(f"  {r['id']:<32} {r['status']:<7} {where}{flags}")
    print(f"\nMeshes: {out / 'run' / 'objects'}/<id>/mesh.glb (and mesh.obj/.mtl/.png, preview.png)")
    gallery = out / "run" / "index.html"
    if gallery.exists():
        print(f"Gallery (open in a browser): {gallery.absolute().as_uri()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="auto", help="auto | tiny-random | folder of checkpoints")
    parser.add_argument("--offline", action="store_true", help="never download weights (as HF_HUB_OFFLINE=1)")
    parser.add_argument("--limit", type=int, default=0, help="sample images to run (0 = all twelve)")
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "demo"), help="local output folder")
    parser.add_argument("--options", default=None, help="PipelineOptions fields as JSON (overrides defaults)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the flow run")
    parser.add_argument("--fresh", action="store_true", help="ignore outputs of an earlier demo run")
    args = parser.parse_args(argv)

    identity = check_weights(args.weights, args.offline)
    if identity is None:
        return 2
    options = dict(SMOKE_OPTIONS) if identity.get("kind") == "tiny-random" else {}
    if args.options:
        options.update(json.loads(args.options))

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    from flows.sample import write_sample_manifest

    manifest = out / "manifest.parquet"
    n = write_sample_manifest(str(manifest), limit=args.limit or None)
    print(f"sample manifest: {manifest} ({n} images)")

    home = REPO_ROOT / ".prefect-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    env = prefect_env(port, home)
    api = env["PREFECT_API_URL"]
    os.environ.update(
        {k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    )
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    with ProcessScope() as scope:
        server_log = logs / "prefect-server.log"
        server = scope.start(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            server_log, "prefect server", env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        print(f"Prefect server starting on {api} (pid {server.pid}, PREFECT_HOME={home}, log {server_log})")
        _wait_http(f"{api}/health", 180.0, server, server_log)

        serve_log = logs / "serve.log"
        serve = scope.start([sys.executable, "-m", "flows.serve"], serve_log, "serve", env=env, cwd=REPO_ROOT)
        _wait_deployment("crm-batch/crm-batch", 180.0, serve, serve_log)
        print(f"deployment crm-batch/crm-batch served (pid {serve.pid}, log {serve_log})", flush=True)

        from prefect.deployments import run_deployment

        params = {
            "manifest_uri": str(manifest),
            "output_uri": str(out / "run"),
            "weights": args.weights,
            "options": options,
            "resume": not args.fresh,
            "max_failure_rate": 0.5,
        }
        print(f"triggering crm-batch/crm-batch with {json.dumps(params)}", flush=True)
        run = run_deployment(
            "crm-batch/crm-batch", parameters=params, timeout=args.timeout, poll_interval=2, as_subflow=False
        )
        state = run.state
        print(f"flow run {run.name} ({run.id}): {state.type.value if state else 'unknown'}")
        if not (state and state.is_completed()):
            print(
                f"the flow run did not complete; see {serve_log} and the Prefect UI at {api[:-4]}",
                file=sys.stderr,
            )
            return 1
        print_results(out)
        return 0


if __name__ == "__main__":
    sys.exit(main())
