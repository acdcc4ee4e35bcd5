"""The batch job on a real multi-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine: a head
plus worker nodes that carry one logical GPU each, so actors are placed as on a GPU cluster), and how
a flow reaches Ray: a new local node whatever a stale bootstrap file says, a dead address fails fast.

The cluster keeps its bootstrap file in a private Ray temp folder (``RAY_TMPDIR``), never in the
machine's shared ``/tmp/ray``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("prefect")

from flows_testutil import free_port, png_bytes, prefect_test_server  # noqa: E402

from flows.io.manifest import make_input_table, read_results, validate_input_table, write_input_manifest  # noqa: E402
from flows.ray_job.session import InfrastructureError, _minimal_node_agent, connect_ray  # noqa: E402
from pipeline.outputs.atomic import is_temp_name  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"node_ip_address": "127.0.0.1"}  # every node listens on 127.0.0.1 only


@pytest.fixture(scope="module")
def ray_tmpdir():
    """A short private Ray temp folder (Unix socket paths must stay under ~100 characters), and
    loopback-only Ray in this process: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once at import,
    and would otherwise dial a 127.0.0.1 cluster at the machine's address."""
    from ray._private import ray_constants

    flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    path = tempfile.mkdtemp(prefix="crmray", dir="/tmp")
    saved = {
        k: os.environ.get(k)
        for k in ("RAY_TMPDIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_worker_niceness")
    }
    os.environ.update(
        {"RAY_TMPDIR": path, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}
    )
    yield path
    ray_constants.ENABLE_RAY_CLUSTER = flag
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(ray_tmpdir):
    """Head (1 CPU, no GPU) + two worker nodes (2 CPUs, 1 logical GPU each)."""
    import ray
    from ray.cluster_utils import Cluster

    with (
        _minimal_node_agent()
    ):  # minimal node agents: nodes register well within Ray's 30 s on a busy machine
        c = Cluster(
            initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **LOOPBACK}
        )
        for _ in range(2):
            _add_gpu_node(c)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    with prefect_test_server(tmp_path_factory.mktemp("prefect-home")):
        yield


def _add_gpu_node(cluster):
    """A worker node with 2 CPUs and one logical GPU."""
    with _minimal_node_agent():
        return cluster.add_node(num_cpus=2, num_gpus=1, **LOOPBACK)


def _manifest(folder: Path, n: int) -> tuple[str, list[str]]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img.png").write_bytes(png_bytes())
    ids = [f"row{i:04d}" for i in range(n)]
    uri = str(folder / "manifest.parquet")
    write_input_manifest(make_input_table(ids, ["img.png"] * n), uri)
    return uri, ids


def _markers(out: Path) -> int:
    return sum(1 for _ in (out / "objects").glob("*/result.json"))


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _node(worker: str) -> str:
    return worker.rsplit("/node-", 1)[1]


LOSS_GRACE_S = 10.0  # how long a removed node's worker may still return the call it was running


def _generated(out: Path) -> list[tuple[float, str]]:
    """(when its generate call returned, the node that ran it) of every finished row of a no-op run."""
    found = []
    for marker in (out / "objects").glob("*/result.json"):
        generated_at = json.loads((marker.parent / "meta.json").read_text())["generated_at"]
        found.append((generated_at, _node(json.loads(marker.read_text())["worker"])))
    return found


