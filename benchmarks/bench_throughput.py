"""Steady-state cost per object through the Ray job the flow runs, with a per-stage timeline (not a test).

The rows go through ``flows.ray_job.driver.run_batch`` on a Ray session
(``flows.ray_job.session.ray_session``): fetch tasks, resident generator actors, finalize tasks writing
every file to the output storage, results rows: the same job the ``crm-batch`` flow runs. The backend is
the real pipeline (``flows.ray_job.backends.CRMBackend``) wrapped in :class:`TimelineBackend`, which adds
wall-clock timestamps to each object's timings (when its batch's ``generate`` started and ended on the
actor, when its finalize task started and ended, the task's CPU seconds and, on CUDA, the actor's peak
GPU memory); those travel in the results rows, so the timeline is rebuilt from what the job itself
reports.

From the timeline, after ``--warmup-batches`` batches (model load, first calls, pipeline fill):

* ``s_per_object_steady``: generator-side rate inside the steady window (from the end of the last
  warm-up batch to the end of the last batch); with the driver's backpressure the slower side sets it.
  ``s_per_object_completed`` is the same from finalize completions (cross-check);
* ``gpu_busy_fraction``: share of the window in which an actor was inside ``generate`` (on a CPU-only
  run: the generator actor's busy share);
* seconds per object per stage (medians): stage 1, stage 2, reconstruction (each object's share of its
  batch call), the whole ``generate`` share, fetch, preprocess, finalize wall and CPU and its steps;
* finalize queue depth (objects generated and waiting for a finalize task, and finalize tasks running):
  time-weighted mean and max over the window;
* CPU utilisation of the machine (psutil, sampled every 0.5 s in the driver process): mean and p95.

Usage::

    # the proof of the code path on any machine: tiny random models on the CPU
    python benchmarks/bench_throughput.py --weights tiny-random --device cpu --objects 16 --batch-size 2
    # the real measurement on one GPU (official weights; 20 steady batches of 8 after 2 warm-up batches)
    python benchmarks/bench_throughput.py --weights auto --device cuda --batch-size 8 --objects 176 \\
        --sampler ddim --steps 50
    python benchmarks/bench_throughput.py --weights auto --device cuda --batch-sizes 8 16 32 --objects 352 \\
        --sampler dpmpp --steps 10

Writes ``benchmarks/results/throughput_<device>.json`` (``--out`` to change); ``device`` is the CUDA device
name (``nvidia-h100-80gb-hbm3``...) or ``cpu``. A CPU run records the GPU figures as "not measured".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flows.ray_job.fake_backends import WrappingBackend  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NOT_MEASURED = "not measured"

# The targets (one H100, steady state through the Ray job, 1024 texture), for the record.
TARGETS = {
    "ddim_50+50": {"sampler": "ddim", "steps": 50, "target_s_per_object": 1.0},
    "dpmpp_10+10": {"sampler": "dpmpp", "steps": 10, "target_s_per_object": 0.4},
}


# ------------------------------------------------------------------------------------ the backend
class _TimelineGenerator:
    """Wraps the pipeline of a generator actor; stamps each object of a batch with the call's times."""

    def __init__(self, inner: Any):
        self.inner = inner

    def generate(self, images: list, ids: list[str], seeds: list[int] | None = None, **kwargs: Any) -> list:
        import torch

        cuda = torch.cuda.is_available()
        t0 = time.time()
        objs = self.inner.generate(images, ids, seeds, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.time()
        stamps = {"t_generate_start": t0, "t_generate_end": t1, "batch_objects": float(len(ids))}
        if cuda:
            stamps["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        for obj in objs:
            obj.timings.update(stamps)
        return objs


class TimelineBackend(WrappingBackend):
    """A batch backend (``CRMBackend`` interface) that adds timeline stamps to each object's timings.

    Generator side: ``t_generate_start`` / ``t_generate_end`` (Unix seconds, the batch's ``generate``
    call), ``batch_objects``, ``peak_gpu_mem_gb`` (CUDA). Finalize side: ``t_finalize_start`` /
    ``t_finalize_end``, ``finalize_cpu_s`` (CPU seconds of the finalize call in its worker process) and
    ``finalize_torch_threads`` (torch's intra-op threads in that process).
    """

    def __init__(self, inner: Any):
        self.inner = inner

    def load(self) -> _TimelineGenerator:
        return _TimelineGenerator(self.inner.load())

    def finalize(self, obj: Any, destination: Any) -> Any:
        import torch

        t0, c0 = time.time(), time.process_time()
        res = self.inner.finalize(obj, destination)
        res.timings = {
            **(res.timings or {}),
            "t_finalize_start": t0,
            "t_finalize_end": time.time(),
            "finalize_cpu_s": time.process_time() - c0,
            "finalize_torch_threads": float(torch.get_num_threads()),
        }
        return res


# ------------------------------------------------------------------------------------ measurement
class CpuSampler:
    """System-wide CPU utilisation (percent of all cores) every `interval` seconds, with timestamps."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._psutil.cpu_percent(None)
        while not self._stop.wait(self.interval):
            self.samples.append((time.time(), self._psutil.cpu_percent(None)))

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def _union_length(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of `intervals` clipped to [lo, hi]."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, cur_a, cur_b = 0.0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def _depth(events: list[tuple[float, int]], lo: float, hi: float) -> tuple[float, int]:
    """Time-weighted mean and max of a counter given (time, +1/-1) events, over [lo, hi]."""
    level, area, peak, last = 0, 0.0, 0, lo
    for t, d in sorted(events):
        if t > lo:
            seg = min(t, hi) - last
            if seg > 0:
                area += level * seg
                last = min(t, hi)
        level += d
        if lo <= t <= hi:
            peak = max(peak, level)
        if t >= hi:
            break
    if last < hi:
        area += level * (hi - last)
    return (area / (hi - lo) if hi > lo else 0.0), peak


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def analyse(rows: list[dict], warmup_batches: int, cpu_samples: list[tuple[float, float]]) -> dict:
    """Timeline figures from the results rows (see the module docstring)."""
    ok = [r for r in rows if r["status"] == "ok" and "t_generate_end" in r["timings"]]
    calls = sorted({(r["timings"]["t_generate_start"], r["timings"]["t_generate_end"]) for r in ok})
    if len(calls) <= warmup_batches + 1:
        raise ValueError(
            f"{len(calls)} generate calls: need more than warm-up ({warmup_batches}) + 1 for a steady window"
        )
    lo, hi = calls[warmup_batches - 1][1] if warmup_batches else calls[0][0], calls[-1][1]
    in_window = [r for r in ok if lo < r["timings"]["t_generate_end"] <= hi]
    completed = [r for r in ok if lo < r["timings"]["t_finalize_end"] <= hi]
    window = hi - lo
    waiting = [(r["timings"]["t_generate_end"], 1) for r in ok] + [
        (r["timings"]["t_finalize_start"], -1) for r in ok
    ]
    running = [(r["timings"]["t_finalize_start"], 1) for r in ok] + [
        (r["timings"]["t_finalize_end"], -1) for r in ok
    ]
    wait_mean, wait_max = _depth(waiting, lo, hi)
    run_mean, run_max = _depth(running, lo, hi)
    cpu = [p for t, p in cpu_samples if lo <= t <= hi]
    steady = [r["timings"] for r in in_window]
    per_stage = {}
    for key in (
        "stage1",
        "stage2",
        "reconstruct",
        "generate",
        "fetch",
        "preprocess",
        "finalize",
        "finalize_cpu_s",
        "finalize_torch_threads",
    ):
        per_stage[key] = _median([t[key] for t in steady if key in t])
    for key in ("clean", "bake", "qc", "export", "views", "preview"):
        per_stage[f"finalize.{key}"] = _median([t[key] for t in steady if key in t])
    gen_wait = [t["t_finalize_start"] - t["t_generate_end"] for t in steady]
    peak_mem = [t["peak_gpu_mem_gb"] for t in (r["timings"] for r in ok) if "peak_gpu_mem_gb" in t]
    return {
        "generate_calls": len(calls),
        "warmup_batches": warmup_batches,
        "steady_window_s": window,
        "steady_objects": len(in_window),
        "s_per_object_steady": window / len(in_window) if in_window else None,
        "s_per_object_completed": window / len(completed) if completed else None,
        "gpu_busy_fraction": _union_length(calls, lo, hi) / window if window > 0 else None,
        "seconds_per_object": per_stage,
        "finalize_wait_after_generate_s": {"median": _median(gen_wait), "max": max(gen_wait, default=None)},
        "finalize_queue_depth": {
            "waiting_mean": wait_mean,
            "waiting_max": wait_max,
            "running_mean": run_mean,
            "running_max": run_max,
        },
        "cpu_utilisation_percent": {
            "mean": statistics.fmean(cpu) if cpu else None,
            "p95": sorted(cpu)[int(0.95 * (len(cpu) - 1))] if cpu else None,
            "samples": len(cpu),
        },
        "peak_gpu_mem_gb": max(peak_mem) if peak_mem else NOT_MEASURED,
    }


# ------------------------------------------------------------------------------------ the run
def _manifest(n: int):
    from flows.io.manifest import make_input_table, validate_input_table
    from pipeline.samples import sample_images

    imgs = sample_images()
    ids = [f"obj{i:05d}" for i in range(n)]
    return validate_input_table(make_input_table(ids, [str(imgs[i % len(imgs)]) for i in range(n)]))


def run_once(args: argparse.Namespace, batch_size: int, output_uri: str) -> dict:
    from flows.ray_job.backends import CRMBackend
    from flows.ray_job.driver import BatchConfig, run_batch

    options = {
        "sampler": args.sampler,
        "steps": args.steps,
        "texture_size": args.texture_size,
        "device": args.device,
        "dtype": args.dtype,
        "batch_size": batch_size,
        "seed": 0,
    }
    if args.grid_size:
        options["grid_size"] = args.grid_size
    backend = TimelineBackend(CRMBackend(args.weights, options, allow_download=False))
    config = BatchConfig(
        output_uri=output_uri,
        batch_size=batch_size,
        num_actors=args.actors,
        **({"max_pending_finalize": args.max_pending_finalize} if args.max_pending_finalize else {}),
        timeout_s=args.timeout_s,
    )
    rows: list[dict] = []
    t0 = time.time()
    with CpuSampler() as cpu:
        stats = run_batch(_manifest(args.objects).rows(), backend, config, rows.append)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(
            f"{len(failed)} rows failed, first: {failed[0]['error_class']}: {failed[0]['error_message']}"
        )
    res = analyse(rows, args.warmup_batches, cpu.samples)
    res.update(
        {
            "batch_size": batch_size,
            "objects": len(rows),
            "wall_s": time.time() - t0,
            "actor_load_and_warmup_s": min(r["timings"]["t_generate_end"] for r in rows) - t0,
            "workers": stats.workers,
        }
    )
    return res


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        name = torch.cuda.get_device_name(0)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return "cpu"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _dirty() -> bool | None:
    """Whether the code under test differs from the commit (uncommitted changes in the packages)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipeline", "crm_models", "flows", "benchmarks"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        return bool(out.stdout.strip())
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="tiny-random", help="as python -m pipeline --weights")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    ap.add_argument(
        "--objects", type=int, default=16, help="rows (use >= (warm-up + 20) x batch size on a GPU)"
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--batch-sizes", type=int, nargs="+", help="a sweep (one run per size); overrides --batch-size"
    )
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument("--sampler", default="ddim", choices=("ddim", "dpmpp", "unipc"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--grid-size", type=int, default=None, help="FlexiCubes grid (default: the model's)")
    ap.add_argument("--actors", type=int, default=None, help="generator actors (default: one per GPU)")
    ap.add_argument("--max-pending-finalize", type=int, default=None)
    ap.add_argument("--ray-address", default=None, help="join this cluster (default: a local node)")
    ap.add_argument("--output-uri", default=None, help="run folder (default: a temporary folder, removed)")
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/throughput_<device>.json)"
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray import cloudpickle

    from flows.ray_job.session import ray_session

    if __name__ != "__main__":  # ship TimelineBackend by value: workers need not import this file
        cloudpickle.register_pickle_by_value(sys.modules[__name__])

    device = _device_name(args.device)
    sizes = args.batch_sizes or [args.batch_size]
    record: dict[str, Any] = {
        "device": device,
        "path": "ray",
        "weights": args.weights,
        "sampler": args.sampler,
        "steps": args.steps,
        "texture_size": args.texture_size,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _commit(),
        "dirty": _dirty(),
        "machine": {
            "node": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_avg_start": os.getloadavg(),
        },
        "runs": [],
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_session(args.ray_address))
        for k in sizes:
            out_uri = args.output_uri or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="crm-throughput-")
            )
            run = run_once(args, k, out_uri if args.output_uri is None else f"{out_uri.rstrip('/')}/k{k}")
            record["runs"].append(run)
            print(
                f"K={k}: {run['s_per_object_steady']:.3f} s/object steady "
                f"({run['steady_objects']} objects in {run['steady_window_s']:.1f} s), "
                f"generator busy {run['gpu_busy_fraction']:.2f}, "
                f"finalize {run['seconds_per_object']['finalize']:.2f} s wall / "
                f"{run['seconds_per_object']['finalize_cpu_s']:.2f} CPU-s per object, "
                f"queue waiting mean {run['finalize_queue_depth']['waiting_mean']:.1f}"
            )
    record["machine"]["load_avg_end"] = os.getloadavg()
    best = min(record["runs"], key=lambda r: r["s_per_object_steady"])
    record.update(
        {
            "objects": best["objects"],
            "batch_size": best["batch_size"],
            "s_per_object_steady": best["s_per_object_steady"],
            "gpu_busy_fraction": best["gpu_busy_fraction"],
            "peak_gpu_mem_gb": best["peak_gpu_mem_gb"],
        }
    )
    if device == "cpu":
        record["note"] = (
            "CPU run: proves the code path (real Ray job, actors, finalize tasks, storage, results rows) "
            f"with the {args.weights} weights; its seconds say nothing about a GPU. The GPU figures below "
            "were not measured on this machine."
        )
        record["gpu"] = {name: {**t, "s_per_object_steady": NOT_MEASURED} for name, t in TARGETS.items()}
    out = Path(args.out) if args.out else RESULTS / f"throughput_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
