"""CPU cost of the finalize stage for one grid-80-sized object, step by step, and the levers (not a test).

The batch job runs one finalize task per object on CPU workers (Ray sets ``OMP_NUM_THREADS=1`` there), so
the figure that matters is CPU-seconds per object at one thread: a GPU host with C cores sustains at most
C / (CPU-s per object) objects per second on the CPU side.

Input: a FlexiCubes-like isosurface (marching cubes of a bumpy blob, ``bench_texture.blob_mesh``) with
``--faces`` faces (default 82,000: the size of a grid-80 mesh of the official model before decimation), a
seeded random colour field of the official size (triplane (32, 256, 768), RGB head 32-512-512-3), random
view strips. Everything runs in one subprocess per thread count (default: 1 thread).

Measured (median of ``--repeats``, wall and CPU seconds):

1. ``finalize``: the real ``pipeline.finalize.finalize`` end to end into a temporary folder (its own
   timings: clean, bake, export, views, preview), with the default options (1024 texture, OBJ + preview);
2. the same chain by hand, step by step: clean, decimate, xatlas, rasterize, interpolate, query (colour
   field at every covered texel), fill, GLB, OBJ (+MTL+PNG), views.png, preview.png;
3. levers: the face budget before xatlas (50k default, 30k, 20k: decimate + xatlas + bake), the xatlas
   options (``blockAlign``, ``maxIterations``, pack ``resolution``, chart boundary limit) with texel
   utilisation, and the bfloat16 colour query.

Results: ``benchmarks/results/finalize_cpu.json`` (machine, load averages, commit, threads).

Usage: ``python benchmarks/bench_finalize.py [--repeats 3] [--threads 1] [--faces 82000]``
"""

from __future__ import annotations

import argparse
import json
import os
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


