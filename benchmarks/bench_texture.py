"""Benchmark of the texturing path on CPU: unwrap (+ decimation) -> 1024 bake -> GLB write.

Meshes: marching-cubes isosurfaces of a bumpy blob at about 10k, 50k and 100k faces (FlexiCubes-like
irregular triangles). The colour field is analytic (cheap), so ``bake`` measures the rasterizer, position
interpolation and seam padding, not the reconstruction model's MLP.

Per size, in its own subprocess (so the peak RSS is its own), median over ``--repeats`` runs of:

* ``unwrap``: face-budget decimation (pymeshlab quadric, when above ``--max-faces``) + xatlas;
* ``bake``: UV rasterization at ``--texture-size`` (PyTorch backend), interpolation, colour query, padding;
* ``glb``: GLB serialisation (trimesh, PNG encoding) and atomic write.

Reported per step: wall seconds, CPU seconds (process time, all threads) and peak RSS sampled during the
step. Results: printed table + ``benchmarks/results/bench_texture.json``.

Usage: ``python benchmarks/bench_texture.py [--sizes 10000 50000 100000] [--repeats 3] [--threads N]
[--max-faces 30000] [--texture-size 1024]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def blob_mesh(target_faces: int):
    """Bumpy-sphere isosurface with roughly ``target_faces`` faces (outward winding)."""
    import numpy as np
    from skimage.measure import marching_cubes

    n = max(16, int(round((target_faces / 6.5) ** 0.5)))  # faces ~ 6.5 n^2 for this shape
    for _ in range(6):
        g = np.linspace(-1, 1, n)
        x, y, z = np.meshgrid(g, g, g, indexing="ij")
        s = np.sqrt(x**2 + y**2 + z**2) - 0.6 + 0.1 * np.sin(5 * x) * np.sin(4 * y) * np.cos(3 * z)
        v, f, _, _ = marching_cubes(s, 0.0)
        ratio = target_faces / len(f)
        if abs(ratio - 1) < 0.05:
            break
        n = max(16, int(round(n * ratio**0.5)))
    v = (v / (n - 1) * 2 - 1).astype(np.float32)
    f = f[:, ::-1].astype(np.int64)  # marching_cubes winds inward for a positive-outside field
    return v, np.ascontiguousarray(f)


class PeakRSS:
    """Samples this process's RSS every 10 ms while active."""

    def __init__(self):
        import psutil

        self._p = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self._p.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._p.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)


def run_one(size: int, repeats: int, max_faces: int, texture_size: int) -> dict:
    import torch

    from pipeline.outputs.export import export_glb
    from pipeline.raster import get_rasterizer
    from pipeline.texturing.bake import BakeConfig, bake_on_atlas
    from pipeline.texturing.unwrap import UnwrapConfig, unwrap

    v, f = blob_mesh(size)

    def color_fn(p):
        return torch.stack([torch.sin(3 * p[:, 0]), torch.cos(2 * p[:, 1]), p[:, 2]], dim=1) * 0.8

    rast = get_rasterizer("torch", device="cpu")
    ucfg = UnwrapConfig(max_faces=max_faces, texture_size=texture_size)
    bcfg = BakeConfig(texture_size=texture_size, unwrap=ucfg)
    steps = {"unwrap": [], "bake": [], "glb": []}
    out = {"faces_in": int(len(f))}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            rec = {}
            for name in steps:
                with PeakRSS() as mem:
                    w0, c0 = time.perf_counter(), time.process_time()
                    if name == "unwrap":
                        vs, fs, uv, _ = unwrap(v, f, ucfg)
                    elif name == "bake":
                        mesh = bake_on_atlas(vs, fs, uv, color_fn, bcfg, rast)
                    else:
                        export_glb(mesh, Path(tmp) / "m.glb")
                    rec[name] = (time.perf_counter() - w0, time.process_time() - c0, mem.peak / 2**20)
            for name in steps:
                steps[name].append(rec[name])
        out["faces_unwrapped"] = int(len(fs))
        out["glb_mb"] = os.path.getsize(Path(tmp) / "m.glb") / 2**20
    for name, runs in steps.items():
        out[name] = {
            "wall_s": statistics.median(r[0] for r in runs),
            "cpu_s": statistics.median(r[1] for r in runs),
            "peak_rss_mb": max(r[2] for r in runs),
        }
    out["total_wall_s"] = sum(out[n]["wall_s"] for n in steps)
    out["total_cpu_s"] = sum(out[n]["cpu_s"] for n in steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--max-faces", type=int, default=None, help="face budget (default: UnwrapConfig's)")
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_faces is None:
        sys.path.insert(0, str(REPO))
        from pipeline.texturing.unwrap import UnwrapConfig

        args.max_faces = UnwrapConfig().max_faces
    if args.child is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_one(args.child, args.repeats, args.max_faces, args.texture_size)))
        return
    results = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_start": os.getloadavg(),
        "threads": args.threads or "default",
        "max_faces": args.max_faces,
        "texture_size": args.texture_size,
        "repeats": args.repeats,
        "sizes": {},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", str(size), "--repeats", str(args.repeats)]
        cmd += ["--threads", str(args.threads), "--max-faces", str(args.max_faces)]
        cmd += ["--texture-size", str(args.texture_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if res.returncode != 0:
            raise SystemExit(f"size {size} failed:\n{res.stderr}")
        results["sizes"][str(size)] = json.loads(res.stdout.strip().splitlines()[-1])
    results["load_avg_end"] = os.getloadavg()
    hdr = f"{'faces':>8} {'unwrapped':>9} | {'step':<6} {'wall s':>7} {'cpu s':>7} {'peak MB':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results["sizes"].values():
        for step in ("unwrap", "bake", "glb"):
            s = r[step]
            print(
                f"{r['faces_in']:>8} {r['faces_unwrapped']:>9} | {step:<6} {s['wall_s']:7.2f} "
                f"{s['cpu_s']:7.2f} {s['peak_rss_mb']:8.0f}"
            )
        print(f"{'':>8} {'':>9} | {'total':<6} {r['total_wall_s']:7.2f} {r['total_cpu_s']:7.2f}")
    print(f"load average start/end: {results['load_avg_start']} / {results['load_avg_end']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"_t{args.threads}" if args.threads else ""
    (RESULTS / f"bench_texture{tag}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
