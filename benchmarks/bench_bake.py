"""Where a 1024² texture bake of a 50k-face mesh spends its time, with a real-size colour field (not a test).

Mesh: a FlexiCubes-like marching-cubes isosurface of a bumpy blob with ~50k faces
(``bench_texture.blob_mesh``), unwrapped once (the same atlas for every run). Colour fields:

* ``official``: a `TriplaneColorField` of the official size: a (32, 256, 768) rolled-out triplane (c_dim 32,
  plane resolution 256) and the RGB head 32 -> 512 -> 512 -> 3 (`ReconConfig` defaults), seeded random;
* ``tiny``: the tiny-random preset's colour field (what the tests bake; cheap).

Variants, timed interleaved in one process (each repeat runs every variant once, in turn):

* ``baseline``: ``bake_on_atlas`` of ``--baseline-commit`` (loaded from git), the code before this
  benchmark's changes;
* ``float32``: the current ``bake_on_atlas`` (default settings);
* ``bfloat16``: the current one with ``BakeConfig(query_dtype="bfloat16")``;
* ``float32_chunk4096``: float32 with the colour field's MLP row chunk at 4096 instead of its default
  (``TriplaneColorField.chunk``, 32768): smaller chunks keep the (rows, 512) activations in cache.

Per variant: median wall and CPU (process) seconds over ``--repeats``, and for the current code the per-step
split (rasterize, interpolate, query, fill), plus the largest texel difference to the baseline. Each thread
count (``--threads``, default 1 and 2) runs in its own subprocess. Results:
``benchmarks/results/bake_50k.json``.

Usage: ``python benchmarks/bench_bake.py [--repeats 3] [--threads 1 2] [--baseline-commit 4aa63ff]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_BASELINE = "4aa63ff"  # the bake before per-step timings and the bfloat16 query


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def baseline_module(commit: str) -> types.ModuleType:
    """``pipeline/texturing/bake.py`` as it was at `commit`, as a module."""
    mod = types.ModuleType(f"bake_at_{commit}")
    mod.__file__ = f"{commit}:pipeline/texturing/bake.py"
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(_git("show", f"{commit}:pipeline/texturing/bake.py"), mod.__file__, "exec"), mod.__dict__)
    return mod


def official_size_field(seed: int = 0):
    """Seeded random colour field of the official size: triplane (32, 256, 768), head 32-512-512-3."""
    import torch

    from crm_models.recon.color_field import TriplaneColorField
    from crm_models.recon.config import ReconConfig
    from crm_models.recon.heads import PointMlp

    cfg = ReconConfig()
    torch.manual_seed(seed)
    r = cfg.plane_resolution
    head = PointMlp(cfg.c_dim, cfg.decoder.mlp_hidden, 3)
    return TriplaneColorField(torch.randn(cfg.c_dim, r, 3 * r) * 0.5, head)


def tiny_field(seed: int = 0):
    """The tiny-random preset's colour field on a random triplane of its size."""
    import torch

    from pipeline.options import PipelineOptions
    from pipeline.weights import resolve_weights
    from pipeline.weights.models import load_models

    recon = load_models(resolve_weights("tiny-random"), PipelineOptions(device="cpu")).recon
    c, r = recon.cfg.c_dim, recon.cfg.plane_resolution
    torch.manual_seed(seed)
    return recon.color_field(torch.randn(1, c, r, 3 * r) * 0.5)


