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

Prints a table (median of ``--repeats`` runs, peak RSS) and writes JSON to
``benchmarks/results/bench_evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from evaluation import geometry_metrics as gm
from evaluation.alignment import align
from evaluation.gso import EvalConfig, GeometryConfig, evaluate, evaluate_object, load_gt_mesh
from evaluation.image_metrics import load_views, psnr, ssim
from evaluation.rendering import load_cameras, render_views
from pipeline.atomic import atomic_write_text


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--gt", default=os.environ.get("CRM_GSO_DIR", str(Path("..") / "shared" / "data" / "gso_sample"))
    )
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
    ap.add_argument("--out", default=str(Path("benchmarks") / "results" / "bench_evaluation.json"))
    a = ap.parse_args(argv)
    gt_root = Path(a.gt)
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
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_text(a.out, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
