"""Shared measuring helpers of the loading / reconstruction / multi-view benchmarks.

* `machine()`: what every recorded result carries (CPU model, cores, torch threads, torch version,
  load averages, commit with a dirty flag, time);
* `MemorySampler`: peak resident memory of this process, split into anonymous and file-backed pages
  (a memory-mapped checkpoint counts as file pages), plus the kernel's exact high-water mark;
* `interleaved(fns, repeats)`: time several callables round-robin (A B A B ...), so that a shared,
  noisy machine slows each of them alike, and report medians of wall and CPU time;
* `run_worker(...)`: one measurement in a fresh Python process (its peak RSS is its own).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """HEAD of the repository, with ``+dirty`` when tracked files under crm_models/ or pipeline/ differ."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "crm_models", "pipeline"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _status_mb() -> dict[str, float]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


class MemorySampler:
    """Samples this process's resident memory every `interval` s in a background thread.

    `peak()` -> {"hwm_mb": kernel high-water mark of the whole RSS (exact), "anon_mb" / "file_mb" /
    "rss_mb": sampled peaks}. `mark()` records the current values under a name.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self._peak = {"RssAnon": 0.0, "RssFile": 0.0, "VmRSS": 0.0}
        self.marks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[str, float]:
        s = _status_mb()
        for k in self._peak:
            self._peak[k] = max(self._peak[k], s.get(k, 0.0))
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def mark(self, name: str) -> dict[str, float]:
        s = self._sample()
        self.marks[name] = {k: round(v, 1) for k, v in s.items()}
        return self.marks[name]

    def peak(self) -> dict[str, float]:
        s = self._sample()
        return {
            "hwm_mb": round(s.get("VmHWM", 0.0), 1),
            "rss_mb": round(self._peak["VmRSS"], 1),
            "anon_mb": round(self._peak["RssAnon"], 1),
            "file_mb": round(self._peak["RssFile"], 1),
        }


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Call each of `fns` `repeats` times, round-robin; per name: all wall / CPU times and medians."""
    out: dict[str, dict[str, Any]] = {name: {"wall_s": [], "cpu_s": [], "load_1m": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            fn()
            wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
            out[name]["wall_s"].append(round(wall, 3))
            out[name]["cpu_s"].append(round(cpu, 3))
            out[name]["load_1m"].append(round(os.getloadavg()[0], 2))
    for rec in out.values():
        rec["median_wall_s"] = round(statistics.median(rec["wall_s"]), 3)
        rec["median_cpu_s"] = round(statistics.median(rec["cpu_s"]), 3)
    return out


def run_worker(
    script: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 3600
) -> dict:
    """Run ``python script worker ARGS`` in a fresh process; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, str(script), "worker", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# an absolute path's folders (not after ':' or '/', so URLs stay whole): what a recorded result must not carry
_LOCAL_DIRS = re.compile(r"(?<![\w.:/])/(?:[\w.+-]+/)+")


def without_local_paths(value: Any) -> Any:
    """`value` (JSON-like) with the folders of every absolute path replaced by ``<local>/``: recorded
    results name files, not the machine's folders (``/scratch/crm/CRM.pth`` -> ``<local>/CRM.pth``)."""
    if isinstance(value, str):
        return _LOCAL_DIRS.sub("<local>/", value)
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_local_paths(v) for v in value]
    return value


def save(name: str, payload: dict) -> Path:
    """Write `payload` to benchmarks/results/<name>.json (sorted keys, trailing newline, no local folders)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(without_local_paths(payload), indent=2, sort_keys=True) + "\n")
    return path
