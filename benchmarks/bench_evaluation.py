"""CPU cost of the GSO evaluation: geometry suite and image suite per object, and the sample set.

    python -m benchmarks.bench_evaluation [--gt DIR] [--objects a,b] [--repeats 3] [--full-set] [--no-images]
        [--winding tree,fast]

* geometry suite per object: load, frame mapping, 100k samples per side, alignment (coarse search +
  ICP + refinement), Chamfer, F-score, both volume IoUs (parity, winding number), once per winding
  number evaluation of ``--winding`` (``tree``: the BVH dipole approximation, ``fast``: signed ray
  crossings + boundary cap, ``exact``: all solid angles) - also split into its parts (Chamfer + F-score
  both as two separate single-thread calls and as one shared ``chamfer_fscore`` with all cores);
* image suite per object: 16 renders (torch rasterizer, supersample 1 and 2), PSNR + SSIM, LPIPS-VGG and
  CLIP ViT-L/14 (random weights, same compute as the real ones);
* ``--full-set``: the whole CLI over every sample object (geometry only, GT as prediction).
* ``--jobs-compare``: only this: the CLI (``python -m evaluation.gso`` entry point, geometry only) over
  every sample object with its raw GSO mesh as its own prediction (``--default-frame gt``: the
  alignment must find the table rotation), ``--jobs 1`` and ``--jobs 2`` alternately ``--repeats``
  times in one process; per-object scores, the sampling floor (GT against a resampling of itself) and
  the per-object CPU time. Writes ``benchmarks/results/evaluation_jobs.json``.
* ``--fit-compare``: only this: ``--fit unit`` (SyncDreamer's normalisation) against ``--fit gt-box``
  (default) on every sample object, for the GT in the evaluation frame as its own prediction (aligned
  and not) and for a deformed copy (anisotropic scale 1.08 / 0.95 / 1.03, vertex noise 0.003, turned
  by yaw 100 and pitch 10 degrees), geometry only. Writes ``benchmarks/results/evaluation_fit.json``.

Prints a table (median of ``--repeats`` runs, peak RSS) and writes JSON to
``benchmarks/results/bench_evaluation.json``. The ground truth is ``--gt`` or ``$CRM_GSO_DIR``.
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
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from evaluation import geometry_metrics as gm
from evaluation.alignment import align
from evaluation.gso import (
    EvalConfig,
    GeometryConfig,
    evaluate,
    evaluate_object,
    gt_objects,
    load_gt_mesh,
    read_angle_table,
)
from evaluation.gso import main as eval_main
from evaluation.image_metrics import load_views, psnr, ssim
from evaluation.rendering import load_cameras, render_views
from pipeline.outputs.atomic import atomic_write_text


def _peak_rss_mb() -> float:
    p = psutil.Process()
    mi = p.memory_info()
    return getattr(mi, "peak_wset", None) or _ru_maxrss_mb() or mi.rss / 2**20


def _ru_maxrss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return None


def _timeit(fn, repeats: int) -> dict:
    """Median wall time, median process CPU time (all threads) and the wall times of ``repeats`` runs."""
    times, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"median_s": statistics.median(times), "cpu_s": statistics.median(cpus), "runs_s": times}


def _write_pred(gt_root: Path, names: list[str], folder: Path) -> None:
    import trimesh

    angles = json.loads((gt_root / "gt_rotate_angle_deg.json").read_text())
    for n in names:
        m = load_gt_mesh(gt_root, n, angles.get(n, 0.0))
        trimesh.Trimesh(m.vertices, m.faces, process=False).export(folder / f"{n}.obj")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "evaluation"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + (" (evaluation/ modified)" if dirty.strip() else "")


_SCORES = ("chamfer", "fscore@0.01", "fscore@0.02", "fscore@0.05", "iou_parity", "iou_winding")


def jobs_compare(gt_root: Path, repeats: int, out_path: str) -> dict:
    """``--jobs 1`` vs ``--jobs 2`` on the whole sample, each raw GT mesh as its own prediction."""
    names = [n for n in gt_objects(gt_root) if (gt_root / "objects" / n / "model.obj").is_file()]
    angles = read_angle_table(gt_root)
    runs: list[dict] = []
    docs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pred = Path(tmp) / "pred"
        pred.mkdir()
        for n in names:
            (pred / f"{n}.obj").symlink_to((gt_root / "objects" / n / "model.obj").absolute())
        base = ["--pred", str(pred), "--gt", str(gt_root), "--default-frame", "gt", "--no-images"]
        base += ["--no-plots", "--quiet"]
        for k in range(repeats):
            for jobs in (1, 2):
                out = Path(tmp) / f"out-{jobs}-{k}"
                # a fresh `python -m evaluation.gso` process: the wall time a user sees, and spawned
                # workers import only what that command imports (not this benchmark's modules)
                cmd = [sys.executable, "-m", "evaluation.gso", *base, "--out", str(out), "--jobs", str(jobs)]
                t = time.perf_counter()
                rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
                wall = time.perf_counter() - t
                runs.append({"jobs": jobs, "repeat": k, "wall_s": wall, "exit_status": rc})
                print(f"--jobs {jobs} (repeat {k}): {wall:.1f} s, exit {rc}")
                docs[jobs] = json.loads((out / "metrics.json").read_text())
    per_jobs = {j: {o["object"]: {c: o[c] for c in _SCORES} for o in docs[j]["objects"]} for j in (1, 2)}
    cpu2 = {o["object"]: o["seconds"].get("cpu") for o in docs[2]["objects"]}
    objects = []
    for o in docs[1]["objects"]:
        n = o["object"]
        gt = load_gt_mesh(gt_root, n, angles.get(n, 0.0))
        a = gm.sample_surface(gt.vertices, gt.faces, 100_000, 0)
        b = gm.sample_surface(gt.vertices, gt.faces, 100_000, 1)
        objects.append(
            {
                "object": n,
                "table_angle_deg": angles.get(n, 0.0),
                "faces": len(gt.faces),
                "status": o["status"],
                **{c: o[c] for c in _SCORES},
                "sampling_floor_chamfer": float(gm.chamfer_distance(a, b)),
                "recovered_rotation_deg": o["alignment"].get("rotation_angle_deg"),
                "cpu_s_jobs1": o["seconds"].get("cpu"),
                "cpu_s_jobs2": cpu2.get(n),
                "wall_s_jobs1": o["seconds"].get("total"),
            }
        )
    walls = {j: statistics.median(r["wall_s"] for r in runs if r["jobs"] == j) for j in (1, 2)}
    doc = {
        "what": "python -m evaluation.gso (one process per run, wall time of the whole command) over the "
        "GSO sample, each raw GT mesh as its own prediction (--default-frame gt --no-images; default "
        "protocol: 100k samples, ICP alignment, both IoUs at 64^3)",
        "objects_evaluated": len(objects),
        "runs": runs,
        "median_wall_s": {f"jobs{j}": w for j, w in walls.items()},
        "speedup_jobs2": walls[1] / walls[2],
        "same_scores_jobs1_jobs2": per_jobs[1] == per_jobs[2],
        "max_cpu_s_per_object": {
            "jobs1": max(o["cpu_s_jobs1"] for o in objects),
            "jobs2": max(o["cpu_s_jobs2"] for o in objects),
        },
        "objects": objects,
        "machine": _machine(),
        "commit": _commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    head = ("object", "angle", "chamfer", "floor", "F@0.02", "IoU par", "IoU wnd", "cpu s")
    print(" ".join(f"{h:>9s}" for h in head))
    for o in objects:
        vals = [o["table_angle_deg"], o["chamfer"], o["sampling_floor_chamfer"], o["fscore@0.02"]]
        vals += [o["iou_parity"], o["iou_winding"], o["cpu_s_jobs1"]]
        print(f"{o['object'][:9]:>9s} " + " ".join(f"{v:9.4g}" for v in vals))
    print(f"median wall: --jobs 1 {walls[1]:.1f} s, --jobs 2 {walls[2]:.1f} s ({doc['speedup_jobs2']:.2f}x)")
    atomic_write_text(out_path, json.dumps(doc, indent=1))
    return doc


def fit_compare(gt_root: Path, out_path: str) -> dict:
    """``--fit unit`` vs ``--fit gt-box`` on the sample: exact and deformed copies of the GT."""
    import trimesh

    from evaluation.alignment import rotation_yaw_pitch

    names = [n for n in gt_objects(gt_root) if (gt_root / "objects" / n / "model.obj").is_file()]
    angles = read_angle_table(gt_root)
    rng = np.random.default_rng(0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        exact, deformed = Path(tmp) / "exact", Path(tmp) / "deformed"
        exact.mkdir()
        deformed.mkdir()
        for n in names:
            gt = load_gt_mesh(gt_root, n, angles.get(n, 0.0))
            trimesh.Trimesh(gt.vertices, gt.faces, process=False).export(exact / f"{n}.obj")
            c = gt.vertices.mean(0)
            v = (gt.vertices - c) * [1.08, 0.95, 1.03] + rng.normal(0, 0.003, gt.vertices.shape)
            v = v @ rotation_yaw_pitch(100.0, 10.0).T + c
            trimesh.Trimesh(v, gt.faces, process=False).export(deformed / f"{n}.obj")
        cases = {
            "exact_align_none": (exact, ["--align", "none"]),
            "exact_align_icp": (exact, []),
            "deformed_align_icp": (deformed, []),
        }
        for case, (pred, extra) in cases.items():
            for fit in ("unit", "gt-box"):
                dest = Path(tmp) / f"{case}-{fit}"
                args = ["--pred", str(pred), "--gt", str(gt_root), "--out", str(dest), "--frame", "gt"]
                eval_main([*args, "--fit", fit, "--no-images", "--no-plots", "--quiet", *extra])
                doc = json.loads((dest / "metrics.json").read_text())
                for o in doc["objects"]:
                    row = out.setdefault(case, {}).setdefault(
                        o["object"], {"angle": angles.get(o["object"], 0.0)}
                    )
                    row[fit] = {c: o[c] for c in _SCORES}
    axis = {0.0, 90.0, 180.0, 270.0, -90.0}
    summary = {}
    for case, objs in out.items():
        diffs = [
            abs(r["unit"][c] - r["gt-box"][c]) for r in objs.values() if r["angle"] in axis for c in _SCORES
        ]
        summary[case] = {"max_abs_difference_axis_angle_objects": max(diffs)}
        print(f"{case}: max |unit - gt-box| over axis-angle objects and scores: {max(diffs):.3g}")
        for n, r in objs.items():
            if r["angle"] not in axis:
                u, g = r["unit"], r["gt-box"]
                print(
                    f"  {n} ({r['angle']:g}): unit CD {u['chamfer']:.4f} F@0.02 {u['fscore@0.02']:.3f} IoU "
                    f"{u['iou_winding']:.3f} | gt-box CD {g['chamfer']:.4f} F@0.02 {g['fscore@0.02']:.3f} "
                    f"IoU {g['iou_winding']:.3f}"
                )
    doc = {
        "what": "--fit unit vs --fit gt-box, geometry only, default protocol otherwise; 'exact': the GT in "
        "the evaluation frame as its own prediction; 'deformed': scaled (1.08, 0.95, 1.03) about the "
        "centroid, vertex noise sigma 0.003, turned by yaw 100 / pitch 10 degrees",
        "summary": summary,
        "cases": out,
        "machine": _machine(),
        "commit": _commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(out_path, json.dumps(doc, indent=1))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", default=os.environ.get("CRM_GSO_DIR"), help="GSO folder (default: $CRM_GSO_DIR)")
    ap.add_argument("--objects", default="oil,chicken", help="objects timed one by one")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--full-set", action="store_true", help="also run the CLI path over all 14 sample objects"
    )
    ap.add_argument("--no-images", action="store_true")
    ap.add_argument(
        "--winding",
        default="tree,fast",
        help="winding number evaluations timed, comma-separated: tree, fast, exact (exact is slow)",
    )
    ap.add_argument(
        "--jobs-compare",
        action="store_true",
        help="only time the CLI with --jobs 1 vs --jobs 2 on the whole sample (self-prediction scores too)",
    )
    ap.add_argument(
        "--fit-compare", action="store_true", help="only compare --fit unit with --fit gt-box on the sample"
    )
    ap.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/<name>.json)")
    a = ap.parse_args(argv)
    if not a.gt:
        raise SystemExit("no ground truth: pass --gt DIR or set $CRM_GSO_DIR")
    gt_root = Path(a.gt)
    results_dir = Path("benchmarks") / "results"
    if a.jobs_compare:
        jobs_compare(gt_root, a.repeats, a.out or str(results_dir / "evaluation_jobs.json"))
        return 0
    if a.fit_compare:
        fit_compare(gt_root, a.out or str(results_dir / "evaluation_fit.json"))
        return 0
    a.out = a.out or str(results_dir / "bench_evaluation.json")
    names = [n for n in a.objects.split(",") if n]
    angles = json.loads((gt_root / "gt_rotate_angle_deg.json").read_text())
    rows: list[dict] = []
    windings = [m for m in a.winding.split(",") if m]
    for m in windings:
        if m not in gm.WINDING_METHODS:
            raise SystemExit(f"--winding: unknown method {m!r} (expected {', '.join(gm.WINDING_METHODS)})")
    # predictions are written in the GT frame
    cfgs = {
        m: EvalConfig(images=False, frame="gt", geometry=GeometryConfig(winding_method=m)) for m in windings
    }
    cfg = EvalConfig(images=False, frame="gt")

    with tempfile.TemporaryDirectory() as tmp:
        pred_dir = Path(tmp)
        _write_pred(gt_root, names, pred_dir)
        evaluate_object(names[0], gt_root, pred_dir / f"{names[0]}.obj", cfg)  # warm-up: imports, caches
        for n in names:
            gt = load_gt_mesh(gt_root, n, angles.get(n, 0.0))
            nf = len(gt.faces)
            for m, c in cfgs.items():
                timed = _timeit(
                    lambda n=n, c=c: evaluate_object(n, gt_root, pred_dir / f"{n}.obj", c), a.repeats
                )
                rows.append({"what": f"geometry suite (all), winding={m}", "object": n, "faces": nf, **timed})
            gs, gn = gm.sample_surface(gt.vertices, gt.faces, 100_000, 0, True)
            ps, pn = gm.sample_surface(gt.vertices @ np.diag([1, 1, 1.0]), gt.faces, 100_000, 1, True)
            parts = {
                "sampling 2 x 100k": lambda gt=gt: [
                    gm.sample_surface(gt.vertices, gt.faces, 100_000, s) for s in (0, 1)
                ],
                "alignment (coarse + ICP)": lambda ps=ps, gs=gs, pn=pn, gn=gn: align(ps, gs, None, pn, gn),
                "chamfer + fscore (separate, 1 worker)": lambda ps=ps, gs=gs: (
                    gm.chamfer_distance(ps, gs),
                    gm.fscore(ps, gs, (0.01, 0.02, 0.05)),
                ),
                "chamfer_fscore (shared, all workers)": lambda ps=ps, gs=gs: gm.chamfer_fscore(
                    ps, gs, (0.01, 0.02, 0.05), workers=-1
                ),
                "iou parity (2 meshes)": lambda gt=gt: [
                    gm.inside_ray_parity(gt.vertices, gt.faces) for _ in range(2)
                ],
            }
            for m in windings:
                parts[f"iou winding {m} (2 meshes)"] = lambda gt=gt, m=m: [
                    gm.inside_winding_number(gt.vertices, gt.faces, method=m) for _ in range(2)
                ]
            for what, fn in parts.items():
                rows.append({"what": f"  {what}", "object": n, "faces": nf, **_timeit(fn, a.repeats)})

        if not a.no_images:
            from evaluation.clip_similarity import clip_similarity
            from evaluation.lpips_vgg import LPIPSVGG, lpips_distance

            cams = load_cameras(gt_root / "cameras" / "cameras_16_elev30.json")
            torch.manual_seed(0)
            lp = LPIPSVGG().eval()
            from transformers import CLIPConfig, CLIPModel

            clip_cfg = CLIPConfig(
                vision_config=dict(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_attention_heads=16,
                    num_hidden_layers=24,
                    image_size=224,
                    patch_size=14,
                ),
                text_config=dict(
                    hidden_size=64, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1
                ),
                projection_dim=768,
            )
            clip = CLIPModel(clip_cfg).eval()  # ViT-L/14 vision tower, random weights
            for n in names:
                gt = load_gt_mesh(gt_root, n, angles.get(n, 0.0))
                views = load_views(gt_root / "objects" / n / "renders")
                for ss in (1, 2):
                    timed = _timeit(lambda gt=gt, ss=ss: render_views(gt, cams, supersample=ss), 1)
                    rows.append(
                        {
                            "what": f"image: 16 renders (supersample {ss})",
                            "object": n,
                            "faces": len(gt.faces),
                            **timed,
                        }
                    )
                rend, _ = render_views(gt, cams, supersample=1)
                for what, fn in {
                    "image: PSNR + SSIM (16 views)": lambda rend=rend, views=views: (
                        psnr(rend, views),
                        ssim(rend, views),
                    ),
                    "image: LPIPS-VGG (16 views)": lambda rend=rend, views=views: lpips_distance(
                        lp, rend, views
                    ),
                    "image: CLIP ViT-L/14 (16 views)": lambda rend=rend, views=views: clip_similarity(
                        clip, rend, views
                    ),
                }.items():
                    rows.append({"what": what, "object": n, "faces": len(gt.faces), **_timeit(fn, 1)})

        if a.full_set:
            full = Path(tmp) / "full"
            full.mkdir()
            all_names = sorted(p.name for p in (gt_root / "objects").iterdir() if (p / "model.obj").is_file())
            _write_pred(gt_root, all_names, full)
            t, c = time.perf_counter(), time.process_time()
            run = evaluate(full, gt_root, EvalConfig(frame="gt", images=False), progress=False)
            total, cpu = time.perf_counter() - t, time.process_time() - c
            rows.append(
                {
                    "what": f"CLI path, {len(all_names)} objects, geometry only",
                    "object": "all",
                    "faces": None,
                    "median_s": total,
                    "cpu_s": cpu,
                    "runs_s": [total],
                }
            )
            rows.append(
                {
                    "what": "  per object",
                    "object": "all",
                    "faces": None,
                    "median_s": total / len(all_names),
                    "cpu_s": cpu / len(all_names),
                    "runs_s": [],
                }
            )
            assert all(r.status == "ok" for r in run["results"])

    print(f"{'what':44s} {'object':10s} {'faces':>7s} {'wall s':>9s} {'cpu s':>9s}")
    for r in rows:
        cpu = r.get("cpu_s")
        cpu_s = f"{cpu:9.3f}" if cpu is not None else " " * 9
        print(f"{r['what']:44s} {r['object']:10s} {str(r['faces'] or ''):>7s} {r['median_s']:9.3f} {cpu_s}")
    peak = _peak_rss_mb()
    print(f"peak RSS {peak:.0f} MB; torch threads {torch.get_num_threads()}; load average {os.getloadavg()}")
    doc = {
        "rows": rows,
        "peak_rss_mb": peak,
        "machine": _machine(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(a.out, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
