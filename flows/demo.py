"""The main job end to end (``make demo``): Prefect server + served deployment + one batch run.

``python -m flows.demo --weights auto|tiny-random|DIR [--limit N] [--out out/demo]``

1. resolves the weights like the pipeline does (offline, no download); without weights it says how
   to run the demo with ``WEIGHTS=tiny-random`` and exits with status 2;
2. writes the sample manifest of the bundled example images (``flows.sample``) to ``<out>/manifest.parquet``;
3. starts a Prefect server on 127.0.0.1 (SQLite in ``<repo>/.prefect-home``) and serves the
   ``crm-batch`` deployment (``python -m flows.serve``);
4. triggers ``crm-batch/crm-batch`` on the manifest, waits, prints where the results are;
5. stops the serve and server processes it started (also on Ctrl-C or errors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small settings for the random tiny preset (its outputs are meaningless; this only proves the plumbing).
TINY_OPTIONS = {"steps_stage1": 2, "steps_stage2": 2, "texture_size": 128, "preview_size": 128}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None, name: str, grace_s: float = 20.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the process group started for ``proc``."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    print(f"warning: could not stop {name} (pid {proc.pid})", file=sys.stderr)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
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


def _wait_deployment(name: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
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


def check_weights(weights: str) -> dict | None:
    """The weights identity, or None (after printing how to run the demo) when they are missing."""
    from pipeline.weights import WeightsError, resolve_weights

    try:
        return dict(resolve_weights(weights, allow_download=False).identity)
    except WeightsError as exc:
        print(f"error: CRM weights not available offline ({weights!r}):\n{exc}\n", file=sys.stderr)
        print(
            "Run the demo with seeded random tiny weights instead\n"
            "(meaningless shapes, proves the plumbing):\n"
            "    make demo WEIGHTS=tiny-random\n"
            "or put the official checkpoints in a folder and run `make demo WEIGHTS=/path/to/folder`.",
            file=sys.stderr,
        )
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="auto", help="auto | tiny-random | folder of checkpoints")
    parser.add_argument("--limit", type=int, default=4, help="example images to run (0 = all)")
    parser.add_argument("--out", default=str(REPO_ROOT / "out" / "demo"), help="local output folder")
    parser.add_argument("--options", default=None, help="PipelineOptions fields as JSON (overrides defaults)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the flow run")
    parser.add_argument("--fresh", action="store_true", help="ignore outputs of an earlier demo run")
    args = parser.parse_args(argv)

    identity = check_weights(args.weights)
    if identity is None:
        return 2
    options = dict(TINY_OPTIONS) if identity.get("kind") == "tiny-random" else {}
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
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
        }
    )
    os.environ.update(
        {k: env[k] for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    )
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    server = serve = None
    try:
        server_log = logs / "prefect-server.log"
        server_cmd = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        with open(server_log, "wb") as fh:
            server = subprocess.Popen(
                server_cmd,
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT,
            )  # fmt: skip
        print(f"Prefect server starting on {api} (pid {server.pid}, PREFECT_HOME={home}, log {server_log})")
        _wait_http(f"{api}/health", 180.0, server, server_log)

        serve_log = logs / "serve.log"
        with open(serve_log, "wb") as fh:
            serve = subprocess.Popen(
                [sys.executable, "-m", "flows.serve"],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO_ROOT,
            )  # fmt: skip
        _wait_deployment("crm-batch/crm-batch", 180.0, serve, serve_log)
        print(f"deployment crm-batch/crm-batch served (pid {serve.pid}, log {serve_log})")

        from prefect.deployments import run_deployment

        params = {
            "manifest_uri": str(manifest),
            "output_uri": str(out / "run"),
            "weights": args.weights,
            "options": options,
            "resume": not args.fresh,
            "max_failure_rate": 0.5,
        }
        print(f"triggering crm-batch/crm-batch with {json.dumps(params)}")
        run = run_deployment(
            "crm-batch/crm-batch", parameters=params, timeout=args.timeout, poll_interval=2, as_subflow=False
        )
        state = run.state
        print(f"flow run {run.name} ({run.id}): {state.type.value if state else 'unknown'}")
        results = out / "run" / "results.parquet"
        if not (state and state.is_completed()):
            print(
                f"the flow run did not complete; see {serve_log} and the Prefect UI at {api[:-4]}",
                file=sys.stderr,
            )
            return 1
        import pyarrow.parquet as pq

        table = pq.read_table(results, columns=["id", "status", "error_class", "output_uri"]).to_pylist()
        ok = sum(r["status"] == "ok" for r in table)
        print(f"\n{ok}/{len(table)} objects ok. Results manifest: {results}")
        for r in table:
            where = r["output_uri"] if r["status"] == "ok" else r["error_class"]
            print(f"  {r['id']:<32} {r['status']:<7} {where}")
        print(f"\nMeshes: {out / 'run' / 'objects'}/<id>/mesh.glb (preview.png beside each)")
        return 0
    finally:
        _stop(serve, "serve")
        _stop(server, "prefect server")


if __name__ == "__main__":
    sys.exit(main())
