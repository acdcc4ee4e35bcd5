"""`make demo`'s entry (`python -m flows.demo`): missing weights message, and a full 2-image run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
            "CRM_WEIGHTS_DIR": str(tmp_path / "no-weights"),
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env


def test_demo_without_weights_says_how_to_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.demo", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "WEIGHTS=tiny-random" in proc.stderr
    assert not (tmp_path / "manifest.parquet").exists()  # nothing started


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(1200)
def test_demo_end_to_end_tiny(tmp_path, data_dir):
    import pyarrow.parquet as pq

    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.demo", "--weights", "tiny-random", "--limit", "2", "--out", str(out)],
        cwd=REPO_ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=1100,
    )
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "logs").glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    assert "2/2 objects ok" in proc.stdout
    results = pq.read_table(out / "run" / "results.parquet").to_pylist()
    assert [r["status"] for r in results] == ["ok", "ok"]
    for r in results:
        assert (Path(r["output_uri"]) / "mesh.glb").is_file()
        assert (Path(r["output_uri"]) / "result.json").is_file()
    # the demo stops what it started: its Prefect server and serve processes are gone
    import psutil

    pids = [int(p) for p in re.findall(r"\(pid (\d+)", proc.stdout)]
    assert len(pids) == 2
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