def _timed(fn, repeats: int) -> tuple[dict, object]:
    """Run `fn` `repeats` times: ({wall_s, cpu_s medians}, last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}, out


def _utilisation(uvs, faces, size: int) -> float:
    """Fraction of the size x size texels whose centre lies in a UV triangle."""
    import torch

    from pipeline.raster import get_rasterizer

    uv = torch.as_tensor(uvs)
    clip = torch.cat([uv * 2 - 1, torch.zeros(len(uv), 1), torch.ones(len(uv), 1)], 1)
    out = get_rasterizer("torch", device="cpu").rasterize(clip, torch.as_tensor(faces), (size, size))
    return float((out.triangle_id >= 0).float().mean())


def run_child(threads: int, repeats: int, faces: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from benchmarks.bench_bake import official_size_field
    from benchmarks.bench_texture import blob_mesh
    from pipeline.finalize import finalize, outward
    from pipeline.mesh.cleaning import CleaningConfig, clean_mesh
    from pipeline.options import PipelineOptions
    from pipeline.outputs.export import ExportConfig, export_glb, export_obj
    from pipeline.outputs.preview import save_preview_png
    from pipeline.outputs.views_image import views_png_bytes
    from pipeline.raster import get_rasterizer
    from pipeline.results import GeneratedObject
    from pipeline.texturing.bake import BakeConfig, bake_on_atlas
    from pipeline.texturing.unwrap import UnwrapConfig, decimate, unwrap

    v, f = blob_mesh(faces)
    v = (v * 0.9).astype(np.float32)
    raw_faces = np.ascontiguousarray(f[:, ::-1])  # FlexiCubes' raw winding is inward
    fld = official_size_field()
    rng = np.random.default_rng(0)
    strips = [rng.integers(0, 256, (256, 1536, 3), dtype=np.uint8) for _ in range(2)]
    obj = GeneratedObject(
        id="obj",
        seed=0,
        views_strip=strips[0],
        ccm_strip=strips[1],
        vertices=v,
        faces=raw_faces,
        color_field=fld,
    )
    opts = PipelineOptions(device="cpu")
    out: dict = {"threads": threads, "faces_in": int(len(f))}

    # 1. the real finalize, end to end
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            res = finalize(obj, Path(tmp) / f"r{i}", opts)
            runs.append((time.perf_counter() - w0, time.process_time() - c0, res))
            if not res.ok:
                raise RuntimeError(f"finalize failed: {res.error_class}: {res.error_message}")
        out["finalize"] = {
            "wall_s": statistics.median(r[0] for r in runs),
            "cpu_s": statistics.median(r[1] for r in runs),
            "own_timings_s": {
                k: statistics.median(r[2].timings.get(k, 0.0) for r in runs) for k in runs[0][2].timings
            },
            "faces_out": runs[-1][2].mesh.get("faces") if runs[-1][2].mesh else None,
        }

    # 2. step by step
    steps: dict = {}
    steps["clean"], (cv, cf) = _timed(lambda: clean_mesh(v, raw_faces, CleaningConfig()), repeats)
    of = outward(cf)
    ucfg = UnwrapConfig()
    steps["decimate"], (dv, df) = _timed(lambda: decimate(cv, of, ucfg.max_faces), repeats)
    steps["xatlas"], (vs, fs, uv, _) = _timed(lambda: unwrap(dv, df, ucfg), repeats)
    rast = get_rasterizer("torch", device="cpu")
    bake_steps: list[dict] = []

    def bake(cfg):
        t: dict = {}
        mesh = bake_on_atlas(vs, fs, uv, fld, cfg, rast, timings=t)
        bake_steps.append(t)
        return mesh

    steps["bake"], mesh = _timed(lambda: bake(BakeConfig()), repeats)
    steps["bake"]["steps_wall_s"] = {k: statistics.median(t[k] for t in bake_steps) for k in bake_steps[0]}
    with tempfile.TemporaryDirectory() as tmp:
        ecfg = ExportConfig(frame="gltf")
        steps["glb"], _ = _timed(lambda: export_glb(mesh, Path(tmp) / "m.glb", ecfg), repeats)
        steps["obj_mtl_png"], _ = _timed(lambda: export_obj(mesh, Path(tmp) / "m.obj", ecfg), repeats)
        steps["views_png"], _ = _timed(lambda: views_png_bytes(obj.views_strip, obj.ccm_strip), repeats)
        steps["preview_png"], _ = _timed(
            lambda: save_preview_png(mesh, Path(tmp) / "p.png", size=opts.preview_size, rasterizer=rast),
            repeats,
        )
    steps["total"] = {k: sum(s[k] for s in steps.values()) for k in ("wall_s", "cpu_s")}
    out["steps"] = steps
    out["faces_after_clean"], out["faces_after_decimate"] = int(len(cf)), int(len(df))

    # 3. levers
    levers: dict = {"face_budget": {}, "xatlas": {}, "query_bfloat16": {}}
    for budget in (50_000, 30_000, 20_000):
        u = UnwrapConfig(max_faces=budget)
        dec, (bv, bf) = _timed(lambda u=u: decimate(cv, of, u.max_faces), repeats)
        xat, (bvs, bfs, buv, _) = _timed(lambda u=u, bv=bv, bf=bf: unwrap(bv, bf, u), repeats)
        bk, _ = _timed(lambda a=(bvs, bfs, buv): bake_on_atlas(*a, fld, BakeConfig(), rast), repeats)
        levers["face_budget"][str(budget)] = {
            "faces": int(len(bf)),
            "texel_utilisation_at_1024": round(_utilisation(buv, bfs, 1024), 3),
            "decimate": dec,
            "xatlas": xat,
            "bake": bk,
            "cpu_s": dec["cpu_s"] + xat["cpu_s"] + bk["cpu_s"],
        }
    variants = {
        "default (boundary 0.3, iterations 1, blockAlign off, resolution 1024)": UnwrapConfig(max_faces=0),
        "blockAlign on": UnwrapConfig(max_faces=0, block_align=True),
        "maxIterations 2": UnwrapConfig(max_faces=0, max_chart_iterations=2),
        "maxIterations 4": UnwrapConfig(max_faces=0, max_chart_iterations=4),
        "resolution 512": UnwrapConfig(max_faces=0, texture_size=512),
        "resolution 2048": UnwrapConfig(max_faces=0, texture_size=2048),
        "no chart boundary limit (xatlas default charts)": UnwrapConfig(max_faces=0, max_chart_boundary=0.0),
    }
    for name, u in variants.items():
        t, (xv, xf, xuv, _) = _timed(lambda u=u: unwrap(dv, df, u), repeats)
        levers["xatlas"][name] = {
            **t,
            "seam_vertex_ratio": round(len(xv) / len(dv), 3),
            "texel_utilisation_at_1024": round(_utilisation(xuv, xf, 1024), 3),
        }
    bf16, bmesh = _timed(
        lambda: bake_on_atlas(vs, fs, uv, fld, BakeConfig(query_dtype="bfloat16"), rast), repeats
    )
    diff = np.abs(bmesh.texture.astype(int) - mesh.texture.astype(int))
    levers["query_bfloat16"] = {
        "bake": bf16,
        "max_texel_diff": int(diff.max()),
        "mean_texel_diff": float(diff.mean()),
    }
    out["levers"] = levers
    return out


def main(argv: list[str] | None = None) -> None:
    from benchmarks.bench_bake import _git, _machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--faces", type=int, default=82_000)
    ap.add_argument("--out", default=str(RESULTS / "finalize_cpu.json"))
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(args.child, args.repeats, args.faces)))
        return
    results = {
        "benchmark": "bench_finalize",
        "machine": _machine(),
        "commit": _git("rev-parse", "--short", "HEAD").strip(),
        "dirty": bool(_git("status", "--porcelain", "--", "pipeline", "crm_models", "benchmarks").strip()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeats": args.repeats,
        "runs": {},
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for threads in args.threads:
        load0 = os.getloadavg()
        cmd = [sys.executable, __file__, "--child", str(threads), "--repeats", str(args.repeats)]
        cmd += ["--faces", str(args.faces)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"threads={threads} failed:\n{proc.stderr[-4000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["load_avg_start"], run["load_avg_end"] = load0, os.getloadavg()
        results["runs"][f"threads_{threads}"] = run
        fin = run["finalize"]
        own = ", ".join(f"{k} {v:.2f}" for k, v in fin["own_timings_s"].items())
        print(f"threads {threads}: finalize {fin['wall_s']:.2f} s wall, {fin['cpu_s']:.2f} CPU-s ({own})")
        for name, s in run["steps"].items():
            print(f"  {name:12s} {s['wall_s']:6.2f} s wall {s['cpu_s']:6.2f} CPU-s")
        for budget, s in run["levers"]["face_budget"].items():
            print(
                f"  budget {budget:>6}: {s['faces']} faces, utilisation {s['texel_utilisation_at_1024']}, "
                f"decimate+xatlas+bake {s['cpu_s']:.2f} CPU-s"
            )
        for name, s in run["levers"]["xatlas"].items():
            print(
                f"  xatlas {name}: {s['cpu_s']:.2f} CPU-s, utilisation {s['texel_utilisation_at_1024']}, "
                f"seam vertices x{s['seam_vertex_ratio']}"
            )
        q = run["levers"]["query_bfloat16"]
        print(f"  bake, bfloat16 query: {q['bake']['cpu_s']:.2f} CPU-s, max texel diff {q['max_texel_diff']}")
        print(f"  load average {load0} -> {run['load_avg_end']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
