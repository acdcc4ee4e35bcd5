"""The batch job's ceiling at scale (not a test): rows/s at the driver and driver memory, for the
driver loop (``flows.ray_job.driver``) and for a Ray Data pipeline on the same simulated workload.

    python -m benchmarks.bench_batch_scale [--actors 1,4,16,64] [--rows 10000,100000,1000000]
        [--variants driver,ray_data] [--sleep-s 0.05] [--batch-size 16] [--repeats 2]

Workload: a Parquet manifest of N rows (one small PNG shared by all rows), the no-op backend with a
simulated generator latency of ``--sleep-s`` seconds per object (``time.sleep``: a GPU that is
busy, no CPU), K rows per generate call, the real fetch (read + decode) and finalize
(``objects/<id>/`` + ``result.json``) on local disk, results streamed into a ``ResultsWriter``.
Generator actors reserve 0.01 CPU each so 64 of them fit a small machine.

Variants (same worker functions: ``prepare_image``, the backend's generator, ``finalize_object``):

* ``driver``: ``read_input_manifest`` (record batches) -> ``run_batch`` -> ``ResultsWriter``, with
  ``rows_per_task = K`` (one fetch and one finalize task per batch);
* ``ray_data``: ``read_parquet`` -> ``map_batches`` fetch (CPU tasks) -> ``map_batches`` generate on
  an actor pool -> ``map_batches`` finalize (CPU tasks), exceptions caught per row into status
  columns, results iterated in the driver into the ``ResultsWriter``, and rows missing from the
  output (a lost block, a failed execution) reconciled as failed.

Measured per run, in the driver process: ``steady_rows_per_s`` (rows between the first and the last
result over that time), ``mid_rows_per_s`` (between 25 % and 95 % of the rows: without the start-up of
the actors and the tail), ``wall_s``, ``first_result_s``, the driver process's CPU ms per row
(``driver_cpu_ms_per_row``, user + system: 1000 / it is the driver's own ceiling in rows/s, whatever
the workers cost), the CPU ms per row of the driver and every Ray process under it
(``job_cpu_ms_per_row``) and of the whole machine (``machine_cpu_ms_per_row``, ``machine_cpu_busy``:
other jobs on a shared machine included), and the driver's peak RSS (sampled every 20 ms) with its
growth over the run. Runs of the two variants alternate, so they see the same machine load.
``--profile PREFIX`` runs the driver under cProfile (slower) and writes its top functions.
Writes ``benchmarks/results/batch_scale.json`` (``--out``; ``--append`` adds to the runs there).
"""

from __future__ import annotations

import argparse
import array
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.measure import without_local_paths
from flows.io import storage
from flows.io.manifest import ResultsWriter, identity_json, read_input_manifest, result_row
from flows.ray_job.driver import BatchConfig, run_batch
from flows.ray_job.fake_backends import NoOpBackend
from flows.ray_job.session import start_local_ray
from flows.ray_job.workers import error_info, finalize_object, prepare_image

RESULTS = Path(__file__).resolve().parent / "results" / "batch_scale.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
ACTOR_CPUS = 0.01
# CPUs reserved per fetch/finalize task (``--task-cpus``, default 0.05): these tasks mostly wait on the
# disk here (a finalize costs ~1.2 ms of CPU but ~14 ms of wall time, fsync-bound), so a small
# reservation lets enough of them run at once; both variants use the same value.


