"""Benchmark of FlexiCubes alone (crm_models.flexicubes) at CRM's grid size 80 on CPU.

Cases (each in its own subprocess, so that its peak RSS is its own):
  * sphere        - plain sphere sdf r = 0.5 (CRM sign), undeformed grid, zero weights (~7.5k vertices);
  * sphere_deform - sphere r = 0.4537 with a random deformation (<= 1/4 cell) and random weights;
  * blobby        - a smooth random field: sphere prior plus 24 random low-frequency Fourier modes, random
                    deformation and weights (several components, handles, multi-vertex cubes: the kind
                    of surface an untrained network produces);
  * noise         - (only with --stress) i.i.d. N(0, 1) values: the worst case, ~0.7M vertices.

Each case runs one untimed warm-up (table generation, allocator), then --runs timed runs; the median is
reported. Peak RSS is the process high-water mark (Python + torch + inputs + extraction);
`inputs_rss_mb` is the RSS after the inputs were built, before any extraction. Results are printed as a
table and written to benchmarks/results/bench_flexicubes.json.

Usage: ``python benchmarks/bench_flexicubes.py [--res 80] [--runs 7] [--threads N] [--stress]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CASES = ("sphere", "sphere_deform", "blobby")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _inputs(case: str, res: int):
    import torch

    from crm_models.flexicubes import construct_grid

    g = torch.Generator().manual_seed(0)
    verts, cubes = construct_grid(res)
    n_cubes = cubes.shape[0]

    def deform():
        return verts + torch.tanh(torch.randn(verts.shape, generator=g)) / (2 * res)

    if case == "sphere":
        return verts, 0.5 - verts.norm(dim=1), cubes, torch.zeros((n_cubes, 21))
    if case == "sphere_deform":
        w = torch.randn((n_cubes, 21), generator=g) * 0.1
        return deform(), 0.4537 - verts.norm(dim=1), cubes, w
    if case == "blobby":
        freq = torch.randn((24, 3), generator=g) * 3.0
        phase = torch.rand(24, generator=g) * 2 * torch.pi
        amp = torch.randn(24, generator=g) * 0.08
        s = 0.5 - verts.norm(dim=1) + (torch.sin(verts @ freq.T + phase) * amp).sum(dim=1)
        return deform(), s, cubes, torch.randn((n_cubes, 21), generator=g) * 0.1
    if case == "noise":
        s = torch.randn(verts.shape[0], generator=g)
        return deform(), s, cubes, torch.randn((n_cubes, 21), generator=g) * 0.1
    raise ValueError(f"unknown case {case!r}")


def worker(case: str, res: int, runs: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from crm_models.flexicubes import flexicubes_extract

    x, s, cubes, w = _inputs(case, res)
    inputs_rss = _rss_mb()
    t0 = time.perf_counter()
    out = flexicubes_extract(x, s, cubes, res, w)
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = flexicubes_extract(x, s, cubes, res, w)
        times.append(time.perf_counter() - t0)
    return {
        "case": case,
        "res": res,
        "threads": torch.get_num_threads(),
        "vertices": int(out.vertices.shape[0]),
        "faces": int(out.faces.shape[0]),
        "surface_cubes": int(out.surf_cubes.sum()),
        "first_run_s": first,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "inputs_rss_mb": inputs_rss,
        "peak_rss_mb": _peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=80)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--stress", action="store_true", help="also run the i.i.d. noise worst case")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.res, args.runs, args.threads)))
        return 0

    cases = CASES + (("noise",) if args.stress else ())
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, "--worker", case, "--res", str(args.res), "--runs", str(args.runs)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    header = (
        f"{'case':14s} {'res':>4s} {'thr':>3s} {'verts':>8s} {'faces':>8s} {'median s':>9s} {'min s':>7s}"
    )
    header += f" {'1st s':>7s} {'inputs MB':>9s} {'peak MB':>8s}"
    print(header)
    for r in rows:
        print(
            f"{r['case']:14s} {r['res']:4d} {r['threads']:3d} {r['vertices']:8d} {r['faces']:8d} "
            f"{r['median_s']:9.3f} {r['min_s']:7.3f} {r['first_run_s']:7.3f} {r['inputs_rss_mb']:9.0f} "
            f"{r['peak_rss_mb']:8.0f}"
        )
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    import torch

    from pipeline.outputs.atomic import atomic_write_json

    payload = {
        "benchmark": "flexicubes",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "runs": args.runs,
        "results": rows,
    }
    out = RESULTS / "bench_flexicubes.json"
    atomic_write_json(out, payload)
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
