"""The path users type: a Prefect server, the served deployment (``python -m flows.serve``), and
``prefect deployment run crm-batch/crm-batch --param manifest_uri=s3://... --param output_uri=s3://...``
as a shell command against the S3 test server; the flow run is watched to its end and its results are
read back from S3. Credentials reach the flow run and its Ray workers through the environment, as
docs/batch.md says; the parameters carry only the endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("prefect")
pytest.importorskip("moto")

import pyarrow.parquet as pq  # noqa: E402
from flows_testutil import free_port, moto_s3, png_bytes  # noqa: E402

from flows.io import storage  # noqa: E402
from flows.io.manifest import make_input_table, read_results  # noqa: E402
from flows.processes import stop_process  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
BUCKET = "crm-shell"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[0]} exited early:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def test_prefect_deployment_run_from_a_shell_on_s3(tmp_path):
    with moto_s3(BUCKET) as s3:
        run = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
        ids = [f"obj{i}" for i in range(4)]
        for i in ids:
            storage.write_bytes_atomic(f"{run}/images/{i}.png", png_bytes(), s3)
        with storage.open_uri(f"{run}/manifest.parquet", "wb", s3) as fh:
            pq.write_table(make_input_table(ids, [f"images/{i}.png" for i in ids]), fh)

        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_HOME": str(tmp_path / "prefect-home"),
                "PREFECT_API_URL": api,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_worker_niceness": "0",
                "HF_HUB_OFFLINE": "1",
                "AWS_ACCESS_KEY_ID": s3["key"],  # secrets in the environment, not in parameters
                "AWS_SECRET_ACCESS_KEY": s3["secret"],
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
            }
        )
        server = serve = None
        try:
            server_log = tmp_path / "server.log"
            server = _start(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_log, env
            )
            _wait_http(f"{api}/health", server, server_log, 180)
            serve_log = tmp_path / "serve.log"
            serve = _start([sys.executable, "-m", "flows.serve"], serve_log, env)
            _wait_http(f"{api}/deployments/name/crm-batch/crm-batch", serve, serve_log, 180)

            command = [
                PREFECT, "deployment", "run", "crm-batch/crm-batch",
                "--param", f"manifest_uri={run}/manifest.parquet",
                "--param", f"output_uri={run}/out",
                "--param", "backend=noop",
                "--param", "num_actors=1",
                "--param", f"storage_options={json.dumps({'endpoint_url': s3['endpoint_url']})}",
                "--watch", "--watch-timeout", "400",
            ]  # fmt: skip
            done = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=450
            )
            detail = (
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\nserve log:\n{serve_log.read_text()[-4000:]}"
            )
            assert done.returncode == 0, detail
            assert "Completed" in done.stdout, detail
        finally:
            stop_process(serve, "serve", grace_s=30)
            stop_process(server, "prefect server", grace_s=10)

        results = {r["id"]: r for r in read_results(f"{run}/out/results.parquet", s3).to_pylist()}
        assert sorted(results) == ids
        assert all(r["status"] == "ok" for r in results.values()), results
        for i in ids:
            assert storage.exists(f"{run}/out/objects/{i}/result.json", s3)
        assert not storage.exists(f"{run}/out/lease.json", s3)
