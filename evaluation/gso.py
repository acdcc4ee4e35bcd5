"""Evaluate predicted meshes against Google Scanned Objects ground truth.

``python -m evaluation.gso --pred DIR [--gt DIR] [--out DIR]`` (``--help`` lists every option; the
protocol and the reasons for its choices are in ``docs/evaluation.md``).

Per object: load both meshes, bring the prediction into the GT frame (Z up, render-000 camera on +X),
normalise both to longest side 1 and centre their bounding boxes, rotate the GT by the rotation table,
align the prediction rigidly (coarse yaw/pitch search + ICP, or none), then

* geometry: Chamfer distance, F-score at several thresholds, volume IoU (ray parity and winding number);
* texture: unlit renders at the 16 GT cameras vs the GT renders on white: PSNR, SSIM, LPIPS-VGG, CLIP.

Geometry and rendering run per object (optionally in a process pool); LPIPS and CLIP run in the main
process on the returned renders so their weights are loaded once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .alignment import AlignConfig, align, icp
from .geometry_metrics import (
    GeometryConfig,
    chamfer_fscore,
    inside_ray_parity,
    inside_winding_number,
    sample_surface,
    volume_iou,
)
from .mesh_loading import (
    FRAMES,
    EvalMesh,
    find_prediction,
    frame_to_gt,
    list_predictions,
    load_mesh,
    normalize_unit,
    rotation_z,
)

__all__ = ["EvalConfig", "ObjectResult", "evaluate_object", "evaluate", "main", "METRIC_COLUMNS"]

NUM_VIEWS = 16
GEOMETRY_COLUMNS = ["chamfer", "fscore", "iou_parity", "iou_winding"]
IMAGE_COLUMNS = ["psnr", "ssim", "lpips", "clip"]
METRIC_COLUMNS = GEOMETRY_COLUMNS + IMAGE_COLUMNS


@dataclass
class EvalConfig:
    """Protocol options (all recorded in the output metadata).

    Attributes:
        frame: frame of the predictions: ``"auto"`` (read the record our exporter writes into the GLB /
            OBJ, else ``default_frame``), or one of ``gltf``, ``reference``, ``ccm``, ``gt``.
        default_frame: frame assumed by ``auto`` when a file records none.
        geometry: sampling, F-score thresholds, IoU grid (:class:`GeometryConfig`).
        align: alignment options (:class:`AlignConfig`).
        images: compute the image metrics (needs GT renders and the rasterizer).
        supersample: render supersampling factor (antialiasing).
        raster: rasterizer backend for :func:`pipeline.raster.get_rasterizer`.
        device: torch device for rendering / LPIPS / CLIP (None: CPU, or CUDA for nvdiffrast).
        lpips: compute LPIPS; lpips_vgg / lpips_lin: weight files (None: standard caches).
        clip: compute CLIP similarity; clip_model: HF id or local directory (offline only).
        iou_methods: which volume IoU inside tests to run.
    """

    frame: str = "auto"
    default_frame: str = "gltf"
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    images: bool = True
    supersample: int = 2
    raster: str = "auto"
    device: str | None = None
    lpips: bool = True
    lpips_vgg: str | None = None
    lpips_lin: str | None = None
    clip: bool = True
    clip_model: str = "openai/clip-vit-large-patch14"
    iou_methods: tuple[str, ...] = ("parity", "winding")


@dataclass
class ObjectResult:
    """Outcome for one object: metric values (None = not computed), status, reason, alignment."""

    name: str
    status: str = "ok"
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    fscores: dict = field(default_factory=dict)
    frame: str = ""
    alignment: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    renders: np.ndarray | None = None  # (16, H, W, 3) prediction renders on white
    gt_views: np.ndarray | None = None  # (16, H, W, 3) GT renders on white

    def row(self) -> dict:
        out = {"object": self.name, "status": self.status}
        for c in METRIC_COLUMNS:
            out[c] = self.metrics.get(c)
        for t, v in sorted(self.fscores.items()):
            out[f"fscore@{t:g}"] = v
        out["frame"] = self.frame
        out["reason"] = self.reason
        return out


def _fail(res: ObjectResult, stage: str, exc: BaseException | str) -> ObjectResult:
    res.status = "failed"
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    res.reason = f"{stage}: {msg}" if not res.reason else f"{res.reason}; {stage}: {msg}"
    return res


def load_gt_mesh(gt_root: Path, name: str, angle_deg: float) -> EvalMesh:
    """GT mesh of ``name``: normalised (longest side 1, bbox centred), rotated by ``Rz(-angle)``."""
    m = load_mesh(gt_root / "objects" / name / "model.obj")
    v, _, _ = normalize_unit(m.vertices)
    return EvalMesh(v @ rotation_z(-angle_deg).T, m.faces)


def prediction_to_gt_frame(mesh: EvalMesh, frame: str, default_frame: str) -> tuple[EvalMesh, str]:
    """Rotate a prediction into the GT frame and normalise it; returns the mesh and the frame used."""
    used = frame
    if frame == "auto":
        used = mesh.frame if mesh.frame in FRAMES else default_frame
    m = mesh.transformed(frame_to_gt(used))
    v, _, _ = normalize_unit(m.vertices)
    m.vertices = v
    return m, used


def _occupancy(mesh: EvalMesh, method: str, cfg: GeometryConfig) -> np.ndarray:
    if method == "parity":
        return inside_ray_parity(mesh.vertices, mesh.faces, cfg.iou_resolution, cfg.iou_range)
    if method == "winding":
        return inside_winding_number(
            mesh.vertices,
            mesh.faces,
            cfg.iou_resolution,
            cfg.iou_range,
            beta=cfg.winding_beta,
            method=cfg.winding_method,
        )
    raise ValueError(f"unknown IoU method {method!r}")


def evaluate_object(name: str, gt_root: str | Path, pred_path: str | Path, cfg: EvalConfig) -> ObjectResult:
    """Geometry metrics and prediction renders of one object (LPIPS / CLIP are added by the caller).

    Never raises for bad data: failures are recorded in ``status`` / ``reason``.
    """
    gt_root = Path(gt_root)
    res = ObjectResult(name)
    t0 = time.perf_counter()
    try:
        table = json.loads((gt_root / "gt_rotate_angle_deg.json").read_text())
        angle = float(table.get(name, 0.0))
    except (OSError, json.JSONDecodeError):
        angle = 0.0
    try:
        gt = load_gt_mesh(gt_root, name, angle)
    except Exception as exc:
        return _fail(res, "ground truth", exc)
    try:
        raw = load_mesh(pred_path)
        pred, res.frame = prediction_to_gt_frame(raw, cfg.frame, cfg.default_frame)
    except Exception as exc:
        return _fail(res, "prediction", exc)
    gcfg = cfg.geometry
    try:
        ps, pn = sample_surface(pred.vertices, pred.faces, gcfg.num_samples, gcfg.seed, return_normals=True)
        gs, gn = sample_surface(gt.vertices, gt.faces, gcfg.num_samples, gcfg.seed, return_normals=True)
        al = align(ps, gs, cfg.align, pn, gn)
        pred = pred.transformed(al.rotation, al.translation)
        ps, pn = al.apply(ps), pn @ al.rotation.T
        res.alignment = al.to_dict()
        if cfg.align.method != "none":
            # A rotation changes the bounding box: normalise again in the aligned pose, then refine.
            v, scale, shift = normalize_unit(pred.vertices)
            pred.vertices = v
            ps = ps * scale + shift
            r2, t2, resid = icp(
                ps,
                gs,
                np.eye(3),
                np.zeros(3),
                cfg.align.icp_iters,
                cfg.align.icp_tol,
                cfg.align.icp_points,
                cfg.align.seed + 2,
                pn,
                gn,
            )
            pred = pred.transformed(r2, t2)
            ps = ps @ r2.T + t2
            total = np.eye(4)
            total[:3, :3] = r2 @ (scale * al.rotation)
            total[:3, 3] = r2 @ (scale * al.translation + shift) + t2
            res.alignment.update(
                matrix=np.round(total, 6).tolist(), renormalize_scale=float(scale), residual=float(resid)
            )
        res.seconds["align"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        cd, fs = chamfer_fscore(ps, gs, gcfg.fscore_thresholds, gcfg.workers)
        res.metrics["chamfer"] = float(cd)
        res.fscores = {t: float(v) for t, v in fs.items()}
        res.metrics["fscore"] = res.fscores.get(float(gcfg.headline_threshold))
        for method in cfg.iou_methods:
            occ_p = _occupancy(pred, method, gcfg)
            occ_g = _occupancy(gt, method, gcfg)
            res.metrics[f"iou_{method}"] = float(volume_iou(occ_p, occ_g))
        res.seconds["geometry"] = time.perf_counter() - t1
    except Exception as exc:
        return _fail(res, "geometry", exc)
    if cfg.images:
        t2 = time.perf_counter()
        try:
            from .image_metrics import load_views, psnr, ssim
            from .rendering import load_cameras, render_views

            res.gt_views = load_views(gt_root / "objects" / name / "renders", NUM_VIEWS)
            cams = load_cameras(gt_root / "cameras" / "cameras_16_elev30.json")
            rast = _rasterizer(cfg)
            res.renders, _ = render_views(pred, cams, rast, supersample=cfg.supersample)
            res.metrics["psnr"] = float(psnr(res.renders, res.gt_views).mean())
            res.metrics["ssim"] = float(ssim(res.renders, res.gt_views).mean())
        except Exception as exc:
            _fail(res, "images", exc)
        res.seconds["images"] = time.perf_counter() - t2
    res.seconds["total"] = time.perf_counter() - t0
    return res


_RAST = {}


def _rasterizer(cfg: EvalConfig):
    from pipeline.raster import get_rasterizer

    key = (cfg.raster, cfg.device)
    if key not in _RAST:
        _RAST[key] = get_rasterizer(cfg.raster, device=cfg.device)
    return _RAST[key]


def _worker(args) -> ObjectResult:
    name, gt_root, pred_path, cfg = args
    try:
        return evaluate_object(name, gt_root, pred_path, cfg)
    except Exception as exc:  # defensive: a worker must always answer
        return _fail(ObjectResult(name), "internal", f"{exc}\n{traceback.format_exc(limit=3)}")


def gt_objects(gt_root: Path) -> list[str]:
    """Object names with a folder under ``gt_root/objects``."""
    d = gt_root / "objects"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


@dataclass
class ImageModels:
    """LPIPS / CLIP models (None where unavailable) and why a column is empty."""

    lpips: object | None = None
    clip: object | None = None
    notes: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def load_image_models(cfg: EvalConfig) -> ImageModels:
    """Load the LPIPS and CLIP models that are enabled and available; record reasons otherwise."""
    im = ImageModels()
    if not cfg.images:
        im.notes["lpips"] = im.notes["clip"] = "image metrics disabled (--no-images)"
        return im
    if cfg.lpips:
        from .lpips_vgg import find_lpips_weights, load_lpips_vgg

        try:
            im.lpips = load_lpips_vgg(cfg.lpips_vgg, cfg.lpips_lin)
            vgg, lin = find_lpips_weights(cfg.lpips_vgg, cfg.lpips_lin)
            im.files["lpips"] = {"vgg": str(vgg), "lin": str(lin)}
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
            im.notes["lpips"] = str(exc)
    else:
        im.notes["lpips"] = "disabled (--no-lpips)"
    if cfg.clip:
        from .clip_similarity import load_clip

        try:
            im.clip = load_clip(cfg.clip_model)
            im.files["clip"] = cfg.clip_model
        except FileNotFoundError as exc:
            im.notes["clip"] = str(exc)
    else:
        im.notes["clip"] = "disabled (--no-clip)"
    return im


def add_model_metrics(res: ObjectResult, models: ImageModels) -> None:
    """Fill LPIPS and CLIP columns of ``res`` from its renders (in place)."""
    if res.renders is None or res.gt_views is None:
        return
    if models.lpips is not None:
        from .lpips_vgg import lpips_distance

        res.metrics["lpips"] = float(lpips_distance(models.lpips, res.renders, res.gt_views).mean())
    if models.clip is not None:
        from .clip_similarity import clip_similarity

        res.metrics["clip"] = float(clip_similarity(models.clip, res.renders, res.gt_views).mean())


def evaluate(
    pred_dir: str | Path,
    gt_root: str | Path,
    cfg: EvalConfig,
    objects: list[str] | None = None,
    jobs: int = 1,
    progress: bool = True,
    models: ImageModels | None = None,
) -> dict:
    """Evaluate every object present in both ``pred_dir`` and ``gt_root``.

    Returns:
        ``{"results": [ObjectResult], "only_pred": [...], "only_gt": [...], "notes": {...},
        "files": {...}, "seconds": float}``.
    """
    from tqdm.auto import tqdm

    pred_dir, gt_root = Path(pred_dir), Path(gt_root)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction directory not found: {pred_dir}")
    if not (gt_root / "objects").is_dir():
        raise FileNotFoundError(f"ground-truth directory has no objects/ folder: {gt_root}")
    gt_names = gt_objects(gt_root)
    pred_names = list_predictions(pred_dir)
    if objects:
        gt_names = [n for n in gt_names if n in objects]
        pred_names = [n for n in pred_names if n in objects]
    both = [n for n in gt_names if n in pred_names]
    only_pred = [n for n in pred_names if n not in gt_names]
    only_gt = [n for n in gt_names if n not in pred_names]
    models = models if models is not None else load_image_models(cfg)
    tasks = [(n, str(gt_root), str(find_prediction(pred_dir, n)), cfg) for n in both]
    t0 = time.perf_counter()
    results: list[ObjectResult] = []
    bar = tqdm(total=len(tasks), desc="gso eval", unit="obj", disable=not progress)
    if jobs > 1 and len(tasks) > 1:
        # one KD-tree query thread per process: the processes already use the cores
        one = replace(cfg, geometry=replace(cfg.geometry, workers=1))
        tasks = [(n, g, p, one) for n, g, p, _ in tasks]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for res in pool.map(_worker, tasks):
                add_model_metrics(res, models)
                results.append(res)
                bar.update(1)
    else:
        for task in tasks:
            res = _worker(task)
            add_model_metrics(res, models)
            results.append(res)
            bar.update(1)
    bar.close()
    return {
        "results": results,
        "only_pred": only_pred,
        "only_gt": only_gt,
        "notes": models.notes,
        "files": models.files,
        "seconds": time.perf_counter() - t0,
    }


def _default_gt() -> str:
    return os.environ.get("CRM_GSO_DIR", str(Path("..") / "shared" / "data" / "gso_sample"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.gso",
        description=(
            "Score predicted meshes against Google Scanned Objects ground truth: Chamfer distance, "
            "F-score, volume IoU (geometry) and PSNR, SSIM, LPIPS, CLIP similarity of renders at the 16 "
            "GT cameras (texture). Writes per-object CSV/JSON, a Markdown table, plots and metadata. "
            "Protocol: docs/evaluation.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--pred",
        required=True,
        help="prediction folder: <name>.glb|.obj|.gltf|.ply, or <name>/ holding one mesh "
        "(the batch pipeline's <id>/mesh.glb + mesh.obj; GLB preferred)",
    )
    p.add_argument(
        "--gt",
        default=_default_gt(),
        help="ground-truth folder in the gso_sample layout: objects/<name>/{model.obj,renders/000..015.png}, "
        "cameras/cameras_16_elev30.json, gt_rotate_angle_deg.json (default: $CRM_GSO_DIR or "
        "../shared/data/gso_sample)",
    )
    p.add_argument("--out", default=str(Path("out") / "eval-gso"), help="output folder")
    p.add_argument("--objects", default=None, help="comma-separated subset of object names")
    p.add_argument(
        "--frame",
        default="auto",
        choices=["auto", *FRAMES],
        help="frame of the predictions: auto reads the record our exporter writes (GLB asset.extras, OBJ "
        "header); gltf = Y up, front +Z; reference = CRM's export, Y up, front -Z; ccm = Z up, front +Y; "
        "gt = already in the GT frame",
    )
    p.add_argument(
        "--default-frame",
        default="gltf",
        choices=list(FRAMES),
        help="frame assumed by --frame auto when a file records none",
    )
    p.add_argument(
        "--align",
        default="icp",
        choices=["icp", "none"],
        help="icp: coarse yaw/pitch search then rigid ICP (transform reported per object); none: frames only",
    )
    p.add_argument("--samples", type=int, default=100_000, help="surface samples per mesh (Chamfer, F-score)")
    p.add_argument("--seed", type=int, default=0, help="seed of surface sampling and alignment subsampling")
    p.add_argument(
        "--fscore-thresholds",
        default="0.01,0.02,0.05",
        help="F-score distance thresholds in the unit frame (longest side 1), comma-separated",
    )
    p.add_argument("--headline-threshold", type=float, default=0.02, help="threshold of the 'fscore' column")
    p.add_argument(
        "--iou-resolution", type=int, default=64, help="volume IoU grid nodes per axis over [-1,1]^3"
    )
    p.add_argument(
        "--iou-methods",
        default="parity,winding",
        help="volume IoU inside tests: parity (ray crossing parity, published-number compatible) and/or "
        "winding (generalised winding number, robust to holes)",
    )
    p.add_argument(
        "--winding-method",
        default="fast",
        choices=["fast", "exact", "tree"],
        help="evaluation of the winding number test: fast (exact via signed ray crossings + boundary cap), "
        "exact (all solid angles, slow reference), tree (BVH dipole approximation)",
    )
    p.add_argument("--no-images", action="store_true", help="skip rendering and all image metrics")
    p.add_argument("--supersample", type=int, default=2, help="render supersampling factor (antialiasing)")
    p.add_argument(
        "--raster", default="auto", choices=["auto", "torch", "nvdiffrast"], help="rasterizer backend"
    )
    p.add_argument(
        "--device", default=None, help="torch device for rendering, LPIPS and CLIP (e.g. cpu, cuda)"
    )
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument(
        "--lpips-vgg",
        default=None,
        help="torchvision VGG16 weights vgg16-397923af.pth (default: $TORCH_HOME/hub/checkpoints)",
    )
    p.add_argument(
        "--lpips-lin",
        default=None,
        help="LPIPS v0.1 linear-layer weights vgg.pth (default: an installed lpips package's weights/v0.1)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip CLIP similarity")
    p.add_argument(
        "--clip-model",
        default="openai/clip-vit-large-patch14",
        help="transformers CLIPModel: Hugging Face id (read from the local cache only) or local directory",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes over objects")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(a: argparse.Namespace) -> EvalConfig:
    thresholds = tuple(float(x) for x in a.fscore_thresholds.split(",") if x.strip())
    if a.headline_threshold not in thresholds:
        thresholds = tuple(sorted({*thresholds, a.headline_threshold}))
    methods = tuple(m.strip() for m in a.iou_methods.split(",") if m.strip())
    for m in methods:
        if m not in ("parity", "winding"):
            raise SystemExit(f"--iou-methods: unknown method {m!r} (expected parity, winding)")
    return EvalConfig(
        frame=a.frame,
        default_frame=a.default_frame,
        geometry=GeometryConfig(
            num_samples=a.samples,
            seed=a.seed,
            fscore_thresholds=thresholds,
            headline_threshold=a.headline_threshold,
            iou_resolution=a.iou_resolution,
            winding_method=a.winding_method,
        ),
        align=AlignConfig(method=a.align, seed=a.seed),
        images=not a.no_images,
        supersample=a.supersample,
        raster=a.raster,
        device=a.device,
        lpips=not a.no_lpips,
        lpips_vgg=a.lpips_vgg,
        lpips_lin=a.lpips_lin,
        clip=not a.no_clip,
        clip_model=a.clip_model,
        iou_methods=methods,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 some objects failed, 2 bad arguments)."""
    from .report import write_report

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    objects = [o.strip() for o in args.objects.split(",")] if args.objects else None
    try:
        run = evaluate(args.pred, args.gt, cfg, objects, max(1, args.jobs), progress=not args.quiet)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {"command": ["python", "-m", "evaluation.gso", *(argv if argv is not None else sys.argv[1:])]}
    paths = write_report(
        run, cfg, args.out, pred_dir=args.pred, gt_dir=args.gt, plots=not args.no_plots, extra=meta
    )
    results = run["results"]
    ok = [r for r in results if r.status == "ok"]
    print(f"evaluated {len(results)} objects ({len(ok)} ok) in {run['seconds']:.1f} s -> {paths['markdown']}")
    for r in results:
        if r.status != "ok":
            print(f"  failed {r.name}: {r.reason}")
    if run["only_pred"]:
        print(f"  predictions without ground truth (skipped): {', '.join(run['only_pred'])}")
    if run["only_gt"]:
        print(f"  ground truth without prediction (skipped): {', '.join(run['only_gt'])}")
    for col, note in run["notes"].items():
        print(f"  {col} column empty: {note}")
    if not results:
        print("no object found on both sides", file=sys.stderr)
        return 1
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
