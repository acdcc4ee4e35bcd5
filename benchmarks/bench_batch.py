"""Batch orchestration benchmark (not a test): overhead, actor scaling, driver memory.

    python -m benchmarks.bench_batch [--rows 12] [--model-s 2.0] [--tiny-rows 4] [--big-rows 10000]

1. Overhead: the same rows through (a) a plain Python loop (read image, decode, generate, finalize,
   upload; one after the other) and (b) the Ray job (``flows.ray_job.driver.run_batch``, one actor, K=1),
   with a no-op model that sleeps ``--model-s`` seconds per object (a realistic model time) and with
   no model at all (0 s: pure per-row cost). Reports rows/s and the per-row overhead of (b) over (a) as
   a share of the model time (target < 5 %).
2. Scaling: 1 vs 2 generator actors (0.5 CPU each) on the tiny-random preset (real pipeline).
3. Driver memory: peak RSS of the driver process for a ``--big-rows`` manifest (no-op model; streaming
   keeps it bounded), against a 1,000-row run.

Prints a table and writes ``benchmarks/results/bench_batch.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from flows.io import storage
from flows.io.manifest import ResultsWriter, make_input_table, validate_input_table
from flows.ray_job.driver import BatchConfig, run_batch
from flows.ray_job.fake_backends import NoOpBackend
from flows.ray_job.session import start_local_ray
from pipeline.weights.tiny_configs import SMOKE_OPTIONS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TINY_OPTIONS = {**SMOKE_OPTIONS, "write_obj": False}


def _png_bytes() -> bytes:
    from PIL import Image

    img = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (64, 80), (200, 60, 40, 255)), (32, 24))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _manifest(folder: Path, n: int, distinct_files: int | None = None, images: list[Path] | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        files = [images[i % len(images)] for i in range(n)]
    else:
        k = n if distinct_files is None else distinct_files
        data = _png_bytes()
        paths = []
        for i in range(k):
            p = folder / f"img{i}.png"
            p.write_bytes(data)
            paths.append(p)
        files = [paths[i % k] for i in range(n)]
    ids = [f"row{i:06d}" for i in range(n)]
    return validate_input_table(make_input_table(ids, [str(p) for p in files]))


def plain_loop(manifest, backend, out_uri: str) -> float:
    """The same per-row work without any orchestration: returns seconds."""
    from flows.ray_job.workers import finalize_object, prepare_image

    t0 = time.perf_counter()
    gen = backend.load()
    run_info = {"weights_identity": "{}", "options_hash": backend.options_hash()}
    for row in manifest.rows():
        status, image = prepare_image(row.image_uri, None, backend)
        obj = gen.generate([image], [row.id], [0], input_infos=[status["input_info"]], preprocessed=True)[0]
        item = {
            "id": row.id,
            "image_uri": row.image_uri,
            "seed": 0,
            "attempts": 1,
            "worker": "loop",
            "timings": {},
        }
        row_out = finalize_object(item, backend, obj, out_uri, None, run_info)
        assert row_out["status"] == "ok", row_out
    return time.perf_counter() - t0


def ray_job(manifest, backend, out_uri: str, **config: Any) -> tuple[float, Any, list[dict]]:
    rows: list[dict] = []
    t0 = time.perf_counter()
    stats = run_batch(manifest.rows(), backend, BatchConfig(output_uri=out_uri, **config), rows.append)
    dt = time.perf_counter() - t0
    bad = [r for r in rows if r["status"] != "ok"]
    assert not bad, bad[:3]
    return dt, stats, rows


class PeakRSS:
    """Samples this process's RSS every 20 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _steady_s_per_row(rows: list[dict]) -> float:
    """Seconds between consecutive finished rows (excludes the run's start-up: actor start, model load)."""
    t = sorted(r["finished_at"] for r in rows)
    return (t[-1] - t[0]).total_seconds() / (len(t) - 1)


def bench_overhead(work: Path, rows: int, model_s: float, repeats: int) -> dict[str, Any]:
    """Per-row cost: plain loop vs the Ray job in steady state (one actor, K=1).

    The Ray job has a fixed cost per run (actor process start, model load) that does not grow with
    the manifest; its per-row cost is the time between consecutive finished rows.
    """
    out: dict[str, Any] = {}
    manifest = _manifest(work / "ovh", rows)
    for s in (0.0, model_s):
        backend = NoOpBackend(sleep_s=s)
        ray_job(
            manifest, backend, str(work / f"warm-{s}"), batch_size=1, num_actors=1
        )  # warm the task workers
        loop_t, ray_t, ray_row = [], [], []
        for r in range(repeats):
            loop_t.append(plain_loop(manifest, backend, str(work / f"loop-{s}-{r}")))
            dt, _, res = ray_job(manifest, backend, str(work / f"ray-{s}-{r}"), batch_size=1, num_actors=1)
            ray_t.append(dt)
            ray_row.append(_steady_s_per_row(res))
        lo, ra, rr = statistics.median(loop_t), statistics.median(ray_t), statistics.median(ray_row)
        loop_row = lo / rows
        out[f"model_{s:g}s"] = {
            "rows": rows,
            "loop_s": round(lo, 3),
            "ray_s_total": round(ra, 3),
            "ray_fixed_cost_s": round(ra - rows * rr, 2),
            "loop_s_per_row": round(loop_row, 4),
            "ray_steady_s_per_row": round(rr, 4),
            "loop_rows_per_s": round(1 / loop_row, 3),
            "ray_steady_rows_per_s": round(1 / rr, 3),
            "overhead_per_row_s": round(rr - loop_row, 4),
            "overhead_pct_of_model_time": round(100 * (rr - loop_row) / s, 2) if s else None,
        }
    return out