def write_manifest(folder: Path, n: int) -> str:
    """A manifest of ``n`` rows (ids ``row0000000``...), every row the same PNG, in row groups of 64k."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "img.png"
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (32, 40), (200, 60, 40, 255)), (16, 12))
    img.save(image)
    uri = str(folder / f"manifest-{n}.parquet")
    with pq.ParquetWriter(uri, pa.schema([("id", pa.string()), ("image_uri", pa.string())])) as w:
        for start in range(0, n, 65536):
            ids = [f"row{i:07d}" for i in range(start, min(n, start + 65536))]
            w.write_table(pa.table({"id": ids, "image_uri": [str(image)] * len(ids)}))
    return uri


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (all processes: driver, Ray workers, raylet, others)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


class JobCpu:
    """CPU seconds of this process and every process under it (the local Ray node it started: raylet,
    GCS, workers, actors), sampled: Ray reaps its workers without adding their time to its own, so each
    process's CPU time is read while it lives and the last reading counts (at most one sampling interval
    of a process that exits is missed)."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.base: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU s at the start
        self.last: dict[tuple[int, float], float] = {}
        for key, cpu in self._read():
            self.base[key] = cpu

    def _read(self) -> list[tuple[tuple[int, float], float]]:
        out = []
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out.append(((p.pid, p.create_time()), t.user + t.system))
            except psutil.Error:
                continue
        return out

    def sample(self) -> None:
        for key, cpu in self._read():
            self.last[key] = cpu

    def seconds(self) -> float:
        return sum(cpu - self.base.get(key, 0.0) for key, cpu in self.last.items())