def test_flow_on_cluster_survives_a_lost_node_and_uses_returning_resources(
    cluster, prefect_harness, tmp_path
):
    """Rows spread over both GPU nodes; one node is lost mid-run while no GPU is left for its actor's
    replacement: the run goes on with the surviving actor, the replacement is placed on a node added
    later, and every row ends exactly once (one results row, one object folder, no half-written one)."""
    from flows.crm_batch import crm_batch

    n = 120
    manifest_uri, ids = _manifest(tmp_path / "in", n)
    out = tmp_path / "out"
    gpu_nodes = list(cluster.worker_nodes)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = crm_batch(
                manifest_uri=manifest_uri, output_uri=str(out), backend="noop", options={"sleep_s": 0.25},
                ray_address=cluster.address, batch_size=2, max_failure_rate=0.0, timeout_s=400,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _wait_until(lambda: _markers(out) >= 30 or not thread.is_alive(), 300, "30 rows")
    lost, survivor = gpu_nodes
    lost_id, survivor_id = lost.node_id[:12], survivor.node_id[:12]
    cluster.remove_node(lost, allow_graceful=False)
    t_loss = time.time()
    # no GPU is left for the lost actor's replacement: the survivor carries the run meanwhile (counted by
    # when rows were generated, not finalized: rows the lost node generated just before it died may
    # still be finalizing)
    _wait_until(
        lambda: sum(t > t_loss and node == survivor_id for t, node in _generated(out)) >= 16
        or not thread.is_alive(),
        300, "rows generated on the surviving node after the loss",
    )  # fmt: skip
    t_new = time.time()
    new_node = _add_gpu_node(cluster)
    new_id = new_node.node_id[:12]
    thread.join(timeout=420)
    assert not thread.is_alive(), "the flow did not finish"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["rows"] == n and summary["ok"] == n and summary["failed"] == 0
    assert summary["node_losses"] >= 1 and summary["actor_deaths"] == 0, summary

    results = read_results(summary["results_uri"]).to_pylist()
    assert sorted(r["id"] for r in results) == ids  # exactly once
    assert {_node(r["worker"]) for r in results} <= {lost_id, survivor_id, new_id}
    generated = _generated(out)
    assert len(generated) == n
    before_loss = {node for t, node in generated if t < t_loss}
    assert before_loss >= {lost_id, survivor_id}, "rows were not spread over both GPU nodes"
    # the lost node did nothing once removed (a call it was in may return while its processes go down)
    late = [t - t_loss for t, node in generated if node == lost_id and t > t_loss + LOSS_GRACE_S]
    assert not late, f"rows generated on the lost node {late} s after its removal"
    assert {node for t, node in generated if t_loss < t < t_new} - {lost_id} == {survivor_id}
    assert new_id in {node for t, node in generated if t > t_new}, "the replacement never ran on the new node"

    entries = sorted(p.name for p in (out / "objects").iterdir())
    assert entries == ids, [e for e in entries if is_temp_name(e)][:5]  # no duplicate or half-written folder
    assert all((out / "objects" / i / "result.json").is_file() for i in ids)
    assert not (out / "lease.json").exists()


def test_cluster_without_any_live_actor_fails_after_a_bounded_wait(cluster, tmp_path):
    """Every GPU node is lost: the replacements wait for GPUs that never come, and the job ends in
    InfrastructureError after ``actor_wait_s`` (it does not wait forever)."""
    import ray

    from flows.ray_job.driver import BatchConfig, run_batch
    from flows.ray_job.fake_backends import NoOpBackend

    (tmp_path / "img.png").write_bytes(png_bytes())
    ids = [f"r{i}" for i in range(60)]
    manifest = validate_input_table(make_input_table(ids, [str(tmp_path / "img.png")] * len(ids)))
    config = BatchConfig(
        output_uri=str(tmp_path / "out"), batch_size=2, actor_wait_s=5.0, timeout_s=300
    )  # one actor per GPU node
    rows: list[dict] = []
    done = threading.Event()

    def remove_gpu_nodes_after_some_rows() -> None:
        while len(rows) < 6 and not done.is_set():
            time.sleep(0.1)
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        removed_at.append(time.monotonic())

    removed_at: list[float] = []
    ray.init(address=cluster.address, log_to_driver=False)
    killer = threading.Thread(target=remove_gpu_nodes_after_some_rows, daemon=True)
    killer.start()
    try:
        with pytest.raises(
            InfrastructureError, match=r"no generator actor alive for 5 s while \d+ rows wait"
        ):
            run_batch(manifest.rows(), NoOpBackend(sleep_s=0.3), config, rows.append)
        raised_at = time.monotonic()
    finally:
        done.set()
        killer.join(timeout=60)
        ray.shutdown()
    assert removed_at and 5.0 <= raised_at - removed_at[0] < 60.0, raised_at - removed_at[0]
    assert 6 <= len(rows) < len(ids) and len({r["id"] for r in rows}) == len(rows)


# --------------------------------------------------------------------------- reaching Ray
def _stale_bootstrap(folder: Path) -> int:
    """A Ray temp folder whose bootstrap file names a port where nothing listens; returns the port."""
    port = free_port()
    (folder / "ray").mkdir(parents=True, exist_ok=True)
    (folder / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    return port


def test_local_ray_starts_whatever_stale_bootstrap_file_exists():
    """``ray_session(None)`` starts a new local node even when the bootstrap file names a dead
    cluster (``ray.init()`` without an address would wait on it forever)."""
    folder = Path(tempfile.mkdtemp(prefix="crmst", dir="/tmp"))
    _stale_bootstrap(folder)
    code = (
        "import time, ray; from flows.ray_job.session import ray_session; t = time.monotonic()\n"
        "with ray_session(None, num_cpus=1):\n"
        "    print('started', round(time.monotonic() - t, 1), ray.cluster_resources().get('CPU'))\n"
    )
    env = {**os.environ, "RAY_TMPDIR": str(folder), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started" in proc.stdout and proc.stdout.strip().endswith("1.0"), proc.stdout


def test_connecting_where_nothing_answers_fails_fast(ray_tmpdir, tmp_path, monkeypatch):
    """A given address with nothing behind it (or something that is not Ray), and ``"auto"`` led by a
    stale bootstrap file, fail with a clear InfrastructureError within the connect timeout (Ray
    itself would retry forever)."""
    port = _stale_bootstrap(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.monotonic()
    with pytest.raises(
        InfrastructureError, match=rf"no Ray cluster answers at 127\.0\.0\.1:{port} \(from ray_address\)"
    ):
        connect_ray(f"127.0.0.1:{port}", timeout_s=2.0)
    with pytest.raises(InfrastructureError, match=r"names a cluster that is gone"):
        connect_ray("auto", timeout_s=1.0)
    with pytest.raises(InfrastructureError, match=rf"no Ray cluster answers at 127\.0\.0\.1:{port} "):
        connect_ray(f"ray://127.0.0.1:{port}", timeout_s=1.0)  # Ray Client address: same bound
    with socket.socket() as listener:  # accepts connections, never speaks gRPC
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        other = listener.getsockname()[1]
        with pytest.raises(InfrastructureError, match=rf"no Ray cluster answers at 127\.0\.0\.1:{other} "):
            connect_ray(f"127.0.0.1:{other}", timeout_s=1.0)
    assert time.monotonic() - t0 < 20.0
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    with pytest.raises(InfrastructureError, match="found no cluster"):
        connect_ray("auto", timeout_s=1.0)