def run_child(threads: int, repeats: int, baseline_commit: str, faces: int, texture_size: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from benchmarks.bench_texture import blob_mesh
    from pipeline.raster import get_rasterizer
    from pipeline.texturing.bake import BakeConfig, bake_on_atlas
    from pipeline.texturing.unwrap import UnwrapConfig, unwrap

    base = baseline_module(baseline_commit)
    v, f = blob_mesh(faces)
    v = v * 0.9
    vs, fs, uv, _ = unwrap(v, f, UnwrapConfig(texture_size=texture_size))
    rast = get_rasterizer("torch", device="cpu")
    fields = {"official": official_size_field(), "tiny": tiny_field()}
    out: dict = {"faces": int(len(f)), "faces_unwrapped": int(len(fs)), "fields": {}}
    for fname, fld in fields.items():
        variants = ("baseline", "float32", "bfloat16", "float32_chunk4096")
        runs: dict[str, list[tuple[float, float, dict]]] = {v: [] for v in variants}
        default_chunk = fld.chunk
        textures: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for variant in runs:
                timings: dict[str, float] = {}
                w0, c0 = time.perf_counter(), time.process_time()
                if variant == "baseline":
                    mesh = base.bake_on_atlas(
                        vs, fs, uv, fld, base.BakeConfig(texture_size=texture_size), rast
                    )
                else:
                    fld.chunk = 4096 if variant == "float32_chunk4096" else default_chunk
                    dtype = "bfloat16" if variant == "bfloat16" else "float32"
                    cfg = BakeConfig(texture_size=texture_size, query_dtype=dtype)
                    mesh = bake_on_atlas(vs, fs, uv, fld, cfg, rast, timings=timings)
                    fld.chunk = default_chunk
                runs[variant].append((time.perf_counter() - w0, time.process_time() - c0, timings))
                textures[variant] = mesh.texture
        res: dict = {"colour_field_chunk": default_chunk}
        for variant, rs in runs.items():
            entry = {
                "wall_s": statistics.median(r[0] for r in rs),
                "cpu_s": statistics.median(r[1] for r in rs),
                "wall_runs": [round(r[0], 3) for r in rs],
            }
            if rs[0][2]:
                entry["steps_wall_s"] = {k: statistics.median(r[2][k] for r in rs) for k in rs[0][2]}
            diff = np.abs(textures[variant].astype(int) - textures["baseline"].astype(int))
            entry["max_texel_diff_vs_baseline"] = int(diff.max())
            entry["mean_texel_diff_vs_baseline"] = float(diff.mean())
            res[variant] = entry
        with torch.no_grad():
            clip = torch.cat(
                [torch.as_tensor(uv) * 2 - 1, torch.zeros(len(uv), 1), torch.ones(len(uv), 1)], 1
            )
            covered = int(
                (rast.rasterize(clip, torch.as_tensor(fs), (texture_size,) * 2).triangle_id >= 0).sum()
            )
        res["covered_texels"] = covered
        out["fields"][fname] = res
    return out


def _machine() -> dict:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "node": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "avx512_bf16": " avx512_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--faces", type=int, default=50_000)
    ap.add_argument("--texture-size", type=int, default=1024)
    ap.add_argument("--baseline-commit", default=DEFAULT_BASELINE, help="git commit of the baseline bake")
    ap.add_argument("--out", default=str(RESULTS / "bake_50k.json"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        res = run_child(args.child, args.repeats, args.baseline_commit, args.faces, args.texture_size)
        print(json.dumps(res))
        return
    results = {
        "benchmark": "bench_bake",
        "machine": _machine(),
        "commit": _git("rev-parse", "--short", "HEAD").strip(),
        "dirty": bool(_git("status", "--porcelain", "--", "pipeline", "crm_models", "benchmarks").strip()),
        "baseline_commit": args.baseline_commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "texture_size": args.texture_size,
        "repeats": args.repeats,
        "runs": {},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for threads in args.threads:
        load0 = os.getloadavg()
        cmd = [sys.executable, __file__, "--child", str(threads), "--repeats", str(args.repeats)]
        cmd += ["--faces", str(args.faces), "--texture-size", str(args.texture_size)]
        cmd += ["--baseline-commit", args.baseline_commit]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"threads={threads} failed:\n{proc.stderr}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["load_avg_start"], run["load_avg_end"] = load0, os.getloadavg()
        results["runs"][f"threads_{threads}"] = run
        for fname, res in run["fields"].items():
            for variant in ("baseline", "float32", "bfloat16", "float32_chunk4096"):
                r = res[variant]
                steps = " ".join(f"{k} {v:.2f}" for k, v in r.get("steps_wall_s", {}).items())
                print(
                    f"threads {threads} {fname:8s} {variant:8s} wall {r['wall_s']:6.2f} s "
                    f"cpu {r['cpu_s']:6.2f} s  max diff {r['max_texel_diff_vs_baseline']}  {steps}"
                )
        print(f"  load average {load0} -> {run['load_avg_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