class DriverProbe:
    """Peak RSS (sampled every 20 ms) and CPU seconds of this process over a block, and the times of
    the first and last result."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self.first: float | None = None
        self.last: float | None = None
        self.rows = 0
        self.times = array.array("d")  # harness only: 8 bytes a row
        self.track: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        next_track = next_cpu = 0.0
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peak = max(self.peak, rss)
            now = time.perf_counter()
            if now >= next_cpu:
                self.job.sample()
                next_cpu = now + 0.5
            if now >= next_track:  # the RSS timeline: [seconds, rows done, RSS MB] every 10 s
                self.track.append([round(now - self.t0, 1), self.rows, round(rss / 2**20, 1)])
                next_track = now + 10.0
            time.sleep(0.02)

    def row(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.rows += 1
        self.times.append(now)

    def __enter__(self) -> DriverProbe:
        self.rss_before = self.proc.memory_info().rss
        self.cpu_before = sum(self.proc.cpu_times()[:2])
        self.machine_before = _busy_cpu_s()
        self.job = JobCpu()
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = sum(self.proc.cpu_times()[:2]) - self.cpu_before
        self.machine_cpu = _busy_cpu_s() - self.machine_before
        self._stop.set()
        self._thread.join()
        self.job.sample()
        self.job_cpu = self.job.seconds()

    def mid_rate(self, lo: float = 0.25, hi: float = 0.95) -> float | None:
        """Rows/s between ``lo`` and ``hi`` of the rows done: without actor start-up and the tail."""
        a, b = int(lo * len(self.times)), int(hi * len(self.times)) - 1
        if b <= a or self.times[b] <= self.times[a]:
            return None
        return (b - a) / (self.times[b] - self.times[a])

    def report(self) -> dict[str, Any]:
        steady = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        mid = self.mid_rate()
        return {
            "mid_rows_per_s": round(mid, 1) if mid else None,
            "rows": self.rows,
            "wall_s": round(self.wall, 2),
            "first_result_s": round(self.first - self.t0, 2) if self.first else None,
            "steady_rows_per_s": round((self.rows - 1) / steady, 1) if steady > 0 else None,
            "driver_cpu_ms_per_row": round(1000 * self.cpu / max(self.rows, 1), 3),
            "job_cpu_ms_per_row": round(1000 * self.job_cpu / max(self.rows, 1), 3),
            "machine_cpu_ms_per_row": round(1000 * self.machine_cpu / max(self.rows, 1), 3),
            "machine_cpu_busy": round(self.machine_cpu / (self.wall * (os.cpu_count() or 1)), 3),
            "driver_rss_before_mb": round(self.rss_before / 2**20, 1),
            "driver_peak_rss_mb": round(self.peak / 2**20, 1),
            "driver_rss_growth_mb": round((self.peak - self.rss_before) / 2**20, 1),
            "rss_timeline": self.track,  # [s, rows done, driver RSS MB]
        }


# --------------------------------------------------------------------------- variant 1: the driver loop
def run_driver(
    manifest_uri: str, out: Path, actors: int, k: int, sleep_s: float, task_cpus: float
) -> dict[str, Any]:
    backend = NoOpBackend(sleep_s=sleep_s, write_files=False)
    manifest = read_input_manifest(manifest_uri)
    writer = ResultsWriter(str(out / "results.parquet"))
    config = BatchConfig(
        output_uri=str(out),
        batch_size=k,
        num_actors=actors,
        actor_num_cpus=ACTOR_CPUS,
        task_num_cpus=task_cpus,
        rows_per_task=k,
        timeout_s=7200,
    )
    with DriverProbe() as probe:

        def on_result(row: dict[str, Any]) -> None:
            writer.write(row)
            probe.row()

        stats = run_batch(manifest.rows(), backend, config, on_result)
        writer.close()
    report = probe.report()
    report.update(ok=stats.ok, failed=stats.failed, generate_calls=stats.generate_calls)
    return report


# --------------------------------------------------------------------------- variant 2: Ray Data
def _fetch_batch(batch: pa.Table, backend: Any) -> pa.Table:
    """Fetch + decode + preprocess each row; failures become status columns, not exceptions."""
    images, ok, errors = [], [], []
    for uri in batch.column("image_uri").to_pylist():
        status, image = prepare_image(uri, None, backend)
        ok.append(status["ok"])
        images.append(pickle.dumps(image) if status["ok"] else None)
        errors.append(None if status["ok"] else json.dumps(status))
    return (
        batch.append_column("ok", pa.array(ok))
        .append_column("image", pa.array(images, pa.binary()))
        .append_column("error", pa.array(errors, pa.string()))
    )


class _GenerateBatch:
    """Ray Data actor UDF: the backend's generator loaded once; a failing batch is retried row by row."""

    def __init__(self, backend: Any):
        self.generator = backend.load()

    def _generate(self, images: list, ids: list[str]) -> list:
        return self.generator.generate(images, ids, [0] * len(ids), preprocessed=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        ok = batch.column("ok").to_pylist()
        errors = batch.column("error").to_pylist()
        todo = [i for i, good in enumerate(ok) if good]
        images = [pickle.loads(b) for b in batch.column("image").to_pylist() if b is not None]
        objects: list[bytes | None] = [None] * len(ids)
        try:
            for i, obj in zip(todo, self._generate(images, [ids[i] for i in todo])):
                objects[i] = pickle.dumps(obj)
        except Exception:  # noqa: BLE001 - isolate the failing row
            for i, image in zip(todo, images):
                try:
                    objects[i] = pickle.dumps(self._generate([image], [ids[i]])[0])
                except Exception as exc:  # noqa: BLE001
                    ok[i], errors[i] = False, json.dumps(error_info(exc))
        out = batch.drop_columns(["image", "ok", "error"])
        return (
            out.append_column("ok", pa.array(ok))
            .append_column("object", pa.array(objects, pa.binary()))
            .append_column("error", pa.array(errors, pa.string()))
        )


def _finalize_batch(batch: pa.Table, backend: Any, output_uri: str, run_info: dict[str, str]) -> pa.Table:
    """Finalize each generated object; every row leaves as its results row (JSON text)."""
    rows = []
    for r in batch.to_pylist():
        if not r["ok"]:
            err = json.loads(r["error"])
            row = result_row(
                r["id"],
                "failed",
                image_uri=r["image_uri"],
                error_class=err["error_class"],
                error_message=err["error_message"],
                attempts=1,
                **run_info,
            )
        else:
            item = {
                "id": r["id"],
                "image_uri": r["image_uri"],
                "seed": 0,
                "attempts": 1,
                "worker": "ray-data",
            }
            row = finalize_object(item, backend, pickle.loads(r["object"]), output_uri, None, run_info)
        rows.append(json.dumps(row, default=str))
    return pa.table({"id": batch.column("id"), "result": pa.array(rows, pa.string())})


def run_ray_data(
    manifest_uri: str, out: Path, actors: int, k: int, sleep_s: float, task_cpus: float
) -> dict[str, Any]:
    import ray.data

    backend = NoOpBackend(sleep_s=sleep_s, write_files=False)
    run_info = {
        "weights_identity": identity_json(backend.weights_identity()),
        "options_hash": backend.options_hash(),
    }
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    writer = ResultsWriter(str(out / "results.parquet"))
    seen: set[str] = set()
    lost: str | None = None
    with DriverProbe() as probe:
        # 0.25 CPU per read task (a whole CPU may never be free next to the actors); blocks of 16 batches,
        # cut while streaming, so every actor gets input from the start
        ds = ray.data.read_parquet(manifest_uri, num_cpus=0.25).select_columns(["id", "image_uri"])
        ds = ds.repartition(target_num_rows_per_block=16 * k)
        ds = ds.map_batches(
            _fetch_batch,
            fn_kwargs={"backend": backend},
            batch_size=k,
            batch_format="pyarrow",
            num_cpus=task_cpus,
        )
        ds = ds.map_batches(
            _GenerateBatch,
            fn_constructor_kwargs={"backend": backend},
            batch_size=k,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ACTOR_CPUS,
        )
        ds = ds.map_batches(
            _finalize_batch,
            fn_kwargs={"backend": backend, "output_uri": str(out), "run_info": run_info},
            batch_size=k,
            batch_format="pyarrow",
            num_cpus=task_cpus,
        )
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for text in batch.column("result").to_pylist():
                    row = json.loads(text)
                    seen.add(row["id"])
                    writer.write(row)
                    probe.row()
        except Exception as exc:  # noqa: BLE001 - the rows it lost are reconciled below
            lost = f"{type(exc).__name__}: {str(exc)[:300]}"
        manifest = read_input_manifest(manifest_uri)  # reconcile: rows missing from the output are failed
        missing = 0
        for r in manifest.rows():
            if r.id not in seen:
                missing += 1
                writer.write(
                    result_row(
                        r.id,
                        "failed",
                        image_uri=r.image_uri,
                        error_class="RowLost",
                        error_message=lost or "missing from the output",
                        **run_info,
                    )
                )
        writer.close()
    report = probe.report()
    report.update(
        ok=writer.status_counts.get("ok", 0),
        failed=writer.status_counts.get("failed", 0),
        reconciled_missing=missing,
        execution_error=lost,
    )
    return report


VARIANTS: dict[str, Callable[..., dict[str, Any]]] = {"driver": run_driver, "ray_data": run_ray_data}


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        commit = None
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--actors",
        default="1,4,16,64",
        help="actor counts for the sweep; the largest also runs the --rows sizes",
    )
    ap.add_argument("--sweep-rows", type=int, default=4000, help="manifest size of the actor sweep (0: none)")
    ap.add_argument("--rows", default="10000,100000,1000000", help="manifest sizes (at the largest --actors)")
    ap.add_argument("--variants", default="driver,ray_data", help="driver, ray_data")
    ap.add_argument("--sweep-variants", default="driver", help="variants run in the actor sweep")
    ap.add_argument("--sleep-s", type=float, default=0.05, help="simulated generator seconds per object")
    ap.add_argument("--batch-size", type=int, default=16, help="K rows per generate call")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration below --once-above rows")
    ap.add_argument("--once-above", type=int, default=100000, help="larger manifests run once per variant")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray node (default: all)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temp folder, removed)")
    ap.add_argument("--append", action="store_true", help="add these runs to the recorded ones")
    ap.add_argument("--task-cpus", type=float, default=0.05, help="CPUs reserved per fetch/finalize task")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (default: benchmarks/results/)")
    ap.add_argument("--profile", default=None, help="cProfile the driver; writes <PROFILE>-<run>.txt")
    args = ap.parse_args(argv)
    out_path = Path(args.out)
    actor_counts = [int(a) for a in args.actors.split(",") if a]
    row_counts = [int(r) for r in args.rows.split(",") if r]
    variants = [v for v in args.variants.split(",") if v]

    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    report: dict[str, Any] = {"machine": _machine(), "args": vars(args), "runs": []}
    if args.append and out_path.is_file():
        earlier = json.loads(out_path.read_text())
        report["runs"] = earlier.get("runs", [])
        report["earlier_invocations"] = [*earlier.get("earlier_invocations", []), earlier.get("args")]
    start_local_ray(num_cpus=args.num_cpus)
    report["machine"]["ray_cpus"] = ray.cluster_resources().get("CPU")

    def one(variant: str, n_rows: int, actors: int, rep: int) -> None:
        if n_rows not in manifests:
            manifests[n_rows] = write_manifest(work / "in", n_rows)
        manifest = manifests[n_rows]
        out = work / f"out-{variant}-{n_rows}-{actors}-{rep}"
        load = os.getloadavg()
        call = (manifest, out, actors, args.batch_size, args.sleep_s, args.task_cpus)
        if args.profile:  # the driver process under cProfile (slower: for where the time goes, not rates)
            import cProfile
            import pstats

            prof = cProfile.Profile()
            res = prof.runcall(VARIANTS[variant], *call)
            with open(f"{args.profile}-{variant}-{n_rows}-{actors}.txt", "w") as fh:
                pstats.Stats(prof, stream=fh).sort_stats("tottime").print_stats(40)
        else:
            res = VARIANTS[variant](*call)
        res.update(
            variant=variant,
            manifest_rows=n_rows,
            actors=actors,
            repeat=rep,
            load_avg_before=load,
            load_avg_after=os.getloadavg(),
        )
        report["runs"].append(res)
        print(json.dumps(res), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        _save(report, out_path)

    manifests: dict[int, str] = {}
    try:
        for actors in actor_counts if args.sweep_rows else []:  # actor sweep
            for variant in [v for v in args.sweep_variants.split(",") if v in variants]:
                one(variant, args.sweep_rows, actors, 0)
        top = max(actor_counts)
        for n_rows in row_counts:  # manifest sizes at the most actors, variants alternating
            reps = args.repeats if n_rows <= args.once_above else 1
            for rep in range(reps):
                for variant in variants if rep % 2 == 0 else variants[::-1]:
                    one(variant, n_rows, top, rep)
    finally:
        ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["summary"] = _summary(report["runs"])
    _save(report, out_path)
    print(json.dumps(report["summary"], indent=1))
    return report


def _summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repeats per (variant, rows, actors, invocation: when runs of several are merged)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        key = (r["variant"], r["manifest_rows"], r["actors"], r.get("invocation") or "")
        groups.setdefault(key, []).append(r)
    out = []
    for (variant, n_rows, actors, invocation), rs in sorted(groups.items()):

        def med(key: str, rs=rs) -> float | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return round(statistics.median(vals), 3) if vals else None

        out.append(
            {
                "variant": variant,
                **({"invocation": invocation} if invocation else {}),
                "manifest_rows": n_rows,
                "actors": actors,
                "runs": len(rs),
                "steady_rows_per_s": med("steady_rows_per_s"),
                "mid_rows_per_s": med("mid_rows_per_s"),
                "wall_s": med("wall_s"),
                "first_result_s": med("first_result_s"),
                "driver_cpu_ms_per_row": med("driver_cpu_ms_per_row"),
                "driver_ceiling_rows_per_s": _ceiling(med("driver_cpu_ms_per_row")),
                "job_cpu_ms_per_row": med("job_cpu_ms_per_row"),
                "machine_cpu_ms_per_row": med("machine_cpu_ms_per_row"),
                "machine_cpu_busy": med("machine_cpu_busy"),
                "driver_peak_rss_mb": med("driver_peak_rss_mb"),
                "driver_rss_growth_mb": med("driver_rss_growth_mb"),
            }
        )
    return out


def _ceiling(cpu_ms_per_row: float | None) -> int | None:
    """Rows/s the driver could sustain on one core of its own: 1000 / its CPU ms per row."""
    return round(1000 / cpu_ms_per_row) if cpu_ms_per_row else None


def _save(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(without_local_paths(report), indent=2, default=str)
    storage.write_bytes_atomic(str(path), text.encode())


if __name__ == "__main__":
    main()