def bench_scaling(work: Path, rows: int, images: list[Path]) -> dict[str, Any]:
    from flows.ray_job.backends import CRMBackend

    backend = CRMBackend("tiny-random", TINY_OPTIONS)
    manifest = _manifest(work / "scale", rows, images=images)
    out: dict[str, Any] = {"rows": rows, "options": TINY_OPTIONS}
    for n in (1, 2):
        dt, stats, res = ray_job(manifest, backend, str(work / f"scale-{n}"), batch_size=1, num_actors=n)
        steady = _steady_s_per_row(res) if len(res) > 1 else float("nan")
        out[f"actors_{n}"] = {
            "wall_s": round(dt, 2),
            "rows_per_min_wall": round(60 * rows / dt, 3),
            "steady_s_per_row": round(steady, 3),
            "steady_rows_per_min": round(60 / steady, 3),
            "workers": stats.workers,
        }
    out["speedup_wall"] = round(out["actors_1"]["wall_s"] / out["actors_2"]["wall_s"], 3)
    # model loading happens once per actor and in parallel; the steady rate is what a long run sees
    out["speedup_steady"] = round(
        out["actors_1"]["steady_s_per_row"] / out["actors_2"]["steady_s_per_row"], 3
    )
    return out


def bench_memory(work: Path, big_rows: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sorted({min(1000, big_rows), big_rows}):
        manifest = _manifest(work / f"mem-{n}", n, distinct_files=16)
        base = psutil.Process().memory_info().rss
        writer = ResultsWriter(str(work / f"mem-{n}" / "results.parquet"))
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            config = BatchConfig(output_uri=str(work / f"mem-out-{n}"), batch_size=32, num_actors=1)
            stats = run_batch(manifest.rows(), NoOpBackend(write_files=False), config, writer.write)
            writer.close()
        dt = time.perf_counter() - t0
        assert stats.ok == n, stats
        out[f"rows_{n}"] = {
            "seconds": round(dt, 2),
            "rows_per_s": round(n / dt, 1),
            "driver_rss_before_mb": round(base / 2**20, 1),
            "driver_peak_rss_mb": round(peak.peak / 2**20, 1),
            "driver_growth_mb": round((peak.peak - base) / 2**20, 1),
        }
        print(json.dumps({f"rows_{n}": out[f"rows_{n}"]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=12, help="rows for the overhead comparison")
    ap.add_argument("--model-s", type=float, default=2.0, help="simulated model seconds per row")
    ap.add_argument("--repeats", type=int, default=1, help="repeats (median) of the overhead runs")
    ap.add_argument("--tiny-rows", type=int, default=4, help="rows for 1 vs 2 actors (0 = skip)")
    ap.add_argument("--big-rows", type=int, default=10000, help="rows for the driver-memory run (0 = skip)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray node (default: all)")
    ap.add_argument("--sections", default="overhead,memory,scaling", help="comma-separated sections to run")
    args = ap.parse_args(argv)

    import ray

    # Ray runs its workers at niceness 15 by default; the plain loop runs at 0. Same priority for both.
    os.environ.setdefault("RAY_worker_niceness", "0")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
        "args": vars(args),
    }
    t0 = time.perf_counter()
    start_local_ray(num_cpus=args.num_cpus)
    report["ray_init_s"] = round(time.perf_counter() - t0, 1)
    try:
        sections = set(args.sections.split(","))
        if "overhead" in sections:
            report["overhead"] = bench_overhead(work, args.rows, args.model_s, args.repeats)
            print(json.dumps(report["overhead"], indent=1), flush=True)
        if args.tiny_rows and "scaling" in sections:
            from pipeline.samples import sample_images

            images = sample_images(args.tiny_rows)
            report["scaling_tiny"] = bench_scaling(work, args.tiny_rows, images)
            print(json.dumps(report["scaling_tiny"], indent=1), flush=True)
        if args.big_rows and "memory" in sections:
            report["memory"] = bench_memory(work, args.big_rows)
            print(json.dumps(report["memory"], indent=1), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_avg_at_end"] = os.getloadavg()

    print("\n| measurement | value |\n|---|---|")
    for key, val in report.get("overhead", {}).items():
        rates = f"{val['loop_rows_per_s']} / {val['ray_steady_rows_per_s']}"
        print(f"| {key}: loop / ray (steady) rows/s | {rates} |")
        print(
            f"| {key}: overhead per row (s) | {val['overhead_per_row_s']} "
            f"({val['overhead_pct_of_model_time']} %) |"
        )
    for key, val in report.get("memory", {}).items():
        print(
            f"| {key}: driver peak RSS / growth (MB) | {val['driver_peak_rss_mb']} "
            f"/ {val['driver_growth_mb']} |"
        )
    if "scaling_tiny" in report:
        sc = report["scaling_tiny"]
        print(
            f"| tiny: 1 actor / 2 actors wall (s) | {sc['actors_1']['wall_s']} / {sc['actors_2']['wall_s']} |"
        )
        print(
            f"| tiny: speedup 2 vs 1 actors (wall / steady) | {sc['speedup_wall']} / {sc['speedup_steady']} |"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target = RESULTS_DIR / "bench_batch.json"
    merged: dict[str, Any] = json.loads(target.read_text()) if target.is_file() else {}
    merged.update(report)  # sections run separately accumulate in one file
    storage.write_bytes_atomic(str(target), json.dumps(merged, indent=2, default=str).encode())
    print(f"\nwritten {target}")
    return report


if __name__ == "__main__":
    main()
