"""Benchmark of the reconstruction stage at CRM's full size on CPU (random weights, fp32).

Measurements, each in its own subprocess so that its peak RSS is its own:
  * unet       - U-Net forward at 256 x 768 (encode without input assembly), median of --unet-runs;
  * unet_cl    - the same with channels_last (NHWC) convolutions;
  * decode     - decode at grid 80: lattice features + SDF MLP + weight MLP (surface cubes only) +
                 FlexiCubes, no vertex colours (the official decode has none), median of --decode-runs;
  * flexicubes - FlexiCubes alone on the decode's inputs (all-cube weights), median of --fc-runs;
  * baseline   - (optional, --baseline) a straightforward decode in the style of the official code run
                 in the same conditions: per-point sampling of all grid vertices, SDF MLP and weight MLP
                 over all vertices / cubes at once, then FlexiCubes. Same machine, same load: a fair
                 reference for the speed-up when the machine is shared.
Decode, FlexiCubes and baseline do one untimed warm-up run first (grid and table construction; its
time is reported as `first_run_s`); the U-Net runs are all timed. Every process builds the full model
first (as a real run would hold it), so peak RSS includes the ~475 MB of parameters.
Results are printed as a table and written to benchmarks/results/bench_recon.json.

Usage: ``python benchmarks/bench_recon.py [--unet-runs 3] [--decode-runs 5] [--baseline] [--threads N]``
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _build(grid_res: int):
    import torch

    from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig

    torch.manual_seed(0)
    cfg = ReconConfig().with_decoder(grid_res=grid_res)
    model = ConvolutionalReconstructionModel(cfg).eval().requires_grad_(False)
    return model


def _timed(fn, runs: int) -> tuple[dict, object]:
    """One untimed warm-up call (reported as `first_run_s`) then `runs` timed calls of `fn()`."""
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return {"times_s": times[1:], "first_run_s": times[0]}, result


def _triplane(model, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    r, c = model.cfg.plane_resolution, model.cfg.c_dim
    return torch.randn(1, c, r, 3 * r, generator=g)


def worker_unet(runs: int, grid_res: int, channels_last: bool = False) -> dict:
    import torch

    t0 = time.perf_counter()
    model = _build(grid_res)
    model.unet2.use_channels_last(channels_last)
    build_s = time.perf_counter() - t0
    r = model.cfg.plane_resolution
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 12, r, 3 * r, generator=g)
    times = []
    with torch.inference_mode():
        xn = model.add_noise(x, generator=g)
        for _ in range(runs):
            t = time.perf_counter()
            out = model.run_unet(xn)
            times.append(time.perf_counter() - t)
    assert out.shape == (1, model.cfg.c_dim, r, 3 * r)
    return {"times_s": times, "build_s": build_s}


def _decode_inputs(model):
    """sdf, deformed vertices and all-cube weights, as the decoder computes them."""
    import torch

    from crm_models.recon.triplane import sample_lattice, split_planes

    with torch.inference_mode():
        planes = split_planes(_triplane(model))
        verts, cubes, axis = model.grid()
        feats = sample_lattice(planes, axis).reshape(-1, planes.shape[1])
        _, sdf, v_def = model.sdf_and_deformation(feats, verts)
        w = model.weightMlp.cube_weights(feats, cubes, chunk=model.cfg.decoder.mlp_chunk) * 0.1
    return v_def, sdf, cubes, w


def worker_decode(runs: int, grid_res: int) -> dict:
    model = _build(grid_res)
    tri = _triplane(model)
    out, mesh = _timed(lambda: model.decode(tri, vertex_colors=False), runs)
    return {**out, "vertices": int(mesh.vertices.shape[0]), "faces": int(mesh.faces.shape[0])}


def worker_flexicubes(runs: int, grid_res: int) -> dict:
    from crm_models.flexicubes import flexicubes_extract

    model = _build(grid_res)
    v_def, sdf, cubes, w = _decode_inputs(model)
    out, res = _timed(
        lambda: flexicubes_extract(v_def, sdf, cubes, grid_res, w, weight_scale=0.5, training=False), runs
    )
    return {**out, "vertices": int(res.vertices.shape[0]), "faces": int(res.faces.shape[0])}


def worker_baseline(runs: int, grid_res: int) -> dict:
    """Official-style decode: no chunking, no lattice factorisation, weight MLP on every cube."""
    import torch

    from crm_models.flexicubes import flexicubes_extract
    from crm_models.recon.triplane import sample_points, split_planes

    model = _build(grid_res)
    tri = _triplane(model)

    @torch.no_grad()
    def decode():
        planes = split_planes(tri)
        verts, cubes, _ = model.grid()
        feats = sample_points(planes, verts)
        out = model.sdfMlp(feats)
        sdf = out[:, 0] + 0.5 - torch.norm(verts, dim=-1)
        v_def = verts + torch.tanh(out[:, 1:]) / grid_res * 0.95 / 0.95 * 0.5
        w = model.weightMlp(feats[cubes.reshape(-1)].reshape(cubes.shape[0], -1)) * 0.1
        return flexicubes_extract(v_def, sdf, cubes, grid_res, w, weight_scale=0.5, training=False)

    out, res = _timed(decode, runs)
    return {**out, "vertices": int(res.vertices.shape[0]), "faces": int(res.faces.shape[0])}


WORKERS = {
    "unet": worker_unet,
    "unet_cl": lambda runs, grid_res: worker_unet(runs, grid_res, channels_last=True),
    "decode": worker_decode,
    "flexicubes": worker_flexicubes,
    "baseline": worker_baseline,
}


def run_worker(name: str, runs: int, grid_res: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--runs", str(runs)]
        cmd += ["--grid", str(grid_res), "--worker-out", str(out)]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        result = json.loads(out.read_text())
        result["process_wall_s"] = time.perf_counter() - t
    result["median_s"] = statistics.median(result["times_s"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet-runs", type=int, default=3)
    p.add_argument("--decode-runs", type=int, default=5)
    p.add_argument("--fc-runs", type=int, default=5)
    p.add_argument("--baseline", action="store_true", help="also time the official-style decode")
    p.add_argument("--baseline-runs", type=int, default=2)
    p.add_argument("--grid", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--only", nargs="*", choices=sorted(WORKERS), default=None)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = WORKERS[args.worker](args.runs, args.grid)
        result["peak_rss_mb"] = _peak_rss_mb()
        result["torch_threads"] = torch.get_num_threads()
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    plan = [("unet", args.unet_runs), ("unet_cl", args.unet_runs)]
    plan += [("decode", args.decode_runs), ("flexicubes", args.fc_runs)]
    if args.baseline:
        plan.append(("baseline", args.baseline_runs))
    if args.only:
        plan = [(n, r) for n, r in plan if n in args.only]
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "python": platform.python_version(),
        },
        "grid_res": args.grid,
        "plane": [256, 768],
        "results": {},
    }
    for name, runs in plan:
        print(f"[bench_recon] {name}: {runs} run(s) ...", flush=True)
        report["results"][name] = run_worker(name, runs, args.grid, args.threads)
    report["machine"]["loadavg_end"] = os.getloadavg()
    import torch

    report["machine"]["torch"] = torch.__version__

    print(f"\nReconstruction benchmark (CPU, full size, grid {args.grid}, random weights)")
    print(f"{'measurement':<12} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'peak RSS MB':>12}")
    for name, r in report["results"].items():
        ts = r["times_s"]
        row = f"{name:<12} {len(ts):>4} {r['median_s']:>9.2f} {min(ts):>7.2f} {max(ts):>7.2f}"
        print(f"{row} {r['peak_rss_mb']:>12.0f}")
    print(f"load average start {report['machine']['loadavg_start']}, end {report['machine']['loadavg_end']}")

    from pipeline.outputs.atomic import atomic_write_json

    dst = atomic_write_json(RESULTS / "bench_recon.json", report)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
