"""`make demo`'s entry (`python -m flows.demo`) and the served deployment (`python -m flows.serve`):
missing weights end fast with the ways out, a full tiny run on the bundled samples, and clean stops on
SIGTERM (no process left behind)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf-home"),
            "CRM_WEIGHTS_DIR": str(tmp_path / "no-weights"),
        }
    )
    env.pop("PREFECT_API_URL", None)
    env.update(extra)
    return env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


#: Libraries the no-weights path must not import: the networks' (seconds to import on a busy machine,
#: 8-12 s in all before the weights check stopped needing them) and the services'.
HEAVY_MODULES = ("torch", "diffusers", "transformers", "open_clip", "prefect", "ray")


def _top_level_imports(importtime_stderr: str) -> set[str]:
    """Top-level package names from `python -X importtime`'s report (lines `import time: a | b | name`)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names


@pytest.mark.e2e  # the demo as a user runs it (a subprocess); make test-fast leaves it out
@pytest.mark.parametrize("network", ["offline", "hub-unreachable"])
def test_demo_without_weights_lists_the_ways_out_fast(tmp_path, network):
    """No weights: exit 2 with the three ways out, nothing started, and fast by construction: the
    weights are checked before any network or service library is imported (checked with
    ``-X importtime``, not with a clock). With downloads allowed, an unreachable hub (connection
    refused here; DNS failure on the CI machines) is reported at once."""
    extra = (
        {}
        if network == "offline"
        else {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    )
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows.demo", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    imported = _top_level_imports(proc.stderr)
    assert "flows" in imported and "huggingface_hub" in imported  # the report was parsed
    assert not imported & set(HEAVY_MODULES), sorted(imported & set(HEAVY_MODULES))
    err = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    assert "Three ways out" in err
    assert "WEIGHTS=/path/to/crm-weights" in err  # 1. a local folder
    assert "hf download Zhengyi/CRM CRM.pth pixel-diffusion.pth ccm-diffusion.pth" in err  # 2.
    assert "make demo WEIGHTS=tiny-random" in err  # 3.
    assert ("HF_HUB_OFFLINE is set" in err) if network == "offline" else ("unreachable" in err)
    assert not (tmp_path / "manifest.parquet").exists()  # nothing started


def _start_demo(tmp_path: Path, limit: int, **popen) -> subprocess.Popen:
    """`python -m flows.demo` on tiny random weights and the first `limit` samples, into tmp_path/demo."""
    cmd = [sys.executable, "-m", "flows.demo", "--weights", "tiny-random", "--limit", str(limit)]
    return subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "demo")], cwd=REPO_ROOT, env=_env(tmp_path), text=True, **popen
    )


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _gone(pids: set[int]) -> list[int]:
    """The pids of `pids` still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(1200)
def test_demo_end_to_end_tiny_on_bundled_samples(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.samples import sample_images

    out = tmp_path / "demo"
    proc = _start_demo(tmp_path, 3, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: set[int] = set()
    deadline = time.monotonic() + 1100
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _descendants(proc.pid)
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=60)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "logs").glob("*.log")))
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}\n{logs}"
    assert "3/3 objects ok" in stdout and "Meshes:" in stdout
    results = pq.read_table(out / "run" / "results.parquet").to_pylist()
    assert sorted(r["id"] for r in results) == [p.stem for p in sample_images(3)]
    assert all(r["status"] == "ok" for r in results)
    for r in results:
        assert (Path(r["output_uri"]) / "mesh.glb").is_file()
        assert (Path(r["output_uri"]) / "result.json").is_file()
    # the demo stops what it started: server, serve, flow run, Ray
    assert len(seen) >= 2
    assert _gone(seen) == []


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(900)
def test_demo_stopped_by_sigterm_leaves_no_process(tmp_path):
    """SIGTERM while the flow run works: the demo exits promptly and every process it started is gone."""
    proc = _start_demo(tmp_path, 2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    lines = []
    try:
        for line in proc.stdout:  # bounded by the test timeout
            lines.append(line)
            if line.startswith("triggering crm-batch/crm-batch"):
                break
        # wait until the flow run has started (a process below the server and serve: the runner polls
        # for scheduled runs, slowly on a loaded machine), then let it start Ray before the signal
        deadline = time.monotonic() + 240
        while len(seen) < 3 and time.monotonic() < deadline and proc.poll() is None:
            seen |= _descendants(proc.pid)
            time.sleep(0.5)
        for _ in range(20):
            seen |= _descendants(proc.pid)
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=180)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "".join(lines) + rest
    assert stop_s < 120, f"stopping took {stop_s:.0f} s"
    assert len(seen) >= 3, seen  # server, serve, and the flow run's processes were seen
    assert _gone(seen) == [], "".join(lines) + rest


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(600)
def test_serve_exits_on_sigterm_with_a_stuck_flow_run(tmp_path):
    """`flows.serve` with a flow run that does not finish (a no-op model that sleeps for an hour per
    object): SIGTERM ends the serve process within its stop timeout, and nothing below it survives."""
    from flows.demo import free_port, prefect_env

    port = free_port()
    env = prefect_env(port, tmp_path / "prefect-home")
    env.update(_env(tmp_path), PREFECT_API_URL=env["PREFECT_API_URL"])
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    serve = None
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/health", 120)
        log = tmp_path / "serve.log"
        with open(log, "wb") as fh:
            serve = subprocess.Popen(
                [sys.executable, "-m", "flows.serve", "--stop-timeout", "15"],
                cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        # serve prints this line after registering the deployment (importing the flow is slow under load)
        deadline = time.monotonic() + 300
        while "serving deployment crm-batch/crm-batch" not in log.read_text(errors="replace"):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
        manifest = tmp_path / "in.parquet"
        from flows.sample import write_sample_manifest

        write_sample_manifest(str(manifest), limit=1)
        params = {
            "manifest_uri": str(manifest),
            "output_uri": str(tmp_path / "run"),
            "backend": "noop",
            "options": {"sleep_s": 3600},
        }
        run = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "crm-batch/crm-batch",
             "--params", json.dumps(params)],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        # wait until the flow run is working (it has child processes: the run, then Ray)
        seen: set[int] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(seen) < 3:
            seen |= _descendants(serve.pid)
            time.sleep(0.5)
        for _ in range(10):
            seen |= _descendants(serve.pid)
            time.sleep(0.5)
        assert seen, "the flow run never started"
        serve.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        serve.wait(timeout=120)
        stop_s = time.monotonic() - t0
        output = log.read_text(errors="replace")
        assert stop_s < 15 + 30, f"serve took {stop_s:.0f} s to stop\n{output[-3000:]}"
        assert _gone(seen) == [], output[-3000:]
    finally:
        for p in (serve, server):
            if p is not None and p.poll() is None:
                with_group = p is server
                (os.killpg(p.pid, signal.SIGKILL) if with_group else p.kill())
                p.wait(timeout=30)
